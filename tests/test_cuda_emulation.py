"""What only the emulated CUDA kernels (tests/cuda_emulation) let a machine without a GPU test: the kernels'
device-side asserts, and their results with blocks and threads run in the opposite order (a missing barrier or a
race between blocks gives a different result in one of the two orders). The "cuda_emulated-cpu" cases of the other
test files run the kernels' outputs and gradients against the reference."""
import pytest
import torch

import spectral_kernels as sk

from conftest import assert_close, assert_raises_all, cuda_emulation_unavailable

pytestmark = pytest.mark.skipif(cuda_emulation_unavailable() is not None, reason=str(cuda_emulation_unavailable()))


@pytest.fixture
def emulated(cuda_emulation):
    """The emulated CUDA kernels, as ops of their own (the CPU kernels serve spectral_kernels' ops)."""
    return torch.ops.sk_emulated_cuda


def test_device_side_asserts(emulated):
    """Index values out of range reach the kernels (the CUDA entry points leave them to device-side asserts, which
    a real GPU reports by losing its context): each kernel that reads them stops with the assert."""
    c, idx = torch.randn(3), torch.tensor([0, 1, 2])
    bad = torch.tensor([0, 1, 6])
    xf = torch.randn(2, 4, dtype=torch.complex64)  # half spectra of length-6 signals
    x, coef = torch.randn(5, 4), torch.randn(6)
    ptr, src, perm = torch.tensor([0, 2, 3, 5, 6]), torch.tensor([0, 1, 2, 3, 0, 4]), torch.arange(6)
    g = torch.randn(5, 4)
    asserts = [
        ("r < m", lambda: emulated.fourierft_spectrum_rows(c, bad, idx, 6, 6, 1.0)),
        ("v < n", lambda: emulated.fourierft_spectrum_rows(c, idx, bad, 6, 6, 1.0)),
        ("gk < n_in", lambda: emulated.fourierft_mix(xf, c, bad, idx, 6, 6, 1.0)),
        ("sk < n_out", lambda: emulated.fourierft_mix(xf, c, idx, bad, 6, 6, 1.0)),
        ("ak < n_x", lambda: emulated.fourierft_coef_grad(xf, xf, bad, idx, 6, 6, 1.0)),
        ("bk < n_y", lambda: emulated.fourierft_coef_grad(xf, xf, idx, bad, 6, 6, 1.0)),
        ("s < in_rows", lambda: emulated.frod_mix(x, coef, ptr, torch.tensor([0, 1, 2, 3, 0, 5]), perm)),
        ("p < coefs", lambda: emulated.frod_mix(x, coef, ptr, src, torch.tensor([0, 1, 2, 3, 4, 6]))),
        ("r.begin <= r.end", lambda: emulated.frod_mix(x, coef, torch.tensor([0, 3, 2, 5, 6]), src, perm)),
        ("r.end == entries", lambda: emulated.frod_mix(x, coef, torch.tensor([0, 2, 3, 5, 5]), src, perm)),
        ("s_row < g_rows", lambda: emulated.frod_mix_backward(g, x[:4], coef, ptr,
                                                              torch.tensor([0, 1, 2, 3, 0, 5]), perm, True)),
        ("index < coefs", lambda: emulated.frod_mix_backward(g, x[:4], coef, ptr, src,
                                                             torch.tensor([0, 1, 2, 3, 4, 6]), True)),
    ]
    assert_raises_all([("device-side assert failed: .*" + condition, call) for condition, call in asserts])
    assert emulated.fourierft_mix(xf, c, idx, idx, 6, 6, 1.0).shape == (2, 4)  # the emulation goes on


def fused_op(name):
    """The fused op ``name`` (method-path) at odd sizes on the cpu backend: forward(*inputs) -> y, and its inputs
    (x and the adapter's trainable tensors)."""
    method, path = name.split("-")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 37, 96, generator=g)
    w, bias = torch.randn(45, 96, generator=g), torch.randn(45, generator=g)
    if method == "fourierft":
        flat = torch.randperm(45 * 96, generator=g)[:300]
        indices = torch.stack([flat // 96, flat % 96])
        return (lambda x, spectrum: sk.fourierft_linear(x, w, bias, spectrum, indices, 150.0, backend="cpu",
                                                        path=path)), (x, torch.randn(300, generator=g))
    if method == "oft":  # three blocks of 32
        return (lambda x, params: sk.oft_linear(x, w, bias, sk.oft_rotation(params, 32, backend="cpu"),
                                                backend="cpu", path=path)), (x, 0.1 * torch.randn(3, 496, generator=g))
    u, v = torch.randn(45, 96, generator=g) / 10, torch.randn(96, 96, generator=g) / 10
    flat = torch.randperm(96 * 96, generator=g)[:200]
    s_indices = torch.stack([flat // 96, flat % 96])
    return (lambda x, lam, s_values: sk.frod_linear(x, u, v, lam, s_values, s_indices, bias, backend="cpu",
                                                    path=path)), (x, torch.randn(96, generator=g),
                                                                  torch.randn(200, generator=g))


@pytest.mark.parametrize("op", ["fourierft-token", "fourierft-weight", "oft-token", "oft-weight", "frod-factored",
                                "frod-weight"])
def test_reverse_order_gives_the_same_results(op, cuda_emulation):
    """Outputs and gradients with blocks and threads run last first, against the usual order: the same bits where
    the kernels are deterministic (OFT, FRoD), within float32 rounding where they add with atomics (FourierFT)."""
    forward, inputs = fused_op(op)
    results = []
    for reverse in (False, True):
        leaves = [t.clone().requires_grad_() for t in inputs]
        with cuda_emulation.active(reverse=reverse):
            y = forward(*leaves)
            results.append([y.detach(), *torch.autograd.grad(y.square().sum(), leaves)])
    for usual, reverse in zip(*results):
        if op.startswith("fourierft"):
            assert_close(reverse, usual, torch.float32)
        else:
            assert torch.equal(reverse, usual)


def test_grid_stride_loops(emulated):
    """Launches whose grid is capped at 65535 (FourierFT's token, coefficient and row loops) or split by the number
    of multiprocessors (the coefficient gradient's token splits) against the CPU kernels."""
    g = torch.Generator().manual_seed(0)
    ops = torch.ops.spectral_kernels
    xf = torch.randn(70000, 3, dtype=torch.complex64, generator=g)  # length-4 signals
    coef, idx = torch.randn(3, generator=g), torch.tensor([0, 3, 1])
    args = (xf, coef, idx, idx, 4, 6, 0.5)
    assert_close(emulated.fourierft_mix(*args), ops.fourierft_mix(*args), torch.float32)
    flat = torch.randperm(300 * 300, generator=g)[:65600]
    coef = torch.randn(65600, generator=g)
    args = (coef, flat // 300, flat % 300, 300, 300, 2.0)
    assert_close(emulated.fourierft_spectrum_rows(*args), ops.fourierft_spectrum_rows(*args), torch.float32)
    ft = torch.randn(70000, 2, dtype=torch.complex64, generator=g).t()  # (n/2 + 1, m) for n = 3
    assert torch.equal(emulated.fourierft_real_mirror(ft, None, 3), ops.fourierft_real_mirror(ft, None, 3))
    yf = torch.randn(3000, 4, dtype=torch.complex64, generator=g)
    args = (xf[:3000], yf, idx, torch.tensor([5, 0, 2]), 4, 6, 1.5)
    assert_close(emulated.fourierft_coef_grad(*args), ops.fourierft_coef_grad(*args), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16],
                         ids=["fp32", "fp64", "bf16", "fp16"])
@pytest.mark.parametrize("tokens,offset", [(2056, 0), (2056, 1), (2051, 0), (24, 0), (3, 0)],
                         ids=["tiles", "unaligned", "ragged", "one-tile", "few"])
def test_frod_rows_whole_or_by_element(emulated, dtype, tokens, offset):
    """FRoD's kernels access a thread's tokens of a row with one 16-byte load or store where every row allows it
    (tokens a multiple of 16 bytes' worth, 16-byte aligned tensors), element by element otherwise: rows several
    tiles long, rows off a 16-byte boundary (offset), ragged and short rows, against the CPU kernels."""
    g = torch.Generator().manual_seed(tokens + offset)
    ops = torch.ops.spectral_kernels
    rows, entries = 5, 23  # batches of four entries and a partial one; a row without entries

    def feature_major(n):  # (n, tokens), its data `offset` elements past the start of its allocation
        flat = torch.randn(n * tokens + offset, generator=g, dtype=torch.float64).to(dtype)
        return flat[offset:].view(n, tokens)

    x, z, grad = feature_major(rows), feature_major(rows), feature_major(rows)
    ptr = torch.tensor([0, 6, 6, 15, 16, entries])
    src, perm = torch.randint(0, rows, (entries,), generator=g), torch.randperm(entries, generator=g)
    coef = torch.randn(entries, generator=g, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    exact = dtype in (torch.float32, torch.float64)
    tol = None if exact else 1e-2  # one rounding of float sums to bfloat16 / float16
    mixed = ops.frod_mix(x, coef, ptr, src, perm)
    backward = {need_dz: ops.frod_mix_backward(grad, z, coef, ptr, src, perm, need_dz) for need_dz in (True, False)}
    for reverse in (False, True):  # the backward's reduction over warps, in both orders
        emulated.set_reverse(reverse)
        try:
            assert_close(emulated.frod_mix(x, coef, ptr, src, perm), mixed, dtype if exact else torch.float32, tol)
            for need_dz, (dz_cpu, dcoef_cpu) in backward.items():
                dz, dcoef = emulated.frod_mix_backward(grad, z, coef, ptr, src, perm, need_dz)
                assert_close(dcoef, dcoef_cpu, dtype if dtype == torch.float64 else torch.float32)
                assert dz.shape == dz_cpu.shape
                if need_dz:
                    assert_close(dz, dz_cpu, dtype if exact else torch.float32, tol)
        finally:
            emulated.set_reverse(False)
