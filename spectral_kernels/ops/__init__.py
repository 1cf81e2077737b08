"""The fused ops, one module per method."""
from .fourierft import fourierft_delta_weight, fourierft_linear
from .frod import frod_effective_weight, frod_linear
from .oft import oft_effective_weight, oft_linear, oft_rotate, oft_rotation

__all__ = ["fourierft_delta_weight", "fourierft_linear", "frod_effective_weight", "frod_linear", "oft_effective_weight",
           "oft_linear", "oft_rotate", "oft_rotation"]
