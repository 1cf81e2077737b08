"""What is compared: a registry of adapter methods, each building its implementations.

A method's builder takes the frozen base ``nn.Linear`` and the parsed arguments and
returns ``{implementation name: module}``. Every module wraps its own deepcopy of the
base, so no two implementations share weights, caches or gradients.
"""
import copy

import spectral_kernels

try:
    import peft
    from peft.tuners.fourierft.layer import FourierFTLinear as PeftFourierFTLinear
    from peft.tuners.lora.layer import Linear as PeftLoraLinear
except ImportError:  # the peft and lora columns are then left out
    peft = None

LORA_RANK = 32


def fourierft(base, args):
    n = args.n_frequency
    impls = {
        "ours": spectral_kernels.FourierFTLinear(copy.deepcopy(base), n_frequency=n),
        "reference": spectral_kernels.FourierFTLinear(copy.deepcopy(base), n_frequency=n, backend="reference"),
    }
    if peft is not None:
        config = peft.FourierFTConfig(n_frequency=n)
        impls["peft"] = PeftFourierFTLinear(copy.deepcopy(base), "default", config, n_frequency=n)
    return impls


# OFT and FRoD join as one entry each once spectral_kernels has their layers.
METHODS = {"fourierft": fourierft}


def implementations(method, base, args):
    """The frozen ``base`` itself (the floor), the method's implementations, then LoRA as the yardstick."""
    impls = {"base": copy.deepcopy(base), **METHODS[method](base, args)}
    if peft is not None:
        config = peft.LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK)
        impls["lora"] = PeftLoraLinear(copy.deepcopy(base), "default", config, r=LORA_RANK, lora_alpha=LORA_RANK)
    return impls
