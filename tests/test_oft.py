"""OFT: every backend and path against the reference (peft's einsum rotation and Cayley math)."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import spectral_kernels as sk
from spectral_kernels.kernels.reference import oft as reference

from conftest import (assert_close, assert_compiled_matches_eager, assert_low_precision_close, assert_raises_all,
                      device_backends, native_device_backends)

PATHS = ["token", "weight"]
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16],
                                 ids=["fp32", "fp64", "bf16", "fp16"])
# (in_features, out_features, block size): odd widths, block sizes 2..32 incl. non-powers of two.
SMALL = [(24, 7, 2), (24, 10, 3), (40, 13, 5), (40, 17, 8), (96, 33, 12), (96, 20, 32)]
# (name, use_cayley_neumann, num_cayley_neumann_terms, block_share)
ROTATIONS = [("neumann5", True, 5, False), ("neumann3", True, 3, False), ("exact", False, 5, False),
             ("neumann5-shared", True, 5, True), ("exact-shared", False, 5, True)]


def make_case(n_in, n_out, b, lead, dtype, device, shared=False, seed=0):
    """(x, weight, bias, params) in ``dtype`` and in float64, on ``device``."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(n_out, n_in, generator=g, dtype=torch.float64) / n_in ** 0.5
    bias = torch.randn(n_out, generator=g, dtype=torch.float64)
    params = 0.1 * torch.randn(1 if shared else n_in // b, b * (b - 1) // 2, generator=g, dtype=torch.float64)
    x = torch.randn(*lead, n_in, generator=g, dtype=torch.float64)
    exact = [t.to(device) for t in (x, weight, bias, params)]
    return [t.to(dtype) for t in exact], exact


def run(fn, x, weight, bias, params, grad_out=None):
    """Output and gradients w.r.t. x, weight, params and bias."""
    x, weight, params, bias = (t.detach().requires_grad_() for t in (x, weight, params, bias))
    y = fn(x, weight, bias, params)
    if grad_out is None:
        grad_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = torch.autograd.grad(y, (x, weight, params, bias), grad_out.to(y.device, y.dtype))
    return [y.detach(), *grads], grad_out


def check(device, backend, path, n_in, n_out, b, lead, dtype, neumann=True, terms=5, shared=False):
    (x, w, bias, p), (x64, w64, bias64, p64) = make_case(n_in, n_out, b, lead, dtype, device, shared)

    def ours(x, w, bias, p):
        return sk.oft_linear(x, w, bias, sk.oft_rotation(p, b, neumann, terms, backend=backend), backend=backend,
                             path=path)

    def ref(x, w, bias, p):
        return reference.oft_linear(x, w, bias, reference.cayley(p, b, neumann, terms))

    exact, g = run(ref, x64, w64, bias64, p64)
    got, _ = run(ours, x, w, bias, p, g)
    names = ("y", "dx", "dweight", "dparams", "dbias")
    if dtype in (torch.float32, torch.float64):
        for name, a, e in zip(names, got, exact):
            assert a.dtype == dtype, name
            assert_close(a, e.to(dtype), dtype)
    else:
        lowp, _ = run(ref, x, w, bias, p, g)
        for name, a, r, e in zip(names, got, lowp, exact):
            assert a.dtype == dtype, name
            assert_low_precision_close(a, r, e)


@pytest.mark.parametrize("device,backend", device_backends())
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("n_in,n_out,b", SMALL)
@pytest.mark.parametrize("lead", [(), (5,), (2, 3)], ids=["1d", "2d", "3d"])
@DTYPES
def test_matches_reference(device, backend, path, n_in, n_out, b, lead, dtype):
    check(device, backend, path, n_in, n_out, b, lead, dtype)


@pytest.mark.parametrize("device,backend", device_backends())
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name,neumann,terms,shared", ROTATIONS, ids=[r[0] for r in ROTATIONS])
@pytest.mark.parametrize("n_in,n_out,b", [(40, 13, 5), (96, 20, 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_rotation_modes(device, backend, path, name, neumann, terms, shared, n_in, n_out, b, dtype):
    check(device, backend, path, n_in, n_out, b, (2, 3), dtype, neumann, terms, shared)


@pytest.mark.parametrize("device,backend", device_backends())
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("n_in,n_out,b", [(96, 20, 48), (160, 21, 80)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_matches_reference_many_tokens(device, backend, path, n_in, n_out, b, dtype):
    """135 tokens: several of the kernels' token tiles (64 on Triton), a partial one, and the rotation gradient's
    reduction split over them; blocks of 48 (one 64-wide Triton tile) and 80 (wider than one tile)."""
    check(device, backend, path, n_in, n_out, b, (3, 45), dtype)


@pytest.mark.parametrize("device,backend", device_backends())
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_frozen_input(device, backend, path, dtype):
    """x without a gradient (a first layer's input): the rotation's backward skips dx, and the gradients of the
    rotation parameters and the bias are the reference's."""
    (x, w, bias, p), _ = make_case(40, 13, 8, (2, 3), dtype, device)

    def grads(backend):
        p_, bias_ = (t.detach().requires_grad_() for t in (p, bias))
        y = sk.oft_linear(x, w, bias_, sk.oft_rotation(p_, 8, backend=backend), backend=backend, path=path)
        return torch.autograd.grad(y.square().sum(), (p_, bias_))

    for got, expected in zip(grads(backend), grads("reference")):
        assert_close(got, expected, dtype)


@pytest.mark.parametrize("device,backend", [p for p in device_backends() if p.id != "triton-cpu"])
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("n_in,n_out,b,shared", [(512, 300, 256, False), (1024, 96, 32, False),
                                                 (768, 200, 48, True), (1000, 64, 40, False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_matches_reference_large(device, backend, path, n_in, n_out, b, shared, dtype):
    check(device, backend, path, n_in, n_out, b, (3, 70), dtype, shared=shared)


@pytest.mark.parametrize("device,backend", device_backends())
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("neumann,shared", [(True, False), (False, True)], ids=["neumann", "exact-shared"])
def test_gradcheck(device, backend, path, neumann, shared):
    (x, w, bias, p), _ = make_case(12, 5, 4, (2, 3), torch.float64, device, shared)
    inputs = [t.detach().requires_grad_() for t in (x, w, bias, p)]

    def fn(x, w, bias, p):
        return sk.oft_linear(x, w, bias, sk.oft_rotation(p, 4, neumann, backend=backend), backend=backend, path=path)

    # fast_mode (random directions) keeps the interpreted Triton kernels quick.
    assert torch.autograd.gradcheck(fn, inputs, fast_mode=backend == "triton")


@pytest.mark.parametrize("device,backend", device_backends())
@pytest.mark.parametrize("shared", [False, True])
def test_rotate_gradcheck(device, backend, shared):
    (x, _, _, p), _ = make_case(15, 1, 3, (4,), torch.float64, device, shared)
    inputs = [t.detach().requires_grad_() for t in (x, p)]
    assert torch.autograd.gradcheck(lambda x, p: sk.oft_rotate(x, sk.oft_rotation(p, 3), backend=backend), inputs,
                                    fast_mode=backend == "triton")


@pytest.mark.parametrize("device,backend", device_backends())
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("lead", [(), (5,), (3, 5)], ids=["1d", "2d", "3d"])
@DTYPES
def test_rotate_and_effective_weight(device, backend, shared, lead, dtype):
    """oft_rotate (output and the gradients of x and R) and oft_effective_weight against the reference."""
    (x, w, _, p), (x64, w64, _, p64) = make_case(40, 9, 8, lead, dtype, device, shared)
    rot64 = reference.cayley(p64, 8, True, 5)
    rot = rot64.to(dtype)
    grad_out = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(device)

    def rotate(fn, x, rot, w):
        x, rot = (t.detach().requires_grad_() for t in (x, rot))
        y = fn(x, rot)
        grads = torch.autograd.grad(y, (x, rot), grad_out.to(y.dtype))
        return [y.detach(), *grads, w @ reference.block_diagonal(rot.detach(), 5).t()]

    exact = rotate(reference.rotate, x64, rot64, w64)
    got = rotate(lambda x, rot: sk.oft_rotate(x, rot, backend=backend), x, rot, w)
    got[-1] = sk.oft_effective_weight(w, rot, backend=backend)
    lowp = rotate(lambda x, rot: reference.rotate(x, rot).to(dtype), x, rot, w)
    for name, a, r, e in zip(("y", "dx", "drot", "effective weight"), got, lowp, exact):
        assert a.dtype == dtype, name
        if dtype in (torch.float32, torch.float64):
            assert_close(a, e.to(dtype), dtype)
        else:
            assert_low_precision_close(a, r, e)


# The backends with Neumann kernels of their own (the others build the rotations with peft's torch code).
NEUMANN_BACKENDS = [p for p in device_backends()
                    if p.id in ("cpu-cpu", "cuda-cuda", "cuda_emulated-cpu", "triton-cpu", "triton-cuda")]


@pytest.mark.parametrize("device,backend", [pytest.param("cpu", "reference", id="reference")] + NEUMANN_BACKENDS)
@pytest.mark.parametrize("neumann", [True, False])
def test_rotation_matches_peft(neumann, device, backend):
    """peft's torch code (reference backend, exact Cayley on every backend) gives its R bitwise; the kernels'
    Neumann series within float32 rounding, gradients too."""
    from peft.tuners.oft.layer import OFTRotationModule

    torch.manual_seed(0)
    module = OFTRotationModule(3, 28, 8, 24, use_cayley_neumann=neumann).to(device)
    torch.nn.init.normal_(module.weight, std=0.1)
    expected = module._cayley_batch(module.weight, 8, neumann, 5)
    got = sk.oft_rotation(module.weight, 8, neumann, backend=backend)
    if backend == "reference" or not neumann:
        assert torch.equal(got, expected)
    grad = torch.randn_like(expected)
    assert_close(got, expected, torch.float32)
    assert_close(torch.autograd.grad(got, module.weight, grad)[0],
                 torch.autograd.grad(expected, module.weight, grad)[0], torch.float32)


@pytest.mark.parametrize("device,backend", device_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_rotation_takes_numpy_integers(device, backend, dtype):
    """Sizes that pass the integer checks as numbers.Integral (numpy's) reach the kernels as Python ints (the Triton
    launch rejected a numpy block size)."""
    params = 0.2 * torch.randn(3, 6, generator=torch.Generator().manual_seed(0), dtype=dtype).to(device)
    got = sk.oft_rotation(params, np.int64(4), True, np.int32(5), backend=backend)
    assert_close(got, reference.cayley(params.double(), 4, True, 5), dtype)


@pytest.mark.parametrize("device,backend", NEUMANN_BACKENDS)
@pytest.mark.parametrize("terms", [1, 2, 3, 4, 5, 7])
@pytest.mark.parametrize("b,blocks", [(2, 3), (3, 1), (5, 4), (17, 2), (32, 6), (33, 1), (64, 2), (65, 1)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp64", "fp32", "bf16", "fp16"])
def test_neumann_kernels_match_reference(device, backend, kernel_device, terms, b, blocks, dtype):
    """The kernels' Neumann blocks and parameter gradients against peft's series in float64 (b = 65: past the
    Triton kernels' largest block, peft's torch code on that backend)."""
    g = torch.Generator().manual_seed(terms * 100 + b)
    params64 = 0.2 * torch.randn(blocks, b * (b - 1) // 2, generator=g, dtype=torch.float64).to(device)
    grad64 = torch.randn(blocks, b, b, generator=g, dtype=torch.float64).to(device)
    params = params64.to(dtype).requires_grad_()
    rot = sk.oft_rotation(params, b, True, terms, backend=backend)
    # One term is R = I, independent of the parameters as in peft's code: their gradient is None.
    assert rot.requires_grad == (terms > 1)
    kernel = terms > 1 and (kernel_device == "cpu" and backend == "cpu" or b <= 64)
    assert (type(rot.grad_fn).__name__ == "_NeumannBackward") == kernel
    dparams = torch.autograd.grad(rot, params, grad64.to(dtype))[0] if terms > 1 else torch.zeros_like(params)
    exact_params = params.detach().double().requires_grad_()
    exact = reference.cayley(exact_params, b, True, terms)
    exact_grad = torch.autograd.grad(exact, exact_params, grad64)[0] if terms > 1 else torch.zeros_like(params64)
    assert rot.dtype == dtype and dparams.dtype == dtype
    if dtype in (torch.float32, torch.float64):
        assert_close(rot, exact, dtype)
        assert_close(dparams, exact_grad, dtype)
    else:  # against peft's series computed in the same low precision
        lowp_params = params.detach().requires_grad_()
        lowp = reference.cayley(lowp_params, b, True, terms)
        lowp_grad = torch.autograd.grad(lowp, lowp_params, grad64.to(dtype))[0] if terms > 1 else \
            torch.zeros_like(params)
        assert_low_precision_close(rot, lowp, exact.detach())
        assert_low_precision_close(dparams, lowp_grad, exact_grad)


@pytest.mark.parametrize("device,backend", NEUMANN_BACKENDS)
@pytest.mark.parametrize("terms", [2, 5])
def test_neumann_kernels_gradcheck(device, backend, terms):
    params = (0.3 * torch.randn(3, 10, dtype=torch.float64, device=device)).requires_grad_()
    assert torch.autograd.gradcheck(lambda p: sk.oft_rotation(p, 5, True, terms, backend=backend), (params,))


@pytest.mark.parametrize("device,backend", NEUMANN_BACKENDS)
def test_neumann_kernels_without_autograd(device, backend, monkeypatch):
    """Where autograd records nothing (no_grad, inference_mode, parameters without grad) the Neumann kernel runs
    alone, as the fused ops' bodies do there, not through its autograd.Function: Function.apply on a live parameter
    waits for the parameter's autograd lock while holding the GIL, and another thread's grad-enabled call (a clone
    of the parameter) holds that lock while waiting for the GIL: an eval call beside a training step hung the
    process (torch's own lock inversion; 2 of 2 runs of 6000 calls a thread before the change)."""
    from spectral_kernels.ops import oft as oft_ops

    params = torch.nn.Parameter(0.2 * torch.randn(3, 10, device=device))
    expected = sk.oft_rotation(params, 5, backend=backend).detach()

    def refuse(*args):
        raise AssertionError("autograd.Function applied where autograd records nothing")

    monkeypatch.setattr(oft_ops._Neumann, "apply", refuse)
    for context in (torch.no_grad, torch.inference_mode):
        with context():
            assert torch.equal(sk.oft_rotation(params, 5, backend=backend), expected)
    assert torch.equal(sk.oft_rotation(params.detach(), 5, backend=backend), expected)


@pytest.mark.parametrize("device,backend", native_device_backends())
def test_native_neumann_bad_input(device, backend, kernel_device):
    ops = torch.ops.spectral_kernels
    cases = [("parameters", lambda: ops.oft_neumann(torch.randn(2, 5, device=device), 4, [1.0, 2.0])),
             ("gradient", lambda: ops.oft_neumann_backward(torch.randn(2, 6, device=device),
                                                           torch.randn(2, 3, 3, device=device), 4, [1.0, 2.0])),
             ("start with 1", lambda: ops.oft_neumann(torch.randn(2, 6, device=device), 4, [2.0, 2.0]))]
    if kernel_device == "cuda":  # past the kernels' shared memory and argument limits
        cases += [("block size 65 out of range", lambda: ops.oft_neumann(torch.randn(1, 2080, device=device), 65,
                                                                          [1.0, 2.0])),
                  ("at most 64 coefficients", lambda: ops.oft_neumann(torch.randn(1, 6, device=device), 4,
                                                                       [1.0] + [2.0] * 64))]
    if device == "cuda":  # a gradient on the CPU
        cases += [("different devices", lambda: ops.oft_neumann_backward(torch.randn(2, 6, device=device),
                                                                         torch.randn(2, 4, 4), 4, [1.0, 2.0]))]
    assert_raises_all(cases)


@pytest.mark.parametrize("device,backend", NEUMANN_BACKENDS)
def test_neumann_kernels_past_the_gpu_limits(device, backend, kernel_device):
    """More coefficients than the CUDA kernels take by value (65 terms) and blocks past the GPU kernels' 64: the
    same blocks as peft's series, from the kernels where they take them, else from peft's torch code."""
    g = torch.Generator().manual_seed(3)
    for b, terms in [(4, 65), (66, 3)]:
        params = (0.05 * torch.randn(2, b * (b - 1) // 2, generator=g, dtype=torch.float64)).to(device)
        params.requires_grad_()
        rot = sk.oft_rotation(params, b, True, terms, backend=backend)
        kernel = kernel_device == "cpu" and backend == "cpu" or (b <= 64 and (backend == "triton" or terms <= 64))
        assert (type(rot.grad_fn).__name__ == "_NeumannBackward") == kernel
        exact = reference.cayley(params, b, True, terms)
        grad = torch.randn(rot.shape, generator=g, dtype=torch.float64).to(device)
        assert_close(rot, exact, torch.float64)
        assert_close(*(torch.autograd.grad(r, params, grad)[0] for r in (rot, exact)), torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_exact_cayley_is_orthogonal(dtype):
    params = torch.randn(6, 12 * 11 // 2, dtype=dtype)  # large entries: far from the identity
    rot = sk.oft_rotation(params, 12, use_cayley_neumann=False)
    eye = torch.eye(12, dtype=dtype).expand_as(rot)
    assert_close(rot.transpose(1, 2) @ rot, eye, dtype)
    assert_close(rot @ rot.transpose(1, 2), eye, dtype)


@pytest.mark.parametrize("tokens", [3, 30])  # the token and the weight path
def test_compile_fullgraph(tokens):
    layer = sk.OFTLinear(torch.nn.Linear(48, 12), config=sk.OFTConfig(oft_block_size=8, init_weights=False))
    assert_compiled_matches_eager(layer, torch.randn(tokens, 48))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("shared", [False, True])
def test_opcheck(path, shared):
    (x, w, bias, p), _ = make_case(24, 10, 6, (3,), torch.float32, "cpu", shared)
    rot = sk.oft_rotation(p, 6).detach().requires_grad_()
    torch.library.opcheck(torch.ops.spectral_kernels.oft_linear_fwd.default,
                          (x.requires_grad_(), w, bias, rot, "cpu", path))
    torch.library.opcheck(torch.ops.spectral_kernels.oft_rotate_fwd.default, (x, rot, "cpu"))


@pytest.mark.skipif(sk.backends()["cpu"] is not None, reason=str(sk.backends()["cpu"]))
@settings(max_examples=60, deadline=None)
@given(b=st.integers(1, 20), blocks=st.integers(1, 4), tokens=st.integers(0, 30), shared=st.booleans(),
       transpose=st.booleans(), dtype=st.sampled_from([torch.float64, torch.float32]))
def test_cpu_kernels_any_shape(b, blocks, tokens, shared, transpose, dtype):
    """Every block size up to 20 (whole and partial SIMD vectors), token count (empty, partial tiles), sharing,
    and the backward's optional outputs."""
    from spectral_kernels.kernels.native import oft as native

    g = torch.Generator().manual_seed(b * 1000 + blocks * 100 + tokens)
    x, grad = torch.randn(2, tokens, blocks * b, generator=g, dtype=torch.float64)
    rot = torch.randn(1 if shared else blocks, b, b, generator=g, dtype=torch.float64)
    full = rot.expand(blocks, b, b)
    expected = reference.rotate(x, full.transpose(1, 2) if transpose else full)
    rotated = native.rotate(x.to(dtype), rot.to(dtype), transpose)
    assert rotated.shape == x.shape and rotated.dtype == dtype
    if tokens:
        assert_close(rotated, expected.to(dtype), dtype)
    dense = torch.einsum("trk,trc->rkc", x.view(tokens, blocks, b), grad.view(tokens, blocks, b))
    expected_drot = dense.sum(0, keepdim=True) if shared else dense
    expected_dx = reference.rotate(grad, full.transpose(1, 2))
    for need_dx, need_drot in [(True, True), (True, False), (False, True)]:
        g = grad.to(dtype, copy=True)
        dx, drot = native.rotate_backward(g, x.to(dtype), rot.to(dtype), need_dx, need_drot)
        if need_dx and tokens:
            assert_close(dx, expected_dx.to(dtype), dtype)
        if need_drot:
            assert_close(drot, expected_drot.to(dtype), dtype)
        if not need_dx:
            assert torch.equal(g, grad.to(dtype))  # untouched


@pytest.mark.parametrize("device,backend", native_device_backends())
def test_native_kernels_reject_bad_arguments(device, backend):
    """Shapes, dtypes and devices, checked by the entry points of both C++ backends (shared checks)."""
    k = sk.dispatch.kernels("oft", backend)
    x, rot = torch.randn(3, 8, device=device), torch.randn(2, 4, 4, device=device)
    cases = [("rotation blocks must be floating-point", lambda: k.rotate(x, rot.int(), False)),
             ("rotation blocks must be", lambda: k.rotate(x, rot[:, :3], False)),
             ("x must be floating-point", lambda: k.rotate(x.long(), rot, False)),
             ("block size 4 does not divide 6 features", lambda: k.rotate(x[:, :6], rot, False)),
             ("2 rotation blocks for 4 blocks", lambda: k.rotate(torch.randn(3, 16, device=device), rot, False)),
             ("g .* differ", lambda: k.rotate_backward(x[:2].clone(), x, rot, True, True)),
             ("g must be contiguous", lambda: k.rotate_backward(x.t().contiguous().t(), x, rot, True, True))]
    if device == "cuda":
        cases += [("different devices", lambda: k.rotate(x, rot.cpu(), False)),
                  ("different devices", lambda: k.rotate_backward(x.clone(), x, rot.cpu(), True, True))]
    assert_raises_all(cases)


@pytest.mark.parametrize("device,backend", native_device_backends())
@pytest.mark.parametrize("tokens", [0, 3])
def test_native_kernels_zero_features(device, backend, tokens):
    """x with 0 features (0 blocks) is a valid, empty input of the C++ entry points: dR is zero."""
    k = sk.dispatch.kernels("oft", backend)
    x, rot = torch.empty(tokens, 0, device=device), torch.randn(1, 4, 4, device=device)
    assert k.rotate(x, rot, False).shape == (tokens, 0)
    dx, drot = k.rotate_backward(x.clone(), x, rot, True, True)
    assert dx.shape == (tokens, 0) and torch.equal(drot, torch.zeros_like(rot))
