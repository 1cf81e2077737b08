"""spectral_kernels: fused kernels for the FourierFT, OFT and FRoD PEFT adapters."""
from .config import FourierFTConfig, OFTConfig
from .dispatch import backends
from .layers import FourierFTLinear, OFTLinear
from .ops import fourierft_delta_weight, fourierft_linear, oft_effective_weight, oft_linear, oft_rotate, oft_rotation

__all__ = ["FourierFTConfig", "FourierFTLinear", "OFTConfig", "OFTLinear", "backends", "fourierft_delta_weight",
           "fourierft_linear", "oft_effective_weight", "oft_linear", "oft_rotate", "oft_rotation"]
