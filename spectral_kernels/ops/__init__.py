"""The fused ops, one module per method."""
from .fourierft import fourierft_delta_weight, fourierft_linear

__all__ = ["fourierft_delta_weight", "fourierft_linear"]
