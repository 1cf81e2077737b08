"""spectral_kernels: fused kernels for the FourierFT, OFT and FRoD PEFT adapters."""
from .dispatch import backends
from .ops import fourierft_delta_weight, fourierft_linear

__all__ = ["backends", "fourierft_delta_weight", "fourierft_linear"]
