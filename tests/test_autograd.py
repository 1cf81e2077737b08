"""The fused ops under torch's autograd machinery: second derivatives, torch.func transforms, autocast.

A graph recorded with create_graph=True must give the same first-order gradients as
without it; differentiating those gradients once more must raise (the kernels'
backward is not differentiable), never return silently wrong numbers.
"""
import subprocess
import sys

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import spectral_kernels as sk
from spectral_kernels import dispatch
from spectral_kernels.layers.fourierft import fourierft_indices

from conftest import assert_close, device_backends, selective_checkpointing

D_IN, D_OUT, TOKENS, BLOCK = 12, 10, 5, 4

pytestmark = pytest.mark.filterwarnings("ignore:Sparse invariant checks:UserWarning")  # FRoD's reference (peft's)


def on(device, dtype, *tensors):
    return [t.to(device, dtype if t.is_floating_point() else t.dtype) for t in tensors]

# Each case builder returns (the trainable tensors, the op as a function of x and them), its fixed tensors on
# ``device`` in ``dtype``.


def fourierft(backend, path, device, dtype, g):
    weight, bias, indices = on(device, dtype, torch.randn(D_OUT, D_IN, generator=g), torch.randn(D_OUT, generator=g),
                               fourierft_indices(D_OUT, D_IN, 30, 777))

    def fn(x, spectrum):
        return sk.fourierft_linear(x, weight, bias, spectrum, indices, 150.0, backend, path)

    return [torch.randn(30, generator=g)], fn


def oft(backend, path, device, dtype, g):
    weight, bias = on(device, dtype, torch.randn(D_OUT, D_IN, generator=g), torch.randn(D_OUT, generator=g))

    def fn(x, params):  # the Neumann rotation runs in its own C++ op on the cpu backend
        return sk.oft_linear(x, weight, bias, sk.oft_rotation(params, BLOCK, backend=backend), backend, path)

    return [0.1 * torch.randn(D_IN // BLOCK, BLOCK * (BLOCK - 1) // 2, generator=g)], fn


def oft_rotate(backend, path, device, dtype, g):
    rot = torch.linalg.matrix_exp(torch.randn(D_IN // BLOCK, BLOCK, BLOCK, generator=g))
    return [rot], lambda x, rot: sk.oft_rotate(x, rot, backend)


def frod(backend, path, device, dtype, g):
    u, v, s_indices = on(device, dtype, torch.randn(D_OUT, D_IN, generator=g), torch.randn(D_IN, D_IN, generator=g),
                         torch.tensor([[0, 3, 7], [5, 1, 2]]))

    def fn(x, lam, s_values):
        return sk.frod_linear(x, u, v, lam, s_values, s_indices, None, backend, path)

    return [torch.randn(D_IN, generator=g), torch.randn(3, generator=g)], fn


CASES = [pytest.param(fourierft, path, id=f"fourierft-{path}") for path in dispatch.FOURIERFT_PATHS] + \
        [pytest.param(oft, path, id=f"oft-{path}") for path in dispatch.OFT_PATHS] + \
        [pytest.param(oft_rotate, None, id="oft_rotate")] + \
        [pytest.param(frod, path, id=f"frod-{path}") for path in dispatch.FROD_PATHS]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("device,backend", device_backends())
@pytest.mark.parametrize("make,path", CASES)
def test_first_order_only(device, backend, make, path, dtype):
    g = torch.Generator().manual_seed(0)
    params, fn = make(backend, path, device, dtype, g)
    inputs = [t.to(device, dtype).requires_grad_() for t in (torch.randn(TOKENS, D_IN, generator=g), *params)]
    plain = torch.autograd.grad(fn(*inputs).square().sum(), inputs)
    recorded = torch.autograd.grad(fn(*inputs).square().sum(), inputs, create_graph=True)
    for got, expected in zip(recorded, plain):
        assert_close(got.detach(), expected, dtype)
    total = sum(grad.square().sum() for grad in recorded)
    with pytest.raises(RuntimeError, match="not differentiable"):
        torch.autograd.grad(total, inputs, retain_graph=True)
    for grad, one in zip(recorded, inputs):  # never None for a gradient in its own input (OFT's parameters gave it)
        with pytest.raises(RuntimeError, match="not differentiable"):
            torch.autograd.grad(grad.square().sum(), one, retain_graph=True, allow_unused=True)


@pytest.mark.parametrize("make,path", CASES)
def test_reference_has_second_derivatives(make, path):
    """The alternative the error names: the reference backend's gradients are differentiable (float64)."""
    params, fn = make("reference", path, "cpu", torch.float64, torch.Generator().manual_seed(0))
    x = torch.randn(TOKENS, D_IN, generator=torch.Generator().manual_seed(1))
    inputs = [t.double().requires_grad_() for t in (x, *params)]
    assert torch.autograd.gradgradcheck(lambda *args: fn(*args).pow(3).sum(), inputs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("make,path", CASES)
def test_torch_func_transforms_run_the_reference(make, path, dtype):
    """Under torch.func transforms (grad, vmap) the automatic choice is the reference backend, whose torch ops
    have functorch's rules; a kernel backend asked for by name refuses with a clear error."""
    def build(backend):
        params, fn = make(backend, path, "cpu", dtype, torch.Generator().manual_seed(0))
        return [t.to(dtype) for t in params], fn

    (params, fn), (_, reference) = build(None), build("reference")
    x = torch.randn(3, TOKENS, D_IN, generator=torch.Generator().manual_seed(1)).to(dtype)
    argnums = tuple(range(1, len(params) + 1))
    grads = torch.func.grad(lambda x, *p: fn(x, *p).square().sum(), argnums)(x, *params)
    inputs = [t.clone().requires_grad_() for t in params]
    for got, expected in zip(grads, torch.autograd.grad(reference(x, *inputs).square().sum(), inputs)):
        assert_close(got, expected, dtype)
    assert_close(torch.vmap(lambda row: fn(row, *params))(x), reference(x, *params), dtype)
    _, kernel = build("cpu")
    with pytest.raises(RuntimeError, match="cannot run under torch.func transforms"):
        torch.vmap(lambda row: kernel(row, *params))(x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("device,backend", [*device_backends(), pytest.param("cpu", "reference", id="reference-cpu")])
@pytest.mark.parametrize("make,path", CASES)
def test_batched_backward(device, backend, make, path, dtype):
    """A backward autograd runs under vmap after an ordinary forward (is_grads_batched=True, and so
    torch.autograd.functional.jacobian(vectorize=True)) gives each row of grad_outputs the gradients a backward of
    that row alone gives (the kernels' backward ran on the batched tensors and failed). FRoD's reference, peft's
    sparse product, has no batching rule for the gradient of S's values, as peft's layer."""
    g = torch.Generator().manual_seed(0)
    params, fn = make(backend, path, device, dtype, g)
    inputs = [t.to(device, dtype).requires_grad_() for t in (torch.randn(TOKENS, D_IN, generator=g), *params)]
    x, *params = inputs
    y = fn(*inputs)
    rows = torch.randn(3, *y.shape, generator=g).to(device, dtype)
    if make is frod and backend == "reference":
        with pytest.raises(NotImplementedError, match="SparseCPU"):
            torch.autograd.grad(y, inputs[-1], rows, retain_graph=True, is_grads_batched=True)
        inputs = inputs[:-1]
    batched = torch.autograd.grad(y, inputs, rows, retain_graph=True, is_grads_batched=True)
    for i, row in enumerate(rows):
        for got, expected in zip(batched, torch.autograd.grad(y, inputs, row, retain_graph=True), strict=True):
            assert_close(got[i], expected, dtype)
    jacobian = torch.autograd.functional.jacobian(lambda x: fn(x, *params), x.detach(), vectorize=True)
    eye = torch.eye(y.numel(), device=device, dtype=dtype).reshape(-1, *y.shape)
    assert_close(jacobian.reshape(y.numel(), -1),
                 torch.stack([torch.autograd.grad(y, x, e, retain_graph=True)[0].flatten() for e in eye]), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("make,path", CASES)
def test_compiled_torch_func_transforms(make, path, dtype):
    """torch.compile of a torch.func transform runs the reference backend too (the kernels' custom ops went into
    the traced graph and failed there: they have no functorch rules)."""
    torch._dynamo.reset()
    params, fn = make(None, path, "cpu", dtype, torch.Generator().manual_seed(0))
    params = [t.to(dtype) for t in params]
    x = torch.randn(TOKENS, D_IN, generator=torch.Generator().manual_seed(1)).to(dtype)
    argnums = tuple(range(1, len(params) + 1))
    transform = torch.func.grad(lambda x, *p: fn(x, *p).square().sum(), argnums)
    compiled = torch.compile(transform, backend="aot_eager")(x, *params)  # FRoD's reference breaks the graph
    for got, expected in zip(compiled, transform(x, *params), strict=True):
        assert_close(got, expected, dtype)


_COLD_CHECKPOINT = """
import torch
from torch.utils.checkpoint import checkpoint
import spectral_kernels as sk

torch.manual_seed(0)
for layer in (sk.FourierFTLinear(torch.nn.Linear(16, 12), config=sk.FourierFTConfig(n_frequency=20)),
              sk.OFTLinear(torch.nn.Linear(16, 12), config=sk.OFTConfig(oft_block_size=4, init_weights=False)),
              sk.FrodLinear(torch.nn.Linear(16, 12), config=sk.FrodConfig(sparse_rate=0.1, init_weights=False))):
    x = torch.randn(5, 16, dtype=torch.float64, requires_grad=True)
    layer.double()
    def loss(x):
        return checkpoint(layer, x, use_reentrant=False).square().sum()
    compiled = torch.autograd.grad(torch.compile(loss, backend="aot_eager", fullgraph=True)(x), x)[0]
    eager = torch.autograd.grad(loss(x), x)[0]
    assert (compiled - eager).abs().max() < 1e-10, (compiled - eager).abs().max()
print("ok")
"""


def test_compiled_checkpoint_as_the_first_call():
    """torch.compile of an activation checkpoint whose layer makes the process's first fused-op call: choosing the
    backend filled a module-level cache there, a side effect the checkpoint's traced region refuses."""
    result = subprocess.run([sys.executable, "-c", _COLD_CHECKPOINT], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("device,backend", [*device_backends(), pytest.param("cpu", "reference", id="reference-cpu")])
@pytest.mark.parametrize("make,path", CASES)
def test_selective_activation_checkpointing(device, backend, make, path, dtype):
    """Under selective activation checkpointing (checkpoint with create_selective_checkpoint_contexts) the recompute
    gets back the kept outputs of the saved ops in the order of the first run, and refuses kept outputs written in
    place: the ops write into no output of a GEMM, and their first call's one-time work (index checks, FRoD's plan
    and V^T) is hidden from the region, whose recompute finds it done. Outputs and gradients as without it."""
    def run(sac):
        g = torch.Generator().manual_seed(0)
        params, fn = make(backend, path, device, dtype, g)  # new tensors, so that nothing is cached for them yet
        inputs = [t.to(device, dtype).requires_grad_() for t in (torch.randn(2, 3, D_IN, generator=g), *params)]

        def region(*inputs):
            h = fn(*inputs)
            return h / h.abs().max()  # an amax scaling, as float8 recipes take

        if sac:
            y = checkpoint(region, *inputs, use_reentrant=False, context_fn=selective_checkpointing)
        else:
            y = region(*inputs)
        return [y.detach(), *torch.autograd.grad(y.square().sum(), inputs)]

    for got, expected in zip(run(True), run(False), strict=True):
        assert_close(got, expected, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("device,backend", device_backends())
@pytest.mark.parametrize("make,path", CASES)
def test_fake_and_proxy_tracing(device, backend, make, path, dtype):
    """Traced outside torch.compile, under a fake tensor mode (FakeTensorMode, make_fx's fake and symbolic modes,
    aot_function) or a proxy one (make_fx, torch.func.linearize), the ops go in as their custom ops: no values are
    read and nothing is kept (the index checks read them, the raw kernels had no fake kernels), and the traced
    graph of forward and backward computes what the op does."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    g = torch.Generator().manual_seed(0)
    params, fn = make(backend, path, device, dtype, g)

    def forward_and_grads(*inputs):
        inputs = [t.detach().requires_grad_() for t in inputs]
        y = fn(*inputs)
        return (y, *torch.autograd.grad(y.square().sum(), inputs))

    def sample(seed):
        g.manual_seed(seed)
        return [t.to(device, dtype) for t in (torch.randn(TOKENS, D_IN, generator=g),
                                              *(torch.randn(p.shape, generator=g) for p in params))]

    expected = forward_and_grads(*sample(2))
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        shapes = [t.shape for t in forward_and_grads(*(mode.from_tensor(t) for t in sample(1)))]
    assert shapes == [t.shape for t in expected]
    for tracing_mode in ("real", "fake", "symbolic"):
        # (the op's fixed tensors, constants of fn, stay real)
        graph = make_fx(forward_and_grads, tracing_mode=tracing_mode, _allow_non_fake_inputs=True)(*sample(1))
        for got, want in zip(graph(*sample(2)), expected, strict=True):
            assert_close(got, want, dtype)


def test_weight_builders_trace():
    """The merge and eval-cache builders take the reference's torch code while traced (their kernels have no fake
    kernels): FakeTensorMode gives their shapes, torch.compile their values, in one graph but for FRoD's (its
    sparse S breaks it, as peft's does)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    g = torch.Generator().manual_seed(0)
    weight, spectrum, params = torch.randn(D_OUT, D_IN, generator=g), torch.randn(30, generator=g), \
        0.1 * torch.randn(D_IN // BLOCK, BLOCK * (BLOCK - 1) // 2, generator=g)
    u, v, lam, s_values = (torch.randn(*shape, generator=g) for shape in ((D_OUT, D_IN), (D_IN, D_IN), (D_IN,), (3,)))
    indices, s_indices = fourierft_indices(D_OUT, D_IN, 30, 777), torch.tensor([[0, 3, 7], [5, 1, 2]])
    builders = {
        "fourierft": lambda: sk.fourierft_delta_weight(spectrum, indices, D_OUT, D_IN, 150.0),
        "oft": lambda: sk.oft_effective_weight(weight, sk.oft_rotation(params, BLOCK)),
        "frod": lambda: sk.frod_effective_weight(u, v, lam, s_values, s_indices),
    }
    for name, build in builders.items():
        expected = build()
        with FakeTensorMode(allow_non_fake_inputs=True):
            assert build().shape == expected.shape == (D_OUT, D_IN)
        torch._dynamo.reset()
        assert_close(torch.compile(build, fullgraph=name != "frod", backend="aot_eager")(), expected, torch.float32)


@pytest.mark.parametrize("make,path", CASES)
def test_exported_kernels_refuse_forward_mode(make, path):
    """An exported program holds the kernels' custom ops, which have no forward-mode rule: torch.func.jvp gave
    their outputs zero tangents, now it raises; exported with the reference backend, the jvp is right."""
    g = torch.Generator().manual_seed(0)
    x, tangent = torch.randn(TOKENS, D_IN, generator=g), torch.randn(TOKENS, D_IN, generator=g)

    def exported(backend):
        params, fn = make(backend, path, "cpu", torch.float32, torch.Generator().manual_seed(0))
        module = torch.nn.Module()
        module.forward = lambda x: fn(x, *params)
        return torch.export.export(module, (x,)).module(), lambda x: fn(x, *params)

    program, _ = exported("cpu")
    with pytest.raises(RuntimeError, match="no forward-mode derivatives"):
        torch.func.jvp(program, (x,), (tangent,))
    if make is not frod:  # peft's sparse products, which FRoD's reference runs, have no forward-mode rule either
        program, fn = exported("reference")
        assert_close(torch.func.jvp(program, (x,), (tangent,))[1], torch.func.jvp(fn, (x,), (tangent,))[1],
                     torch.float32)


@pytest.mark.parametrize("device,backend", device_backends())
@pytest.mark.parametrize("make,path", CASES)
def test_autocast_leaves_float64_alone(device, backend, make, path):
    """torch.autocast does not cast float64 (F.linear stays float64 under it): neither do the fused ops."""
    params, fn = make(backend, path, device, torch.float64, torch.Generator().manual_seed(0))
    params = [t.to(device, torch.float64) for t in params]
    x = torch.randn(TOKENS, D_IN, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).to(device)
    expected = fn(x, *params)
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
        y = fn(x, *params)
    assert y.dtype == torch.float64
    assert_close(y, expected, torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("shape", [(D_IN,), (TOKENS, D_IN), (2, 3, D_IN)], ids=["1d", "2d", "3d"])
@pytest.mark.parametrize("device,backend", device_backends())
@pytest.mark.parametrize("make,path", CASES)
def test_outputs_can_be_modified_in_place(device, backend, make, path, shape, dtype):
    """Model code adds into a layer's output in place (Falcon: ``mlp_output += attention_output``): the ops'
    outputs are not views made inside them (autograd refuses in-place writes to those), and the gradients through
    the write are the reference's."""
    def run(backend):
        g = torch.Generator().manual_seed(0)
        params, fn = make(backend, path, device, dtype, g)
        inputs = [t.to(device, dtype).requires_grad_()
                  for t in (torch.randn(*shape, generator=g), *params)]
        y = fn(*inputs)
        y += 1.0
        y *= torch.arange(y.shape[-1], device=device)
        return [y.detach(), *torch.autograd.grad(y.square().sum(), inputs)]

    for got, expected in zip(run(backend), run("reference")):
        assert_close(got, expected, dtype)


@pytest.fixture
def deterministic():
    """Sets torch.use_deterministic_algorithms for the test (warn_only as given) and restores it after."""
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    yield lambda warn_only=False: torch.use_deterministic_algorithms(True, warn_only=warn_only)
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("device,backend", device_backends())
@pytest.mark.parametrize("make,path", CASES)
def test_deterministic_algorithms(device, backend, make, path, dtype, deterministic):
    """Under torch.use_deterministic_algorithms(True) a backend whose kernels for the op add with atomics
    (FourierFT's on the GPU backends, dispatch.NONDETERMINISTIC) refuses by name as torch's ops do, or warns with
    warn_only=True; the others run as before."""
    params, fn = make(backend, path, device, dtype, torch.Generator().manual_seed(0))
    params = [t.to(device, dtype).requires_grad_() for t in params]
    x = torch.randn(TOKENS, D_IN, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    _, reference = make("reference", path, device, dtype, torch.Generator().manual_seed(0))
    expected = reference(x, *params)
    atomic = make is fourierft and backend in ("cuda", "triton")
    deterministic()
    if atomic:
        with pytest.raises(RuntimeError, match="does not have a deterministic implementation"):
            fn(x, *params)
        deterministic(warn_only=True)
        with pytest.warns(UserWarning, match="does not have a deterministic implementation"):
            y = fn(x, *params)
    else:
        y = fn(x, *params)
    assert_close(y, expected, dtype)


def test_deterministic_algorithms_automatic_choice(monkeypatch, deterministic):
    """With a GPU's backends available, the automatic choice for FourierFT on it is the reference backend under
    torch.use_deterministic_algorithms(True), and the CUDA kernels otherwise and for the other methods."""
    monkeypatch.setattr(dispatch, "_unavailable_reason", lambda name: None)
    gpu = torch.device("cuda")
    assert [dispatch.select_backend(gpu, method=m) for m in ("fourierft", "oft", "frod")] == ["cuda"] * 3
    deterministic()
    assert [dispatch.select_backend(gpu, method=m) for m in ("fourierft", "oft", "frod")] == \
        ["reference", "cuda", "cuda"]
    assert dispatch.select_backend(torch.device("cpu"), method="fourierft") == "cpu"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("device,backend", device_backends())
@pytest.mark.parametrize("make", [fourierft, frod], ids=["fourierft", "frod"])
def test_weight_path_keeps_no_effective_weight_without_input_grad(device, backend, make, dtype):
    """Where x needs no gradient (a model's first adapted layers, after frozen embeddings), the weight path keeps
    no effective weight (D_OUT x D_IN), which serves dx only, and its adapter gradients are the reference's."""
    def run(backend, x_grad):
        g = torch.Generator().manual_seed(0)
        params, fn = make(backend, "weight", device, dtype, g)
        params = [t.to(device, dtype).requires_grad_() for t in params]
        x = torch.randn(TOKENS, D_IN, generator=g).to(device, dtype).requires_grad_(x_grad)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            y = fn(x, *params)
        return sum(saved), torch.autograd.grad(y.square().sum(), params)

    kept, grads = run(backend, False)
    assert run(backend, True)[0] - kept == D_OUT * D_IN
    for got, expected in zip(grads, run("reference", False)[1]):
        assert_close(got, expected, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("device,backend", device_backends())
def test_token_path_keeps_no_input_spectrum_without_coefficient_grad(device, backend, dtype):
    """FourierFT's token path keeps rfft(x) (tokens x (D_IN // 2 + 1)) for the coefficients' gradient alone: with
    frozen coefficients it is not kept, and dx is the reference's."""
    def run(backend, coefficient_grad):
        g = torch.Generator().manual_seed(0)
        (spectrum,), fn = fourierft(backend, "token", device, dtype, g)
        spectrum = spectrum.to(device, dtype).requires_grad_(coefficient_grad)
        x = torch.randn(TOKENS, D_IN, generator=g).to(device, dtype).requires_grad_()
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            y = fn(x, spectrum)
        return sum(saved), torch.autograd.grad(y.square().sum(), x)[0]

    kept, dx = run(backend, False)
    assert run(backend, True)[0] - kept == TOKENS * (D_IN // 2 + 1)
    assert_close(dx, run("reference", False)[1], dtype)
