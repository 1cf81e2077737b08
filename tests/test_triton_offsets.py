"""The Triton kernels address tensors of more than 2**31 elements: their offsets are 64-bit.

Triton computes in 32 bits what it is given in 32 bits (program ids, integer arguments below 2**31), so a row
offset such as row * tokens wrapped around to an address gigabytes before the tensor. Each test launches one
kernel on a (mostly untouched, lazily allocated) half-precision tensor past that size, with a grid of only the programs
whose offsets pass 2**31, and compares their rows with the same kernel on a small tensor holding the same rows.
"""
import os

import pytest
import torch

triton = pytest.importorskip("triton")
from spectral_kernels.kernels.triton import fourierft, frod, oft  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1",
                                reason="needs a CUDA device or TRITON_INTERPRET=1")
BF16 = torch.bfloat16


def _randn(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0)).to(device=DEVICE, dtype=BF16)


def test_frod_rows_past_2_31():
    """3 rows of 2**30 + 1 tokens: row 2 starts at element 2**31 + 2."""
    rows, tokens, width = 3, 2 ** 30 + 1, 256
    inp = torch.empty(1, tokens, dtype=BF16, device=DEVICE)
    inp[:, :width] = _randn(1, width)
    coef = torch.tensor([0.5, -1.25, 2.0], device=DEVICE)
    ptr = torch.arange(rows + 1, device=DEVICE)  # row i = coef[i] * inp[0]
    src = torch.zeros(rows, dtype=torch.long, device=DEVICE)
    perm = torch.arange(rows, device=DEVICE)
    out = torch.empty(rows, tokens, dtype=BF16, device=DEVICE)
    frod._mix_kernel[(rows, 1)](inp, coef, ptr, src, perm, out, tokens, ACC=triton.language.float32,
                                BLOCK_T=width)
    expected = frod.mix(inp[:, :width].contiguous(), coef, ptr, src, perm)
    torch.testing.assert_close(out[:, :width], expected, rtol=0, atol=0)

    dz = torch.empty(rows, tokens, dtype=BF16, device=DEVICE)
    partial = torch.zeros(1, rows, device=DEVICE)
    frod._mix_backward_kernel[(rows, 1)](inp, out, coef, ptr, src, perm, dz, partial, tokens, rows, NEED_DZ=True,
                                         ACC=triton.language.float32, BLOCK_T=width)
    expected_dz, expected_dcoef = frod.mix_backward(inp[:, :width].contiguous(), expected, coef, ptr, src, perm,
                                                    True)
    torch.testing.assert_close(dz[:, :width], expected_dz, rtol=0, atol=0)
    torch.testing.assert_close(partial[0], expected_dcoef, rtol=0, atol=0)


def test_oft_tokens_past_2_31():
    """64 tokens of 2**25 + 2**20 features: token 63 starts past element 2**31; one 32-wide block is rotated."""
    tokens, ld, b = 64, 2 ** 25 + 2 ** 20, 32
    x = torch.empty(tokens, ld, dtype=BF16, device=DEVICE)
    x[:, :b] = _randn(tokens, b)
    rot = torch.linalg.qr(torch.randn(1, b, b, generator=torch.Generator().manual_seed(1)))[0].to(DEVICE, BF16)
    small = x[:, :b].contiguous()
    acc, precision = oft._dot_args(x.dtype, rot.dtype)
    tile = oft._tile(b)

    out = torch.empty_like(x)
    oft._rotate_kernel[(1, 1)](x, rot.float(), out, tokens, b, ld, 1, 0, rot.stride(1), rot.stride(2),
                               ACC=acc, PRECISION=precision, BLOCK_T=oft.BLOCK_T, BLOCK=tile)
    torch.testing.assert_close(out[:, :b], oft.rotate(small, rot, False), rtol=0, atol=0)

    partial = torch.zeros(1, 1, b, b, device=DEVICE)
    oft._rotate_grad_kernel[(1, 1)](x, out, partial, tokens, b, ld, 1, 1, tokens,
                                    ACC=acc, PRECISION=precision, BLOCK_T=oft.BLOCK_T, BLOCK=tile)
    expected = oft._rotate_grad(small, out[:, :b].contiguous(), b, False)
    torch.testing.assert_close(partial[0], expected, rtol=0, atol=0)


def test_fourierft_mirror_rows_past_2_31():
    """ΔW's 3 rows of 2**30 + 1 columns from a half-spectrum: row 2 starts at element 2**31 + 2."""
    m, n, width = 3, 2 ** 30 + 1, 64
    bins = n // 2 + 1
    ft = torch.empty(bins, 1, dtype=torch.complex32, device=DEVICE)  # every row reads the same column
    ft[:width] = torch.randn(width, 1, dtype=torch.complex64, generator=torch.Generator().manual_seed(2)).to(ft)
    ft = ft.expand(bins, m)
    out = torch.empty(m, n, dtype=torch.float16, device=DEVICE)
    fourierft._real_mirror_kernel[(1, 1)](torch.view_as_real(ft), ft.stride(0), ft.stride(1), out, out, m, n, bins,
                                          HAS_BASE=False, BLOCK_P=fourierft.BLOCK_P, BLOCK_Q=width)
    torch.testing.assert_close(out[:, :width], torch.view_as_real(ft[:width]).select(-1, 0).t(), rtol=0, atol=0)
