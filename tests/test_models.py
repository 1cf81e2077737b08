"""Real transformers models (GPT-2 with Conv1D, LLaMA, BERT; built from configs): every method through
spectral_kernels.inject and through peft + spectral_kernels.peft.swap, against peft itself: logits, gradients,
the losses of a few optimizer steps, and merging the trained adapters."""
import copy
import gc
import pickle
import warnings
import weakref

import peft
import pytest
import torch
from torch.autograd import forward_ad
from transformers.pytorch_utils import Conv1D

import spectral_kernels as sk
from spectral_kernels import dispatch
from spectral_kernels.peft import swap

from conftest import assert_close, selective_checkpointing
from test_inject import bert, gpt2, llama, peft_config, tokens

CONFIGS = {
    "fourierft": lambda targets: sk.FourierFTConfig(n_frequency=64, target_modules=targets, init_weights=False),
    "oft": lambda targets: sk.OFTConfig(oft_block_size=8, target_modules=targets, init_weights=False),
    "frod": lambda targets: sk.FrodConfig(target_modules=targets, init_weights=False, sparse_rate=0.05,
                                          progressbar=False),
}
MODELS = {"gpt2": (gpt2, "all-linear"), "llama": (llama, "all-linear"), "bert": (bert, None)}
ADAPTER_KEYS = ("fourierft_", "oft_R", "frod_")
STEPS = 3


def conv1d_as_linear(model):
    """``model`` with every Conv1D replaced by the equivalent nn.Linear (peft's OFT does not take Conv1D)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, Conv1D):
            linear = torch.nn.Linear(*module.weight.shape)
            with torch.no_grad():
                linear.weight.copy_(module.weight.t())
                linear.bias.copy_(module.bias)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, linear)
    return model


def batch(model):
    ids = tokens(model, 9)
    if model.config.model_type == "bert":
        return {"input_ids": ids, "labels": torch.tensor([0, 2])}
    return {"input_ids": ids, "labels": ids}


def train(model, inputs):
    """(logits and gradients of the first step, the loss of every step) of AdamW on the trainable parameters."""
    params = {n.removeprefix("base_model.model."): p for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(params.values(), lr=1e-2)
    losses, first = [], None
    for _ in range(STEPS):
        optimizer.zero_grad()
        out = model(**inputs)
        out.loss.backward()
        if first is None:
            first = out.logits.detach(), {n: p.grad.clone() for n, p in params.items()}
        optimizer.step()
        losses.append(out.loss.item())
    return first, losses


@pytest.mark.parametrize("method", list(CONFIGS))
@pytest.mark.parametrize("model_name", list(MODELS))
def test_model_against_peft(model_name, method):
    make, targets = MODELS[model_name]
    config = CONFIGS[method](targets)
    base = make()
    # peft's OFT takes no Conv1D: GPT-2's reference is peft on the same model with its Conv1Ds as Linears.
    peft_base = conv1d_as_linear(copy.deepcopy(base)) if method == "oft" else copy.deepcopy(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(peft_base, peft_config(config))
    swapped = swap(copy.deepcopy(theirs))
    ours = sk.inject(copy.deepcopy(base), config)
    state = {k.removeprefix("base_model.model.").removeprefix("base_model."): v for k, v in theirs.state_dict().items()}
    adapter_state = {k: v for k, v in state.items() if any(p in k for p in ADAPTER_KEYS)}
    assert adapter_state and adapter_state.keys() <= ours.state_dict().keys()
    ours.load_state_dict(adapter_state, strict=False)

    inputs = batch(base)
    (expected_logits, expected_grads), expected_losses = train(theirs, inputs)
    for model in (ours, swapped):
        (logits, grads), losses = train(model, inputs)
        assert_close(logits, expected_logits, torch.float32)
        assert grads.keys() == expected_grads.keys() and grads
        for name, grad in grads.items():  # through a whole model: float32 rounding adds up over the layers
            assert_close(grad, expected_grads[name], torch.float32, tol=1e-4)
        for loss, expected in zip(losses, expected_losses):
            assert abs(loss - expected) <= 2e-5 * max(1.0, abs(expected)), (losses, expected_losses)
    assert expected_losses[-1] < expected_losses[0]

    # merged into the base weights, the trained adapters give the same logits
    with torch.no_grad():
        expected = ours(**inputs).logits
        assert_close(sk.merge_and_unload(ours)(**inputs).logits, expected, torch.float32)
        expected = swapped(**inputs).logits
        assert_close(swapped.merge_and_unload()(**inputs).logits, expected, torch.float32)


def first_step(model, ids):
    """The loss and the trainable parameters' gradients of one training step."""
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


CHECKPOINTING = {"reentrant": {"use_reentrant": True}, "non-reentrant": {"use_reentrant": False},
                 "selective": {"use_reentrant": False, "context_fn": selective_checkpointing}}


@pytest.mark.parametrize("method", list(CONFIGS))
@pytest.mark.parametrize("kind", list(CHECKPOINTING))
def test_gradient_checkpointing(method, kind):
    """transformers' gradient checkpointing (the forward of each decoder layer run again in the backward) gives
    the gradients of a plain step, for inject and for peft + swap; so does selective checkpointing, whose recompute
    takes kept outputs in the order of the first run, the layers' first call there."""
    config = CONFIGS[method]("all-linear")
    ours = sk.inject(llama(), config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        swapped = swap(peft.get_peft_model(llama(), peft_config(config)))
    ids = tokens(ours, 9)
    for model in (ours.train(), swapped.train()):  # transformers checkpoints in training mode only
        loss, grads = first_step(copy.deepcopy(model), ids)
        checkpointed = copy.deepcopy(model)
        checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs=CHECKPOINTING[kind])
        checkpointed.enable_input_require_grads()  # the reentrant variant needs an input that requires grad
        checkpointed_loss, checkpointed_grads = first_step(checkpointed, ids)
        assert checkpointed_loss == loss and grads and checkpointed_grads.keys() == grads.keys()
        for name, grad in grads.items():
            assert_close(checkpointed_grads[name], grad, torch.float32)


class _Doubled(torch.nn.Module):
    def forward(self, weight):
        return 2 * weight


class _OneLayer(torch.nn.Module):
    def __init__(self, in_features=24, out_features=16):
        super().__init__()
        self.proj = torch.nn.Linear(in_features, out_features)

    def forward(self, x):
        return self.proj(x)


@pytest.mark.parametrize("method", list(CONFIGS))
def test_eval_cache_sees_swapped_and_parametrized_weights(method):
    """The eval cache reads a layer's tensors from the modules' registries (see layers/base.py: member): tensors
    swapped there by torch.func.functional_call, and a base weight computed by a parametrization, give what the
    layer computes without the cache (FRoD replaces the base weight: there only the swap matters)."""
    torch.manual_seed(0)
    model = sk.inject(_OneLayer(), CONFIGS[method](["proj"])).eval()
    x = torch.randn(5, 24)
    swapped = {name: p.detach() + 0.05 * torch.randn_like(p) for name, p in model.named_parameters()}
    uncached = copy.deepcopy(model)
    uncached.proj.cache_effective_weight = False
    with torch.no_grad():
        model(x)  # the cache now holds the weight of the parameters before the swap
        for name, p in uncached.named_parameters():
            p.copy_(swapped[name])
        expected = uncached(x)
        assert_close(torch.func.functional_call(model, swapped, (x,)), expected, torch.float32)
        for name, p in model.named_parameters():
            p.copy_(swapped[name])
        for layer in (model, uncached):
            torch.nn.utils.parametrize.register_parametrization(layer.proj.base_layer, "weight", _Doubled())
        doubled = uncached(x)
        assert_close(model(x), doubled, torch.float32)
        assert torch.allclose(doubled, expected) == (method == "frod")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("method", list(CONFIGS))
def test_eval_cache_sees_new_tensors_at_old_addresses(method, dtype):
    """A tensor that replaces a parameter may get the memory of the one the cache was built from, at the same
    version (load_state_dict(assign=True), Module.half().float(): the allocator hands freed blocks back), and
    the cache must see it. Forced here with numpy-backed parameters: the new ones share the old ones' memory,
    not their storage."""
    torch.manual_seed(0)
    model = sk.inject(_OneLayer().to(dtype), CONFIGS[method](["proj"])).eval()
    uncached = copy.deepcopy(model)
    uncached.proj.cache_effective_weight = False
    arrays = {name: p.detach().numpy().copy() for name, p in model.named_parameters()}

    def load(layer):
        layer.load_state_dict({name: torch.from_numpy(a) for name, a in arrays.items()}, strict=False, assign=True)

    x = torch.randn(5, 24, dtype=dtype)
    with torch.no_grad():
        load(model)
        before = model(x)  # the cache now holds the weight built from the arrays' old values
        for a in arrays.values():
            a += 0.05 * torch.randn(a.shape).numpy()  # behind the version counter of every tensor on them
        load(model)
        load(uncached)
        changed = uncached(x)
        assert not torch.allclose(changed, before)
        assert_close(model(x), changed, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("method", list(CONFIGS))
def test_eval_cache_with_several_active_adapters(method, dtype, monkeypatch):
    """Several active adapters fold into one eval weight, built once and rebuilt when one of them changes, with the
    training forward's result. FRoD rebuilt every adapter's W' on every call (one cache slot, keys taking turns):
    slower than with the cache off; OFT rotated x by all but the last adapter on every call."""
    import spectral_kernels.layers.oft as oft_layer

    torch.manual_seed(0)
    model = sk.inject(_OneLayer().to(dtype), CONFIGS[method](["proj"]))
    sk.inject(model, CONFIGS[method](["proj"]), "other")
    sk.set_adapter(model, ["default", "other"])
    layer, x = model.proj, torch.randn(5, 24, dtype=dtype)
    builds, rotations = [], []
    build = layer._summed_weight if method == "frod" else layer._rotate_weight if method == "oft" else \
        layer._effective_weight
    monkeypatch.setattr(layer, build.__name__, lambda *args: builds.append(1) or build(*args))
    rotate = oft_layer.oft_rotate
    monkeypatch.setattr(oft_layer, "oft_rotate", lambda *args: rotations.append(1) or rotate(*args))
    expected = model(x).detach()
    rotations.clear()
    model.eval()
    with torch.no_grad():
        outputs = [model(x) for _ in range(3)]
        for y in outputs:
            assert_close(y, expected, dtype)
        assert builds == [1] and not rotations
        next(p for n, p in layer.named_parameters() if ".other" in n).mul_(1.5)  # an optimizer step
        changed = model(x)
    assert builds == [1, 1] and not torch.allclose(changed, expected)
    model.train()
    assert_close(changed, model(x), dtype)


@pytest.mark.parametrize("method", list(CONFIGS))
def test_eval_cache_checks_input_as_the_op(method):
    """The eval cache runs its own GEMM instead of the fused op: bad input gets the op's errors there too, not
    torch's from inside F.linear (FRoD takes any floating-point dtype, as its op and peft's layer do)."""
    layer = sk.inject(_OneLayer(), CONFIGS[method](["proj"])).proj
    x = torch.randn(3, 24)
    bad = [(x[:, :23], ValueError, "in_features=24"), (x.long(), TypeError, "floating-point"),
           (x.to("meta"), RuntimeError, "different devices")]
    if method != "frod":
        bad.append((x.double(), TypeError, "same dtype"))
    for mode in (True, False):
        layer.train(mode)
        with torch.no_grad():
            for bad_x, error, match in bad:
                with pytest.raises(error, match=match):
                    layer(bad_x)


@pytest.mark.parametrize("method", list(CONFIGS))
def test_compile_dynamic_shapes(method):
    """torch.compile(dynamic=True, fullgraph=True) traces the layers without a graph break at symbolic token counts
    and scalings (FourierFT's finiteness check of the scaling broke the graph), and computes what eager does."""
    torch._dynamo.reset()
    model = sk.inject(_OneLayer(), CONFIGS[method](["proj"]))
    compiled = torch.compile(model, fullgraph=True, dynamic=True, backend="aot_eager")
    params = [p for p in model.parameters() if p.requires_grad]
    for tokens in (5, 9):
        x = torch.randn(2, tokens, 24)
        results = []
        for module in (model, compiled):
            y = module(x)
            results.append((y, torch.autograd.grad(y.square().sum(), params)))
        (expected, expected_grads), (y, grads) = results
        assert_close(y, expected, torch.float32)
        for got, want in zip(grads, expected_grads):
            assert_close(got, want, torch.float32)
    if method == "fourierft":
        op = torch.compile(sk.fourierft_linear, fullgraph=True, dynamic=True, backend="aot_eager")
        layer, x = model.proj, torch.randn(3, 24)
        args = (layer.base_layer.weight, layer.base_layer.bias, layer.fourierft_spectrum["default"],
                layer.indices["default"])
        for scaling in (150.0, 100.0):
            assert_close(op(x, *args, scaling), sk.fourierft_linear(x, *args, scaling), torch.float32)


def _traced_paths(model, x, dynamic):
    """The paths (string arguments) of the fused ops in the graph torch.compile traces for ``model(x)``."""
    torch._dynamo.reset()
    paths = []

    def backend(graph_module, example_inputs):
        paths.extend(arg for node in graph_module.graph.nodes if "spectral_kernels" in str(node.target)
                     for arg in node.args if arg in (*dispatch.FOURIERFT_PATHS, *dispatch.OFT_PATHS,
                                                     *dispatch.FROD_PATHS))
        return graph_module

    torch.compile(model, backend=backend, fullgraph=True, dynamic=dynamic)(x)
    return paths


@pytest.mark.parametrize("method", list(CONFIGS))
def test_compile_dynamic_shapes_choose_paths_by_size(method):
    """With symbolic token counts, torch.compile picks each op's path by the traced size, as eager (and a static
    graph) does: dynamo before torch 2.12 reports torch.compiler.is_exporting() as True under torch.compile,
    which sent every size to torch.export's choice, the path for few tokens."""
    model = sk.inject(_OneLayer(), CONFIGS[method](["proj"]))
    chosen = [_traced_paths(model, torch.randn(tokens, 24), dynamic=False) for tokens in (3, 70)]
    assert chosen[0] != chosen[1]  # both sides of the threshold
    for tokens, static in zip((3, 70), chosen):
        assert _traced_paths(model, torch.randn(tokens, 24), dynamic=True) == static


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("strict", [False, True], ids=["non-strict", "strict"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("method", list(CONFIGS))
def test_export_dynamic_token_counts(method, training, strict, dtype, monkeypatch):
    """torch.export (traced by dynamo or not) with a dynamic token count gives one program for the whole range:
    the paths chosen by size (and FourierFT's kept spectrum, here with chunks of 20 tokens) are not guarded on the
    traced size, and the program computes what eager does, on both sides of every threshold, gradients
    included."""
    monkeypatch.setitem(dispatch.FOURIERFT_CHUNK_BYTES, "cpu", 8 * (16 // 2 + 24 // 2 + 2) * 20)
    model = sk.inject(_OneLayer().to(dtype), CONFIGS[method](["proj"])).train(training)
    tokens = torch.export.Dim("tokens", min=2, max=4096)
    program = torch.export.export(model, (torch.randn(5, 24, dtype=dtype),), dynamic_shapes=({0: tokens},),
                                  strict=strict).module()
    params = dict(model.named_parameters())
    exported = {name: p for name, p in program.named_parameters() if params[name].requires_grad}
    for count in (3, 12, 30, 70):  # below and above the paths' thresholds and one chunk
        x = torch.randn(count, 24, dtype=dtype, requires_grad=True)
        results = []
        for module, trained in ((model, [params[name] for name in exported]), (program, list(exported.values()))):
            y = module(x)
            results.append((y, torch.autograd.grad(y.square().sum(), [x, *trained]) if training else ()))
        (expected, expected_grads), (y, grads) = results
        assert_close(y, expected, dtype)
        for got, want in zip(grads, expected_grads):
            assert_close(got, want, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("method", list(CONFIGS))
def test_delta_weight_is_differentiable_like_peft(method, dtype):
    """get_delta_weight carries gradients to the adapter's parameters as peft's does (a regulariser on ΔW trains
    them): the same ΔW and the same gradients."""
    base = _OneLayer().to(dtype)
    config = CONFIGS[method](["proj"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(copy.deepcopy(base), peft_config(config)).base_model.model
    ours = sk.inject(copy.deepcopy(base), config)
    ours.load_state_dict(theirs.state_dict(), strict=False)  # FRoD's projections are the same values
    results = []
    for model in (ours, theirs):
        delta = model.proj.get_delta_weight("default")
        delta.square().sum().backward()
        results.append((delta.detach(), {n: p.grad for n, p in model.proj.named_parameters() if p.requires_grad}))
    (delta, grads), (expected_delta, expected_grads) = results
    assert delta.dtype == expected_delta.dtype == dtype
    # peft builds FourierFT's dW in float32 whatever the spectrum's dtype (ours in float64 for float64)
    tolerance = torch.float32 if method == "fourierft" else dtype
    assert_close(delta, expected_delta, tolerance)
    assert grads.keys() == expected_grads.keys() and grads
    for name, grad in grads.items():
        assert_close(grad, expected_grads[name], tolerance)


def _fresh(model, x):
    """``model(x)`` with autograd on: the fused op, never the eval cache."""
    with torch.enable_grad():
        return model(x).detach()


@pytest.mark.parametrize("method", list(CONFIGS))
def test_eval_cache_sees_writes_without_versions(method):
    """Writes that skip version counters: a fused optimizer step (torch.optim's fused=True, transformers'
    default) is seen with the layer in eval mode throughout and with training in between (OFT kept its rotations
    across both); a write through .data is seen once the layer trained or the cache was turned off, as the
    README advises (turning it off dropped nothing, and OFT kept its rotations in training)."""
    torch.manual_seed(0)
    model = sk.inject(_OneLayer(), CONFIGS[method](["proj"])).eval()
    layer, x = model.proj, torch.randn(5, 24)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=0.1, fused=True)
    for train_between in (False, True):
        with torch.no_grad():
            before = model(x)
        model.train(train_between)
        with torch.no_grad():
            model(x)
        model(x).square().sum().backward()
        versions = [p._version for p in params]
        optimizer.step()
        assert [p._version for p in params] == versions  # what the cache cannot see by versions
        optimizer.zero_grad()
        model.eval()
        expected = _fresh(model, x)
        assert not torch.allclose(expected, before)
        with torch.no_grad():
            assert_close(model(x), expected, torch.float32)
    for way in ("train", "cache off"):
        with torch.no_grad():
            model(x)
            if way == "train":
                model.train()
                model(x)
            else:
                layer.cache_effective_weight = False
            for p in params:
                p.data.mul_(1.5)
            model.eval()
            layer.cache_effective_weight = True
            expected = _fresh(model, x)
            assert_close(model(x), expected, torch.float32)


@pytest.mark.parametrize("method", list(CONFIGS))
def test_eval_cache_keys(method):
    """What the eval weight depends on besides the tensors' versions: their layout (a square weight and its
    transpose share storage, address and version), autocast's dtype (FRoD kept a bfloat16 weight for float32
    calls after an autocast call, and refused them), and OFT's Cayley settings."""
    torch.manual_seed(0)
    model = sk.inject(_OneLayer(16, 16), CONFIGS[method](["proj"])).eval()
    layer, x = model.proj, torch.randn(5, 16)
    with torch.no_grad():
        with torch.autocast("cpu", torch.bfloat16):
            model(x)  # the eval weight built under autocast
        assert_close(model(x), _fresh(model, x), torch.float32)
        transposed = {"proj.base_layer.weight": layer.base_layer.weight.detach().t()}
        assert_close(torch.func.functional_call(model, transposed, (x,)),
                     _fresh(lambda v: torch.func.functional_call(model, transposed, (v,)), x), torch.float32)
        if method == "oft":
            rotation = layer.oft_R["default"]
            for setting, value in (("num_cayley_neumann_terms", 2), ("use_cayley_neumann", False)):
                setattr(rotation, setting, value)
                assert_close(model(x), _fresh(model, x), torch.float32)


@pytest.mark.parametrize("method", list(CONFIGS))
def test_forward_mode_ad(method):
    """Forward-mode AD (torch.func.jvp, torch.autograd.forward_ad) through a layer gives the directional
    derivative in every mode, as through peft's layers: under no_grad the ops' bare forward dropped the tangents
    and the eval cache the parameters' (silently), or failed on torch.func's wrapped tensors. Against central
    differences, in float64. FRoD's, peft's sparse products, fail loudly in every mode, as peft's layer does."""
    torch.manual_seed(0)
    model = sk.inject(_OneLayer().double(), CONFIGS[method](["proj"]))
    params = dict(model.named_parameters())
    name, param = next((n, p.detach()) for n, p in params.items() if p.requires_grad)
    x, tx = torch.randn(5, 24, dtype=torch.float64), torch.randn(5, 24, dtype=torch.float64)
    tp = torch.randn_like(param)

    def f(x, p):
        return torch.func.functional_call(model, {**params, name: p}, (x,))

    def dual():
        with forward_ad.dual_level():
            return forward_ad.unpack_dual(f(forward_ad.make_dual(x, tx), forward_ad.make_dual(param, tp))).tangent

    eps = 1e-6
    with torch.no_grad():
        expected = (f(x + eps * tx, param + eps * tp) - f(x - eps * tx, param - eps * tp)) / (2 * eps)
    for training in (True, False):
        model.train(training)
        for grad in (True, False):
            with torch.set_grad_enabled(grad):
                for jvp in (lambda: torch.func.jvp(f, (x, param), (tx, tp))[1], dual):
                    if method == "frod":  # peft's sparse products have no forward-mode formula
                        with pytest.raises(NotImplementedError, match="forward AD"):
                            jvp()
                    else:
                        assert_close(jvp(), expected, torch.float32)


ADAPTER_PARAMETER = {"fourierft": ("fourierft_spectrum", "default"), "oft": ("oft_R.default", "weight"),
                     "frod": ("frod_lambda_l", "default")}


@pytest.mark.parametrize("method", list(CONFIGS))
def test_parametrized_adapter_parameter(method):
    """An adapter parameter under torch.nn.utils.parametrize is used as its parametrization computes it, as in
    peft: FourierFT's layer left the adapter out (silently) and FRoD's failed."""
    torch.manual_seed(0)
    model = sk.inject(_OneLayer(), CONFIGS[method](["proj"]))
    doubled = copy.deepcopy(model)
    table, name = ADAPTER_PARAMETER[method]
    with torch.no_grad():
        getattr(doubled.proj.get_submodule(table), name).mul_(2)
    torch.nn.utils.parametrize.register_parametrization(model.proj.get_submodule(table), name, _Doubled())
    x = torch.randn(5, 24)
    for training in (True, False):
        model.train(training)
        doubled.train(training)
        assert_close(model(x), doubled(x), torch.float32)
        with torch.no_grad():
            assert_close(model(x), doubled(x), torch.float32)


class _Halved(torch.nn.Linear):
    def forward(self, x):
        return super().forward(x) / 2


def _hooked(model):
    model.proj.register_forward_hook(lambda module, args, out: 3 * out)
    return model


def _weight_norm(model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.nn.utils.weight_norm(model.proj)
    return model


@pytest.mark.parametrize("case", [_hooked, _weight_norm, lambda m: m], ids=["hook", "weight_norm", "subclass"])
@pytest.mark.parametrize("method", list(CONFIGS))
def test_base_layer_called_like_peft(method, case):
    """Where calling the base layer does more than its product (a hook, weight_norm's recomputation, an nn.Linear
    subclass's own forward), FourierFT's and OFT's layers call it as peft's do (they used to compute the product
    alone); FRoD's replaces it, as peft's does. The same outputs and gradients as peft's layers."""
    def base():  # weight_norm's modules cannot be deep-copied
        torch.manual_seed(0)
        model = _OneLayer()
        if case.__name__ == "<lambda>":
            model.proj = _Halved(24, 16)
        return case(model)

    config = CONFIGS[method](["proj"])
    theirs = peft.get_peft_model(base(), peft_config(config)).base_model.model
    ours = sk.inject(base(), config)
    ours.load_state_dict(theirs.state_dict(), strict=False)
    for model in (ours, theirs):
        if case is _weight_norm:
            with torch.no_grad():
                model.proj.base_layer.weight_g.mul_(2)
    x = torch.randn(5, 24)
    results = []
    for model in (ours, theirs):
        y = model(x.requires_grad_())
        trained = [p for p in model.parameters() if p.requires_grad]
        results.append((y.detach(), torch.autograd.grad(y.square().sum(), [x, *trained])))
        with torch.no_grad():
            assert_close(model.eval()(x), y, torch.float32)
    (y, grads), (expected, expected_grads) = results
    assert_close(y, expected, torch.float32)
    assert len(grads) == len(expected_grads)
    for got, want in zip(grads, expected_grads):
        assert_close(got, want, torch.float32)


@pytest.mark.parametrize("method", list(CONFIGS))
def test_trainable_tensors_in_shared_memory_are_not_cached(method):
    """After model.share_memory() (Hogwild training) other processes write the adapters' parameters, which neither
    version counters nor optimizer hooks here see: the eval cache kept its weight while they trained. A write
    through a numpy view stands in for theirs."""
    torch.manual_seed(0)
    model = sk.inject(_OneLayer(), CONFIGS[method](["proj"])).eval().share_memory()
    x = torch.randn(5, 24)
    with torch.no_grad():
        before = model(x)
        for p in model.parameters():
            if p.requires_grad:
                p.detach().numpy()[...] += 0.5
        after = model(x)
    expected = _fresh(model, x)
    assert not torch.equal(after, before)
    assert_close(after, expected, torch.float32)


@pytest.mark.parametrize("method", list(CONFIGS))
def test_copies_leave_the_eval_cache_behind(method):
    """Pickles and copies of a layer do not carry its eval weight (a copy of the base weight), and compute the
    same."""
    torch.manual_seed(0)
    model = sk.inject(_OneLayer(), CONFIGS[method](["proj"])).eval()
    x = torch.randn(5, 24)
    size = len(pickle.dumps(model))
    expected = _fresh(model, x)
    with torch.no_grad():
        assert_close(model(x), expected, torch.float32)
        assert len(pickle.dumps(model)) == size
        assert_close(copy.deepcopy(model)(x), expected, torch.float32)


@pytest.mark.parametrize("method", list(CONFIGS))
def test_fsdp_flat_parameters(method, tmp_path):
    """FSDP (use_orig_params=False, its default) puts plain tensors in the parameters' place while they are
    unsharded: FourierFT's and FRoD's layers read their tables' registries alone and left the adapter out."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel

    torch.manual_seed(0)
    model = sk.inject(_OneLayer(), CONFIGS[method](["proj"])).requires_grad_(False)
    x = torch.randn(5, 24)
    expected = model(x)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            y = FullyShardedDataParallel(model, device_id=torch.device("cpu"))(x)
    finally:
        dist.destroy_process_group()
    assert_close(y, expected, torch.float32)


def _fsdp_oft_losses(rank, store, use_orig_params, out):
    """One of two ranks of test_fsdp_units_of_oft_rotations: the losses of peft's, the swapped and the injected
    model, each wrapped by peft's fsdp_auto_wrap_policy."""
    import torch.distributed as dist
    from peft.utils.other import fsdp_auto_wrap_policy
    from torch.distributed.fsdp import FullyShardedDataParallel

    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    config = CONFIGS["oft"](["query", "value"])
    theirs = peft.get_peft_model(bert(), peft_config(config))
    swapped = swap(copy.deepcopy(theirs))
    ours = sk.inject(bert(), config)
    ours.load_state_dict({k.removeprefix("base_model.model."): v for k, v in theirs.state_dict().items()})
    inputs = batch(ours)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    losses = []
    for model in (theirs, swapped, ours):
        wrapped = FullyShardedDataParallel(model, device_id=torch.device("cpu"), use_orig_params=use_orig_params,
                                           auto_wrap_policy=fsdp_auto_wrap_policy(model))
        loss = wrapped(**inputs).loss
        loss.backward()
        losses.append(loss.detach())
    dist.destroy_process_group()
    if rank == 0:
        torch.save(losses, out)


@pytest.mark.parametrize("use_orig_params", [False, True])
def test_fsdp_units_of_oft_rotations(use_orig_params, tmp_path):
    """peft's fsdp_auto_wrap_policy makes each OFT rotation module an FSDP unit, which gathers its parameter when
    called: swapped and injected layers read it without calling it (sharded over two ranks) and failed; they get
    peft's loss now."""
    torch.multiprocessing.spawn(_fsdp_oft_losses, args=(tmp_path / "store", use_orig_params, tmp_path / "losses"),
                                nprocs=2)
    theirs, swapped, ours = torch.load(tmp_path / "losses")
    assert_close(swapped, theirs, torch.float32)
    assert_close(ours, theirs, torch.float32)


@pytest.mark.parametrize("method", list(CONFIGS))
def test_eval_cache_and_optimizer_steps(method):
    """A fused step is seen from the optimizer's own post-step hooks too (they run before the global ones), and
    a step on other parameters (a student's, next to a frozen teacher) keeps the teacher's eval weight."""
    torch.manual_seed(0)
    model = sk.inject(_OneLayer(), CONFIGS[method](["proj"])).eval()
    teacher = sk.inject(_OneLayer(), CONFIGS[method](["proj"])).eval()
    x = torch.randn(5, 24)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1, fused=True)
    seen = []

    @torch.no_grad()
    def evaluate(*_):
        seen.append((model(x), _fresh(model, x)))

    optimizer.register_step_post_hook(evaluate)
    with torch.no_grad():
        teacher(x)
        model(x)
    kept = teacher.proj._cache
    for _ in range(2):
        model(x).square().sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        with torch.no_grad():
            teacher(x)
    assert len(seen) == 2
    for cached, fresh in seen:
        assert_close(cached, fresh, torch.float32)
    assert kept is not None and teacher.proj._cache is kept


def test_compiled_optimizer_steps():
    """torch.compile(optimizer.step) runs the package's global step hooks (_cache._count_step) outside the graph:
    traced, they were compiled once per parameter, which raised under error_on_recompile in any process that had
    imported spectral_kernels, adapters or not. A fused step compiled so is seen by the eval cache."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = sk.inject(torch.nn.Sequential(*[_OneLayer(24, 24) for _ in range(3)]),
                      CONFIGS["fourierft"](["proj"])).eval()
    x = torch.randn(5, 24)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.1, fused=True)
    step = torch.compile(optimizer.step, backend="aot_eager")
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(2):
            with torch.no_grad():
                model(x)  # the eval caches
            model(x).square().sum().backward()
            step()
            optimizer.zero_grad()
    with torch.no_grad():
        assert_close(model(x), _fresh(model, x), torch.float32)


@pytest.mark.parametrize("method", list(CONFIGS))
def test_eval_cache_skips_parametrized_tensors(method, monkeypatch):
    """A parametrized base weight or adapter parameter is a new tensor on every read: the eval cache rebuilt its
    weight on every call (slower than the fused op), and now leaves such layers to the fused op."""
    torch.manual_seed(0)
    x = torch.randn(5, 24)
    table, name = ADAPTER_PARAMETER[method]
    for parametrize in (lambda layer: layer.base_layer, lambda layer: layer.get_submodule(table)):
        model = sk.inject(_OneLayer(), CONFIGS[method](["proj"])).eval()
        target = parametrize(model.proj)
        torch.nn.utils.parametrize.register_parametrization(target, "weight" if target is model.proj.base_layer
                                                            else name, _Doubled())
        with torch.no_grad():
            model(x)
            assert model.proj._cache is None  # (OFT's rotations do not depend on a parametrized base weight)
            assert_close(model(x), _fresh(model, x), torch.float32)


@pytest.mark.parametrize("method", list(CONFIGS))
def test_moving_a_model_drops_its_eval_caches(method):
    """.to(), .half(), .cpu() of a model: the eval caches' weights and rotations, made from the tensors before
    the move, were kept until the next eval call (GPU memory held after a model went to the CPU); a move to where
    the model is keeps them."""
    torch.manual_seed(0)
    model = sk.inject(_OneLayer(), CONFIGS[method](["proj"])).eval()
    x = torch.randn(5, 24)
    with torch.no_grad():
        model(x)
    cached = [model.proj._cache[1]] if model.proj._cache else []
    kept = [weakref.ref(t) for t in cached + [r for _, r in getattr(model.proj, "_rotations", {}).values()]]
    del cached
    assert kept
    key = model.proj._cache and model.proj._cache[0]
    model.to("cpu")  # where it is: kept (a device move on every step costs nothing)
    assert (model.proj._cache and model.proj._cache[0]) == key and all(ref() is not None for ref in kept)
    model.to(torch.float64)
    gc.collect()
    assert [ref() for ref in kept] == [None] * len(kept)
    with torch.no_grad():
        assert_close(model(x.double()), _fresh(model, x.double()), torch.float64)


@pytest.mark.parametrize("method", list(CONFIGS))
def test_merging_or_disabling_drops_the_eval_cache(method):
    """merge() and disabling the adapters leave the base layer to run alone: the eval cache's copy of the weight
    (and OFT's rotations) went on taking a weight's memory per layer until the layer trained again."""
    torch.manual_seed(0)
    model = sk.inject(_OneLayer(), CONFIGS[method](["proj"])).eval()
    x = torch.randn(5, 24)
    for leave, back in ((lambda: model.proj.merge(), lambda: model.proj.unmerge()),
                        (lambda: model.proj.enable_adapters(False), lambda: model.proj.enable_adapters(True))):
        with torch.no_grad():
            expected = model(x)
        assert_close(expected, _fresh(model, x), torch.float32)
        kept = [weakref.ref(model.proj._cache[1])]
        kept += [weakref.ref(r) for _, r in getattr(model.proj, "_rotations", {}).values()]
        leave()
        gc.collect()
        assert [ref() for ref in kept] == [None] * len(kept)
        back()
        with torch.no_grad():
            assert_close(model(x), expected, torch.float32)


class _Tied(torch.nn.Module):
    """Two linear layers sharing one weight (tied, as transformers ties them); the output reads the first."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(24, 24), torch.nn.Linear(24, 24)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.a(x)


@pytest.mark.parametrize("method", list(CONFIGS))
def test_eval_cache_sees_merges_into_a_tied_weight(method):
    """Merging or unmerging one layer writes a weight another adapted layer shares: that layer's eval cache sees it
    (the writes, through .data as peft's, counted no version: FourierFT's and OFT's caches kept the weight from
    before; FRoD's with two active adapters, which reads the base weight, likewise)."""
    torch.manual_seed(0)
    model = sk.inject(_Tied(), CONFIGS[method](["a", "b"])).eval()
    if method == "frod":
        sk.inject(model, CONFIGS[method](["a", "b"]), "other")
        sk.set_adapter(model, ["default", "other"])
    assert model.a.base_layer.weight is model.b.base_layer.weight
    x = torch.randn(5, 24)
    for step in (model.b.merge, model.b.unmerge):
        with torch.no_grad():
            model(x)  # a's eval cache
        step()
        with torch.no_grad():
            assert_close(model(x), _fresh(model, x), torch.float32)


@pytest.mark.parametrize("method", list(CONFIGS))
def test_load_state_dict_swapping_tensors(method):
    """Under torch.__future__.set_swap_module_params_on_conversion(True), load_state_dict swaps every parameter and
    buffer (torch.utils.swap_tensors), which refuses a tensor with weak references: after a forward, FRoD's
    projection and pattern, keys of the ops' caches, had them. The model then computes with what it loaded."""
    torch.manual_seed(0)
    model = sk.inject(_OneLayer(), CONFIGS[method](["proj"]))
    loaded = copy.deepcopy(model)  # FRoD's U, computed at set-up, is not in the state dict
    x = torch.randn(5, 24)
    model(x).sum().backward()
    model.eval()
    with torch.no_grad():
        model(x)
    state = {name: t + 0.5 if t.is_floating_point() else t.clone() for name, t in model.state_dict().items()}
    swapping = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        model.load_state_dict(state)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swapping)
    assert all(torch.equal(t, state[name]) for name, t in model.state_dict().items())
    with torch.no_grad():
        assert_close(model(x), _fresh(model, x), torch.float32)
        loaded.load_state_dict(state)
        assert_close(model(x), loaded.eval()(x), torch.float32)


def test_fourierft_folded_indices_go_with_their_adapters():
    """FourierFT keeps the active adapters' indices concatenated while several are active; a deleted adapter's and
    those left on a device the layer moved off stayed until the next call with several adapters."""
    torch.manual_seed(0)
    model = sk.inject(_OneLayer(), CONFIGS["fourierft"](["proj"]))
    sk.inject(model, CONFIGS["fourierft"](["proj"]), "other")
    sk.set_adapter(model, ["default", "other"])
    x = torch.randn(5, 24)
    for leave in (lambda: model.double(), lambda: sk.delete_adapter(model, "other")):
        model(x.to(model.proj.weight.dtype))
        folded = weakref.ref(model.proj._folded_indices.get(list(model.proj.indices.values()), 1))
        leave()
        gc.collect()
        assert folded() is None
    assert_close(model(x.double()), model.proj.base_layer(x.double()) + x.double() @ model.proj.delta_weight(
        "default").t(), torch.float64)


def test_eval_cache_after_a_first_call_in_inference_mode():
    """FourierFT with two active adapters keeps their indices concatenated, and its eval weight on that tensor;
    made by a first call in inference mode (an HF pipeline), the concatenation was an inference tensor, without
    a version counter, and the eval weight was rebuilt on every call after it."""
    torch.manual_seed(0)
    model = sk.inject(_OneLayer(), CONFIGS["fourierft"](["proj"]))
    sk.inject(model, CONFIGS["fourierft"](["proj"]), "other")
    sk.set_adapter(model, ["default", "other"])
    model.eval()
    x = torch.randn(5, 24)
    with torch.inference_mode():
        model(x)
    with torch.no_grad():
        model(x)
        weight = model.proj._cache[1]
        assert_close(model(x), _fresh(model, x), torch.float32)
        assert model.proj._cache[1] is weight


@pytest.mark.parametrize("method", list(CONFIGS))
def test_jit_trace_keeps_no_eval_weight(method):
    """torch.jit.trace of an eval call after the cache was built recorded the cached weight as a constant, and the
    traced module ignored later changes of the adapter."""
    torch.manual_seed(0)
    model = sk.inject(_OneLayer(), CONFIGS[method](["proj"])).eval()
    x = torch.randn(5, 24)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model(x)
        traced = torch.jit.trace(model, x, check_trace=False)
        for p in model.parameters():
            if p.requires_grad:
                p.mul_(1.5)
        assert_close(traced(x), _fresh(model, x), torch.float32)


def test_frod_calls_its_base_layer_with_several_adapters():
    """With several active adapters peft's FRoD layer calls its base layer (its sum of each adapter's change of
    the base output); the eval cache's summed weight skipped that, hooks included."""
    def two(model):
        sk.inject(model, CONFIGS["frod"](["proj"]), "other")
        sk.set_adapter(model, ["default", "other"])
        return model

    torch.manual_seed(0)
    model = two(sk.inject(_OneLayer(), CONFIGS["frod"](["proj"])))
    x = torch.randn(5, 24)
    expected = model(x).detach()
    model.proj.base_layer.register_forward_hook(lambda module, args, out: out + 1)
    hooked = model(x).detach()
    assert not torch.allclose(hooked, expected)
    with torch.no_grad():
        for _ in range(2):
            assert_close(model.eval()(x), hooked, torch.float32)
    assert model.proj._cache is None  # each adapter's weight took the one slot in turn, rebuilt on every call


@pytest.mark.parametrize("method", list(CONFIGS))
def test_layers_pickled_before_the_cache_flag_was_a_property(method):
    """Layers pickled whole before cache_effective_weight became a property kept it in their __dict__ and lacked
    _cache_enabled: loading them left every forward failing."""
    layer = sk.inject(_OneLayer(), CONFIGS[method](["proj"])).proj
    state = layer.__getstate__()
    state["cache_effective_weight"] = state.pop("_cache_enabled") and False
    old = type(layer).__new__(type(layer))
    old.__setstate__(state)
    x = torch.randn(5, 24)
    assert old.cache_effective_weight is False
    assert_close(old(x), layer(x), torch.float32)


def _fsdp_stale_steps(rank, store, out, wrapper):
    """One of two ranks of test_eval_cache_sees_sharded_steps: per method, the eval calls after a fused step that
    differ from the fused op's."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard

    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    stale = {}
    for method in CONFIGS:
        torch.manual_seed(0)
        model = sk.inject(_OneLayer(), CONFIGS[method](["proj"])).eval()
        if wrapper == "fully_shard":
            wrapped = fully_shard(model, mesh=init_device_mesh("cpu", (2,)))
        else:
            wrapped = FullyShardedDataParallel(model, device_id=torch.device("cpu"), use_orig_params=True)
        optimizer = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=0.1, fused=True)
        x = torch.randn(3, 24)
        stale[method] = 0
        for _ in range(4):
            with torch.no_grad():
                wrapped(x)
            wrapped(x).square().sum().backward()
            optimizer.step()
            optimizer.zero_grad()
            with torch.no_grad():
                cached = wrapped(x)
                model.proj.cache_effective_weight = False
                stale[method] += not torch.allclose(cached, wrapped(x), atol=1e-5)
                model.proj.cache_effective_weight = True
    dist.destroy_process_group()
    torch.save(stale, f"{out}.{rank}")


@pytest.mark.parametrize("wrapper", ["FullyShardedDataParallel", "fully_shard"])
def test_eval_cache_sees_sharded_steps(wrapper, tmp_path):
    """Under FSDP (use_orig_params=True) an optimizer steps the shards, and the layers read the gathered tensors,
    whose storage sees no step (a rank may hold no element of the adapter): every eval call after a step saw the
    weight from before it on some rank. FSDP2's shards are DTensors, whose storage spans the whole tensor."""
    torch.multiprocessing.spawn(_fsdp_stale_steps, args=(tmp_path / "store", tmp_path / "stale", wrapper), nprocs=2)
    for rank in range(2):
        assert torch.load(tmp_path / f"stale.{rank}") == {method: 0 for method in CONFIGS}
