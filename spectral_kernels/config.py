"""Adapter configurations with peft's field names and defaults.

``fan_in_fan_out`` is kept for peft's checkpoints: the layers read the weight layout
off the base layer (transformers' Conv1D stores it transposed), and ``inject``
corrects the field with peft's warning where it says otherwise.
"""
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Optional, Union


def is_integer(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value, low=-math.inf, high=math.inf):
    """Whether ``value`` is a finite real number in [low, high] (NaN and bools are not). Comparisons only, no
    math.isfinite: torch.compile traces them for a symbolic float (a Python float argument that changed between
    calls becomes one)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and -math.inf < value < math.inf \
        and low <= value <= high


def check_seed(name, seed):
    """A seed torch.Generator.manual_seed takes."""
    if not is_integer(seed) or not -2**63 <= seed < 2**64:
        raise ValueError(f"{name} must be an integer seed in [-2**63, 2**64), got {seed!r}")


def check_bias(bias, own):
    """peft's bias values: 'none', 'all', or the adapted layers' biases, which peft reads from any '..._only'
    ('lora_only' too), the method's own being ``own``."""
    if not (isinstance(bias, str) and (bias in ("none", "all") or bias.endswith("_only"))):
        raise ValueError(f"bias must be 'none', 'all' or {own!r} (peft takes any '..._only'), got {bias!r}")


@dataclass
class FourierFTConfig:
    """peft.FourierFTConfig's fields (peft 0.21): same names, same defaults."""

    n_frequency: int = 1000
    scaling: float = 150.0
    random_loc_seed: Optional[int] = 777
    fan_in_fan_out: bool = False
    target_modules: Optional[Union[list[str], str]] = None
    exclude_modules: Optional[Union[list[str], str]] = None
    bias: str = "none"
    modules_to_save: Optional[list[str]] = None
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None
    n_frequency_pattern: dict = field(default_factory=dict)
    init_weights: bool = False
    inference_mode: bool = False

    def __post_init__(self):
        if not is_integer(self.n_frequency) or self.n_frequency <= 0:
            raise ValueError(f"n_frequency must be a positive integer, got {self.n_frequency!r}")
        if not isinstance(self.n_frequency_pattern, Mapping):  # peft fails later, in get_peft_model
            raise ValueError("n_frequency_pattern must be a dict of module name patterns to n_frequency, got "
                             f"{self.n_frequency_pattern!r}")
        self.n_frequency_pattern = dict(self.n_frequency_pattern)  # a plain dict, as saved configs hold it
        for key, n in self.n_frequency_pattern.items():
            if not is_integer(n) or n <= 0:
                raise ValueError(f"n_frequency_pattern[{key!r}] must be a positive integer, got {n!r}")
        check_seed("random_loc_seed", self.random_loc_seed)
        if not is_real(self.scaling):
            raise ValueError(f"scaling must be a finite real number, got {self.scaling!r}")
        check_bias(self.bias, "fourier_only")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError("`layers_to_transform` cannot be used when `target_modules` is a str.")
        if isinstance(self.target_modules, str) and self.layers_pattern is not None:
            raise ValueError("`layers_pattern` cannot be used when `target_modules` is a str.")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("When `layers_pattern` is specified, `layers_to_transform` must also be specified. ")


@dataclass
class OFTConfig:
    """peft.OFTConfig's fields (peft 0.21): same names, same defaults, same validation.

    As in peft 0.21, ``module_dropout`` is accepted but has no effect: peft builds
    its MultiplicativeDropoutLayer and never calls it in the forward.
    """

    r: int = 0
    oft_block_size: int = 32
    module_dropout: float = 0.0
    target_modules: Optional[Union[list[str], str]] = None
    fan_in_fan_out: bool = False
    bias: str = "none"
    exclude_modules: Optional[Union[list[str], str]] = None
    init_weights: bool = True
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None
    modules_to_save: Optional[list[str]] = None
    coft: bool = False
    eps: float = 6e-5
    block_share: bool = False
    use_cayley_neumann: bool = True
    num_cayley_neumann_terms: int = 5
    inference_mode: bool = False

    def __post_init__(self):
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("When `layers_pattern` is specified, `layers_to_transform` must also be specified. ")
        if self.r == 0 and self.oft_block_size == 0:
            raise ValueError(f"Either `r` or `oft_block_size` must be non-zero. Currently, r = {self.r} and "
                             f"oft_block_size = {self.oft_block_size}.")
        if not (self.r != 0) ^ (self.oft_block_size != 0):
            raise ValueError(f"You can only specify either r ({self.r}) or oft_block_size ({self.oft_block_size}), "
                             "but not both simultaneously, because r x oft_block_size == in_features.")
        if not (is_integer(self.r) and is_integer(self.oft_block_size)) or self.r < 0 or self.oft_block_size < 0:
            raise ValueError(f"r and oft_block_size must be non-negative integers, got r={self.r!r}, "
                             f"oft_block_size={self.oft_block_size!r}")
        if not is_integer(self.num_cayley_neumann_terms) or \
                (self.use_cayley_neumann and self.num_cayley_neumann_terms < 1):
            raise ValueError("num_cayley_neumann_terms must be an integer, at least 1 with use_cayley_neumann, "
                             f"got {self.num_cayley_neumann_terms!r}")
        if not is_real(self.eps, 0.0):
            raise ValueError(f"eps must be a finite non-negative number, got {self.eps!r}")
        if not is_real(self.module_dropout, 0.0, 1.0):
            raise ValueError(f"module_dropout must be in [0, 1], got {self.module_dropout!r}")
        check_bias(self.bias, "oft_only")
        if not isinstance(self.init_weights, bool):  # peft's OFT layer refuses other values too
            raise ValueError(f"Unknown initialization init_weights={self.init_weights!r} (True or False)")


@dataclass
class FrodConfig:
    """peft.FrodConfig's fields (peft 0.21): same names, same defaults, peft's validation plus checks of the values
    peft lets through to fail later or to compute nonsense: frod_dropout a probability, regularization_alpha a finite
    non-negative ridge term, projection_prng_key a seed torch.Generator takes."""

    target_modules: Optional[Union[list[str], str]] = None
    projection_prng_key: int = 0
    save_projection: bool = True
    frod_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    modules_to_save: Optional[list[str]] = None
    init_weights: bool = True
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None
    sparse_rate: float = 0.01
    regularization_alpha: float = 1e-3
    progressbar: bool = True
    runtime_offload_base_weight: bool = False
    inference_mode: bool = False

    def __post_init__(self):
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("When `layers_pattern` is specified, `layers_to_transform` must also be specified. ")
        if not 0 <= self.sparse_rate <= 1:
            raise ValueError(f"`sparse_rate` should be between 0 and 1, got {self.sparse_rate}.")
        if not is_real(self.frod_dropout, 0.0, 1.0):
            raise ValueError(f"frod_dropout must be in [0, 1], got {self.frod_dropout!r}")
        check_seed("projection_prng_key", self.projection_prng_key)
        if not is_real(self.regularization_alpha, 0.0):
            raise ValueError(f"regularization_alpha must be a finite non-negative number, got "
                             f"{self.regularization_alpha!r}")
        check_bias(self.bias, "frod_only")
