"""spectral_kernels: fused kernels for the FourierFT, OFT and FRoD PEFT adapters."""
from .config import FourierFTConfig, FrodConfig, OFTConfig
from .dispatch import backends
from .inject import (delete_adapter, disable_adapters, inject, load_adapter, mark_only_adapters_as_trainable,
                     merge_and_unload, print_trainable_parameters, save_adapter, set_adapter, trainable_parameters,
                     unload)
from .layers import FourierFTLinear, FrodLinear, OFTLinear
from .ops import (fourierft_delta_weight, fourierft_linear, frod_effective_weight, frod_linear,
                  oft_effective_weight, oft_linear, oft_rotate, oft_rotation)

__all__ = ["FourierFTConfig", "FourierFTLinear", "FrodConfig", "FrodLinear", "OFTConfig", "OFTLinear", "backends",
           "fourierft_delta_weight", "fourierft_linear", "frod_effective_weight", "frod_linear", "oft_effective_weight",
           "oft_linear", "oft_rotate", "oft_rotation",
           "delete_adapter", "disable_adapters", "inject", "load_adapter", "mark_only_adapters_as_trainable",
           "merge_and_unload", "print_trainable_parameters", "save_adapter", "set_adapter", "trainable_parameters",
           "unload"]
