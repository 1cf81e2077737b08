"""FourierFT primitives of the C++ backends (`cpu`, `cuda`); see ops/fourierft.py."""
import torch

from . import IMPORT_ERROR  # noqa: F401  (defines the schemas, loads _C)

_ops = torch.ops.spectral_kernels


def spectrum_rows(coef, rows, cols, m, n, scale):
    return _ops.fourierft_spectrum_rows(coef, rows, cols, m, n, scale)


def real_mirror(ft, base, n):
    return _ops.fourierft_real_mirror(ft, base, n)


def mix(xf, coef, gather_idx, scatter_idx, n_in, n_out, scale):
    return _ops.fourierft_mix(xf, coef, gather_idx, scatter_idx, n_in, n_out, scale)


def coef_grad(xf, yf, x_idx, y_idx, n_x, n_y, scale):
    return _ops.fourierft_coef_grad(xf, yf, x_idx, y_idx, n_x, n_y, scale)
