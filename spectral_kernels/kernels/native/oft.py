"""OFT primitives of the C++ backends (`cpu`, `cuda`); see ops/oft.py."""
import torch

from . import IMPORT_ERROR  # noqa: F401  (defines the schemas, loads _C)

_ops = torch.ops.spectral_kernels


def rotate(x, rot, transpose):
    return _ops.oft_rotate(x, rot, transpose)


def rotate_backward(g, x, rot, need_dx, need_drot):
    """(dx, dR) of x_rot = x · blockdiag(rot) for its gradient g (contiguous); dx is written over g."""
    drot = _ops.oft_rotate_backward_(g, x, rot, need_dx, need_drot)
    return g, drot


NEUMANN_MAX_BLOCK = 1 << 20  # the C++ kernels' bound (csrc/cpu/oft.cpp: check_neumann)


def neumann(params, block_size, coef):
    """Rotation blocks sum_p coef[p] Q^p of the skew blocks of ``params`` (CPU)."""
    return _ops.oft_neumann(params, block_size, coef)


def neumann_backward(params, grad, block_size, coef):
    return _ops.oft_neumann_backward(params, grad, block_size, coef)
