"""OFT primitives in Triton (GPU; on CPU under TRITON_INTERPRET=1).

Same contracts as csrc/cpu/oft.cpp: x is (T, n·b) row-major, rotation blocks
(n or 1, b, b). A shared block is addressed with block stride 0, the transpose by
swapping R's strides, so neither is ever copied. Tiles meet in tl.dot converted to
float32 (float64 for float64) with exact products: "ieee" precision for float32 and
float64, and "tf32" when x and R are both bfloat16/float16, whose values TF32
represents exactly, so those run on tensor cores. (Converting also
sidesteps the interpreter's tl.dot on bfloat16, which multiplies the raw bits in
triton 3.9.)
"""
import torch
import triton
import triton.language as tl

BLOCK_T = 64
SPLIT_PROGRAMS = 256  # aim for about this many programs in the dR reduction


def _tile(b):
    """Tile edge over the b columns of a block: a power of two in [16, 64] (tl.dot needs >= 16)."""
    return max(16, min(64, triton.next_power_of_2(b)))


@triton.jit
def _rotate_kernel(x_ptr, r_ptr, out_ptr, tokens, b, ld, col_tiles, r_block, r_row, r_col,
                   ACC: tl.constexpr, PRECISION: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK: tl.constexpr):
    j = tl.program_id(1) // col_tiles
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)[:, None]
    c = (tl.program_id(1) % col_tiles) * BLOCK + tl.arange(0, BLOCK)[None, :]
    rows = x_ptr + t * ld + j * b
    rot = r_ptr + j * r_block
    acc = tl.zeros((BLOCK_T, BLOCK), dtype=ACC)
    for k0 in range(0, b, BLOCK):
        k = k0 + tl.arange(0, BLOCK)
        xs = tl.load(rows + k[None, :], mask=(t < tokens) & (k[None, :] < b), other=0.0)
        rs = tl.load(rot + k[:, None] * r_row + c * r_col, mask=(k[:, None] < b) & (c < b), other=0.0)
        acc += tl.dot(xs.to(ACC), rs.to(ACC), input_precision=PRECISION, out_dtype=ACC)
    tl.store(out_ptr + t * ld + j * b + c, acc.to(out_ptr.dtype.element_ty), mask=(t < tokens) & (c < b))


@triton.jit
def _rotate_grad_kernel(x_ptr, g_ptr, part_ptr, tokens, b, ld, blocks, tiles, split_len,
                        ACC: tl.constexpr, PRECISION: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK: tl.constexpr):
    """partial[split, j, k-tile, c-tile] = sum over the split's tokens of x_j[t, k] g_j[t, c]."""
    pid = tl.program_id(0)
    j = pid // (tiles * tiles)
    k = (pid // tiles % tiles) * BLOCK + tl.arange(0, BLOCK)
    c = (pid % tiles) * BLOCK + tl.arange(0, BLOCK)
    split = tl.program_id(1)
    acc = tl.zeros((BLOCK, BLOCK), dtype=ACC)
    t_end = tl.minimum(tokens, (split + 1) * split_len)
    for t0 in range(split * split_len, t_end, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)[:, None]
        live = t < t_end
        xs = tl.load(x_ptr + t * ld + j * b + k[None, :], mask=live & (k[None, :] < b), other=0.0)
        gs = tl.load(g_ptr + t * ld + j * b + c[None, :], mask=live & (c[None, :] < b), other=0.0)
        acc += tl.dot(tl.trans(xs.to(ACC)), gs.to(ACC), input_precision=PRECISION, out_dtype=ACC)
    out = part_ptr + ((split * blocks + j) * b + k[:, None]) * b + c[None, :]
    tl.store(out, acc, mask=(k[:, None] < b) & (c[None, :] < b))


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


_HALF = (torch.bfloat16, torch.float16)


def _dot_args(*dtypes):
    if dtypes[0] == torch.float64:
        return tl.float64, "ieee"
    return tl.float32, "tf32" if all(d in _HALF for d in dtypes) else "ieee"


def rotate(x, rot, transpose):
    x = x.contiguous()
    tokens, features = x.shape
    b = rot.shape[-1]
    out = torch.empty_like(x)
    if x.numel() == 0:
        return out
    acc, precision = _dot_args(x.dtype, rot.dtype)
    rot = rot.to(_acc(x.dtype))
    rot = rot.transpose(1, 2) if transpose else rot
    block, blocks = _tile(b), features // b
    col_tiles = triton.cdiv(b, block)
    grid = (triton.cdiv(tokens, BLOCK_T), blocks * col_tiles)
    _rotate_kernel[grid](x, rot, out, tokens, b, features, col_tiles, 0 if rot.shape[0] == 1 else rot.stride(0),
                         rot.stride(1), rot.stride(2), ACC=acc, PRECISION=precision, BLOCK_T=BLOCK_T, BLOCK=block)
    return out


def rotate_backward(g, x, rot, need_dx, need_drot):
    """(dx, dR) of x_rot = x · blockdiag(rot) for its gradient g; dx is a new tensor here."""
    dx = rotate(g, rot, True) if need_dx else g
    drot = _rotate_grad(x, g, rot.shape[-1], rot.shape[0] == 1) if need_drot else g.new_empty(0)
    return dx, drot


def _rotate_grad(x, g, block_size, shared):
    x = x.contiguous()
    g = g.contiguous()
    tokens, features = x.shape
    b, blocks = block_size, features // block_size
    block = _tile(b)
    tiles = triton.cdiv(b, block)
    programs = blocks * tiles * tiles
    splits = max(1, min(triton.cdiv(tokens, BLOCK_T), SPLIT_PROGRAMS // programs))
    split_len = triton.cdiv(triton.cdiv(tokens, splits), BLOCK_T) * BLOCK_T
    partial = torch.zeros(splits, blocks, b, b, dtype=_acc(x.dtype), device=x.device)
    if tokens:
        acc, precision = _dot_args(x.dtype)
        _rotate_grad_kernel[(programs, splits)](x, g, partial, tokens, b, features, blocks, tiles, split_len,
                                                ACC=acc, PRECISION=precision, BLOCK_T=BLOCK_T, BLOCK=block)
    grad = partial.sum(0)
    return grad.sum(0, keepdim=True) if shared else grad
