"""FourierFT primitives in Triton (GPU; on CPU under TRITON_INTERPRET=1).

Same contracts as csrc/cpu/fourierft.cpp; the index folding is spelled out in
csrc/fourierft_fold.h. Complex tensors are handled as interleaved (re, im) reals.
"""
import torch
import triton
import triton.language as tl

from . import on_tensors_device

BLOCK_K = 128
BLOCK_T = 16
BLOCK_ROWS_K = 16
BLOCK_P = 32
BLOCK_Q = 64
SPLIT_PROGRAMS = 256  # coef_grad: aim for about this many programs


@triton.jit
def _spectrum_rows_kernel(c_ptr, rows_ptr, cols_ptr, out_ptr, nnz, n, bins,
                          BLOCK_K: tl.constexpr, BLOCK_Q: tl.constexpr):
    k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)[:, None]
    q = tl.program_id(1) * BLOCK_Q + tl.arange(0, BLOCK_Q)[None, :]
    live = (k < nnz) & (q < bins)
    c = tl.load(c_ptr + k, mask=k < nnz, other=0.0)
    r = tl.load(rows_ptr + k, mask=k < nnz, other=0)
    v = tl.load(cols_ptr + k, mask=k < nnz, other=0)
    # The angle from the exact index (v q) mod n, in the output's precision (a float literal or a float argument
    # would be float32, and so would every float64 angle derived from it).
    angle = ((v * q) % n).to(c.dtype) / n * tl.full([], -6.283185307179586, c.dtype)
    dst = out_ptr + 2 * (r * bins + q)
    tl.atomic_add(dst, c * tl.cos(angle), mask=live)
    tl.atomic_add(dst + 1, c * tl.sin(angle), mask=live)


@triton.jit
def _real_mirror_kernel(ft_ptr, stride_q, stride_p, base_ptr, out_ptr, m, n, bins, HAS_BASE: tl.constexpr,
                        BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr):
    p = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)[:, None]  # p * n passes 2**31 at lm_heads
    q = tl.program_id(1).to(tl.int64) * BLOCK_Q + tl.arange(0, BLOCK_Q)[None, :]  # and q * stride_q at 65536**2
    live = (p < m) & (q < n)
    low = q < bins
    src = tl.where(low, q, n - q) * stride_q + tl.where(low, p, (m - p) % m) * stride_p
    value = tl.load(ft_ptr + 2 * src, mask=live, other=0.0)
    if HAS_BASE:
        value += tl.load(base_ptr + p * n + q, mask=live, other=0.0).to(value.dtype)
    tl.store(out_ptr + p * n + q, value.to(out_ptr.dtype.element_ty), mask=live)


@triton.jit
def _mix_kernel(xf_ptr, c_ptr, g_ptr, b_ptr, out_ptr, tokens, nnz, n_in, n_out,
                BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr):
    # One grid axis, token tiles first: a second axis holds at most 65535 programs (nnz = 8.4M at BLOCK_K = 128).
    t_tiles = tl.cdiv(tokens, BLOCK_T)
    t = (tl.program_id(0) % t_tiles).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)[:, None]  # 64-bit offsets
    k = (tl.program_id(0) // t_tiles) * BLOCK_K + tl.arange(0, BLOCK_K)[None, :]
    live = (t < tokens) & (k < nnz)
    w = tl.load(c_ptr + k, mask=k < nnz, other=0.0)
    g = tl.load(g_ptr + k, mask=k < nnz, other=0)
    b = tl.load(b_ptr + k, mask=k < nnz, other=0)
    low = 2 * g <= n_in
    j = tl.where(low, g, n_in - g)
    src = xf_ptr + 2 * (t * (n_in // 2 + 1) + j)
    re = tl.load(src, mask=live, other=0.0) * w
    im = tl.load(src + 1, mask=live, other=0.0) * w
    im = tl.where(low, -im, im)
    dst = out_ptr + 2 * t * (n_out // 2 + 1)
    mirror = (n_out - b) % n_out
    first = live & (2 * b <= n_out)
    second = live & (2 * mirror <= n_out)
    tl.atomic_add(dst + 2 * b, re, mask=first)
    tl.atomic_add(dst + 2 * b + 1, im, mask=first)
    tl.atomic_add(dst + 2 * mirror, re, mask=second)
    tl.atomic_add(dst + 2 * mirror + 1, -im, mask=second)


@triton.jit
def _coef_grad_kernel(xf_ptr, yf_ptr, a_ptr, b_ptr, part_ptr, tokens, nnz, n_x, n_y, split_len,
                      BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr):
    """partial[split, k] = sum over the split's tokens of Re(X^[t, a_k] Y^[t, b_k])."""
    k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    split = tl.program_id(1)
    a = tl.load(a_ptr + k, mask=k < nnz, other=0)
    b = tl.load(b_ptr + k, mask=k < nnz, other=0)
    a_low = 2 * a <= n_x
    b_low = 2 * b <= n_y
    ja = tl.where(a_low, a, n_x - a)[None, :]
    jb = tl.where(b_low, b, n_y - b)[None, :]
    # Re(X^ Y^) = xr*yr - xi*yi with each imaginary part negated on the low half.
    sign = tl.where(a_low == b_low, 1.0, -1.0)[None, :]
    acc = tl.zeros((BLOCK_T, BLOCK_K), dtype=xf_ptr.dtype.element_ty)
    t_end = tl.minimum(tokens, (split + 1) * split_len)
    for t0 in range(split * split_len, t_end, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)[:, None].to(tl.int64)  # 64-bit offsets t * (n // 2 + 1)
        live = (t < t_end) & (k[None, :] < nnz)
        xs = xf_ptr + 2 * (t * (n_x // 2 + 1) + ja)
        ys = yf_ptr + 2 * (t * (n_y // 2 + 1) + jb)
        xr = tl.load(xs, mask=live, other=0.0)
        xi = tl.load(xs + 1, mask=live, other=0.0)
        yr = tl.load(ys, mask=live, other=0.0)
        yi = tl.load(ys + 1, mask=live, other=0.0)
        acc += xr * yr - sign * xi * yi
    tl.store(part_ptr + split * nnz + k, tl.sum(acc, axis=0), mask=k < nnz)


@on_tensors_device
def spectrum_rows(coef, rows, cols, m, n, scale):
    bins, nnz = n // 2 + 1, coef.numel()
    out = torch.zeros(m, bins, dtype=coef.dtype.to_complex(), device=coef.device)
    if nnz:
        grid = (triton.cdiv(nnz, BLOCK_ROWS_K), triton.cdiv(bins, BLOCK_Q))
        # Scaled here, not in the kernel: a float argument is a float32 there.
        _spectrum_rows_kernel[grid](coef * scale, rows.contiguous(), cols.contiguous(),
                                    torch.view_as_real(out), nnz, n, bins, BLOCK_K=BLOCK_ROWS_K, BLOCK_Q=BLOCK_Q)
    return out


@on_tensors_device
def real_mirror(ft, base, n):
    bins, m = ft.shape
    out = torch.empty(m, n, dtype=ft.real.dtype if base is None else base.dtype, device=ft.device)
    grid = (triton.cdiv(m, BLOCK_P), triton.cdiv(n, BLOCK_Q))
    # Real parts at twice ft's (complex) strides, whatever its layout.
    _real_mirror_kernel[grid](torch.view_as_real(ft), ft.stride(0), ft.stride(1),
                              out if base is None else base.contiguous(), out, m, n, bins, HAS_BASE=base is not None,
                              BLOCK_P=BLOCK_P, BLOCK_Q=BLOCK_Q)
    return out


@on_tensors_device
def mix(xf, coef, gather_idx, scatter_idx, n_in, n_out, scale):
    xf = xf.contiguous()
    tokens, nnz = xf.shape[0], coef.numel()
    out = torch.zeros(tokens, n_out // 2 + 1, dtype=xf.dtype, device=xf.device)
    if tokens and nnz:
        grid = (triton.cdiv(tokens, BLOCK_T) * triton.cdiv(nnz, BLOCK_K),)
        _mix_kernel[grid](torch.view_as_real(xf), coef.to(xf.real.dtype) * (scale / 2),
                          gather_idx.contiguous(), scatter_idx.contiguous(), torch.view_as_real(out), tokens, nnz,
                          n_in, n_out, BLOCK_T=BLOCK_T, BLOCK_K=BLOCK_K)
    return out


@on_tensors_device
def coef_grad(xf, yf, x_idx, y_idx, n_x, n_y, scale):
    xf = xf.contiguous()
    yf = yf.to(xf.dtype).contiguous()
    tokens, nnz = xf.shape[0], x_idx.numel()
    # Tokens split so that there are about SPLIT_PROGRAMS programs (n=1000 makes only 8 coefficient
    # blocks); the partial sums are added on the host (deterministic, no atomics).
    blocks = triton.cdiv(nnz, BLOCK_K)
    splits = max(1, min(triton.cdiv(tokens, BLOCK_T), SPLIT_PROGRAMS // max(blocks, 1)))
    split_len = triton.cdiv(triton.cdiv(tokens, splits), BLOCK_T) * BLOCK_T
    partial = torch.zeros(splits, nnz, dtype=xf.real.dtype, device=xf.device)
    if nnz and tokens:
        _coef_grad_kernel[(blocks, splits)](torch.view_as_real(xf), torch.view_as_real(yf), x_idx.contiguous(),
                                            y_idx.contiguous(), partial, tokens, nnz, n_x, n_y, split_len,
                                            BLOCK_T=BLOCK_T, BLOCK_K=BLOCK_K)
    return partial.sum(0) * scale
