"""What is compared: a registry of adapter methods, each building its implementations.

A method's builder takes the frozen base ``nn.Linear``, the parsed arguments and config
fields that override the arguments' (FRoD's sparse_rate per run), and returns
``{implementation name: module}``: ours (one per backend with --backends), our
pure-PyTorch reference backend (peft's algorithm) and, when peft is installed, peft's own
layer. Every module wraps its own deepcopy of the base, so no two implementations share
weights, caches or gradients.
Adapters are initialised non-trivially (peft's init_weights=False) and their parameters
train, as in fine-tuning.
"""
import copy

import torch

import spectral_kernels
from spectral_kernels.layers.frod import BufferDict, frod_projections

try:
    import peft
    from peft.tuners._buffer_dict import BufferDict as PeftBufferDict
    from peft.tuners.fourierft.layer import FourierFTLinear as PeftFourierFTLinear
    from peft.tuners.frod.layer import Linear as PeftFrodLinear
    from peft.tuners.lora.layer import Linear as PeftLoraLinear
    from peft.tuners.oft.layer import Linear as PeftOFTLinear
except ImportError:  # the peft and lora columns are then left out
    peft = None

LORA_RANK = 32
# Our config class and the name of peft's, per method: same field names, same defaults.
CONFIG_CLASSES = {"fourierft": (spectral_kernels.FourierFTConfig, "FourierFTConfig"),
                  "oft": (spectral_kernels.OFTConfig, "OFTConfig"),
                  "frod": (spectral_kernels.FrodConfig, "FrodConfig")}


def configs(method, args, **fields):
    """(our config, peft's config or None) of ``method`` with the bench's options and ``fields``."""
    options = {"fourierft": {"n_frequency": args.n_frequency},
               # peft's defaults otherwise: blocks of oft_block_size, Cayley-Neumann rotations.
               "oft": {"oft_block_size": args.oft_block_size, "init_weights": False},
               "frod": {"sparse_rate": args.frod_sparse_rates[0], "init_weights": False, "progressbar": False}}[method]
    ours, theirs = CONFIG_CLASSES[method]
    options.update(fields)
    return ours(**options), getattr(peft, theirs)(**options) if peft is not None else None


def ours(args):
    """{implementation name: backend} of our layer: "ours" on the automatic choice, or with --backends one
    "ours-<backend>" per listed backend, timed side by side."""
    backends = getattr(args, "backends", None)
    return {f"ours-{backend}": backend for backend in backends} if backends else {"ours": None}


def lora_config(**fields):
    return peft.LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, **fields)


def fourierft(base, args, **fields):
    config, peft_config = configs("fourierft", args, **fields)
    impls = {
        **{name: spectral_kernels.FourierFTLinear(copy.deepcopy(base), config=config, backend=backend)
           for name, backend in ours(args).items()},
        "reference": spectral_kernels.FourierFTLinear(copy.deepcopy(base), config=config, backend="reference"),
    }
    if peft is not None:
        impls["peft"] = PeftFourierFTLinear(copy.deepcopy(base), "default", peft_config,
                                            n_frequency=peft_config.n_frequency)
    return impls


def oft(base, args, **fields):
    config, peft_config = configs("oft", args, **fields)
    impls = {
        **{name: spectral_kernels.OFTLinear(copy.deepcopy(base), config=config, backend=backend)
           for name, backend in ours(args).items()},
        "reference": spectral_kernels.OFTLinear(copy.deepcopy(base), config=config, backend="reference"),
    }
    if peft is not None:
        impls["peft"] = PeftOFTLinear(copy.deepcopy(base), "default", peft_config, r=0)
    return impls


def frod(base, args, **fields):
    config, peft_config = configs("frod", args, **fields)
    # The projection V and the sparse pattern exactly as peft's FrodModel builds them for a category of one layer,
    # computed once (a QR and an eigh of the weight: seconds at 4096) and shared by all.
    v, s_indices = frod_projections({"layer": [base.weight]}, config)["layer"]
    frod_V, frod_s_indices = BufferDict(), BufferDict()
    frod_V["default"], frod_s_indices["default"] = v, s_indices
    impls = {
        **{name: spectral_kernels.FrodLinear(copy.deepcopy(base), "default", config, frod_V, frod_s_indices,
                                             backend=backend) for name, backend in ours(args).items()},
        "reference": spectral_kernels.FrodLinear(copy.deepcopy(base), "default", config, frod_V, frod_s_indices,
                                                 backend="reference"),
    }
    if peft is not None:
        shared = [PeftBufferDict({"default": t}) for t in (v, s_indices, torch.tensor(v.shape))]
        # .to(): peft keeps its per-layer U on the CPU until the model is moved.
        impls["peft"] = PeftFrodLinear(copy.deepcopy(base), *shared, "default", peft_config).to(v.device)
    return impls


METHODS = {"fourierft": fourierft, "oft": oft, "frod": frod}


def implementations(method, base, args, **fields):
    """The frozen ``base`` itself (the floor), the method's implementations (config ``fields`` overriding the
    arguments), then LoRA as the yardstick."""
    impls = {"base": copy.deepcopy(base), **METHODS[method](base, args, **fields)}
    if peft is not None:
        impls["lora"] = PeftLoraLinear(copy.deepcopy(base), "default", lora_config(), r=LORA_RANK,
                                       lora_alpha=LORA_RANK)
    return impls
