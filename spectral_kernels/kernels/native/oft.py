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


# The C++ kernels' largest block and coefficient count per device (kNeumannMaxBlock in csrc/cpu/oft.cpp and
# csrc/cuda/oft.cu, kNeumannMaxTerms there): a CUDA thread block holds a rotation block's matrices in its shared
# memory and takes the coefficients by value.
_NEUMANN_LIMITS = {"cpu": (1 << 20, float("inf")), "cuda": (64, 64)}


def neumann_fits(backend, block_size, n_coef):
    """Whether ``backend``'s Neumann kernels take blocks of ``block_size`` and ``n_coef`` coefficients."""
    max_block, max_coef = _NEUMANN_LIMITS[backend]
    return block_size <= max_block and n_coef <= max_coef


def neumann(params, block_size, coef):
    """Rotation blocks sum_p coef[p] Q^p of the skew blocks of ``params``."""
    return _ops.oft_neumann(params, block_size, coef)


def neumann_backward(params, grad, block_size, coef):
    return _ops.oft_neumann_backward(params, grad, block_size, coef)
