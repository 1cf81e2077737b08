"""FRoD primitives in Triton (GPU; on CPU under TRITON_INTERPRET=1).

Same contracts as csrc/cpu/frod.cpp: feature-major activations (features, T) and a
CSR plan (ptr over output rows; per entry its input row src and its index perm into
coef / grad). A program owns one output row and a tile of tokens (mix) or a token
split (sddmm), so loads run along contiguous tokens. Accumulation is in float32
(float64 for float64).
"""
import torch
import triton
import triton.language as tl

BLOCK_T = 256
SPLIT_PROGRAMS = 1024  # aim for about this many programs in the sddmm reduction


@triton.jit
def _mix_kernel(in_ptr, coef_ptr, ptr_ptr, src_ptr, perm_ptr, out_ptr, tokens, ACC: tl.constexpr,
                BLOCK_T: tl.constexpr):
    i = tl.program_id(0)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    live = t < tokens
    acc = tl.zeros((BLOCK_T,), dtype=ACC)
    for e in range(tl.load(ptr_ptr + i), tl.load(ptr_ptr + i + 1)):
        c = tl.load(coef_ptr + tl.load(perm_ptr + e))
        row = tl.load(in_ptr + tl.load(src_ptr + e) * tokens + t, mask=live, other=0.0)
        acc += c * row.to(ACC)
    tl.store(out_ptr + i * tokens + t, acc.to(out_ptr.dtype.element_ty), mask=live)


@triton.jit
def _sddmm_kernel(g_ptr, z_ptr, ptr_ptr, src_ptr, perm_ptr, part_ptr, tokens, entries, split_len,
                  ACC: tl.constexpr, BLOCK_T: tl.constexpr):
    """partial[split, perm[e]] = sum over the split's tokens of g[i, t] z[src[e], t], e in row i."""
    i = tl.program_id(0)
    split = tl.program_id(1)
    t_begin = split * split_len
    t_end = tl.minimum(tokens, t_begin + split_len)
    for e in range(tl.load(ptr_ptr + i), tl.load(ptr_ptr + i + 1)):
        z_row = z_ptr + tl.load(src_ptr + e) * tokens
        acc = tl.zeros((BLOCK_T,), dtype=ACC)
        for t0 in range(t_begin, t_end, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            live = t < t_end
            gs = tl.load(g_ptr + i * tokens + t, mask=live, other=0.0)
            zs = tl.load(z_row + t, mask=live, other=0.0)
            acc += gs.to(ACC) * zs.to(ACC)
        tl.store(part_ptr + split * entries + tl.load(perm_ptr + e), tl.sum(acc, axis=0))


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tl_acc(dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def mix(x, coef, ptr, src, perm):
    x = x.contiguous()
    rows, tokens = ptr.shape[0] - 1, x.shape[1]
    out = x.new_empty(rows, tokens)
    if out.numel() == 0:
        return out
    grid = (rows, triton.cdiv(tokens, BLOCK_T))
    _mix_kernel[grid](x, coef.to(_acc(x.dtype)).contiguous(), ptr, src, perm, out, tokens, ACC=_tl_acc(x.dtype),
                      BLOCK_T=BLOCK_T)
    return out


def sddmm(g, z, ptr, src, perm):
    g, z = g.contiguous(), z.contiguous()
    rows, tokens, entries = g.shape[0], g.shape[1], src.shape[0]
    splits = max(1, min(triton.cdiv(tokens, BLOCK_T), SPLIT_PROGRAMS // max(rows, 1)))
    split_len = triton.cdiv(triton.cdiv(tokens, splits), BLOCK_T) * BLOCK_T
    partial = torch.zeros(splits, entries, dtype=_acc(g.dtype), device=g.device)
    if entries and tokens:
        _sddmm_kernel[(rows, splits)](g, z, ptr, src, perm, partial, tokens, entries, split_len,
                                      ACC=_tl_acc(g.dtype), BLOCK_T=BLOCK_T)
    return partial.sum(0)
