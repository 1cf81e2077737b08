"""FRoD primitives in Triton (GPU; on CPU under TRITON_INTERPRET=1).

Same contracts as csrc/cpu/frod.cpp: feature-major activations (features, T) and a
CSR plan (ptr over the rows written; per entry the row src it reads and its index
perm into coef / dcoef). A program owns one written row and one tile of tokens, so
loads run along contiguous tokens; the backward's sampled gradient is summed per
tile into partial[tile, entry], then over tiles on the host (deterministic, no
atomics). Accumulation is in float32 (float64 for float64).
"""
import torch
import triton
import triton.language as tl

from . import MAX_GRID_Y, on_tensors_device

BLOCK_T = 256


@triton.jit
def _mix_kernel(in_ptr, coef_ptr, ptr_ptr, src_ptr, perm_ptr, out_ptr, tokens, ACC: tl.constexpr,
                BLOCK_T: tl.constexpr):
    i = tl.program_id(0).to(tl.int64)  # row offsets i * tokens pass 2**31 (4096 rows of 524288 tokens)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    live = t < tokens
    acc = tl.zeros((BLOCK_T,), dtype=ACC)
    for e in range(tl.load(ptr_ptr + i), tl.load(ptr_ptr + i + 1)):
        c = tl.load(coef_ptr + tl.load(perm_ptr + e))
        row = tl.load(in_ptr + tl.load(src_ptr + e) * tokens + t, mask=live, other=0.0)
        acc += c * row.to(ACC)
    tl.store(out_ptr + i * tokens + t, acc.to(out_ptr.dtype.element_ty), mask=live)


@triton.jit
def _mix_backward_kernel(g_ptr, z_ptr, coef_ptr, ptr_ptr, src_ptr, perm_ptr, dz_ptr, part_ptr, tokens, entries,
                         NEED_DZ: tl.constexpr, ACC: tl.constexpr, BLOCK_T: tl.constexpr):
    """dz[j, tile] = sum_e coef[perm e] g[src e, tile];  partial[tile, perm e] = sum_tile g[src e] z[j]."""
    j = tl.program_id(0).to(tl.int64)  # 64-bit offsets, as in _mix_kernel
    tile = tl.program_id(1).to(tl.int64)
    t = tile * BLOCK_T + tl.arange(0, BLOCK_T)
    live = t < tokens
    z = tl.load(z_ptr + j * tokens + t, mask=live, other=0.0).to(ACC)
    acc = tl.zeros((BLOCK_T,), dtype=ACC)
    for e in range(tl.load(ptr_ptr + j), tl.load(ptr_ptr + j + 1)):
        index = tl.load(perm_ptr + e)
        g = tl.load(g_ptr + tl.load(src_ptr + e) * tokens + t, mask=live, other=0.0).to(ACC)
        acc += tl.load(coef_ptr + index) * g
        tl.store(part_ptr + tile * entries + index, tl.sum(g * z, axis=0))
    if NEED_DZ:
        tl.store(dz_ptr + j * tokens + t, acc.to(dz_ptr.dtype.element_ty), mask=live)


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tl_acc(dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _block(tokens):
    return max(16, min(BLOCK_T, triton.next_power_of_2(tokens)))


@on_tensors_device
def mix(x, coef, ptr, src, perm):
    x = x.contiguous()
    rows, tokens = ptr.shape[0] - 1, x.shape[1]
    out = x.new_empty(rows, tokens)
    if out.numel() == 0:
        return out
    block = _block(tokens)
    if triton.cdiv(tokens, block) > MAX_GRID_Y:  # as the CUDA backend's limit
        raise RuntimeError("frod_mix: too many tokens for one launch")
    _mix_kernel[(rows, triton.cdiv(tokens, block))](x, coef.to(_acc(x.dtype)).contiguous(), ptr, src, perm, out,
                                                    tokens, ACC=_tl_acc(x.dtype), BLOCK_T=block)
    return out


@on_tensors_device
def mix_backward(g, z, coef, ptr, src, perm, need_dz):
    g, z = g.contiguous(), z.contiguous()
    rows, tokens, entries = z.shape[0], z.shape[1], src.shape[0]
    dz = g.new_empty(rows, tokens) if need_dz else g.new_empty(0)
    block = _block(tokens)
    tiles = triton.cdiv(tokens, block)
    if tiles > MAX_GRID_Y:
        raise RuntimeError("frod_mix_backward: too many tokens for one launch")
    partial = torch.zeros(tiles, entries, dtype=_acc(g.dtype), device=g.device)
    if rows and tokens:
        _mix_backward_kernel[(rows, tiles)](g, z, coef.to(_acc(g.dtype)).contiguous(), ptr, src, perm, dz, partial,
                                            tokens, entries, NEED_DZ=need_dz, ACC=_tl_acc(g.dtype), BLOCK_T=block)
    return dz, partial.sum(0)
