"""FourierFT: every backend and path against the reference (peft's torch.fft math)."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import spectral_kernels as sk
from spectral_kernels import dispatch
from spectral_kernels.kernels.reference import fourierft as reference
from spectral_kernels.layers.fourierft import fourierft_indices

from conftest import (assert_close, assert_compiled_matches_eager, assert_low_precision_close, assert_raises_all,
                      device_backends, native_device_backends)

PATHS = ["token", "weight"]
# (out_features, in_features, n_frequency): odd, non-square, n from 1 to out*in.
SMALL = [(33, 17, 1), (24, 40, 100), (16, 12, 192), (1000, 37, 700)]
LARGE = [(768, 768, 1000), (37, 1000, 37000), (300, 513, 4000), (3072, 24, 1000), (40, 11008, 1000)]


def make_case(m, n, nf, lead, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(m, n, generator=g, dtype=torch.float64) / n ** 0.5
    bias = torch.randn(m, generator=g, dtype=torch.float64)
    spectrum = torch.randn(nf, generator=g, dtype=torch.float64)
    x = torch.randn(*lead, n, generator=g, dtype=torch.float64)
    indices = fourierft_indices(m, n, nf, 777)
    cast = [t.to(device, dtype) for t in (x, weight, bias, spectrum)]
    exact = [t.to(device) for t in (x, weight, bias, spectrum)]
    return cast, exact, indices.to(device)


def run(fn, x, weight, bias, spectrum, grad_out=None):
    """Output and gradients w.r.t. x, weight, spectrum and bias."""
    x, weight, spectrum, bias = (t.detach().requires_grad_() for t in (x, weight, spectrum, bias))
    y = fn(x, weight, bias, spectrum)
    if grad_out is None:
        grad_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = torch.autograd.grad(y, (x, weight, spectrum, bias), grad_out.to(y.device, y.dtype))
    return [y.detach(), *grads], grad_out


def check(device, backend, path, m, n, nf, lead, dtype):
    (x, w, b, c), (x64, w64, b64, c64), indices = make_case(m, n, nf, lead, dtype, device)
    scaling = 150.0

    def ours(x, w, b, c):
        return sk.fourierft_linear(x, w, b, c, indices, scaling, backend=backend, path=path)

    def ref(x, w, b, c):
        return reference.fourierft_linear(x, w, b, c, indices, scaling)

    exact, g = run(ref, x64, w64, b64, c64)
    got, _ = run(ours, x, w, b, c, g)
    names = ("y", "dx", "dweight", "dspectrum", "dbias")
    if dtype in (torch.float32, torch.float64):
        for name, a, e in zip(names, got, exact):
            assert a.dtype == dtype, name
            assert_close(a, e.to(dtype), dtype)
    else:
        lowp, _ = run(ref, x, w, b, c, g)
        for name, a, r, e in zip(names, got, lowp, exact):
            assert a.dtype == dtype, name
            assert_low_precision_close(a, r, e)


@pytest.mark.parametrize("device,backend", device_backends())
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("m,n,nf", SMALL)
@pytest.mark.parametrize("lead", [(), (5,), (2, 3)], ids=["1d", "2d", "3d"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16],
                         ids=["fp32", "fp64", "bf16", "fp16"])
def test_matches_reference(device, backend, path, m, n, nf, lead, dtype):
    check(device, backend, path, m, n, nf, lead, dtype)


@pytest.mark.parametrize("device,backend", [p for p in device_backends() if p.id != "triton-cpu"])
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("m,n,nf", LARGE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_matches_reference_large(device, backend, path, m, n, nf, dtype):
    check(device, backend, path, m, n, nf, (2, 9), dtype)


@pytest.mark.parametrize("device,backend", device_backends())
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_matches_reference_many_tokens(device, backend, path, dtype):
    """135 tokens: several of the CPU kernels' token tiles (32 for the reduction, 8 for the mix), a partial
    one, split over threads."""
    check(device, backend, path, 40, 26, 300, (3, 45), dtype)


@pytest.mark.parametrize("device,backend", device_backends())
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_frozen_input(device, backend, path, dtype):
    """x without a gradient (a first layer's input): no spectral dx is taken, and the spectrum's and the bias's
    gradients are the reference's."""
    (x, w, b, c), _, indices = make_case(24, 40, 100, (2, 3), dtype, device)

    def grads(backend):
        c_, b_ = (t.detach().requires_grad_() for t in (c, b))
        y = sk.fourierft_linear(x, w, b_, c_, indices, 150.0, backend=backend, path=path)
        return torch.autograd.grad(y.square().sum(), (c_, b_))

    for got, expected in zip(grads(backend), grads("reference")):
        assert_close(got, expected, dtype)


@pytest.mark.parametrize("device,backend", device_backends())
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_backward_in_token_chunks(device, backend, path, dtype, monkeypatch):
    """The backward's spectra in chunks of 7 tokens over 45 (the last one partial)."""
    per_token = 8 * (40 // 2 + 26 // 2 + 2)
    monkeypatch.setitem(dispatch.FOURIERFT_CHUNK_BYTES, device, 7 * per_token)
    assert dispatch.fourierft_chunk_tokens(torch.device(device), 40, 26) == 7
    check(device, backend, path, 40, 26, 300, (3, 15), dtype)


@pytest.mark.parametrize("device,backend", device_backends())
@pytest.mark.parametrize("direct", [True, False], ids=["direct-rows", "fft-rows"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_weight_path_row_transforms(device, backend, direct, dtype, monkeypatch):
    """The weight path with the spectrum's rows transformed directly and by an FFT of the dense rows."""
    monkeypatch.setattr(dispatch, "FOURIERFT_DIRECT_COEFFICIENTS_PER_ROW", 10 ** 9 if direct else 0)
    assert dispatch.fourierft_direct_rows(300, 40) == direct
    check(device, backend, "weight", 40, 26, 300, (3, 15), dtype)


@pytest.mark.parametrize("device,backend", device_backends())
@pytest.mark.parametrize("path", PATHS)
def test_gradcheck(device, backend, path):
    (x, w, b, c), _, indices = make_case(12, 10, 30, (2, 3), torch.float64, device)
    inputs = [t.detach().requires_grad_() for t in (x, w, b, c)]

    def fn(x, w, b, c):
        return sk.fourierft_linear(x, w, b, c, indices, 3.0, backend=backend, path=path)

    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("device,backend", device_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16],
                         ids=["fp32", "fp64", "bf16", "fp16"])
def test_delta_weight(device, backend, dtype):
    for m, n, nf in SMALL:
        (_, _, _, c), (_, _, _, c64), indices = make_case(m, n, nf, (1,), dtype, device)
        got = sk.fourierft_delta_weight(c, indices, m, n, 150.0, backend=backend)
        exact = reference.fourierft_delta_weight(c64, indices, m, n, 150.0)
        assert got.dtype == dtype
        if dtype in (torch.float32, torch.float64):
            assert_close(got, exact.to(dtype), dtype)
        else:
            assert_low_precision_close(got, reference.fourierft_delta_weight(c, indices, m, n, 150.0), exact)


def test_reference_delta_weight_at_2048_on_two_threads():
    """torch 2.13's CPU ifft2 of a 2048 x 2048 float32 input came out 2048² times too small on two threads or
    more, and with it the reference's ΔW (what peft computes) and the layers' calls that use it; float32 against
    float64."""
    indices = fourierft_indices(2048, 2048, 1000, 777)
    c = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        got = reference.fourierft_delta_weight(c, indices, 2048, 2048, 150.0)
    finally:
        torch.set_num_threads(threads)
    assert_close(got, sk.fourierft_delta_weight(c.double(), indices, 2048, 2048, 150.0).float(), torch.float32)


@pytest.mark.parametrize("device,backend", device_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_delta_weight_takes_numpy_integers(device, backend, dtype):
    """Sizes given as numpy integers reach the kernels as Python ints (the Triton launch rejected them)."""
    (_, _, _, c), (_, _, _, c64), indices = make_case(6, 8, 10, (1,), dtype, device)
    got = sk.fourierft_delta_weight(c, indices, np.int64(6), np.int64(8), 2.0, backend=backend)
    assert_close(got, reference.fourierft_delta_weight(c64, indices, 6, 8, 2.0).to(dtype), dtype)


@pytest.mark.parametrize("device,backend", device_backends() + [pytest.param("cpu", "reference", id="reference")])
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_duplicate_positions_accumulate(device, backend, path, dtype):
    """Several adapters folded into one call may share positions: contributions add, on every backend (the
    reference too: peft's assignment is undefined for repeated positions), gradients included."""
    (x, w, b, c), _, indices = make_case(9, 14, 20, (4,), dtype, device)
    partner = torch.randn(20, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(device, dtype)

    def call(spectrum, idx, scaling):
        return sk.fourierft_linear(x, w, b, spectrum, idx, scaling, backend=backend, path=path)

    both = torch.cat([c, partner]).requires_grad_()
    doubled = call(both, torch.cat([indices, indices], 1), 1.0)
    summed = call(c + partner, indices, 1.0)
    assert_close(doubled, summed, dtype)
    (grad,) = torch.autograd.grad(doubled.sum(), both)
    single = c.clone().requires_grad_()
    (expected,) = torch.autograd.grad(call(single, indices, 1.0).sum(), single)
    assert_close(grad, torch.cat([expected, expected]), dtype)


@pytest.mark.parametrize("device,backend", device_backends())
@pytest.mark.parametrize("m,n", [(7, 5), (6, 9), (16, 12)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_delta_weight_primitives(device, backend, m, n, dtype):
    """The weight path's kernels against torch.fft on a dense spectrum: the row transforms of S, then the real
    part of its full 2-D transform added to a base, from the column FFT in any memory layout."""
    k = dispatch.kernels("fourierft", backend)
    g = torch.Generator().manual_seed(0)
    indices = torch.cat([fourierft_indices(m, n, m * n // 3, 777)] * 2, 1).to(device)  # with duplicates
    coef = torch.randn(indices.shape[1], generator=g, dtype=torch.float64)
    dense = torch.zeros(m, n, dtype=torch.float64).index_put_((indices[0].cpu(), indices[1].cpu()), coef,
                                                              accumulate=True)
    coef = coef.to(device, dtype)
    rows_done = k.spectrum_rows(coef, indices[0], indices[1], m, n, 0.5)
    assert rows_done.dtype == dtype.to_complex() and rows_done.shape == (m, n // 2 + 1)
    assert_close(torch.view_as_real(rows_done),
                 torch.view_as_real(0.5 * torch.fft.fft(dense, dim=1)[:, :n // 2 + 1]).to(device, dtype), dtype)
    expected = 0.5 * torch.fft.fft2(dense).real
    base = torch.randn(m, n, generator=g, dtype=torch.float64)
    column_fft = torch.fft.fft(rows_done, dim=0)
    for ft in (column_fft.t(), column_fft.t().contiguous(), column_fft.contiguous().t()):
        assert_close(k.real_mirror(ft, None, n), expected.to(device, dtype), dtype)
        got = k.real_mirror(ft, base.to(device, dtype), n)
        assert got.dtype == dtype
        assert_close(got, (base + expected).to(device, dtype), dtype)
    if dtype != torch.float32:  # half-precision weights come with float32 spectra
        return
    low = k.real_mirror(column_fft.t(), base.to(device, torch.bfloat16), n)
    assert low.dtype == torch.bfloat16
    assert_low_precision_close(low, (base.to(torch.bfloat16).double() + expected).to(torch.bfloat16).to(device),
                               (base.to(torch.bfloat16).double() + expected).to(device))


@pytest.mark.parametrize("tokens", [3, 60])  # the token and the weight path
def test_compile_fullgraph(tokens):
    layer = sk.FourierFTLinear(torch.nn.Linear(20, 12), n_frequency=30)
    assert_compiled_matches_eager(layer, torch.randn(tokens, 20))


def test_compile_fullgraph_public_op():
    """The public op checks its index values with an assert inside the traced graph (it cannot branch on them)."""
    (x, w, b, c), _, indices = make_case(12, 20, 30, (5,), torch.float32, "cpu")
    torch._dynamo.reset()
    compiled = torch.compile(sk.fourierft_linear, fullgraph=True, backend="aot_eager")
    assert_close(compiled(x, w, b, c, indices, 2.0), sk.fourierft_linear(x, w, b, c, indices, 2.0), torch.float32)
    with pytest.raises(RuntimeError, match="out of range"):
        compiled(x, w, b, c, indices.flip(0), 2.0)  # rows past out_features


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("chunks", [1, 3])
def test_opcheck(path, chunks, monkeypatch):
    """The op's fake and real outputs agree, the token path's kept spectrum (one chunk) or its empty state; the
    public op keeps the spectrum where the tokens fit one chunk."""
    per_token = 8 * (10 // 2 + 8 // 2 + 2)
    monkeypatch.setitem(dispatch.FOURIERFT_CHUNK_BYTES, "cpu", per_token * (7 if chunks == 1 else 3))
    (x, w, b, c), _, indices = make_case(10, 8, 12, (7,), torch.float32, "cpu")
    keep = path == "token" and chunks == 1
    args = (x.requires_grad_(), w, b, c.requires_grad_(), indices[0], indices[1], 2.0, "cpu", path, keep)
    _, state = torch.ops.spectral_kernels.fourierft_linear_fwd(*args)
    y = sk.fourierft_linear(x, w, b, c, indices, 2.0, backend="cpu", path=path)
    saved = y.grad_fn.next_functions[0][0].saved_tensors[-1]  # past the view to x's leading dimensions
    assert saved.shape == state.shape
    if path == "token":
        assert state.shape == ((7 if keep else 0), 8 // 2 + 1)
    torch.library.opcheck(torch.ops.spectral_kernels.fourierft_linear_fwd.default, args)


@pytest.mark.skipif(sk.backends()["cpu"] is not None, reason=str(sk.backends()["cpu"]))
def test_cpu_kernels_reject_out_of_range_indices():
    """The C++ kernels check indices before addressing memory with them (the torch ops are callable directly,
    not only through the checked public functions)."""
    k = dispatch.kernels("fourierft", "cpu")
    c, ok, xf = torch.randn(3), torch.tensor([0, 1, 2]), torch.randn(2, 4, dtype=torch.complex64)
    for bad in (torch.tensor([0, 6, 1]), torch.tensor([0, -1, 1])):
        with pytest.raises(RuntimeError, match="out of range"):
            k.spectrum_rows(c, bad, ok, 6, 6, 1.0)
        with pytest.raises(RuntimeError, match="out of range"):
            k.spectrum_rows(c, ok, bad, 6, 6, 1.0)
        with pytest.raises(RuntimeError, match="out of range"):
            k.mix(xf, c, bad, ok, 6, 6, 1.0)
        with pytest.raises(RuntimeError, match="out of range"):
            k.mix(xf, c, ok, bad, 6, 6, 1.0)
        with pytest.raises(RuntimeError, match="out of range"):
            k.coef_grad(xf, xf, bad, ok, 6, 6, 1.0)
        with pytest.raises(RuntimeError, match="out of range"):
            k.coef_grad(xf, xf, ok, bad, 6, 6, 1.0)
    assert k.mix(xf, c, ok, ok, 6, 6, 1.0).shape == (2, 4)


@pytest.mark.parametrize("device,backend", native_device_backends())
def test_native_kernels_reject_bad_arguments(device, backend):
    """Shapes, dtypes and devices, checked by the entry points of both C++ backends (shared checks; the CUDA
    kernels assert index values on the device: test_cuda_emulation.py tests those asserts)."""
    k = dispatch.kernels("fourierft", backend)
    c, idx = torch.randn(3, device=device), torch.tensor([0, 1, 2], device=device)
    xf = torch.randn(2, 4, dtype=torch.complex64, device=device)  # half spectra of length-6 signals
    cases = [("3 coefficients but 2 and 3 indices", lambda: k.mix(xf, c, idx[:2], idx, 6, 6, 1.0)),
             ("int64 indices", lambda: k.mix(xf, c, idx.int(), idx.int(), 6, 6, 1.0)),
             ("xf must be complex", lambda: k.mix(xf, c, idx, idx, 8, 6, 1.0)),
             ("n_out >= 1", lambda: k.mix(xf, c, idx, idx, 6, 0, 1.0)),
             ("same length", lambda: k.coef_grad(xf, xf, idx, idx[:2], 6, 6, 1.0)),
             ("yf must be complex", lambda: k.coef_grad(xf, xf.real, idx, idx, 6, 6, 1.0)),
             ("2 and 1 tokens", lambda: k.coef_grad(xf, xf[:1], idx, idx, 6, 6, 1.0)),
             ("n >= 1", lambda: k.spectrum_rows(c, idx, idx, 6, 0, 1.0)),
             ("floating-point coefficients", lambda: k.spectrum_rows(idx, idx, idx, 6, 6, 1.0))]
    if device == "cuda":
        cases += [("different devices", lambda: k.mix(xf, c, idx.cpu(), idx, 6, 6, 1.0)),
                  ("different devices", lambda: k.mix(xf, c.cpu(), idx, idx, 6, 6, 1.0)),
                  ("different devices", lambda: k.coef_grad(xf, xf, idx, idx.cpu(), 6, 6, 1.0)),
                  ("different devices", lambda: k.spectrum_rows(c, idx, idx.cpu(), 6, 6, 1.0)),
                  ("different devices", lambda: k.real_mirror(xf.t(), torch.randn(2, 6), 6))]
    assert_raises_all(cases)


@pytest.mark.skipif(sk.backends()["cpu"] is not None, reason=str(sk.backends()["cpu"]))
@settings(max_examples=60, deadline=None)
@given(m=st.integers(1, 12), n=st.integers(1, 12), tokens=st.integers(1, 3), data=st.data(),
       path=st.sampled_from(PATHS))
def test_index_folding_any_shape(m, n, tokens, data, path):
    """Every spectrum size, parity and position (Nyquist and DC rows/columns included)."""
    nf = data.draw(st.integers(1, m * n))
    check("cpu", "cpu", path, m, n, nf, (tokens,), torch.float64)
