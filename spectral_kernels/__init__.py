"""spectral_kernels: fused kernels for the FourierFT, OFT and FRoD PEFT adapters."""
from .config import FourierFTConfig
from .dispatch import backends
from .layers import FourierFTLinear
from .ops import fourierft_delta_weight, fourierft_linear

__all__ = ["FourierFTConfig", "FourierFTLinear", "backends", "fourierft_delta_weight", "fourierft_linear"]
