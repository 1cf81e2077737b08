"""FourierFTLinear against peft's own FourierFT layer, plus the layer's adapter handling."""
import copy
from collections import UserDict

import pytest
import torch
from peft import FourierFTConfig as PeftFourierFTConfig
from peft.tuners.fourierft.layer import FourierFTLinear as PeftFourierFTLinear
from transformers.pytorch_utils import Conv1D

import spectral_kernels as sk

from conftest import assert_close, device_backends


def pair(base, n_frequency=200, scaling=150.0, init_weights=False, backend=None):
    """Ours and peft's layer over copies of ``base``, with identical spectra."""
    torch.manual_seed(0)
    peft = PeftFourierFTLinear(copy.deepcopy(base), "default",
                               PeftFourierFTConfig(n_frequency=n_frequency, scaling=scaling, init_weights=init_weights,
                                                   fan_in_fan_out=isinstance(base, Conv1D)),
                               n_frequency=n_frequency)
    torch.manual_seed(0)
    ours = sk.FourierFTLinear(copy.deepcopy(base), config=sk.FourierFTConfig(
        n_frequency=n_frequency, scaling=scaling, init_weights=init_weights), backend=backend)
    return ours, peft


def outputs_and_grads(layer, x):
    x = x.detach().requires_grad_()
    y = layer(x)
    y.backward(torch.ones_like(y))
    return y.detach(), x.grad, layer.fourierft_spectrum["default"].grad


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("base", [lambda: torch.nn.Linear(48, 30), lambda: Conv1D(30, 48),
                                  lambda: torch.nn.Linear(64, 40, bias=False)], ids=["linear", "conv1d", "nobias"])
@pytest.mark.parametrize("tokens", [1, 7, 300])
def test_peft_parity(backend, base, tokens):
    ours, peft = pair(base(), backend=backend)
    assert torch.equal(ours.indices["default"], peft.indices["default"])
    assert torch.equal(ours.fourierft_spectrum["default"], peft.fourierft_spectrum["default"])
    assert ours.state_dict().keys() == peft.state_dict().keys()
    x = torch.randn(2, tokens, 48 if isinstance(ours.base_layer, Conv1D) else ours.in_features)
    for a, e in zip(outputs_and_grads(ours, x), outputs_and_grads(peft, x)):
        assert_close(a, e, torch.float32)
    assert_close(ours.get_delta_weight("default"), peft.get_delta_weight("default"), torch.float32)
    for layer in (ours, peft):  # differentiable, as peft's (a regulariser on dW trains the spectrum)
        layer.zero_grad()
        layer.get_delta_weight("default").square().sum().backward()
    assert_close(ours.fourierft_spectrum["default"].grad, peft.fourierft_spectrum["default"].grad, torch.float32)
    ours.merge()
    peft.merge()
    assert_close(ours.base_layer.weight, peft.base_layer.weight, torch.float32)


def test_loads_peft_state_dict():
    ours, peft = pair(torch.nn.Linear(20, 10))
    with torch.no_grad():
        peft.fourierft_spectrum["default"].mul_(3)
    ours.load_state_dict(peft.state_dict())
    x = torch.randn(4, 20)
    assert_close(ours(x), peft(x), torch.float32)


def test_merge_unmerge_disable():
    ours, _ = pair(torch.nn.Linear(32, 24))
    base_weight = ours.base_layer.weight.detach().clone()
    x = torch.randn(5, 32)
    adapted = ours(x).detach()
    ours.merge(safe_merge=True)
    assert ours.merged
    assert_close(ours(x), adapted, torch.float32)
    ours.unmerge()
    assert_close(ours.base_layer.weight, base_weight, torch.float32)
    ours.enable_adapters(False)
    assert_close(ours(x), torch.nn.functional.linear(x, base_weight, ours.base_layer.bias), torch.float32)


@pytest.mark.parametrize("safe_merge", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_merge_rounds_once(dtype, safe_merge):
    """A half-precision layer with float32 coefficients (what inject and peft make of such models) adds its float32
    delta weight as peft does, rounding once: the merged weight is the exact sum rounded to the weight's dtype, and
    unmerge is the exact difference rounded so (rounding the delta first cost a rounding more)."""
    ours, peft = pair(torch.nn.Linear(64, 48).to(dtype), n_frequency=300)
    ours.fourierft_spectrum.float()
    peft.fourierft_spectrum.float()
    original = ours.base_layer.weight.detach().clone()
    with torch.no_grad():  # as merge computes it (with autograd it takes peft's torch.fft math)
        delta = ours.get_delta_weight("default")
        assert delta.dtype == torch.float32
        assert_close(delta, peft.get_delta_weight("default"), torch.float32)
    ours.merge(safe_merge=safe_merge)
    merged = ours.base_layer.weight.detach().clone()
    assert merged.dtype == dtype and torch.equal(merged, (original.float() + delta).to(dtype))
    ours.unmerge()
    assert torch.equal(ours.base_layer.weight, (merged.float() - delta).to(dtype))


def test_safe_merge_detects_nan():
    ours, _ = pair(torch.nn.Linear(8, 8), n_frequency=4)
    with torch.no_grad():
        ours.fourierft_spectrum["default"][0] = float("nan")
    with pytest.raises(ValueError, match="NaNs detected"):
        ours.merge(safe_merge=True)


def test_multiple_adapters_sum():
    base = torch.nn.Linear(30, 20)
    ours = sk.FourierFTLinear(copy.deepcopy(base), "a", sk.FourierFTConfig(n_frequency=50, scaling=10.0))
    ours.update_layer("b", sk.FourierFTConfig(n_frequency=80, scaling=20.0, random_loc_seed=3))
    x = torch.randn(6, 30)
    ours.set_adapter("a")
    only_a = ours(x) - base(x)
    ours.set_adapter("b")
    only_b = ours(x) - base(x)
    assert not ours.fourierft_spectrum["a"].requires_grad
    ours.set_adapter(["a", "b"])
    assert_close(ours(x), base(x) + only_a + only_b, torch.float32)
    with pytest.raises(ValueError, match="unknown adapter"):
        ours.set_adapter("c")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_active_adapters_past_out_times_in(dtype):
    """Active adapters whose coefficients together outnumber the weight's entries (so positions repeat) run as in
    peft, in our layer and in a swapped peft layer: the folded call raised, its n checked against out * in."""
    from spectral_kernels.peft import swap

    ours, peft = pair(torch.nn.Linear(16, 12).to(dtype), n_frequency=150)
    config = dict(n_frequency=150, scaling=20.0, random_loc_seed=3, init_weights=False)
    ours.update_layer("b", sk.FourierFTConfig(**config))
    peft.update_layer("b", 150, PeftFourierFTConfig(**config))
    with torch.no_grad():
        ours.fourierft_spectrum["b"].copy_(peft.fourierft_spectrum["b"])
    swapped = swap(copy.deepcopy(peft))
    x = torch.randn(5, 16, dtype=dtype)
    for layer in (ours, peft, swapped):
        layer.set_adapter(["default", "b"])

    def output_and_gradients(layer):
        x_ = x.clone().requires_grad_()
        y = layer(x_)
        return y, torch.autograd.grad(y.square().sum(), [x_, *layer.fourierft_spectrum.values()])

    expected, expected_grads = output_and_gradients(peft)
    for got, grads in (output_and_gradients(ours), output_and_gradients(swapped)):
        assert_close(got, expected, torch.float32)  # peft builds its delta weights in float32
        for g, e in zip(grads, expected_grads, strict=True):
            assert_close(g, e, torch.float32)
    ours.eval()
    with torch.no_grad():
        assert_close(ours(x), expected, torch.float32)


def test_multiple_adapters_fold_once(monkeypatch):
    """Several active adapters: their indices are concatenated and checked once, not on every call (a device sync
    each on GPU), and eval mode keeps one effective weight, until an adapter changes."""
    from spectral_kernels.ops import _autograd

    ours = sk.FourierFTLinear(torch.nn.Linear(30, 20), "a", sk.FourierFTConfig(n_frequency=50, init_weights=False))
    ours.update_layer("b", sk.FourierFTConfig(n_frequency=80, random_loc_seed=3, init_weights=False))
    ours.set_adapter(["a", "b"])
    checks, builds = [], []
    monkeypatch.setattr(_autograd, "check_values", lambda ok, message: checks.append(bool(ok)))
    build = ours._effective_weight
    monkeypatch.setattr(ours, "_effective_weight", lambda *a: builds.append(1) or build(*a))
    x = torch.randn(6, 30)
    outputs = [ours(x) for _ in range(3)]
    assert checks == [True] and all(torch.equal(y, outputs[0]) for y in outputs)
    ours.eval()
    with torch.no_grad():
        assert_close(ours(x), outputs[0], torch.float32)
        ours(x)
        assert len(builds) == 1
        ours.fourierft_spectrum["b"].mul_(2)  # an optimizer step on one adapter: a new effective weight
        changed = ours(x)
        ours.indices["a"] = ours.indices["a"].flip(1)  # new indices: checked, then used
        ours(x)
    assert len(builds) == 3 and checks == [True, True] and not torch.equal(changed, outputs[0])


@pytest.mark.parametrize("adapters", [["a"], ["a", "b"]], ids=["one", "two"])
def test_eval_cache_reads_coefficients_after_its_key(adapters):
    """A step on the coefficients that lands while an eval call is under way (another thread's), after the layer
    has gathered its adapters and before its cache takes their versions: the cache keeps a weight built from the
    coefficients it read after taking them, so that the next call is the updated model's. With several adapters
    the summed coefficients were read before, and the old model's weight stayed, keyed as the new one."""
    ours = sk.FourierFTLinear(torch.nn.Linear(30, 20), "a", sk.FourierFTConfig(n_frequency=50, init_weights=False))
    ours.update_layer("b", sk.FourierFTConfig(n_frequency=80, random_loc_seed=3, init_weights=False))
    ours.set_adapter(adapters)
    ours.eval()
    x = torch.randn(6, 30)
    cached_linear = ours._cached_linear

    def step_first(*args):
        ours.fourierft_spectrum["a"].add_(1.0)
        return cached_linear(*args)

    with torch.no_grad():
        before = ours(x)  # the cache holds the current model's weight
        ours._cached_linear = step_first
        ours(x)  # the step lands inside this call
        del ours._cached_linear
        got = ours(x)
        ours.cache_effective_weight = False
        assert_close(got, ours(x), torch.float32)
        assert not torch.allclose(got, before)


@pytest.mark.parametrize("tokens", [1, 600])
def test_eval_cache_follows_inplace_updates(tokens):
    ours, _ = pair(torch.nn.Linear(40, 30))
    opt = torch.optim.SGD(ours.parameters(), lr=0.1)
    x = torch.randn(tokens, 40)
    ours.eval()
    with torch.no_grad():
        first = ours(x)
        assert torch.equal(ours(x), first)
    ours.train()
    assert ours._cache is None  # training drops the eval cache's copy of the weight
    ours(x).sum().backward()
    opt.step()
    ours.eval()
    with torch.no_grad():
        after = ours(x)
        expected = sk.fourierft_linear(x, ours.base_layer.weight, ours.base_layer.bias,
                                       ours.fourierft_spectrum["default"], ours.indices["default"], 150.0,
                                       backend="reference")
    assert not torch.equal(after, first)
    assert_close(after, expected, torch.float32)


def bad_inputs():
    w, b, c = torch.randn(6, 5), torch.randn(6), torch.randn(4)
    ind = torch.tensor([[0, 1, 2, 3], [0, 1, 2, 3]])
    x = torch.randn(3, 5)
    return [
        ("in_features", (torch.randn(3, 4), w, b, c, ind), ValueError),
        ("floating-point", (torch.ones(3, 5, dtype=torch.int64), w, b, c, ind), TypeError),
        ("floating-point", (torch.randn(3, 5, dtype=torch.complex64), w, b, c, ind), TypeError),
        ("shape", (x, w, b, c, ind[:, :3]), ValueError),
        ("int64", (x, w, b, c, ind.int()), TypeError),
        ("n_frequency", (x, w, b, torch.randn(0), ind[:, :0]), ValueError),
        ("out of range", (x, w, b, c, torch.tensor([[0, 1, 2, 6], [0, 1, 2, 3]])), ValueError),
        ("out of range", (x, w, b, c, torch.tensor([[0, 1, 2, 3], [0, -1, 2, 3]])), ValueError),
        ("different devices", (x.to("meta"), w, b, c, ind), RuntimeError),
        ("0-d", (torch.tensor(1.0), w, b, c, ind), ValueError),
        ("same dtype", (x, w.double(), b, c, ind), TypeError),
        ("same dtype", (x, w, b.double(), c, ind), TypeError),
        ("bias must have shape", (x, w, b[None], c, ind), ValueError),
        ("weight must be a tensor", (x, None, b, c, ind), TypeError),
    ]


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("match,args,error", bad_inputs(), ids=lambda v: v if isinstance(v, str) else "")
def test_bad_input(match, args, error, backend):
    with pytest.raises(error, match=match):
        sk.fourierft_linear(*args, 1.0, backend=backend)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_bad_scaling_and_path(backend):
    x, w, c, ind = torch.randn(3, 5), torch.randn(6, 5), torch.randn(4), torch.tensor([[0, 1, 2, 3], [0, 1, 2, 3]])
    with pytest.raises(TypeError, match="scaling is a fixed hyper-parameter"):
        sk.fourierft_linear(x, w, None, c, ind, torch.tensor(2.0, requires_grad=True), backend=backend)
    for scaling in (float("nan"), float("inf"), 1j, "2", torch.ones(3), torch.tensor(1j), True):
        with pytest.raises(ValueError, match="scaling must be a finite real number"):
            sk.fourierft_linear(x, w, None, c, ind, scaling, backend=backend)
        with pytest.raises(ValueError, match="scaling must be a finite real number"):
            sk.fourierft_delta_weight(c, ind, 6, 5, scaling, backend=backend)
    assert_close(sk.fourierft_linear(x, w, None, c, ind, torch.tensor(2.0), backend=backend),
                 sk.fourierft_linear(x, w, None, c, ind, 2, backend=backend), torch.float32)
    with pytest.raises(ValueError, match="unknown FourierFT path"):  # the reference too, though it has one
        sk.fourierft_linear(x, w, None, c, ind, 2.0, backend=backend, path="slow")


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_delta_weight_bad_input(backend):
    """The public dW function checks its indices before any kernel reads them (a negative index used to corrupt
    the heap in the cpu kernel, one past the rows gave zeros)."""
    c, ind = torch.randn(4), torch.tensor([[0, 1, 2, 3], [0, 1, 2, 3]])
    for match, args, error in [
        ("out of range", (c, torch.tensor([[0, 1, 2, 6], [0, 1, 2, 3]]), 6, 5), ValueError),
        ("out of range", (c, torch.tensor([[0, -1, 2, 3], [0, 1, 2, 3]]), 6, 5), ValueError),
        ("out of range", (c, torch.tensor([[0, 1, 2, 3], [0, 1, 2, 5]]), 6, 5), ValueError),
        ("shape", (c, ind[:, :3], 6, 5), ValueError),
        ("int64", (c, ind.int(), 6, 5), TypeError),
        ("1-D floating-point", (c.long(), ind, 6, 5), ValueError),
        ("positive", (c, ind, 0, 5), ValueError),
        ("positive integers", (c, ind, 6.0, 5), ValueError),
        ("indices on meta", (c, ind.to("meta"), 6, 5), RuntimeError),
    ]:
        with pytest.raises(error, match=match):
            sk.fourierft_delta_weight(*args, 1.0, backend=backend)


def test_bad_layer_and_hyperparameters():
    with pytest.raises(TypeError, match="Unsupported layer type"):
        sk.FourierFTLinear(torch.nn.Conv2d(3, 3, 1))
    with pytest.raises(ValueError, match="n_frequency"):
        sk.FourierFTLinear(torch.nn.Linear(4, 3), n_frequency=13)
    with pytest.raises(ValueError, match="positive"):
        sk.FourierFTConfig(n_frequency=0)
    for scaling in (float("nan"), float("inf"), "150"):
        with pytest.raises(ValueError, match="scaling must be a finite real number"):
            sk.FourierFTConfig(scaling=scaling)
    with pytest.raises(ValueError, match="bias"):
        sk.FourierFTConfig(bias="some")
    for seed in (None, 1.5, "7", 2**64):  # peft fails later, in torch's manual_seed
        with pytest.raises(ValueError, match="random_loc_seed must be an integer seed"):
            sk.FourierFTConfig(random_loc_seed=seed)
    for n in (0, 2.5, True, "8"):
        with pytest.raises(ValueError, match=r"n_frequency_pattern\['q_proj'\] must be a positive integer"):
            sk.FourierFTConfig(n_frequency_pattern={"q_proj": n})
    for pattern in (None, [("q_proj", 8)]):
        with pytest.raises(ValueError, match="n_frequency_pattern must be a dict"):
            sk.FourierFTConfig(n_frequency_pattern=pattern)
    pattern = sk.FourierFTConfig(n_frequency_pattern=UserDict(q_proj=8)).n_frequency_pattern  # other mappings too
    assert type(pattern) is dict and pattern == {"q_proj": 8}


def test_backend_selection(monkeypatch):
    available = sk.backends()
    assert available["reference"] is None
    assert set(available) == {"reference", "cpu", "cuda", "triton"}
    x, w, b, c = torch.randn(2, 5), torch.randn(6, 5), torch.randn(6), torch.randn(4)
    ind = torch.tensor([[0, 1, 2, 3], [0, 1, 2, 3]])
    with pytest.raises(ValueError, match="unknown backend"):
        sk.fourierft_linear(x, w, b, c, ind, 1.0, backend="fast")
    with pytest.raises(RuntimeError, match="cannot run tensors on cpu|not available"):
        sk.fourierft_linear(x, w, b, c, ind, 1.0, backend="cuda")
    monkeypatch.setenv("SPECTRAL_KERNELS_BACKEND", "reference")
    assert sk.dispatch.select_backend(torch.device("cpu")) == "reference"
    # The measured crossover (dispatch.py): weight path from r = T (M + N) / (M N) = 1 on up to 1024 x 1024
    # elements, from r = 1.5 on above.
    assert sk.dispatch.fourierft_path(255, 512, 512) == "token"
    assert sk.dispatch.fourierft_path(256, 512, 512) == "weight"
    assert sk.dispatch.fourierft_path(512, 1024, 1024) == "weight"
    assert sk.dispatch.fourierft_path(1024, 2048, 2048) == "token"
    assert sk.dispatch.fourierft_path(1536, 2048, 2048) == "weight"
    assert sk.dispatch.fourierft_path(2048, 4096, 4096) == "token"
    assert sk.dispatch.fourierft_path(2048, 1024, 1024) == "weight"
    # The weight path transforms the spectrum's rows directly up to 3 coefficients a row.
    assert sk.dispatch.fourierft_direct_rows(3072, 1024)
    assert not sk.dispatch.fourierft_direct_rows(3073, 1024)
    monkeypatch.setenv("SPECTRAL_KERNELS_FOURIERFT_PATH", "token")
    assert sk.dispatch.fourierft_path(2048, 1024, 1024) == "token"
    monkeypatch.setenv("SPECTRAL_KERNELS_FOURIERFT_PATH", "slow")
    with pytest.raises(ValueError, match="unknown FourierFT path"):
        sk.dispatch.fourierft_path(1, 4, 4)


@pytest.mark.parametrize("device,backend", [pytest.param("cpu", "reference", id="reference-cpu")]
                         + device_backends())
@pytest.mark.parametrize("bad", [(0, 5), (1, 7), (1, 10**6), (0, -1)])
def test_indices_written_after_construction_are_checked(device, backend, bad):
    """Spectrum indices changed in place after set-up are checked again before use, in training and in eval, on
    every backend: a clear error, never a read or write out of bounds."""
    layer = sk.FourierFTLinear(torch.nn.Linear(7, 5), config=sk.FourierFTConfig(n_frequency=6),
                               backend=backend).to(device)
    x = torch.randn(3, 7, device=device)
    layer(x)
    row, value = bad
    with torch.no_grad():
        layer.indices["default"][row, 0] = value
    for train in (True, False):
        layer.train(train)
        with pytest.raises(ValueError, match="out of range"):
            layer(x)


def test_forward_on_meta_leaves_the_indices():
    """A forward on the meta device (shape propagation) leaves the indices where they were: they are not in the
    state dict, so indices moved to meta could not be filled by a later to_empty + load_state_dict."""
    torch.manual_seed(0)
    layer = sk.FourierFTLinear(torch.nn.Linear(24, 16), config=sk.FourierFTConfig(n_frequency=20, init_weights=False))
    x = torch.randn(3, 24)
    expected, state = layer(x).detach(), layer.state_dict()
    layer.to("meta")
    assert layer(x.to("meta")).shape == (3, 16)
    layer.to_empty(device="cpu").load_state_dict(state)
    assert_close(layer(x), expected, torch.float32)


def test_offloaded_coefficients_raise_where_the_base_layer_is_called():
    """Coefficients left on meta (accelerate's offload before the adapter was added) raise where the layer calls
    its base layer as peft's does (here for its hook), as the fused op does: peft's layer computes garbage."""
    layer = sk.FourierFTLinear(torch.nn.Linear(24, 16), config=sk.FourierFTConfig(n_frequency=20))
    layer.base_layer.register_forward_hook(lambda module, args, out: out)
    layer.fourierft_spectrum["default"] = torch.nn.Parameter(layer.fourierft_spectrum["default"].to("meta"))
    with pytest.raises(RuntimeError, match="different devices"):
        layer(torch.randn(3, 24))
    layer.base_layer._forward_hooks.clear()  # the fused op's own check
    with pytest.raises(RuntimeError, match="different devices"):
        layer(torch.randn(3, 24))
