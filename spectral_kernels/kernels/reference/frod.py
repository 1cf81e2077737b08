"""FRoD exactly as peft 0.21 computes it (peft/tuners/frod/layer.py, Linear.forward).

The baseline the other backends are tested and benchmarked against: every factor is
cast to x's dtype, the sparse S is rebuilt and coalesced as a torch COO tensor on
every call, and for half precision densified (peft's workaround for the missing
half-precision sparse matmul).
"""
import torch
import torch.nn.functional as F


def sparse_s(s_values, s_indices, size, dtype):
    """peft's S: a coalesced sparse COO (size, size) tensor of the trainable values."""
    return torch.sparse_coo_tensor(s_indices, s_values.to(dtype), (size, size)).coalesce()


def frod_linear(x, u, v, lam, s_values, s_indices, bias):
    """y = ((x V)(diag(lam) + S)^T) U^T + bias, as peft's single-adapter forward."""
    dtype = x.dtype
    u, v, lam = u.to(dtype), v.to(dtype), lam.to(dtype)
    s = sparse_s(s_values, s_indices, v.shape[1], dtype)
    z = x.reshape(-1, x.shape[-1]) @ v
    if s._nnz() == 0:
        zs = torch.zeros_like(z)
    elif dtype in (torch.float16, torch.bfloat16):
        zs = z @ s.to_dense().t()
    else:
        zs = torch.sparse.mm(s, z.t()).t()
    y = F.linear(zs + z * lam, u)
    y = y.reshape(*x.shape[:-1], u.shape[0])
    return y if bias is None else y + bias


def effective_weight(u, v, lam, s_values, s_indices):
    """peft's get_delta_weight before the subtraction: W' = U (diag(lam) + S) V^T."""
    s = sparse_s(s_values, s_indices, v.shape[1], u.dtype).to_dense()
    return u @ (s + torch.diag_embed(lam.to(u.dtype))) @ v.t().to(u.dtype)
