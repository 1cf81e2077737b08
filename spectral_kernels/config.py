"""Adapter configurations with peft's field names and defaults."""
from dataclasses import dataclass, field
from typing import Optional, Union


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
        if not isinstance(self.n_frequency, int) or self.n_frequency <= 0:
            raise ValueError(f"n_frequency must be a positive integer, got {self.n_frequency!r}")
        if self.bias not in ("none", "all", "fourier_only"):
            raise ValueError(f"bias must be 'none', 'all' or 'fourier_only', got {self.bias!r}")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError("`layers_to_transform` cannot be used when `target_modules` is a str.")
        if isinstance(self.target_modules, str) and self.layers_pattern is not None:
            raise ValueError("`layers_pattern` cannot be used when `target_modules` is a str.")
        if self.layers_pattern and not self.layers_to_transform:
            raise ValueError("When `layers_pattern` is specified, `layers_to_transform` must also be specified. ")
