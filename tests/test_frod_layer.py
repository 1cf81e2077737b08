"""FrodLinear and FRoD's projection set-up against peft's own FRoD, plus the layer's adapter handling."""
import copy
import gc
import weakref

import pytest
import torch
from peft import FrodConfig as PeftFrodConfig
from peft import get_peft_model
from peft.tuners.frod.model import _category_from_key, _layer_index_from_key
from torch import nn
from transformers.pytorch_utils import Conv1D

import spectral_kernels as sk
from spectral_kernels import dispatch
from spectral_kernels.layers.frod import frod_category, frod_layer_index, frod_projections

from conftest import assert_close, assert_low_precision_close, device_backends

pytestmark = pytest.mark.filterwarnings("ignore:Sparse invariant checks:UserWarning")


class Block(nn.Module):
    def __init__(self, d, wide, conv1d):
        super().__init__()
        self.q_proj = Conv1D(d, d) if conv1d else nn.Linear(d, d)
        self.up_proj = Conv1D(wide, d) if conv1d else nn.Linear(d, wide, bias=False)
        self.down_proj = Conv1D(d, wide) if conv1d else nn.Linear(wide, d)

    def forward(self, x):
        return self.down_proj(torch.tanh(self.up_proj(self.q_proj(x))))


class Toy(nn.Module):
    """A stack of blocks: categories q_proj, up_proj (wide, SVD path for one layer) and down_proj."""

    def __init__(self, d=12, wide=20, blocks=3, conv1d=False):
        super().__init__()
        self.layers = nn.ModuleList(Block(d, wide, conv1d) for _ in range(blocks))

    def forward(self, x):
        for block in self.layers:
            x = x + block(x)
        return x


def ours_like_peft(peft_model, base, config, backend=None):
    """``base`` with our FrodLinear in every module peft adapted, projections built by frod_projections."""
    keys = [k for k, m in peft_model.base_model.model.named_modules() if hasattr(m, "frod_lambda_l")]
    weights = {}
    for i, key in enumerate(keys):
        module = base.get_submodule(key)
        weight = module.weight.t() if isinstance(module, Conv1D) else module.weight
        weights.setdefault(frod_category(key), {})[frod_layer_index(key, i)] = weight
    projections = frod_projections({c: [w for _, w in sorted(d.items())] for c, d in weights.items()}, config)
    shared = {c: (sk.layers.frod.BufferDict(), sk.layers.frod.BufferDict()) for c in projections}
    for category, (v, s_indices) in projections.items():
        shared[category][0]["default"], shared[category][1]["default"] = v, s_indices
    for key in keys:
        parent, _, name = key.rpartition(".")
        layer = sk.FrodLinear(base.get_submodule(key), config=config, frod_V=shared[frod_category(key)][0],
                              frod_s_indices=shared[frod_category(key)][1], backend=backend)
        setattr(base.get_submodule(parent), name, layer)
    return base, projections, keys


def build_pair(conv1d=False, backend=None, **kwargs):
    kwargs = {"target_modules": ["q_proj", "up_proj", "down_proj"], "sparse_rate": 0.05, "init_weights": False,
              "progressbar": False, **kwargs}
    torch.manual_seed(0)
    base = Toy(conv1d=conv1d)
    ours_base = copy.deepcopy(base)
    torch.manual_seed(1)
    peft_model = get_peft_model(base, PeftFrodConfig(fan_in_fan_out=conv1d, **kwargs))
    torch.manual_seed(1)
    ours, projections, keys = ours_like_peft(peft_model, ours_base, sk.FrodConfig(fan_in_fan_out=conv1d, **kwargs),
                                             backend)
    return ours, peft_model, projections, keys


def test_inject_frees_the_projections_factorizations(monkeypatch):
    """The layers of a category share V's LU factorisation while sk.inject builds them (one per category), and
    it goes with the inject: kept per V for the model's lifetime, it held a float64 n x n matrix per category,
    on the weights' device, for nothing."""
    factorizations = []

    def recorded(a):
        result = lu_factor_ex(a)
        factorizations.append(result[0])
        return result

    lu_factor_ex = torch.linalg.lu_factor_ex
    monkeypatch.setattr(torch.linalg, "lu_factor_ex", recorded)
    torch.manual_seed(0)
    model = sk.inject(Toy(), sk.FrodConfig(target_modules=["q_proj", "up_proj", "down_proj"], progressbar=False))
    assert len(factorizations) == 3
    kept = [weakref.ref(f) for f in factorizations]
    factorizations.clear()
    gc.collect()
    assert [ref() for ref in kept] == [None] * 3
    assert model(torch.randn(4, 12)).isfinite().all()


@pytest.mark.parametrize("key", ["encoder.layer.0.attention.self.query", "encoder.layer.11.attention.output.dense",
                                 "encoder.layer.3.output.dense", "model.layers.7.self_attn.q_proj",
                                 "transformer.h.2.attn.c_attn", "lm_head", "layers.4.mlp", "classifier.dense"])
def test_category_and_index_rules(key):
    assert frod_category(key) == _category_from_key(key)
    assert frod_layer_index(key, 5) == _layer_index_from_key(key, 5)


@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("sparse_rate", [0.05, 1.0])  # 1.0: the largest, every off-diagonal position
def test_peft_parity(conv1d, backend, sparse_rate):
    ours, peft_model, projections, keys = build_pair(conv1d, backend, sparse_rate=sparse_rate)
    for category, (v, s_indices) in projections.items():
        assert torch.equal(v, peft_model.base_model.frod_V[category]["default"]), category
        assert torch.equal(s_indices, peft_model.base_model.frod_s_indices[category]["default"]), category
    for key in keys:
        a, e = ours.get_submodule(key), peft_model.base_model.model.get_submodule(key)
        assert a.state_dict().keys() == e.state_dict().keys()
        for name in ("frod_lambda_l", "frod_lambda_s_values"):
            assert torch.equal(getattr(a, name)["default"], getattr(e, name)["default"]), (key, name)
        assert_close(a.frod_U["default"], e.frod_U["default"], torch.float32)
    x = torch.randn(2, 5, 12)
    y_ours, y_peft = ours(x), peft_model(x)
    assert_close(y_ours, y_peft, torch.float32)
    y_ours.square().sum().backward()
    y_peft.square().sum().backward()
    for key in keys:
        a, e = ours.get_submodule(key), peft_model.base_model.model.get_submodule(key)
        for name in ("frod_lambda_l", "frod_lambda_s_values"):
            assert_close(getattr(a, name)["default"].grad, getattr(e, name)["default"].grad, torch.float32)
        assert_close(a.get_delta_weight("default"), e.get_delta_weight("default"), torch.float32)
        for layer in (a, e):  # differentiable, as peft's
            layer.zero_grad()
            layer.get_delta_weight("default").square().sum().backward()
        for name in ("frod_lambda_l", "frod_lambda_s_values"):
            assert_close(getattr(a, name)["default"].grad, getattr(e, name)["default"].grad, torch.float32)


def test_merge_unmerge_and_eval_cache():
    ours, peft_model, _, keys = build_pair()
    x = torch.randn(4, 12)
    ours.eval()
    peft_model.eval()
    with torch.no_grad():
        adapted = ours(x)
        assert_close(adapted, peft_model(x), torch.float32)
        layer, theirs = ours.get_submodule(keys[0]), peft_model.base_model.model.get_submodule(keys[0])
        base_weight = layer.base_layer.weight.clone()
        probe = torch.randn(3, 12)
        before = layer(probe)
        for values in (layer.frod_lambda_s_values["default"], theirs.frod_lambda_s_values["default"]):
            values.mul_(2)  # an in-place update invalidates the cached W'
        changed = layer(probe)
        assert_close(changed, theirs(probe), torch.float32)
        assert (changed - before).abs().max() > 0.1
        for values in (layer.frod_lambda_s_values["default"], theirs.frod_lambda_s_values["default"]):
            values.div_(2)
        for key in keys:
            ours.get_submodule(key).merge()
        assert_close(ours(x), adapted, torch.float32)
        for key in keys:
            ours.get_submodule(key).unmerge()
        assert torch.equal(layer.base_layer.weight, base_weight)  # restored exactly, as peft
        assert_close(ours(x), adapted, torch.float32)


def test_merging_nothing_keeps_no_copy_of_the_weight():
    """merge() of an adapter the layer lacks (a model-wide merge of an adapter on other layers) or one safe_merge
    refuses merges nothing: get_delta_weight goes on from the base weight as it is, as peft's (it kept reading the
    copy taken for the merge, from before later changes to the weight)."""
    torch.manual_seed(0)
    layer = sk.FrodLinear(nn.Linear(10, 6), config=sk.FrodConfig(sparse_rate=0.2, init_weights=False))
    layer.update_layer("broken", sk.FrodConfig(sparse_rate=0.2, init_weights=False))
    with torch.no_grad():
        layer.frod_lambda_l["broken"][0] = float("nan")
    for merge in (lambda: layer.merge(adapter_names=["elsewhere"]),
                  lambda: layer.merge(safe_merge=True, adapter_names=["broken"])):
        try:
            merge()
        except ValueError as err:
            assert "NaNs detected" in str(err)
        assert not layer.merged
        with torch.no_grad():
            layer.base_layer.weight.mul_(2)  # e.g. another base checkpoint loaded
        u, v, lam, s_values, s_indices = layer._tensors("default")
        expected = sk.frod_effective_weight(u, v, lam, s_values, s_indices) - layer.base_layer.weight
        assert_close(layer.get_delta_weight("default"), expected, torch.float32)


def test_dropout_and_two_adapters():
    """The base-output path (dropout in training, several adapters) follows peft's arithmetic."""
    torch.manual_seed(0)
    base = nn.Linear(10, 6)
    config = sk.FrodConfig(sparse_rate=0.2, init_weights=False, frod_dropout=0.3)
    layer = sk.FrodLinear(copy.deepcopy(base), config=config)
    layer.update_layer("other", sk.FrodConfig(sparse_rate=0.2, init_weights=False))
    assert torch.equal(layer.frod_s_indices["other"], layer.frod_s_indices["default"])  # shared per category
    x = torch.randn(5, 10)
    layer.train()
    torch.manual_seed(3)
    y = layer(x)
    torch.manual_seed(3)
    h = nn.functional.dropout(x, 0.3)
    delta = layer.get_delta_weight("default")
    assert_close(y, base(x) + h @ delta.t(), torch.float32)
    layer.set_adapter(["default", "other"])
    layer.eval()
    expected = base(x) + x @ (delta + layer.get_delta_weight("other")).t()
    assert_close(layer(x), expected, torch.float32)
    layer.enable_adapters(False)
    assert_close(layer(x), base(x), torch.float32)
    dropped = sk.FrodLinear(copy.deepcopy(base), config=sk.FrodConfig(sparse_rate=0.2, init_weights=False,
                                                                          frod_dropout=1.0)).train()
    assert_close(dropped(x), base(x), torch.float32)  # p = 1 (peft takes it): every input dropped, the base's output


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_layer(dtype):
    torch.manual_seed(0)
    base = nn.Linear(16, 8).to(dtype)
    layer = sk.FrodLinear(copy.deepcopy(base), config=sk.FrodConfig(sparse_rate=0.1, init_weights=False))
    assert layer.frod_lambda_l["default"].dtype == dtype
    x, g = torch.randn(3, 16, dtype=torch.float64), torch.randn(3, 8, dtype=torch.float64)

    def run(layer):
        """The output and the gradients of x, lambda and S's values, in the layer's dtype."""
        xi = x.to(layer.base_layer.weight.dtype).requires_grad_()
        params = [layer.frod_lambda_l["default"], layer.frod_lambda_s_values["default"]]
        y = layer(xi)
        return [y, *torch.autograd.grad(y, [xi, *params], g.to(y.dtype))]

    def reference(dtype):
        copied = copy.deepcopy(layer).to(dtype)
        copied.backend = "reference"
        return run(copied)

    got = run(layer)
    assert [t.dtype for t in got] == [dtype] * 4
    for a, r, e in zip(got, reference(dtype), reference(torch.float64), strict=True):
        assert_low_precision_close(a, r, e)


def test_runtime_offload_base_weight():
    """The offloading layer computes what one without it does, merged too (the offload itself needs a GPU)."""
    base, x = nn.Linear(8, 4), torch.randn(2, 8)

    def layer(offload):
        torch.manual_seed(0)
        return sk.FrodLinear(copy.deepcopy(base), config=sk.FrodConfig(
            sparse_rate=0.2, init_weights=False, runtime_offload_base_weight=offload))

    offloading, plain = layer(True), layer(False)
    y = offloading(x)
    assert offloading.base_layer.weight.device.type == "cpu"
    assert_close(y, plain(x), torch.float32)
    assert (y - base(x)).abs().max() > 0.1
    offloading.merge()
    assert_close(offloading(x), y, torch.float32)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the base weight is offloaded from a GPU to the CPU")
def test_offloaded_base_weight_comes_back():
    """unload and deleting the last adapter give the base layer back on the model's device, as peft's unload."""
    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(8, 4)

        def forward(self, x):
            return self.proj(x)

    config = sk.FrodConfig(target_modules=["proj"], runtime_offload_base_weight=True, progressbar=False)
    x = torch.randn(2, 8, device="cuda")
    model = sk.inject(Holder().cuda(), config)
    model(x)
    assert model.proj.base_layer.weight.device.type == "cpu"
    sk.unload(model)
    assert model.proj.weight.device.type == "cuda"
    layer = sk.inject(model, config).proj
    model(x)
    sk.delete_adapter(model, "default")
    assert layer.base_layer.weight.device.type == "cuda"
    assert_close(model(x), layer.base_layer(x), torch.float32)


def test_init_weights_is_identity():
    """Default init: W' = W, so the layer computes the base layer (as in peft)."""
    base = nn.Linear(9, 5)
    layer = sk.FrodLinear(copy.deepcopy(base))
    x = torch.randn(3, 9)
    assert_close(layer(x), base(x), torch.float32)


def test_bad_input():
    with pytest.raises(ValueError, match="sparse_rate"):
        sk.FrodConfig(sparse_rate=1.5)
    for dropout in (1.5, -0.1, float("nan")):
        with pytest.raises(ValueError, match="frod_dropout"):
            sk.FrodConfig(frod_dropout=dropout)
    for key in (1.5, None, "0", 2**64, -2**63 - 1):
        with pytest.raises(ValueError, match="projection_prng_key"):
            sk.FrodConfig(projection_prng_key=key)
    for alpha in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ValueError, match="regularization_alpha"):
            sk.FrodConfig(regularization_alpha=alpha)
    for bias in ("frod", "only", None):
        with pytest.raises(ValueError, match="bias"):
            sk.FrodConfig(bias=bias)
    with pytest.raises(ValueError, match="layers_to_transform"):
        sk.FrodConfig(layers_pattern="layers")
    with pytest.raises(TypeError, match="Unsupported layer type"):
        sk.FrodLinear(nn.Conv2d(3, 3, 1))
    other = sk.FrodLinear(nn.Linear(6, 6))
    with pytest.raises(ValueError, match="does not fit"):
        sk.FrodLinear(nn.Linear(8, 4), frod_V=other.frod_V, frod_s_indices=other.frod_s_indices)
    with pytest.raises(ValueError, match="both"):
        sk.FrodLinear(nn.Linear(6, 4), frod_V=other.frod_V)
    with pytest.raises(ValueError, match="in_features=6"):
        other(torch.randn(2, 5))


@pytest.mark.parametrize("device,backend", [pytest.param("cpu", "reference", id="reference-cpu")]
                         + device_backends())
@pytest.mark.parametrize("bad", [6, 10**6, -1])
def test_indices_written_after_construction_are_checked(device, backend, bad):
    """S indices changed in place after set-up (as load_state_dict does) are checked again before use, in
    training and in eval, on every backend: a clear error, never a read out of bounds."""
    layer = sk.FrodLinear(nn.Linear(6, 4), config=sk.FrodConfig(sparse_rate=0.2), backend=backend).to(device)
    x = torch.randn(3, 6, device=device)
    layer(x)
    with torch.no_grad():
        layer.frod_s_indices["default"][1, 0] = bad
    for train in (True, False):
        layer.train(train)
        with pytest.raises(ValueError, match="out of range"):
            layer(x)


@pytest.mark.parametrize("device,backend", [pytest.param("cpu", "reference", id="reference")] + device_backends())
def test_no_sparse_entries_no_s_gradient(device, backend):
    """sparse_rate 0: S has no values, and no gradient for them (None, as peft gives), on every backend; lambda's
    gradient as the reference's."""
    def layer(backend):
        torch.manual_seed(0)  # the same base layer and initial lambda for both
        return sk.FrodLinear(nn.Linear(10, 7), config=sk.FrodConfig(sparse_rate=0.0, init_weights=False),
                             backend=backend).to(device)

    layers = [layer(backend), layer("reference")]
    x = torch.randn(5, 10, device=device)
    for layer in layers:
        assert layer.frod_lambda_s_values["default"].numel() == 0
        layer(x).square().sum().backward()
        assert layer.frod_lambda_s_values["default"].grad is None
    assert_close(layers[0].frod_lambda_l["default"].grad, layers[1].frod_lambda_l["default"].grad, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("path", dispatch.FROD_PATHS)
def test_peft_parity_many_tokens(dtype, path, monkeypatch):
    """With sparse entries and 100 tokens (on the factored path the CPU mix's register blocks of every width,
    then single tokens), against peft in float32 and float64: outputs and the gradients of x, lambda and the S
    values."""
    monkeypatch.setenv(dispatch.ENV_FROD_PATH, path)
    ours, peft_model, _, keys = build_pair(backend="cpu")
    ours, peft_model = ours.to(dtype), peft_model.to(dtype)
    x = torch.randn(4, 25, 12, dtype=dtype)
    xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
    y_ours, y_peft = ours(xs[0]), peft_model(xs[1])
    assert_close(y_ours, y_peft, dtype)
    y_ours.square().sum().backward()
    y_peft.square().sum().backward()
    assert_close(xs[0].grad, xs[1].grad, dtype)
    for key in keys:
        a, e = ours.get_submodule(key), peft_model.base_model.model.get_submodule(key)
        for name in ("frod_lambda_l", "frod_lambda_s_values"):
            assert_close(getattr(a, name)["default"].grad, getattr(e, name)["default"].grad, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_peft_parity_without_sparse_entries(dtype):
    """sparse_rate 0 in a model, against peft: same outputs and lambda gradients, no S gradient on either side."""
    ours, peft_model, _, keys = build_pair(backend="cpu", sparse_rate=0.0)
    ours, peft_model = ours.to(dtype), peft_model.to(dtype)
    x = torch.randn(2, 5, 12, dtype=dtype)
    y_ours, y_peft = ours(x), peft_model(x)
    assert_close(y_ours, y_peft, dtype)
    y_ours.square().sum().backward()
    y_peft.square().sum().backward()
    for key in keys:
        a, e = ours.get_submodule(key), peft_model.base_model.model.get_submodule(key)
        assert a.frod_lambda_s_values["default"].grad is None and e.frod_lambda_s_values["default"].grad is None
        assert_close(a.frod_lambda_l["default"].grad, e.frod_lambda_l["default"].grad, dtype)
