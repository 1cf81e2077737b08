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
import functools

import torch
import triton
import triton.language as tl

from . import MAX_GRID_Y, on_tensors_device

BLOCK_T = 64
SPLIT_PROGRAMS = 256  # aim for about this many programs in the dR reduction


def _tile(b):
    """Tile edge over the b columns of a block: a power of two in [16, 64] (tl.dot needs >= 16)."""
    return max(16, min(64, triton.next_power_of_2(b)))


@triton.jit
def _rotate_kernel(x_ptr, r_ptr, out_ptr, tokens, b, ld, col_tiles, r_block, r_row, r_col,
                   ACC: tl.constexpr, PRECISION: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK: tl.constexpr):
    j = tl.program_id(1) // col_tiles
    t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)[:, None]  # t * ld passes 2**31
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
        t = t0 + tl.arange(0, BLOCK_T)[:, None].to(tl.int64)  # 64-bit offsets t * ld
        live = t < t_end
        xs = tl.load(x_ptr + t * ld + j * b + k[None, :], mask=live & (k[None, :] < b), other=0.0)
        gs = tl.load(g_ptr + t * ld + j * b + c[None, :], mask=live & (c[None, :] < b), other=0.0)
        acc += tl.dot(tl.trans(xs.to(ACC)), gs.to(ACC), input_precision=PRECISION, out_dtype=ACC)
    out = part_ptr + ((split * blocks + j) * b + k[:, None]) * b + c[None, :]
    tl.store(out, acc, mask=(k[:, None] < b) & (c[None, :] < b))


@triton.jit
def _neumann_kernel(p_ptr, coef_ptr, g_ptr, out_ptr, b, last, ACC: tl.constexpr, BACKWARD: tl.constexpr,
                    BLOCK: tl.constexpr):
    """One rotation block per program, as csrc/cpu/oft.cpp: R = sum_p coef[p] Q^p (coef[0] = 1), or the
    parameters' gradient from G = dL/dR through D_p = Q^T D_(p-1) + G (Q^T)^(p-1), dL/dQ = sum_p coef[p] D_p."""
    j = tl.program_id(0)
    r = tl.arange(0, BLOCK)[:, None]
    c = tl.arange(0, BLOCK)[None, :]
    inside = (r < b) & (c < b)
    # Q = A - A^T, A's upper triangle from the parameters in triu_indices(b, b, 1) order.
    lo, hi = tl.minimum(r, c), tl.maximum(r, c)
    k = lo * b - lo * (lo + 1) // 2 + hi - lo - 1
    n_params = b * (b - 1) // 2
    upper = tl.load(p_ptr + j * n_params + k, mask=inside & (r != c), other=0.0).to(ACC)
    q = tl.where(r < c, upper, -upper)
    if BACKWARD:
        term = tl.load(g_ptr + j * b * b + r * b + c, mask=inside, other=0.0).to(ACC)  # G (Q^T)^(p-1)
        d = tl.zeros((BLOCK, BLOCK), dtype=ACC)
        dq = tl.zeros((BLOCK, BLOCK), dtype=ACC)
        for p in range(1, last + 1):
            d = term - tl.dot(q, d, input_precision="ieee", out_dtype=ACC)  # Q^T D = -(Q D)
            dq += tl.load(coef_ptr + p).to(ACC) * d
            term = -tl.dot(term, q, input_precision="ieee", out_dtype=ACC)
        grad = dq - tl.trans(dq)
        tl.store(out_ptr + j * n_params + k, grad.to(out_ptr.dtype.element_ty), mask=inside & (r < c))
    else:
        power = tl.where(r == c, 1.0, 0.0).to(ACC)
        rot = power
        for p in range(1, last + 1):
            power = tl.dot(power, q, input_precision="ieee", out_dtype=ACC)
            rot += tl.load(coef_ptr + p).to(ACC) * power
        tl.store(out_ptr + j * b * b + r * b + c, rot.to(out_ptr.dtype.element_ty), mask=inside)


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


_HALF = (torch.bfloat16, torch.float16)


def _dot_args(*dtypes):
    if dtypes[0] == torch.float64:
        return tl.float64, "ieee"
    return tl.float32, "tf32" if all(d in _HALF for d in dtypes) else "ieee"


@on_tensors_device
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
    if grid[1] > MAX_GRID_Y:  # as the CUDA backend's limit
        raise RuntimeError("oft_rotate: too many blocks for one launch")
    _rotate_kernel[grid](x, rot, out, tokens, b, features, col_tiles, 0 if rot.shape[0] == 1 else rot.stride(0),
                         rot.stride(1), rot.stride(2), ACC=acc, PRECISION=precision, BLOCK_T=BLOCK_T, BLOCK=block)
    return out


def rotate_backward(g, x, rot, need_dx, need_drot):
    """(dx, dR) of x_rot = x · blockdiag(rot) for its gradient g; dx is a new tensor here."""
    dx = rotate(g, rot, True) if need_dx else g
    drot = _rotate_grad(x, g, rot.shape[-1], rot.shape[0] == 1) if need_drot else g.new_empty(0)
    return dx, drot


@on_tensors_device
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


# The Neumann kernels hold a block's b x b matrices in one program's registers; larger blocks take peft's
# batched torch code (ops/oft.py: oft_rotation).
NEUMANN_MAX_BLOCK = 64


def neumann_fits(backend, block_size, n_coef):
    """Whether the Neumann kernels take blocks of ``block_size`` (any number of coefficients)."""
    return block_size <= NEUMANN_MAX_BLOCK


@functools.lru_cache(maxsize=None)
def _coefficients(coef, dtype, device):
    return torch.tensor(coef, dtype=dtype, device=device)


@on_tensors_device
def _neumann(params, coef, grad, block_size):
    blocks, acc = params.shape[0], _acc(params.dtype)
    out = params.new_empty(blocks, block_size, block_size) if grad is None else params.new_empty(params.shape)
    if blocks:
        block = max(16, triton.next_power_of_2(block_size))
        # The backward holds four b x b matrices: at b = 64 on four warps ptxas puts them in local memory (6.5 KB
        # of stack a thread for sm_90), on eight in registers (320 bytes of stack); tests/test_triton_compile.py.
        warps = 8 if grad is not None and block == 64 else 4
        _neumann_kernel[(blocks,)](params.contiguous(), _coefficients(tuple(coef), acc, params.device),
                                   params if grad is None else grad.contiguous(),  # (the forward reads no G)
                                   out, block_size, len(coef) - 1,
                                   ACC=_dot_args(params.dtype)[0], BACKWARD=grad is not None, BLOCK=block,
                                   num_warps=warps)
    return out


def neumann(params, block_size, coef):
    """Rotation blocks sum_p coef[p] Q^p of the skew blocks of ``params`` (block_size <= NEUMANN_MAX_BLOCK)."""
    return _neumann(params, coef, None, block_size)


def neumann_backward(params, grad, block_size, coef):
    return _neumann(params, coef, grad, block_size)
