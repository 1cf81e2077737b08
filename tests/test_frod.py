"""FRoD: every backend and path against the reference (peft's sparse COO algorithm)."""
import gc
import weakref

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import spectral_kernels as sk
from spectral_kernels import dispatch
from spectral_kernels.kernels.reference import frod as reference

from conftest import (TOL, assert_close, assert_compiled_matches_eager, assert_low_precision_close,
                      assert_raises_all, device_backends, native_device_backends)

PATHS = ["factored", "weight"]
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16],
                                 ids=["fp32", "fp64", "bf16", "fp16"])
# (in_features, out_features, nnz): odd, non-square, tiny, no sparse entries, every off-diagonal entry.
SMALL = [(12, 7, 5), (16, 40, 30), (37, 20, 0), (5, 3, 20), (33, 33, 100), (1, 4, 0)]

pytestmark = pytest.mark.filterwarnings("ignore:Sparse invariant checks:UserWarning")


def make_case(n_in, n_out, nnz, lead, dtype, device, seed=0):
    """(x, u, v, lam, s_values, bias) in ``dtype`` and in float64 on ``device``, and the indices."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(n_out, n_in, generator=g, dtype=torch.float64) / n_in ** 0.5
    v = torch.randn(n_in, n_in, generator=g, dtype=torch.float64) / n_in ** 0.5
    lam = 1 + torch.rand(n_in, generator=g, dtype=torch.float64)
    off = torch.tensor([(r, c) for r in range(n_in) for c in range(n_in) if r != c], dtype=torch.long).reshape(-1, 2)
    indices = off[torch.randperm(off.shape[0], generator=g)[:nnz]].t().contiguous()
    s_values = 0.3 * torch.randn(indices.shape[1], generator=g, dtype=torch.float64)
    bias = torch.randn(n_out, generator=g, dtype=torch.float64)
    x = torch.randn(*lead, n_in, generator=g, dtype=torch.float64)
    exact = [t.to(device) for t in (x, u, v, lam, s_values, bias)]
    return [t.to(dtype) for t in exact], exact, indices.to(device)


def run(fn, x, u, v, lam, s, bias, grad_out=None):
    """Output and gradients w.r.t. x, lam, s and bias."""
    x, lam, s, bias = (t.detach().requires_grad_() for t in (x, lam, s, bias))
    y = fn(x, u, v, lam, s, bias)
    if grad_out is None:
        grad_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = torch.autograd.grad(y, (x, lam, s, bias), grad_out.to(y.device, y.dtype), allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, (x, lam, s, bias))]
    return [y.detach(), *grads], grad_out


def check(device, backend, path, n_in, n_out, nnz, lead, dtype):
    (x, u, v, lam, s, bias), exact_inputs, indices = make_case(n_in, n_out, nnz, lead, dtype, device)

    def ours(x, u, v, lam, s, bias):
        return sk.frod_linear(x, u, v, lam, s, indices, bias, backend=backend, path=path)

    def ref(x, u, v, lam, s, bias):
        return reference.frod_linear(x, u, v, lam, s, indices, bias)

    exact, g = run(ref, *exact_inputs)
    got, _ = run(ours, x, u, v, lam, s, bias, g)
    names = ("y", "dx", "dlam", "ds", "dbias")
    lowp = run(ref, x, u, v, lam, s, bias, g)[0] if dtype in (torch.bfloat16, torch.float16) else exact
    for name, a, r, e in zip(names, got, lowp, exact):
        assert a.dtype == dtype and a.shape == e.shape, name
        if not e.numel():  # ds without sparse entries
            continue
        if dtype in (torch.float32, torch.float64):
            assert_close(a, e.to(dtype), dtype)
        else:
            assert_low_precision_close(a, r, e)


@pytest.mark.parametrize("device,backend", device_backends())
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("n_in,n_out,nnz", SMALL)
@pytest.mark.parametrize("lead", [(), (5,), (2, 3)], ids=["1d", "2d", "3d"])
@DTYPES
def test_matches_reference(device, backend, path, n_in, n_out, nnz, lead, dtype):
    check(device, backend, path, n_in, n_out, nnz, lead, dtype)


@pytest.mark.parametrize("device,backend", [p for p in device_backends() if p.id != "triton-cpu"])
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("n_in,n_out,nnz,tokens", [(256, 96, 655, 300), (130, 500, 169, 1100), (768, 64, 5898, 40),
                                                    (256, 48, 655, 25000)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_matches_reference_large(device, backend, path, n_in, n_out, nnz, tokens, dtype):
    """Several token chunks of the CPU kernels, many entries per row; at 25000 tokens the factored path's mix
    input (256 x 25000) is over 12 MiB, so the CPU kernels take it in passes of tokens (chunk_tokens)."""
    check(device, backend, path, n_in, n_out, nnz, (tokens,), dtype)


@pytest.mark.parametrize("device,backend", device_backends())
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_matches_reference_many_tokens(device, backend, path, dtype):
    """135 tokens: several of the kernels' token tiles (64 on Triton) and a partial one, rows of many entries."""
    check(device, backend, path, 40, 26, 300, (3, 45), dtype)


@pytest.mark.parametrize("device,backend", device_backends())
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_frozen_input(device, backend, path, dtype):
    """x without a gradient (a first layer's input): the sparse backward skips dz, and the gradients of lambda,
    the S values and the bias are the reference's."""
    (x, u, v, lam, s, bias), _, indices = make_case(16, 40, 30, (2, 3), dtype, device)

    def grads(backend):
        lam_, s_, bias_ = (t.detach().requires_grad_() for t in (lam, s, bias))
        y = sk.frod_linear(x, u, v, lam_, s_, indices, bias_, backend=backend, path=path)
        return torch.autograd.grad(y.square().sum(), (lam_, s_, bias_))

    for got, expected in zip(grads(backend), grads("reference")):
        assert_close(got, expected, dtype)


@pytest.mark.parametrize("device,backend", device_backends())
@pytest.mark.parametrize("path", PATHS)
def test_gradcheck(device, backend, path):
    (x, u, v, lam, s, bias), _, indices = make_case(9, 5, 12, (2, 3), torch.float64, device)
    inputs = [t.detach().requires_grad_() for t in (x, lam, s, bias)]

    def fn(x, lam, s, bias):
        return sk.frod_linear(x, u, v, lam, s, indices, bias, backend=backend, path=path)

    # fast_mode (random directions) keeps the interpreted Triton kernels quick.
    assert torch.autograd.gradcheck(fn, inputs, fast_mode=backend == "triton")


@pytest.mark.parametrize("device,backend", device_backends())
@DTYPES
def test_effective_weight(device, backend, dtype):
    (_, u, v, lam, s, _), (_, u64, v64, lam64, s64, _), indices = make_case(11, 6, 20, (1,), dtype, device)
    got = sk.frod_effective_weight(u, v, lam, s, indices, backend=backend)
    exact = reference.effective_weight(u64, v64, lam64, s64, indices)
    assert got.dtype == dtype
    if dtype in (torch.float32, torch.float64):
        assert_close(got, exact.to(dtype), dtype)
    else:
        assert_low_precision_close(got, reference.effective_weight(u, v, lam, s, indices), exact)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("device,backend", device_backends())
def test_effective_weight_of_trainable_projections(device, backend, dtype):
    """U and V that require grad get the gradients of peft's dense math (V's was lost); built without autograd,
    the kept V^T holds no graph back to V (which kept V and the copy alive for good)."""
    (_, u, v, lam, s, _), _, indices = make_case(11, 6, 20, (1,), dtype, device)
    u, v = u.clone().requires_grad_(), v.clone().requires_grad_()
    weights = torch.randn(u.shape[0], v.shape[0], dtype=dtype,
                          generator=torch.Generator().manual_seed(5)).to(device)
    got = torch.autograd.grad((sk.frod_effective_weight(u, v, lam, s, indices, backend=backend) * weights).sum(),
                              (u, v))
    dense_s = torch.zeros_like(v).index_put((indices[0], indices[1]), s, accumulate=True)
    expected = torch.autograd.grad((u @ (torch.diag(lam) + dense_s) @ v.t() * weights).sum(), (u, v))
    for g, e in zip(got, expected, strict=True):
        assert_close(g, e, dtype)
    with torch.no_grad():
        sk.frod_effective_weight(u, v, lam, s, indices, backend=backend)
    kept = weakref.ref(v)
    del v, got, expected
    gc.collect()
    assert kept() is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("device,backend", device_backends())
@pytest.mark.parametrize("path", PATHS)
def test_duplicate_entries_are_summed(device, backend, path, dtype):
    """peft coalesces S, summing repeated positions; so does the fused op, and each repeated value gets the
    gradient of their sum."""
    (x, u, v, lam, _, bias), _, _ = make_case(6, 4, 0, (3,), dtype, device)
    indices = torch.tensor([[1, 1, 4], [2, 2, 0]], device=device)
    s = torch.tensor([0.5, -0.25, 2.0], dtype=dtype, device=device)
    got, g = run(lambda *args: sk.frod_linear(*args[:5], indices, args[5], backend=backend, path=path),
                 x, u, v, lam, s, bias)
    expected, _ = run(lambda *args: reference.frod_linear(*args[:5], indices, args[5]), x, u, v, lam, s, bias, g)
    for a, e in zip(got, expected, strict=True):
        assert_close(a, e, dtype)
    assert_close(got[3][0], got[3][1], dtype)  # the gradient of S at (1, 2), for both entries


@pytest.mark.parametrize("path", PATHS)
def test_a_column_major_projection_is_not_kept_alive(path):
    """V^T is kept per projection V, held weakly; for a column-major V (a QR factor, say) it was a view of V itself,
    which then never died (float32; the result is checked too)."""
    (x, u, _, lam, s, bias), _, indices = make_case(10, 7, 15, (4,), torch.float32, "cpu")
    v = torch.linalg.qr(torch.randn(10, 10)).Q
    assert v.t().is_contiguous()
    lam.requires_grad_()
    y = sk.frod_linear(x, u, v, lam, s, indices, bias, backend="cpu", path=path)
    assert_close(y, reference.frod_linear(x, u, v, lam, s, indices, bias), torch.float32)
    y.sum().backward()
    kept = weakref.ref(v)
    del v, y
    gc.collect()
    assert kept() is None


@pytest.mark.parametrize("path", PATHS)
def test_opcheck(path):
    (x, u, v, lam, s, bias), _, indices = make_case(10, 7, 15, (4,), torch.float32, "cpu")
    args = (x.requires_grad_(), u, v, lam.requires_grad_(), s.requires_grad_(), indices, bias, "cpu", path)
    torch.library.opcheck(torch.ops.spectral_kernels.frod_linear_fwd.default, args)


@pytest.mark.parametrize("tokens", [3, 60])  # the factored and the weight path
def test_compile_fullgraph(tokens):
    layer = sk.FrodLinear(torch.nn.Linear(24, 12), config=sk.FrodConfig(sparse_rate=0.1, init_weights=False))
    assert_compiled_matches_eager(layer, torch.randn(tokens, 24))


def test_compile_fullgraph_public_op():
    """The public op checks its index values with an assert inside the traced graph (it cannot branch on them)."""
    (x, u, v, lam, s, bias), _, indices = make_case(10, 7, 15, (4,), torch.float32, "cpu")
    torch._dynamo.reset()
    compiled = torch.compile(sk.frod_linear, fullgraph=True, backend="aot_eager")
    assert_close(compiled(x, u, v, lam, s, indices, bias), sk.frod_linear(x, u, v, lam, s, indices, bias),
                 torch.float32)
    with pytest.raises(RuntimeError, match="out of range"):
        compiled(x, u, v, lam, s, indices + 10, bias)


def test_path_choice():
    assert dispatch.frod_path(2047, 1024, 1024, True) == "factored"
    assert dispatch.frod_path(2048, 1024, 1024, True) == "weight"
    assert dispatch.frod_path(8192, 1024, 1024, True) == "weight"
    assert dispatch.frod_path(512, 1024, 1024, False) == "factored"
    assert dispatch.frod_path(2048, 1024, 1024, False) == "weight"
    assert dispatch.frod_path(1, 8, 8, True, "weight") == "weight"
    with pytest.raises(ValueError, match="unknown FRoD path"):
        dispatch.frod_path(1, 8, 8, True, "dense")


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_bad_input(backend):
    (x, u, v, lam, s, bias), _, indices = make_case(8, 5, 6, (3,), torch.float32, "cpu")
    with pytest.raises(TypeError, match="same dtype"):
        sk.frod_linear(x, u, v, lam, s, indices, bias.double(), backend=backend)
    with pytest.raises(ValueError, match="both sizes positive"):
        sk.frod_linear(x, u[:0], v, lam, s, indices, None, backend=backend)
    with pytest.raises(ValueError, match="unknown FRoD path"):  # the reference too, though it has one
        sk.frod_linear(x, u, v, lam, s, indices, bias, backend=backend, path="dense")
    with pytest.raises(ValueError, match="in_features=8"):
        sk.frod_linear(torch.randn(3, 7), u, v, lam, s, indices, bias)
    with pytest.raises(ValueError, match="x is 0-d"):
        sk.frod_linear(torch.tensor(1.0), u, v, lam, s, indices, bias)
    with pytest.raises(TypeError, match="floating-point"):
        sk.frod_linear(x.long(), u, v, lam, s, indices, bias)
    with pytest.raises(TypeError, match="floating-point"):
        sk.frod_linear(x.to(torch.complex64), u, v, lam, s, indices, bias)
    with pytest.raises(ValueError, match="lambda must have shape"):
        sk.frod_linear(x, u, v, lam[:-1], s, indices, bias)
    with pytest.raises(ValueError, match="values"):
        sk.frod_linear(x, u, v, lam, s[:-1], indices, bias)
    with pytest.raises(ValueError, match="out of range"):
        sk.frod_linear(x, u, v, lam, s, indices + 8, bias)
    with pytest.raises(TypeError, match="U must be a tensor"):
        sk.frod_linear(x, None, v, lam, s, indices, bias)
    with pytest.raises(ValueError, match="int64"):
        sk.frod_linear(x, u, v, lam, s, indices.int(), bias)
    with pytest.raises(ValueError, match="U must be"):
        sk.frod_linear(x, u, v[:, :5], lam, s, indices, bias)
    with pytest.raises(ValueError, match="bias must have shape"):
        sk.frod_linear(x, u, v, lam, s, indices, bias[:-1])
    with pytest.raises(ValueError, match="fixed projections"):
        sk.frod_linear(x, u.requires_grad_(), v, lam, s, indices, bias)
    with pytest.raises(RuntimeError, match="different devices"):
        sk.frod_linear(x.to("meta"), u.detach(), v, lam, s, indices, bias)
    with pytest.raises(ValueError, match="unknown backend"):
        sk.frod_linear(x, u.detach(), v, lam, s, indices, bias, backend="fast")


@pytest.mark.parametrize("device,backend", device_backends())
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_inference_tensors(device, backend, path, dtype):
    """Projections and indices made under torch.inference_mode have no version counter: the plan and V^T
    caches do not keep them (they used to raise), inside inference mode and after it, and follow their
    in-place changes."""
    with torch.inference_mode():
        (x, u, v, lam, s, bias), _, indices = make_case(8, 5, 6, (3,), dtype, device)
        for _ in range(2):
            expected = reference.frod_linear(x, u, v, lam, s, indices, bias)
            assert_close(sk.frod_linear(x, u, v, lam, s, indices, bias, backend=backend, path=path), expected,
                         dtype)
            assert_close(sk.frod_effective_weight(u, v, lam, s, indices, backend=backend),
                         reference.effective_weight(u, v, lam, s, indices), dtype)
            v.mul_(-1)
            indices.copy_(indices.flip(1))
    assert_close(sk.frod_linear(x, u, v, lam, s, indices, bias, backend=backend, path=path),
                 reference.frod_linear(x, u, v, lam, s, indices, bias), dtype)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_effective_weight_bad_input(backend):
    """The public W' function checks its arguments before any kernel reads them (an index past n used to give
    an answer: peft's sparse tensor is built without invariant checks)."""
    (_, u, v, lam, s, _), _, indices = make_case(8, 5, 6, (3,), torch.float32, "cpu")
    u = u.detach()
    for match, args, error in [
        ("out of range", (u, v, lam, s, indices + 8), ValueError),
        ("out of range", (u, v, lam, s, indices - 8), ValueError),
        ("int64", (u, v, lam, s, indices.int()), ValueError),
        ("values", (u, v, lam, s[:-1], indices), ValueError),
        ("lambda must have shape", (u, v, lam[:-1], s, indices), ValueError),
        ("U must be", (u, v[:, :5], lam, s, indices), ValueError),
        ("floating point", (u, v, lam, s.long(), indices), TypeError),
        ("different devices", (u, v, lam, s, indices.to("meta")), RuntimeError),
    ]:
        with pytest.raises(error, match=match):
            sk.frod_effective_weight(*args, backend=backend)


@pytest.mark.skipif(sk.backends()["cpu"] is not None, reason=str(sk.backends()["cpu"]))
@settings(max_examples=60, deadline=None)
# Every register block width (csrc/cpu/frod.cpp: the mix 8, 4, 2 and 1 vectors, its backward 4, 2, 1), then
# single tokens.
@example(rows=7, tokens=64 + 32 + 16 + 8 + 3, entries=30, need_dz=True, dtype=torch.float32)
@example(rows=7, tokens=32 + 16 + 8 + 4 + 3, entries=30, need_dz=True, dtype=torch.float64)
@example(rows=1, tokens=29, entries=29, need_dz=False, dtype=torch.float32)  # the entries cancel
@given(rows=st.integers(1, 12), tokens=st.integers(0, 140), entries=st.integers(0, 40), need_dz=st.booleans(),
       dtype=st.sampled_from([torch.float64, torch.float32]))
def test_cpu_kernels_any_plan(rows, tokens, entries, need_dz, dtype):
    """mix and its backward on any CSR plan: empty rows, repeated positions, no tokens, no entries."""
    _check_cpu_kernels(rows, tokens, entries, need_dz, dtype)


@pytest.mark.skipif(sk.backends()["cpu"] is not None, reason=str(sk.backends()["cpu"]))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cpu_kernels_token_passes(dtype):
    """Inputs of over 12 MiB go in passes of 8 MiB of tokens (csrc/cpu/frod.cpp: chunk_tokens); here 3, the last
    with a tail of single tokens."""
    rows = 800 // torch.empty((), dtype=dtype).element_size()
    _check_cpu_kernels(rows, 21000, 3 * rows, True, dtype)


def _check_cpu_kernels(rows, tokens, entries, need_dz, dtype):
    from spectral_kernels.kernels.native import frod as native

    g = torch.Generator().manual_seed(rows * 10000 + tokens * 100 + entries)
    written = torch.randint(0, rows, (entries,), generator=g)
    read = torch.randint(0, rows, (entries,), generator=g)
    coef = torch.randn(entries, generator=g, dtype=torch.float64)
    x, grad = torch.randn(2, rows, tokens, generator=g, dtype=torch.float64)
    perm = torch.argsort(written, stable=True)
    ptr = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(torch.bincount(written, minlength=rows), 0)])
    dense = torch.zeros(rows, rows, dtype=torch.float64).index_put_((written, read), coef, accumulate=True)
    dense_abs = torch.zeros(rows, rows, dtype=torch.float64).index_put_((written, read), coef.abs(), accumulate=True)
    mixed = native.mix(x.to(dtype), coef.to(dtype), ptr, read[perm], perm)
    assert mixed.shape == (rows, tokens) and mixed.dtype == dtype
    # The backward of out = dense · x for its gradient ``grad``, with the plan of dense^T (written <-> read).
    perm_t = torch.argsort(read, stable=True)
    ptr_t = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(torch.bincount(read, minlength=rows), 0)])
    dx, dcoef = native.mix_backward(grad.to(dtype), x.to(dtype), coef, ptr_t, written[perm_t], perm_t, need_dz)
    assert dcoef.shape == (entries,) and dcoef.dtype == dtype
    assert dx.shape == ((rows, tokens) if need_dz else (0,))

    def assert_sums_close(actual, exact, magnitude):
        """Within rounding of the terms summed (``magnitude``: the sums of their absolute values), not of the
        sums, which may cancel: one row's 29 entries summed to a 70th of their terms."""
        assert (actual.double() - exact).abs().max().item() <= TOL[dtype] * magnitude.max().item()

    if tokens:
        assert_sums_close(mixed, dense @ x, dense_abs @ x.abs())
        if need_dz:
            assert_sums_close(dx, dense.t() @ grad, dense_abs.t() @ grad.abs())
    if entries:
        assert_sums_close(dcoef, (grad @ x.t())[written, read], (grad.abs() @ x.abs().t())[written, read])


@pytest.mark.skipif(sk.backends()["cpu"] is not None, reason=str(sk.backends()["cpu"]))
def test_cpu_kernels_reject_bad_plans():
    """The C++ kernels check the plan's values before addressing memory with them (the torch ops are callable
    directly, not only through frod_linear, which builds valid plans)."""
    from spectral_kernels.kernels.native import frod as native

    x, coef = torch.randn(5, 4), torch.randn(6)
    ptr, src, perm = torch.tensor([0, 2, 3, 5, 6]), torch.tensor([0, 1, 2, 3, 0, 4]), torch.arange(6)
    assert native.mix(x, coef, ptr, src, perm).shape == (4, 4)
    for match, plan in [("src 5 out of range", (ptr, torch.tensor([0, 1, 2, 3, 0, 5]), perm)),
                        ("src -1 out of range", (ptr, torch.tensor([0, 1, 2, 3, 0, -1]), perm)),
                        ("perm 7 out of range", (ptr, src, torch.tensor([0, 1, 2, 3, 4, 7]))),
                        ("ptr decreases", (torch.tensor([0, 3, 2, 5, 6]), src, perm)),
                        ("ptr must run from 0 to 6", (torch.tensor([0, 2, 3, 5, 5]), src, perm))]:
        with pytest.raises(RuntimeError, match=match):
            native.mix(x, coef, *plan)
        with pytest.raises(RuntimeError, match=match):
            native.mix_backward(torch.randn(5, 4), torch.randn(4, 4), coef, *plan, True)


@pytest.mark.parametrize("device,backend", native_device_backends())
def test_native_kernels_reject_bad_arguments(device, backend):
    """Shapes, dtypes and devices, checked by the entry points of both C++ backends (shared checks; the CUDA
    kernels assert the plan's values on the device: test_cuda_emulation.py tests those asserts)."""
    from spectral_kernels.kernels.native import frod as native

    x, coef = torch.randn(5, 4, device=device), torch.randn(6, device=device)
    ptr, src, perm = (torch.tensor(v, device=device) for v in ([0, 2, 3, 5, 6], [0, 1, 2, 3, 0, 4], range(6)))
    g = torch.randn(5, 4, device=device)
    cases = [("activations must be", lambda: native.mix(x[0], coef, ptr, src, perm)),
             ("ptr must be a non-empty int64", lambda: native.mix(x, coef, ptr.int(), src, perm)),
             ("src and perm must be int64 vectors of the same length", lambda: native.mix(x, coef, ptr, src, perm[:5])),
             ("coefficients must be", lambda: native.mix(x, src, ptr, src, perm)),
             ("same dtype and token count", lambda: native.mix_backward(g[:, :3], x[:4], coef, ptr, src, perm, True)),
             ("ptr has 4 rows, z has 5", lambda: native.mix_backward(g, x, coef, ptr, src, perm, True))]
    if device == "cuda":
        cases += [("different devices", lambda: native.mix(x, coef, ptr.cpu(), src, perm)),
                  ("different devices", lambda: native.mix(x, coef.cpu(), ptr, src, perm)),
                  ("different devices", lambda: native.mix_backward(g.cpu(), x[:4], coef, ptr, src, perm, True)),
                  ("different devices", lambda: native.mix_backward(g, x[:4], coef, ptr, src, perm.cpu(), True))]
    assert_raises_all(cases)


@pytest.mark.parametrize("device,backend", device_backends())
def test_weight_path_float16_gradients_stay_in_range(device, backend):
    """The weight path's U^T dy^T x sums over tokens before sampling: in float16 it overflowed (under a loss scale
    of 1000 here) where the exact gradients of lambda and S (float32 parameters, as peft keeps them in a float16
    model), peft's and the factored path's are finite."""
    (x, u, v, lam, s, _), _, indices = make_case(16, 16, 25, (256,), torch.float64, device)
    x, u, v = (x + 1).half(), u.half(), v.half()  # activations with a mean, as after a GELU
    grad_out = 1000 * torch.randn(256, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    results = []
    for fn, args in ((sk.frod_linear, (x, u, v, lam.float(), s.float())),
                     (reference.frod_linear, [t.double() for t in (x, u, v, lam, s)])):
        lam_, s_ = (t.detach().requires_grad_() for t in args[3:])
        kwargs = {"backend": backend, "path": "weight"} if fn is sk.frod_linear else {}
        y = fn(*args[:3], lam_, s_, indices, None, **kwargs)
        results.append(torch.autograd.grad(y, (lam_, s_), grad_out.to(device, y.dtype)))
    for got, exact in zip(*results):
        assert torch.isfinite(got).all()
        assert (got.double() - exact).abs().max() <= 1e-2 * exact.abs().max()
