"""spectral_kernels.peft.swap: peft's FourierFT and OFT layers on the fused ops, with peft's machinery intact."""
import contextlib
import copy
import gc
import warnings
import weakref

import peft
import pytest
import torch
from peft.tuners.fourierft.layer import FourierFTLinear as PeftFourierFTLinear
from peft.tuners.frod.layer import Linear as PeftFrodLinear
from peft.tuners.oft.layer import Linear as PeftOFTLinear

import spectral_kernels as sk
from spectral_kernels.peft import SwappedFourierFTLinear, SwappedFrodLinear, SwappedOFTLinear, swap, unswap

from conftest import assert_close, assert_low_precision_close
from test_inject import llama, load_peft_weights, peft_config, tokens

CONFIGS = {
    "fourierft": lambda **kw: peft.FourierFTConfig(n_frequency=24, target_modules=["q_proj", "v_proj", "down_proj"],
                                                   init_weights=False, **kw),
    "oft": lambda **kw: peft.OFTConfig(oft_block_size=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                       init_weights=False, **kw),
    "oft-coft": lambda **kw: peft.OFTConfig(oft_block_size=8, target_modules=["k_proj", "up_proj"], coft=True,
                                            eps=1e-2, init_weights=False, **kw),
    "oft-shared-exact": lambda **kw: peft.OFTConfig(oft_block_size=16, target_modules=["o_proj"], block_share=True,
                                                    use_cayley_neumann=False, init_weights=False, **kw),
    "frod": lambda **kw: peft.FrodConfig(target_modules=["q_proj", "v_proj", "down_proj"], init_weights=False,
                                         sparse_rate=0.05, progressbar=False, **kw),
    "frod-offload": lambda **kw: peft.FrodConfig(target_modules=["gate_proj"], init_weights=False, bias="frod_only",
                                                 runtime_offload_base_weight=True, progressbar=False, **kw),
}
SWAPPED = (SwappedFourierFTLinear, SwappedOFTLinear, SwappedFrodLinear)
PEFT_LAYERS = (PeftFourierFTLinear, PeftOFTLinear, PeftFrodLinear)
METHODS = ["fourierft", "oft", "frod"]
DTYPES, DTYPE_IDS = [torch.float32, torch.float64], ["fp32", "fp64"]


def peft_model(method, seed=0, **kwargs):
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(llama(), CONFIGS[method](**kwargs))


def swapped_pair(method, **kwargs):
    """A peft model and a swapped deep copy of it."""
    theirs = peft_model(method, **kwargs)
    return swap(copy.deepcopy(theirs)), theirs


def loss_and_grads(model, ids):
    model.zero_grad()
    logits = model(ids).logits
    loss = logits.float().pow(2).mean()
    loss.backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_same_outputs(ours, theirs, ids):
    (logits, grads), (expected_logits, expected_grads) = loss_and_grads(ours, ids), loss_and_grads(theirs, ids)
    assert_close(logits, expected_logits, torch.float32)
    assert grads.keys() == expected_grads.keys() and grads
    for name in grads:
        assert_close(grads[name], expected_grads[name], torch.float32)


def count_fused_calls(monkeypatch):
    """Count the calls of the fused ops from the swapped layers (to see they do not fall back to peft's)."""
    import spectral_kernels.peft as swapped

    calls = []
    for name in ("fourierft_linear", "oft_linear", "frod_linear"):
        op = getattr(swapped, name)
        monkeypatch.setattr(swapped, name, lambda *args, op=op, **kwargs: calls.append(op) or op(*args, **kwargs))
    return calls


@pytest.mark.parametrize("method", list(CONFIGS))
def test_swap_matches_peft(method, monkeypatch):
    calls = count_fused_calls(monkeypatch)
    theirs = peft_model(method)
    ours = copy.deepcopy(theirs)
    params = dict(ours.named_parameters())
    state = {k: v.clone() for k, v in ours.state_dict().items()}
    assert swap(ours) is ours and swap(ours) is ours  # idempotent
    layers = [m for m in ours.modules() if isinstance(m, PEFT_LAYERS)]
    assert layers and all(isinstance(m, SWAPPED) for m in layers)
    assert all(p is params[n] for n, p in ours.named_parameters()) and len(params) == len(list(ours.parameters()))
    assert ours.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in ours.state_dict().items())
    ids = tokens(ours)
    assert_same_outputs(ours, theirs, ids)
    assert len(calls) == len(layers)
    unswap(ours)
    assert all(type(m) in PEFT_LAYERS for m in layers)


@pytest.mark.parametrize("method", METHODS)
def test_optimizer_made_before_the_swap_keeps_training(method):
    ours, theirs = peft_model(method), peft_model(method)
    optimizers = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in (ours, theirs)]
    swap(ours)
    ids = tokens(ours)
    for _ in range(3):
        losses = []
        for model, optimizer in zip((ours, theirs), optimizers):
            optimizer.zero_grad()
            loss = model(ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        assert abs(losses[0] - losses[1]) <= 1e-5 * abs(losses[1])
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):  # AdamW's steps amplify rounding
        assert_close(p.detach(), q.detach(), torch.float32, tol=1e-4)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("low_cpu_mem_usage", [False, True])
def test_save_and_load_round_trip(tmp_path, method, low_cpu_mem_usage):
    ours, theirs = swapped_pair(method)
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    from safetensors.torch import load_file

    saved, expected = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("ours", "theirs"))
    assert saved.keys() == expected.keys() and all(torch.equal(saved[k], expected[k]) for k in saved)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = swap(peft.PeftModel.from_pretrained(llama(), tmp_path / "ours", low_cpu_mem_usage=low_cpu_mem_usage))
        # a second adapter loaded into the swapped layers (peft's update_layer on them)
        loaded.load_adapter(tmp_path / "theirs", "second", low_cpu_mem_usage=low_cpu_mem_usage)
    assert all(type(m) in SWAPPED for m in loaded.modules() if isinstance(m, PEFT_LAYERS))
    state, expected_state = loaded.state_dict(), theirs.state_dict()
    for key, value in expected_state.items():  # bit-exact, under both adapter names
        # (on the CPU: with low_cpu_mem_usage, peft leaves what it loads on the device it infers, a GPU where there
        # is one, FRoD's projections included)
        second = key.replace(".default", ".second")
        assert torch.equal(state[key].cpu(), value) and torch.equal(state[second].cpu(), value)
    ids = tokens(loaded)
    with torch.no_grad():
        expected_logits = theirs(ids).logits
        assert_close(loaded(ids).logits, expected_logits, torch.float32)
        loaded.set_adapter("second")
        assert_close(loaded(ids).logits, expected_logits, torch.float32)


@pytest.mark.parametrize("method", METHODS)
def test_adapters_switch_disable_merge_delete_like_peft(method):
    ours, theirs = swapped_pair(method)
    targets = ["q_proj", "up_proj"]  # q_proj: update_layer on a swapped layer; up_proj: a new peft layer
    other = {"fourierft": peft.FourierFTConfig(n_frequency=16, random_loc_seed=5, target_modules=targets,
                                               init_weights=False),
             "oft": peft.OFTConfig(oft_block_size=4, target_modules=targets, init_weights=False),
             # the same sparse_rate: peft 0.21 sizes a further adapter's S values by the first adapter's pattern
             "frod": peft.FrodConfig(target_modules=targets, init_weights=False, sparse_rate=0.05,
                                     progressbar=False)}[method]
    for model in (ours, theirs):
        torch.manual_seed(1)
        model.add_adapter("other", copy.deepcopy(other))
    layers = ours.base_model.model.model.layers[0]
    assert type(layers.self_attn.q_proj) in SWAPPED and type(layers.mlp.up_proj) not in SWAPPED
    swap(ours)
    assert type(layers.mlp.up_proj) in SWAPPED
    ids = tokens(ours)
    assert_same_outputs(ours, theirs, ids)
    for model in (ours, theirs):
        model.set_adapter("other")
    assert_same_outputs(ours, theirs, ids)
    for model in (ours, theirs):
        model.base_model.set_adapter(["default", "other"])
    assert_same_outputs(ours, theirs, ids)
    with ours.disable_adapter(), theirs.disable_adapter():
        assert_close(ours(ids).logits, theirs(ids).logits, torch.float32)
        assert not any(p.requires_grad for n, p in ours.named_parameters() if "other" in n)
    assert_same_outputs(ours, theirs, ids)
    for model in (ours, theirs):
        model.delete_adapter("other")
    assert_same_outputs(ours, theirs, ids)
    ours.merge_adapter()
    assert_close(ours(ids).logits, theirs(ids).logits, torch.float32)
    ours.unmerge_adapter()
    merged = ours.merge_and_unload()
    assert type(merged.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert_close(merged(ids).logits, theirs.merge_and_unload()(ids).logits, torch.float32)


def test_fourierft_adapters_fold_once(monkeypatch):
    """Two active FourierFT adapters in a swapped model: each layer checks its concatenated indices once, not on
    every call (a device sync each on GPU)."""
    from spectral_kernels.ops import _autograd

    ours, _ = swapped_pair("fourierft")
    ours.add_adapter("other", CONFIGS["fourierft"](random_loc_seed=5))
    swap(ours).base_model.set_adapter(["default", "other"])
    checks = []
    monkeypatch.setattr(_autograd, "check_values", lambda ok, message: checks.append(bool(ok)))
    ids = tokens(ours)
    first = ours(ids).logits
    layers = sum(type(m) is SwappedFourierFTLinear for m in ours.modules())
    assert len(checks) == layers > 0 and all(checks)
    assert torch.equal(ours(ids).logits, first) and len(checks) == layers


def test_bare_models_tuners_and_other_methods():
    """inject_adapter_in_model on a bare model, a tuner model, and LoRA layers beside FourierFT's."""
    config = CONFIGS["fourierft"]()
    torch.manual_seed(0)
    bare = peft.inject_adapter_in_model(config, llama())
    torch.manual_seed(0)
    tuner = peft.FourierFTModel(llama(), CONFIGS["fourierft"](), "default")
    ids = tokens(bare)
    expected = bare(ids).logits
    assert_close(swap(bare)(ids).logits, expected, torch.float32)
    assert_close(swap(tuner)(ids).logits, expected, torch.float32)

    mixed = peft.inject_adapter_in_model(peft.LoraConfig(target_modules=["k_proj"], init_lora_weights=False),
                                         llama(), "lora")
    peft.inject_adapter_in_model(config, mixed, "fourierft")
    lora_class = type(mixed.model.layers[0].self_attn.k_proj)
    expected = mixed(ids).logits
    swap(mixed)
    assert type(mixed.model.layers[0].self_attn.k_proj) is lora_class
    assert type(mixed.model.layers[0].self_attn.q_proj) is SwappedFourierFTLinear
    assert_close(mixed(ids).logits, expected, torch.float32)
    with pytest.raises(ValueError, match="holds no peft layer the fused kernels replace"):
        swap(peft.inject_adapter_in_model(peft.LoraConfig(target_modules=["k_proj"]), llama()))


@pytest.mark.parametrize("method", METHODS)
def test_other_dtypes(method):
    """float64 runs fused; so does a bfloat16 model with peft's float32 adapter weights (autocast_adapter_dtype)."""
    ours, theirs = swapped_pair(method)
    ours.double()
    theirs.double()
    ids = tokens(ours)
    # float32 bound: peft's FourierFT builds its dense spectrum in float32 whatever the dtype
    assert_close(ours(ids).logits, theirs(ids).logits, torch.float64 if method == "oft" else torch.float32)

    torch.manual_seed(0)
    model = peft.get_peft_model(llama().to(torch.bfloat16), CONFIGS[method]())
    peft_layer = model.base_model.model.model.layers[0].self_attn.q_proj
    layer = swap(copy.deepcopy(peft_layer))
    adapter = {"fourierft": lambda: layer.fourierft_spectrum["default"], "oft": lambda: layer.oft_R["default"].weight,
               "frod": lambda: layer.frod_lambda_l["default"]}[method]()
    assert layer.get_base_layer().weight.dtype == torch.bfloat16 and adapter.dtype == torch.float32
    x = torch.randn(2, 5, 32).to(torch.bfloat16)
    with torch.no_grad():
        exact = copy.deepcopy(peft_layer).double()(x.double())
        assert_low_precision_close(layer(x), peft_layer(x), exact)


AUTOCAST_CONFIGS = {
    "fourierft": sk.FourierFTConfig(n_frequency=24, target_modules=["q_proj", "down_proj"], init_weights=False),
    "oft": sk.OFTConfig(oft_block_size=8, target_modules=["q_proj", "down_proj"], init_weights=False),
    "frod": sk.FrodConfig(sparse_rate=0.05, target_modules=["q_proj", "down_proj"], init_weights=False,
                          progressbar=False),
}


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("method", METHODS)
def test_autocast_like_peft(method, backend, monkeypatch):
    """Under torch.autocast (bfloat16 on the CPU) our layers and swapped peft layers run the fused ops in bfloat16
    and return their input's dtype, as peft's layers do: outputs and gradients as close to float64's as peft's.
    A bfloat16 input to a float32 layer works too (peft's OFT casts it)."""
    monkeypatch.setenv(sk.dispatch.ENV_BACKEND, backend)
    config = AUTOCAST_CONFIGS[method]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(llama(), peft_config(config)).base_model.model  # keys as ours
    ours = sk.inject(llama(), config)
    load_peft_weights(ours, theirs)
    swapped = swap(copy.deepcopy(theirs))
    ids = tokens(theirs)
    exact_logits, exact_grads = loss_and_grads(copy.deepcopy(theirs).double(), ids)
    calls = count_fused_calls(monkeypatch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected_logits, expected_grads = loss_and_grads(theirs, ids)
        for model in (ours, swapped):
            logits, grads = loss_and_grads(model, ids)
            assert logits.dtype == expected_logits.dtype == torch.bfloat16
            assert_low_precision_close(logits, expected_logits, exact_logits)
            assert grads.keys() == expected_grads.keys() and grads
            for name, grad in grads.items():
                assert grad.dtype == torch.float32  # the parameters' (bfloat16 computation: its tolerance)
                assert_low_precision_close(grad.to(torch.bfloat16), expected_grads[name].to(torch.bfloat16),
                                           exact_grads[name])
        assert len(calls) == 2 * 3  # the swapped layers ran fused, down_proj on its bfloat16 input too

        layer, peft_layer = ours.model.layers[0].self_attn.q_proj, theirs.model.layers[0].self_attn.q_proj
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(2)).to(dtype)
            with torch.no_grad():
                y, expected = layer(x), peft_layer(x)
            assert y.dtype == expected.dtype == dtype
            assert_low_precision_close(y.to(torch.bfloat16), expected.to(torch.bfloat16),
                                       copy.deepcopy(peft_layer).double()(x.double()).detach())


def test_frod_copies_to_the_input_device_are_kept():
    """peft leaves FourierFT's indices and FRoD's V and pattern on the CPU (unless the model is moved) and copies
    them to the input's device on every call; the swap keeps one copy until the tensor changes (meta stands in for
    a GPU here)."""
    from spectral_kernels.peft import _on_device

    v, meta = torch.randn(4, 4), torch.device("meta")
    copy_ = _on_device(v, meta)
    assert copy_.device == meta and _on_device(v, meta) is copy_ and _on_device(v, v.device) is v
    v.add_(1.0)
    assert _on_device(v, meta) is not copy_


def test_copies_made_in_inference_mode_are_not_inference_tensors():
    """A first call in inference mode (an HF pipeline) made the kept copy an inference tensor, which has no version
    counter: the index check kept per tensor (a device sync on GPU) then ran on every call (meta for a GPU)."""
    from spectral_kernels.peft import _on_device

    indices, meta = torch.arange(6).reshape(2, 3), torch.device("meta")
    with torch.inference_mode():
        copy_ = _on_device(indices, meta)
    assert not copy_.is_inference() and _on_device(indices, meta) is copy_


@pytest.mark.parametrize("method", ["fourierft", "frod"])
def test_moves_drop_the_copies(method):
    """peft's model moves leave FourierFT's indices and FRoD's pattern where they are (FRoD's U and V too, on a model
    made on a GPU); the copies the swap kept of them on the GPU (meta here) outlived model.cpu(), holding GPU memory
    as long as the model lived. A move drops them; one that changes nothing keeps them."""
    from spectral_kernels.peft import _on_device

    ours = swap(peft_model(method))
    layer = next(m for m in ours.modules() if isinstance(m, SWAPPED))
    tensors = layer.indices if method == "fourierft" else layer.frod_s_indices
    kept, meta = tensors["default"], torch.device("meta")
    copy_ = weakref.ref(_on_device(kept, meta))
    ours.float()
    assert _on_device(kept, meta) is copy_()
    ours.double()
    gc.collect()
    assert tensors["default"] is kept and copy_() is None


def test_unswap_drops_the_copies():
    from spectral_kernels.peft import _on_device

    ours = swap(peft_model("frod"))
    kept = next(m for m in ours.modules() if isinstance(m, SWAPPED)).frod_s_indices["default"]
    copy_ = weakref.ref(_on_device(kept, torch.device("meta")))
    unswap(ours)
    gc.collect()
    assert copy_() is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_frod_on_a_gpu_model_with_projections_on_the_cpu():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(llama().cuda(), CONFIGS["frod"]())
    assert next(iter(theirs.base_model.frod_V.values()))["default"].device.type == "cpu"
    ours = swap(copy.deepcopy(theirs))
    ids = tokens(ours).cuda()
    assert_same_outputs(ours, theirs, ids)


class _TwoLayers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(32, 24), torch.nn.Linear(24, 16)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def against_peft(method, dtype):
    """The dtype whose tolerance bounds a comparison with peft: float32's for FourierFT, whose dense spectrum peft
    builds in float32 whatever the model's dtype."""
    return torch.float32 if method == "fourierft" else dtype


def two_layer_pair(method, dtype=torch.float32):
    """A peft model of _TwoLayers in ``dtype`` and a swapped deep copy of it."""
    config = {"fourierft": peft.FourierFTConfig(n_frequency=40, target_modules=["a", "b"], init_weights=False),
              "oft": peft.OFTConfig(oft_block_size=8, target_modules=["a", "b"], init_weights=False),
              "frod": peft.FrodConfig(target_modules=["a", "b"], init_weights=False, sparse_rate=0.1,
                                      progressbar=False)}[method]
    torch.manual_seed(0)
    theirs = peft.get_peft_model(_TwoLayers().to(dtype), config)
    return swap(copy.deepcopy(theirs)), theirs


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("method", METHODS)
def test_export_runs_fused(method, training, dtype, monkeypatch):
    """torch.export of a swapped model with a dynamic token count traces the fused ops (the weights are fake
    tensors there) and gives peft's eager outputs and gradients."""
    calls = count_fused_calls(monkeypatch)
    ours, theirs = two_layer_pair(method, dtype)
    for model in (ours, theirs):
        model.train(training)
    tokens = torch.export.Dim("tokens", min=2, max=1024)
    program = torch.export.export(ours.base_model.model, (torch.randn(5, 32, dtype=dtype),),
                                  dynamic_shapes=({0: tokens},))
    assert len(calls) == 2
    program = program.module()
    adapters = [name for name, p in theirs.base_model.model.named_parameters() if p.requires_grad]
    assert adapters
    for count in (3, 100):
        x = torch.randn(count, 32, dtype=dtype, requires_grad=True)
        results = []
        for model in (program, theirs.base_model.model):
            y = model(x)
            inputs = [x, *(model.get_parameter(name) for name in adapters)]
            results.append((y, torch.autograd.grad(y.square().sum(), inputs) if training else ()))
        (y, grads), (expected, expected_grads) = results
        assert_close(y, expected, against_peft(method, dtype))
        for got, want in zip(grads, expected_grads, strict=True):
            assert_close(got, want, against_peft(method, dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("method", METHODS)
def test_functional_call_runs_fused(method, dtype, monkeypatch):
    """torch.func.functional_call with plain tensors in place of the parameters runs the fused ops on them, as
    peft's layers run on them."""
    calls = count_fused_calls(monkeypatch)
    ours, theirs = two_layer_pair(method, dtype)
    x = torch.randn(2, 5, 32, dtype=dtype)
    outputs = []
    for model in (ours, theirs):
        tensors = {name: 1.5 * p.detach() for name, p in model.named_parameters()}
        outputs.append(torch.func.functional_call(model, tensors, (x,)))
    assert len(calls) == 2
    assert_close(outputs[0], outputs[1], against_peft(method, dtype))
    assert not torch.allclose(outputs[0], ours(x))


class _QuantizedWeight(torch.nn.Parameter):
    """Stands for a quantized weight type (bitsandbytes' and torchao's are tensor subclasses)."""


@pytest.mark.parametrize("method", METHODS)
def test_weight_subclasses_go_to_peft(method, monkeypatch):
    """A base weight of another tensor type (quantized) is left to peft's forward."""
    calls = count_fused_calls(monkeypatch)
    ours, theirs = two_layer_pair(method)
    for model in (ours, theirs):
        base = model.base_model.model.a.get_base_layer()
        base.weight = _QuantizedWeight(base.weight.detach())
    x = torch.randn(2, 5, 32)
    assert_close(ours(x), theirs(x), torch.float32)
    assert len(calls) == 1  # layer b's


@pytest.mark.parametrize("method", ["fourierft", "oft"])
def test_layer_over_another_method_s_layer_goes_to_peft(method, monkeypatch):
    """A peft layer whose base layer is another method's peft layer (LoRA's here, as a PeftMixedModel or a second
    inject_adapter_in_model nests them) is left to peft's forward, which includes LoRA's output: the fused op on
    the innermost weight would leave it out (it did). peft's FrodModel cannot be nested so."""
    calls = count_fused_calls(monkeypatch)
    config = {"fourierft": peft.FourierFTConfig(n_frequency=40, target_modules=["a"], init_weights=False),
              "oft": peft.OFTConfig(oft_block_size=8, target_modules=["a"], init_weights=False)}[method]
    torch.manual_seed(0)
    lora = peft.LoraConfig(target_modules=["a", "b"], init_lora_weights=False)
    theirs = peft.inject_adapter_in_model(config, peft.inject_adapter_in_model(lora, _TwoLayers(), "lora"), method)
    assert isinstance(theirs.a.base_layer, peft.tuners.lora.LoraLayer)
    ours = swap(copy.deepcopy(theirs))
    x = torch.randn(2, 5, 32)
    assert_close(ours(x), theirs(x), torch.float32)
    assert not calls


def test_inject_names_the_peft_layer_it_refuses():
    """sk.inject into a module that is another method's peft layer refuses, naming the layer's class in full."""
    model = peft.inject_adapter_in_model(peft.LoraConfig(target_modules=["a"]), _TwoLayers(), "lora")
    with pytest.raises(TypeError, match=r"target module a \(peft\.tuners\.lora\.layer\.Linear\) is not supported"):
        sk.inject(model, sk.OFTConfig(oft_block_size=8, target_modules=["a"]))


@pytest.mark.parametrize("method", METHODS)
def test_accelerate_offload(method):
    """Under accelerate's cpu_offload the weights stay on the meta device until their module's forward loads
    them. A swapped OFT layer then runs peft's forward, which calls those modules, and gives peft's output; peft's
    FourierFT and FRoD layers read their adapter weights without that (wrong output, or an error), and their
    swapped layers refuse with an error."""
    from accelerate import cpu_offload

    ours, theirs = two_layer_pair(method)
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        expected = theirs(x)
        cpu_offload(ours.base_model.model, execution_device=torch.device("cpu"))
        assert ours.base_model.model.a.base_layer.weight.is_meta
        if method == "oft":
            assert_close(ours(x), expected, torch.float32)
        else:
            with pytest.raises((RuntimeError, NotImplementedError), match="meta"):
                ours(x)


@pytest.mark.parametrize("method", METHODS)
def test_accelerate_offload_with_the_peft_class_preloaded(method):
    """Named in cpu_offload's preload_module_classes, peft's class makes accelerate load a layer's whole subtree at
    its forward, which gives peft's layers their adapter weights: the swapped layers answer to that name too."""
    from accelerate import cpu_offload

    ours, theirs = two_layer_pair(method)
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        expected = theirs(x)
        cpu_offload(ours.base_model.model, execution_device=torch.device("cpu"),
                    preload_module_classes=[cls.__name__ for cls in PEFT_LAYERS])
        assert ours.base_model.model.a.base_layer.weight.is_meta and isinstance(ours.base_model.model.a, SWAPPED)
        assert_close(ours(x), expected, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("method", METHODS)
def test_base_layer_hooks_run_as_in_peft(method, dtype, monkeypatch):
    """A forward hook on a base layer runs, and changes the output, as in peft: that layer runs peft's forward,
    which calls the base layer (peft's FRoD computes without it, and so does its swapped layer)."""
    calls = count_fused_calls(monkeypatch)
    ours, theirs = two_layer_pair(method, dtype)
    seen = {"ours": 0, "theirs": 0}
    for name, model in (("ours", ours), ("theirs", theirs)):
        def hook(module, inputs, output, name=name):
            seen[name] += 1
            return 2 * output

        model.base_model.model.a.base_layer.register_forward_hook(hook)
    x = torch.randn(2, 5, 32, dtype=dtype)
    assert_close(ours(x), theirs(x), against_peft(method, dtype))
    assert seen["ours"] == seen["theirs"] == (0 if method == "frod" else 1)
    assert len(calls) == 1  # layer b's


class _RoundedLinear(torch.nn.Linear):
    """An nn.Linear whose own forward changes what it computes (a fake-quantized weight, as in QAT)."""

    def forward(self, x):
        return torch.nn.functional.linear(x, torch.round(self.weight * 8) / 8, self.bias)


def output_and_gradients(model, x):
    """The output and the gradients of x and the trainable parameters, by name (None for those unused)."""
    x = x.clone().requires_grad_()
    names, params = zip(*[(n, p) for n, p in model.named_parameters() if p.requires_grad])
    y = model(x)
    return y, dict(zip(("x", *names), torch.autograd.grad(y.square().sum(), (x, *params), allow_unused=True)))


def _zero_input_gradient(module, grad_input, grad_output):
    return tuple(None if g is None else torch.zeros_like(g) for g in grad_input)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", ["backward-hook", "global-hook", "linear-subclass"])
@pytest.mark.parametrize("method", METHODS)
def test_base_layer_calls_run_as_in_peft(method, case, dtype, monkeypatch):
    """Whatever calling the base layer runs besides nn.Linear's forward, a swapped layer runs too (through peft's
    forward), as peft's does: a backward hook on it, a global module hook, the forward of an nn.Linear subclass.
    Before, the fused op skipped them: gradients, outputs silently wrong (peft's FRoD computes without the base
    layer; it runs peft's forward all the same)."""
    calls = count_fused_calls(monkeypatch)
    ours, theirs = two_layer_pair(method, dtype)
    x = torch.randn(2, 5, 32, dtype=dtype)
    with contextlib.ExitStack() as stack:
        for model in (ours, theirs):
            layer = model.base_model.model.a
            if case == "backward-hook":
                layer.base_layer.register_full_backward_hook(_zero_input_gradient)
            elif case == "linear-subclass":
                rounded = _RoundedLinear(layer.in_features, layer.out_features, dtype=dtype)
                rounded.load_state_dict(layer.base_layer.state_dict())
                layer.base_layer = rounded
        if case == "global-hook":  # doubles the output of every plain nn.Linear
            stack.enter_context(torch.nn.modules.module.register_module_forward_hook(
                lambda module, inputs, output: 2 * output if type(module) is torch.nn.Linear else None))
        (y, grads), (expected, expected_grads) = [output_and_gradients(model, x) for model in (ours, theirs)]
    assert_close(y, expected, against_peft(method, dtype))
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        assert (grad is None) == (expected_grads[name] is None), name
        if grad is not None:
            assert_close(grad, expected_grads[name], against_peft(method, dtype))
    assert len(calls) == {"backward-hook": 1, "global-hook": 0, "linear-subclass": 1}[case]  # layer b, unless global


def test_oft_rotation_module_with_a_backward_hook_goes_to_peft(monkeypatch):
    """peft calls each OFT rotation module: one with hooks of any kind (a backward hook here; FSDP units are
    covered in test_models) is left to peft's forward, whose call runs them. The swap ran only forward hooks."""
    calls = count_fused_calls(monkeypatch)
    ours, theirs = two_layer_pair("oft")
    fired = []
    for model in (ours, theirs):
        model.base_model.model.a.oft_R["default"].register_full_backward_hook(lambda *_: fired.append(1))
    x = torch.randn(2, 5, 32, requires_grad=True)
    for model in (ours, theirs):
        model(x).sum().backward()
    assert fired == [1, 1]
    assert len(calls) == 1  # layer b's
