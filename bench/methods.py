"""What is compared: a registry of adapter methods, each building its implementations.

A method's builder takes the frozen base ``nn.Linear`` and the parsed arguments and
returns ``{implementation name: module}``: ours, our pure-PyTorch reference backend
(peft's algorithm) and, when peft is installed, peft's own layer. Every module wraps
its own deepcopy of the base, so no two implementations share weights, caches or
gradients. Adapters are initialised non-trivially (peft's init_weights=False) and
their parameters train, as in fine-tuning.
"""
import copy

import spectral_kernels

try:
    import peft
    from peft.tuners.fourierft.layer import FourierFTLinear as PeftFourierFTLinear
    from peft.tuners.lora.layer import Linear as PeftLoraLinear
    from peft.tuners.oft.layer import Linear as PeftOFTLinear
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


def oft(base, args):
    # peft's defaults: blocks of oft_block_size with the Cayley-Neumann rotation.
    options = {"oft_block_size": args.oft_block_size, "init_weights": False}
    config = spectral_kernels.OFTConfig(**options)
    impls = {
        "ours": spectral_kernels.OFTLinear(copy.deepcopy(base), config=config),
        "reference": spectral_kernels.OFTLinear(copy.deepcopy(base), config=config, backend="reference"),
    }
    if peft is not None:
        impls["peft"] = PeftOFTLinear(copy.deepcopy(base), "default", peft.OFTConfig(**options), r=0)
    return impls


METHODS = {"fourierft": fourierft, "oft": oft}


def implementations(method, base, args):
    """The frozen ``base`` itself (the floor), the method's implementations, then LoRA as the yardstick."""
    impls = {"base": copy.deepcopy(base), **METHODS[method](base, args)}
    if peft is not None:
        config = peft.LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK)
        impls["lora"] = PeftLoraLinear(copy.deepcopy(base), "default", config, r=LORA_RANK, lora_alpha=LORA_RANK)
    return impls
