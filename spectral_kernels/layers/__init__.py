"""Thin nn.Module adapter layers around the fused ops."""
from .fourierft import FourierFTLinear
from .frod import FrodLinear
from .oft import OFTLinear

__all__ = ["FourierFTLinear", "FrodLinear", "OFTLinear"]
