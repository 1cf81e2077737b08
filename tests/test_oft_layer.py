"""OFTLinear against peft's own OFT layer, plus the layer's adapter handling and error messages."""
import copy
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import OFTConfig as PeftOFTConfig
from peft.tuners.oft.layer import Linear as PeftOFTLinear
from peft.tuners.oft.layer import OFTLayer as PeftOFTLayer
from transformers.pytorch_utils import Conv1D

import spectral_kernels as sk
from spectral_kernels.layers.oft import adjust_oft_parameters

from conftest import assert_close, assert_low_precision_close

MODES = {
    "neumann": dict(),
    "exact": dict(use_cayley_neumann=False),
    "shared": dict(block_share=True),
    "coft": dict(coft=True, eps=1e-2),
    "r": dict(r=6, oft_block_size=0),
}


def pair(base, backend=None, init_weights=False, **kwargs):
    """Ours and peft's layer over copies of ``base``, with identical parameters (same seed)."""
    kwargs = {"oft_block_size": 8, **kwargs}
    torch.manual_seed(0)
    config = PeftOFTConfig(init_weights=init_weights, **kwargs)
    peft = PeftOFTLinear(copy.deepcopy(base), "default", config=config, r=config.r)
    torch.manual_seed(0)
    ours = sk.OFTLinear(copy.deepcopy(base), config=sk.OFTConfig(init_weights=init_weights, **kwargs), backend=backend)
    return ours, peft


def features(layer):
    return layer.in_features


def outputs_and_grads(layer, x):
    """The output and the gradients of x and of every active adapter's parameters."""
    x = x.detach().requires_grad_()
    y = layer(x)
    y.backward(torch.linspace(-1, 1, y.numel()).reshape(y.shape))
    return y.detach(), x.grad, *(layer.oft_R[name].weight.grad for name in layer.active_adapters)


BASES = [lambda: torch.nn.Linear(48, 30), lambda: Conv1D(30, 48), lambda: torch.nn.Linear(48, 40, bias=False)]


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("base", BASES, ids=["linear", "conv1d", "nobias"])
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("tokens", [1, 7, 100])
def test_peft_parity(backend, base, mode, tokens):
    ours, peft = pair(base(), backend=backend, **MODES[mode])
    assert torch.equal(ours.oft_R["default"].weight, peft.oft_R["default"].weight)
    assert ours.state_dict().keys() == peft.state_dict().keys()
    assert (ours.r, ours.oft_block_size) == (peft.r, peft.oft_block_size)
    x = torch.randn(2, tokens, 48)
    for a, e in zip(outputs_and_grads(ours, x), outputs_and_grads(peft, x), strict=True):
        assert_close(a, e, torch.float32)
    assert_close(ours.oft_R["default"].weight, peft.oft_R["default"].weight, torch.float32)  # COFT projects in place
    assert_close(ours.get_delta_weight("default"), peft.get_delta_weight("default"), torch.float32)
    grads = []
    for layer in (ours, peft):  # differentiable as peft's: without COFT (peft projects without autograd)
        layer.zero_grad()
        delta = layer.get_delta_weight("default")
        if delta.requires_grad:
            delta.square().sum().backward()
        grads.append(layer.oft_R["default"].weight.grad)
    assert (grads[0] is None) == (grads[1] is None) == MODES[mode].get("coft", False)
    if grads[0] is not None:
        assert_close(*grads, torch.float32)
    with torch.no_grad():
        adapted = ours(x)
    ours.merge()
    assert_close(ours(x), adapted, torch.float32)
    if not isinstance(ours.base_layer, Conv1D):  # peft's OFT merge multiplies a Conv1D weight the wrong way round
        peft.merge()
        assert_close(ours.base_layer.weight, peft.base_layer.weight, torch.float32)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_coft_two_forwards_one_backward(backend):
    """COFT projects the parameters in place on every forward, as peft does; the Neumann kernels' backward read the
    parameters themselves, so a second forward before the backward (micro-batches summed into one loss) failed
    there with autograd's in-place error. peft's graph holds none of them."""
    ours, peft = pair(torch.nn.Linear(48, 30), backend=backend, **MODES["coft"])
    x1, x2 = torch.randn(3, 48), torch.randn(5, 48)
    for layer in (ours, peft):
        (layer(x1).square().sum() + layer(x2).square().sum()).backward()
    assert_close(ours.oft_R["default"].weight.grad, peft.oft_R["default"].weight.grad, torch.float32)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("coft", [False, True])
def test_one_neumann_term_like_peft(backend, coft):
    """One Neumann term is R = I: the base layer's output, and no gradient for the parameters (None, as peft's,
    which AdamW then skips rather than decaying them)."""
    ours, peft = pair(torch.nn.Linear(48, 30), backend=backend, num_cayley_neumann_terms=1, coft=coft)
    x = torch.randn(2, 7, 48)
    for layer in (ours, peft):
        x_in = x.clone().requires_grad_()
        y = layer(x_in)
        y.sum().backward()
        assert layer.oft_R["default"].weight.grad is None
        assert_close(y, layer.base_layer(x).detach(), torch.float32)
        assert_close(x_in.grad, layer.base_layer.weight.sum(0).expand(2, 7, 48), torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_peft_parity_dtypes(dtype):
    """The adapter follows the base layer's dtype, as in peft."""
    ours, peft = pair(torch.nn.Linear(48, 30).to(dtype))
    assert ours.oft_R["default"].weight.dtype == dtype
    x = torch.randn(5, 48, dtype=torch.float64)
    y_ours, y_peft = ours(x.to(dtype)), peft(x.to(dtype))
    exact = peft.base_layer.to(torch.float64)(peft.oft_R["default"].to(torch.float64)(x)).detach()
    tol = 3e-2 if dtype == torch.bfloat16 else 1e-10
    assert y_ours.dtype == dtype
    assert (y_ours.double() - exact).abs().max() <= max(tol, 2 * (y_peft.double() - exact).abs().max())


def test_multiple_adapters_apply_in_turn():
    base = torch.nn.Linear(48, 20)
    ours, peft = pair(base)
    second = dict(oft_block_size=12, use_cayley_neumann=False, init_weights=False)
    torch.manual_seed(1)
    peft.update_layer("b", 0, PeftOFTConfig(**second))
    torch.manual_seed(1)
    ours.update_layer("b", sk.OFTConfig(**second))
    assert not ours.oft_R["b"].weight.requires_grad
    for layer in (ours, peft):  # both adapters trainable then: both gradients are compared
        layer.set_adapter(["default", "b"])
    x = torch.randn(6, 48)
    for a, e in zip(outputs_and_grads(ours, x), outputs_and_grads(peft, x), strict=True):
        assert_close(a, e, torch.float32)
    ours.merge()
    peft.merge()
    assert_close(ours.base_layer.weight, peft.base_layer.weight, torch.float32)
    with pytest.raises(ValueError, match="unknown adapter"):
        ours.set_adapter("c")


@pytest.mark.parametrize("base", [BASES[0], BASES[1]], ids=["linear", "conv1d"])
@pytest.mark.parametrize("mode", ["neumann", "exact", "shared"])
def test_unmerge_restores_weight(base, mode):
    ours, _ = pair(base(), **MODES[mode])
    ours.update_layer("b", sk.OFTConfig(oft_block_size=16, init_weights=False))
    ours.set_adapter(["default", "b"])
    original = ours.base_layer.weight.detach().clone()
    x = torch.randn(4, 48)
    with torch.no_grad():
        adapted, base_output = ours(x), ours.base_layer(x)
    ours.merge(safe_merge=True)
    assert ours.merged_adapters == ["default", "b"]
    assert not torch.allclose(ours.base_layer.weight, original)
    ours.unmerge()
    assert not ours.merged
    assert_close(ours.base_layer.weight, original, torch.float32)
    ours.merge(adapter_names=["b"])
    ours.enable_adapters(False)  # as peft: the next call unmerges, then runs the base layer alone
    assert ours.merged
    with torch.no_grad():
        assert_close(ours(x), base_output, torch.float32)
    assert not ours.merged
    assert_close(ours.base_layer.weight, original, torch.float32)
    with torch.no_grad():
        ours.enable_adapters(True)
        assert_close(ours(x), adapted, torch.float32)


def test_loads_peft_state_dict():
    ours, peft = pair(torch.nn.Linear(32, 10))
    with torch.no_grad():
        peft.oft_R["default"].weight.mul_(3)
    ours.load_state_dict(peft.state_dict())
    x = torch.randn(4, 32)
    assert_close(ours(x), peft(x), torch.float32)


def test_init_weights_identity():
    ours, _ = pair(torch.nn.Linear(24, 9), init_weights=True)
    assert not ours.oft_R["default"].weight.any()
    x = torch.randn(3, 24)
    assert_close(ours(x), ours.base_layer(x), torch.float32)


def test_safe_merge_detects_nan():
    ours, _ = pair(torch.nn.Linear(16, 8))
    with torch.no_grad():
        ours.oft_R["default"].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaNs detected"):
        ours.merge(safe_merge=True)


@pytest.mark.parametrize("tokens", [1, 600])
def test_eval_caches_follow_inplace_updates(tokens):
    ours, _ = pair(torch.nn.Linear(40, 30))
    opt = torch.optim.SGD(ours.parameters(), lr=0.1)
    x = torch.randn(tokens, 40)
    ours.eval()
    with torch.no_grad():
        first = ours(x)
        assert torch.equal(ours(x), first)
    ours.train()
    ours(x).sum().backward()
    opt.step()
    ours.eval()
    with torch.no_grad():
        after = ours(x)
        rot = sk.oft_rotation(ours.oft_R["default"].weight, 8, backend="reference")
        expected = sk.oft_linear(x, ours.base_layer.weight, ours.base_layer.bias, rot, backend="reference")
    assert not torch.equal(after, first)
    assert_close(after, expected, torch.float32)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_eval_cache_rotations_follow_autocast(backend):
    """peft's torch code for R runs its products in autocast's dtype: a rotation kept from a call under autocast
    (reference backend) made the float32 calls after it bfloat16-accurate."""
    ours, peft = pair(torch.nn.Linear(48, 30), backend=backend)
    ours.eval()
    x = torch.randn(4, 48)
    with torch.no_grad():
        exact = copy.deepcopy(peft).double()(x.double())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert_low_precision_close(ours(x).bfloat16(), peft(x).bfloat16(), exact)
        assert_close(ours(x), peft(x), torch.float32)


@pytest.mark.parametrize("training", [True, False])
def test_caches_off_sees_data_writes(training):
    """With cache_effective_weight = False nothing is kept without autograd (not even the rotations), so writes
    through .data, which version counters do not see, are seen."""
    ours, _ = pair(torch.nn.Linear(40, 30))
    ours.cache_effective_weight = False
    ours.train(training)
    x = torch.randn(5, 40)
    with torch.no_grad():
        first = ours(x)
        ours.oft_R["default"].weight.data.mul_(3)
        rot = sk.oft_rotation(ours.oft_R["default"].weight, 8, backend="reference")
        expected = sk.oft_linear(x, ours.base_layer.weight, ours.base_layer.bias, rot, backend="reference")
        after = ours(x)
    assert not torch.equal(after, first)
    assert_close(after, expected, torch.float32)


@pytest.mark.parametrize("in_features", [48, 7, 30])
@pytest.mark.parametrize("block_size", [7, 64, 5])
def test_block_size_adjusted_as_peft(in_features, block_size):
    base = torch.nn.Linear(in_features, 3)
    with warnings.catch_warnings(record=True) as ours_warnings:
        warnings.simplefilter("always")
        ours, peft = pair(base, oft_block_size=block_size)
    assert (ours.r, ours.oft_block_size) == (peft.r, peft.oft_block_size)
    if in_features % block_size or block_size > in_features:
        assert any("Adjusted `oft_block_size`" in str(w.message) for w in ours_warnings)
    x = torch.randn(2, in_features)
    assert_close(ours(x), peft(x), torch.float32)


@settings(max_examples=200, deadline=None)
@given(in_features=st.integers(1, 300), params=st.integers(1, 400))
def test_adjustment_rule_is_peft(in_features, params):
    assert adjust_oft_parameters(in_features, params) == PeftOFTLayer.adjust_oft_parameters(None, in_features, params)


def bad_inputs():
    w, b = torch.randn(6, 12), torch.randn(6)
    rot = sk.oft_rotation(torch.zeros(3, 6), 4)
    x = torch.randn(3, 12)
    return [
        ("in_features", (torch.randn(3, 8), w, b, rot), ValueError),
        ("0-d", (torch.tensor(1.0), w, b, rot), ValueError),
        ("floating-point", (torch.ones(3, 12, dtype=torch.int64), w, b, rot), TypeError),
        ("does not divide", (x, w, b, sk.oft_rotation(torch.zeros(1, 10), 5)), ValueError),
        ("rotation blocks for", (x, w, b, sk.oft_rotation(torch.zeros(2, 6), 4)), ValueError),
        ("rotation blocks", (x, w, b, torch.zeros(3, 4, 5)), ValueError),
        ("same dtype", (x, w.double(), b, rot), TypeError),
        ("same dtype", (x, w, b.double(), rot), TypeError),
        ("bias", (x, w, b[:4], rot), ValueError),
        ("different devices", (x.to("meta"), w, b, rot), RuntimeError),
        ("different devices", (x, w, b, rot.to("meta")), RuntimeError),
        ("both positive", (x, w[:0], b[:0], rot), ValueError),
        ("both positive", (x[:, :0], w[:, :0], b, rot[:0, :0, :0]), ValueError),
    ]


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("match,args,error", bad_inputs(), ids=lambda v: v if isinstance(v, str) else "")
def test_bad_input(match, args, error, backend):
    with pytest.raises(error, match=match):
        sk.oft_linear(*args, backend=backend)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_zero_features_rejected(backend):
    """The rotation ops refuse zero-width inputs (the reference's block-diagonal matrix came out (1, 1) there) and
    oft_effective_weight a weight that is not 2-D."""
    rot = sk.oft_rotation(torch.zeros(1, 6), 4)
    with pytest.raises(ValueError, match="positive"):
        sk.oft_effective_weight(torch.randn(5, 0), rot, backend=backend)
    with pytest.raises(ValueError, match="positive"):
        sk.oft_rotate(torch.randn(3, 0), rot, backend=backend)
    with pytest.raises(ValueError, match="x is 0-d"):  # it said "in_features=-1"
        sk.oft_rotate(torch.tensor(1.0), rot, backend=backend)
    for weight in (torch.randn(8), torch.randn(2, 6, 8)):  # the same error from every backend
        with pytest.raises(ValueError, match="weight must be 2-D"):
            sk.oft_effective_weight(weight, rot, backend=backend)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_bad_path(backend):
    rot = sk.oft_rotation(torch.zeros(3, 6), 4)
    with pytest.raises(ValueError, match="unknown OFT path"):  # the reference too, though it has one
        sk.oft_linear(torch.randn(3, 12), torch.randn(6, 12), None, rot, backend=backend, path="slow")


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_bad_layer_and_hyperparameters():
    with pytest.raises(TypeError, match="Unsupported layer type"):
        sk.OFTLinear(torch.nn.Conv2d(3, 3, 1))
    with pytest.raises(ValueError, match="not both simultaneously"):
        sk.OFTConfig(r=4, oft_block_size=8)
    with pytest.raises(ValueError, match="must be non-zero"):
        sk.OFTConfig(r=0, oft_block_size=0)
    with pytest.raises(ValueError, match="num_cayley_neumann_terms"):
        sk.OFTConfig(num_cayley_neumann_terms=0)
    sk.OFTConfig(use_cayley_neumann=False, num_cayley_neumann_terms=0)  # unused then, as in peft
    with pytest.raises(ValueError, match="bias"):
        sk.OFTConfig(bias="some")
    for init_weights in ("gaussian", 1, 0, None):
        with pytest.raises(ValueError, match="Unknown initialization"):
            sk.OFTConfig(init_weights=init_weights)
    edited = sk.OFTConfig(oft_block_size=4)
    edited.r = 2  # past the config's own check
    with pytest.raises(ValueError, match="exactly one of r and oft_block_size"):
        sk.OFTLinear(torch.nn.Linear(8, 4), config=sk.OFTConfig(oft_block_size=4)).update_layer("b", edited)
    with pytest.raises(ValueError, match="must have shape"):
        sk.oft_rotation(torch.zeros(2, 5), 4)
    with pytest.raises(ValueError, match="num_cayley_neumann_terms"):
        sk.oft_rotation(torch.zeros(2, 6), 4, num_cayley_neumann_terms=0)
    for neumann, terms in ((False, 5), (True, 1), (True, 5)):  # also where no kernel would run
        with pytest.raises(ValueError, match="unknown backend"):
            sk.oft_rotation(torch.zeros(2, 6), 4, neumann, terms, backend="bogus")
    with pytest.raises(ValueError, match="OFT needs a layer with in_features >= 1"):
        sk.OFTLinear(torch.nn.Linear(0, 3))
    for field, value in [("oft_block_size", 8.5), ("num_cayley_neumann_terms", 2.5), ("eps", float("nan")),
                         ("eps", -1e-3), ("module_dropout", 2.0), ("module_dropout", float("nan"))]:
        with pytest.raises(ValueError, match=field):
            sk.OFTConfig(**{field: value})


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_oft_rotation_bad_input(backend):
    """Integer parameters gave an integer (wrong) exact Cayley transform; complex ones and block size 0 passed."""
    for params, b, error, match in [(torch.tensor([[2, 0, 0]]), 3, TypeError, "floating-point"),
                                    (torch.zeros(2, 3, dtype=torch.complex64), 3, TypeError, "floating-point"),
                                    (None, 3, TypeError, "floating-point"),
                                    (torch.zeros(2, 0), 0, ValueError, "positive integer"),
                                    (torch.zeros(2, 3), 3.0, ValueError, "positive integer"),
                                    (torch.zeros(2, 0), -1, ValueError, "positive integer")]:
        for neumann in (True, False):
            with pytest.raises(error, match=match):
                sk.oft_rotation(params, b, use_cayley_neumann=neumann, backend=backend)
    with pytest.raises(ValueError, match="num_cayley_neumann_terms must be an integer"):
        sk.oft_rotation(torch.zeros(2, 3), 3, num_cayley_neumann_terms=2.5, backend=backend)
    assert torch.equal(sk.oft_rotation(torch.zeros(2, 0), 1, backend=backend), torch.ones(2, 1, 1))


def test_path_selection(monkeypatch):
    assert sk.dispatch.oft_path(10, 1000) == "token"
    assert sk.dispatch.oft_path(5000, 1000) == "weight"
    monkeypatch.setenv("SPECTRAL_KERNELS_OFT_PATH", "weight")
    assert sk.dispatch.oft_path(1, 1000) == "weight"
    monkeypatch.setenv("SPECTRAL_KERNELS_OFT_PATH", "slow")
    with pytest.raises(ValueError, match="unknown OFT path"):
        sk.dispatch.oft_path(1, 4)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_half_precision_merge_rounds_once(backend):
    """A bf16 layer with float32 adapter parameters (what inject and peft make of bf16 models) merges and
    unmerges in float32, rounding once, as peft: the merged weight is the exact one rounded to bf16, and
    unmerge comes as close to the original weight as peft's does."""
    torch.manual_seed(9)
    ours, peft = pair(torch.nn.Linear(256, 128).to(torch.bfloat16), backend, oft_block_size=32)
    for layer in (ours, peft):
        layer.oft_R.float()
    original = ours.base_layer.weight.detach().double()
    exact = original @ ours.get_delta_weight("default").detach().double().t()
    for layer in (ours, peft):
        layer.merge()
    merged = ours.base_layer.weight.detach().double()
    assert ((merged - exact).abs() <= 2**-8 * exact.abs() + 1e-6).all()  # half a bf16 ulp (and float32's error)
    assert (merged != peft.base_layer.weight.double()).float().mean() < 0.01  # ties of the last float32 bit
    for layer in (ours, peft):
        layer.unmerge()
    restored, theirs = ((layer.base_layer.weight.double() - original).abs().max() for layer in (ours, peft))
    assert restored <= theirs
