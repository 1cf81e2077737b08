"""FRoD primitives of the C++ backends (`cpu`, `cuda`); see ops/frod.py."""
import torch

from . import IMPORT_ERROR  # noqa: F401  (defines the schemas, loads _C)

_ops = torch.ops.spectral_kernels


def mix(x, coef, ptr, src, perm):
    return _ops.frod_mix(x, coef, ptr, src, perm)


def mix_backward(g, z, coef, ptr, src, perm, need_dz):
    return _ops.frod_mix_backward(g, z, coef, ptr, src, perm, need_dz)
