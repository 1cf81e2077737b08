"""OFT primitives of the C++ backends (`cpu`, `cuda`); see ops/oft.py."""
import torch

from . import IMPORT_ERROR  # noqa: F401  (defines the schemas, loads _C)

_ops = torch.ops.spectral_kernels


def rotate(x, rot, transpose):
    return _ops.oft_rotate(x, rot, transpose)


def rotate_grad(x, g, block_size, shared):
    return _ops.oft_rotate_grad(x, g, block_size, shared)
