"""OFTLinear: peft's OFT layer, computed by the fused op."""
import functools
import warnings

import torch
from torch import nn

from .._cache import version_key
from ..config import OFTConfig
from ..kernels.reference import oft as reference
from ..ops._autograd import autocast_dtype
from ..ops.oft import oft_effective_weight, oft_linear, oft_rotate, oft_rotation
from .base import AdapterLayer, adapter_entries, computes_product_only, member


def adjust_oft_parameters(in_features, params):
    """peft's rule for an r or block size that does not divide in_features: the nearest divisor (ties go down)."""
    if params >= in_features:
        return in_features
    higher = params
    while higher <= in_features and in_features % higher != 0:
        higher += 1
    lower = params
    while lower > 1 and in_features % lower != 0:
        lower -= 1
    return lower if params - lower <= higher - params else higher


def oft_block_layout(in_features, r, block_size):
    """(r, block_size) with r * block_size == in_features from exactly one of them, adjusted (and warned) as peft."""
    if in_features < 1:
        raise ValueError(f"OFT needs a layer with in_features >= 1, got {in_features}")
    if (r == 0) == (block_size == 0):
        raise ValueError(f"OFT needs exactly one of r and oft_block_size to be non-zero, got r={r}, "
                         f"oft_block_size={block_size}")
    if r == 0:
        if in_features % block_size != 0 or block_size > in_features:
            adjusted = adjust_oft_parameters(in_features, block_size)
            warnings.warn(f"Invalid `oft_block_size` ({block_size})! Adjusted `oft_block_size` to ({adjusted}).")
            block_size = adjusted
        return in_features // block_size, block_size
    if in_features % r != 0 or r > in_features:
        adjusted = adjust_oft_parameters(in_features, r)
        warnings.warn(f"Invalid `r` ({r})! Adjusted `r` to ({adjusted}).")
        r = adjusted
    return r, in_features // r


class OFTRotation(nn.Module):
    """One adapter: ``weight`` (r, or 1 with block_share, b(b-1)/2) as peft's OFTRotationModule."""

    def __init__(self, n_blocks, block_size, config):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_blocks, block_size * (block_size - 1) // 2))
        self.block_size = block_size
        self.coft, self.eps = config.coft, config.eps
        self.use_cayley_neumann = config.use_cayley_neumann
        self.num_cayley_neumann_terms = config.num_cayley_neumann_terms

    def forward(self, params=None, backend=None):
        """Rotation blocks R (n, b, b) of ``weight``, or of ``params``, ``weight`` cast for merging. A forward, called
        as peft's layer calls its rotation modules: their hooks run (FSDP's units gather the weight there).

        With COFT the parameters are first projected and the projection written back
        into ``weight``, as peft does on every forward and merge (in a merge, as in
        peft's get_delta_weight, without autograd).
        """
        if params is None:
            params = self.weight
            if self.coft:
                with torch.no_grad():
                    params.copy_(reference.project(params, self.block_size, self.eps))
        elif self.coft:
            with torch.no_grad():
                params = reference.project(params, self.block_size, self.eps)
                self.weight.copy_(params)
        return oft_rotation(params, self.block_size, self.use_cayley_neumann, self.num_cayley_neumann_terms, backend)


class OFTLinear(AdapterLayer):
    """Wraps an nn.Linear or transformers Conv1D; parameters ``oft_R.<adapter>.weight`` as in peft.

    In eval mode without autograd, each adapter's rotation blocks and W·blockdiag(R)^T
    come from the eval cache (see AdapterLayer).
    """

    adapter_layer_names = ("oft_R",)
    other_param_names = ("r", "oft_block_size")

    def __init__(self, base_layer, adapter_name="default", config=None, backend=None):
        super().__init__(base_layer)
        self.oft_R = nn.ModuleDict({})
        self.r, self.oft_block_size = {}, {}
        self.backend = backend
        self._rotations = {}
        self.update_layer(adapter_name, config or OFTConfig())

    def update_layer(self, adapter_name, config):
        """Add adapter ``adapter_name`` (peft's update_layer) and activate the current set."""
        r, block_size = oft_block_layout(self.in_features, config.r, config.oft_block_size)
        module = OFTRotation(1 if config.block_share else r, block_size, config)
        # peft's initialisation, on the float32 CPU tensor before moving it, so that
        # the same seed gives the same parameters.
        if config.init_weights:
            nn.init.zeros_(module.weight)
        else:
            nn.init.normal_(module.weight, mean=0.0, std=0.1)
        weight = self.base_layer.weight
        # Made on 'meta' (accelerate's init_empty_weights, peft's low_cpu_mem_usage), it stays there until a state
        # dict fills it, as peft leaves it.
        device = None if module.weight.is_meta else weight.device
        self.oft_R[adapter_name] = module.to(device, weight.dtype if weight.is_floating_point() else None)
        self.r[adapter_name], self.oft_block_size[adapter_name] = r, block_size
        self.set_adapter(self.active_adapters or [adapter_name], config.inference_mode)

    def _drop_caches(self):
        super()._drop_caches()
        self._rotations = {}

    def __getstate__(self):
        return {**super().__getstate__(), "_rotations": {}}

    def _rotation(self, name, cache):
        """(key, R) of adapter ``name``: kept where the eval cache applies (``cache``), else (key None) computed,
        differentiable with autograd on."""
        module = adapter_entries(self, "oft_R", "_modules")[name]
        if not cache or module.coft:
            return None, module(backend=self.backend)
        params = member(module, "_parameters", "weight")
        versions = version_key(params)
        if versions is None:
            return None, module(backend=self.backend)
        # Autocast's dtype too: peft's torch code for R (the reference backend, the exact transform, large GPU
        # blocks) runs its products in it.
        key = (name, versions, params.dtype, params.device, module.use_cayley_neumann,
               module.num_cayley_neumann_terms, autocast_dtype(params))
        cached = self._rotations.get(name)
        if cached is None or cached[0] != key:
            self._rotations[name] = cached = (key, module(backend=self.backend))
        return cached

    def _merge_rotation(self, name):
        """R as peft's get_delta_weight builds it (differentiable without COFT): in float32 for half-precision
        parameters on the CPU."""
        module = self.oft_R[name]
        params = module.weight
        if params.device.type == "cpu" and params.dtype in (torch.float16, torch.bfloat16):
            return module(params.float(), self.backend).to(params.dtype)
        return module(params, self.backend)

    def delta_weight(self, adapter):
        """peft's get_delta_weight: the dense blockdiag(R) (in_features, in_features) that merging applies."""
        return reference.block_diagonal(self._merge_rotation(adapter), self.r[adapter])

    def _rotate_weight(self, *rotations):
        """The base weight (out, in) times blockdiag(R)^T for each of ``rotations``, the last first (so that
        x·B_1···B_k W^T = x W_eff^T), in the weight's dtype: computed in the widest of their dtypes, as peft merges
        (a bf16 layer's float32 rotation rounded to bf16 first cost a rounding more)."""
        weight = self._weight()
        dtype = functools.reduce(torch.promote_types, [rot.dtype for rot in rotations], weight.dtype)
        folded = weight.to(dtype).contiguous()
        for rot in reversed(rotations):
            folded = oft_effective_weight(folded, rot.to(dtype), self.backend)
        return folded.to(weight.dtype)

    def _write_weight(self, new):
        self.base_layer.weight.data.copy_(new.t() if self._conv1d else new)
        torch.autograd.graph.increment_version(self.base_layer.weight)  # as AdapterLayer.merge

    @torch.no_grad()
    def merge(self, safe_merge=False, adapter_names=None):
        """Fold the adapters' rotations into the base weight, W <- W·blockdiag(R)^T, in turn (peft's merge)."""
        for name in self._adapters_to_merge(adapter_names):
            merged = self._rotate_weight(self._merge_rotation(name))
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")
            self._write_weight(merged)
            self.merged_adapters.append(name)
        self._drop_caches()  # the merged base layer runs alone

    @torch.no_grad()
    def unmerge(self):
        """Undo the merges, last first: W <- W·blockdiag(R^-1)^T.

        As peft, with the inverse of R (not R^T): the Neumann rotations are only
        nearly orthogonal. It is taken per b x b block, in float32 (float64 for
        float64 parameters), instead of peft's dense in_features^2 inverse.
        """
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        while self.merged_adapters:
            rot = self._merge_rotation(self.merged_adapters.pop())
            exact = torch.float64 if rot.dtype == torch.float64 else torch.float32
            self._write_weight(self._rotate_weight(torch.linalg.inv(rot.to(exact))))

    def _forward(self, x, *args, **kwargs):
        if self._disable_adapters:
            if self.merged_adapters:
                self.unmerge()
            return self._base_layer()(x, *args, **kwargs)
        modules = adapter_entries(self, "oft_R", "_modules")
        names = [] if self.merged_adapters else [n for n in self._active_adapter if n in modules]
        if not names:
            return self._base_layer()(x, *args, **kwargs)
        cache = self._eval_cache_applies(x)
        keys, rotations = zip(*[self._rotation(n, cache) for n in names])
        base_layer = self._base_layer()
        if args or kwargs or not computes_product_only(base_layer):  # peft's forward: base_layer(x rotated)
            dtype = x.dtype
            for rot in rotations:
                x = oft_rotate(x, rot, self.backend)
            return base_layer(x.to(dtype), *args, **kwargs)
        weight, bias = self._weight(), self._bias()
        if None not in keys:  # cached: all the rotations folded into the weight
            return self._cached_linear("oft_linear", x, bias, (weight,), keys, lambda: self._rotate_weight(*rotations))
        # peft rotates by each active adapter in turn, then runs the base layer.
        for rot in rotations[:-1]:
            x = oft_rotate(x, rot, self.backend)
        return oft_linear(x, weight, bias, rotations[-1], self.backend)

    def __repr__(self):
        return "spectral_kernels.oft." + super().__repr__()
