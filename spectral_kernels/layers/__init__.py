"""Thin nn.Module adapter layers around the fused ops."""
from .fourierft import FourierFTLinear

__all__ = ["FourierFTLinear"]
