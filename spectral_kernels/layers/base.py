"""Adapter bookkeeping shared by the layers: named adapters, activation, merging.

Attribute names follow peft's BaseTunerLayer (active_adapters, merged_adapters,
disable_adapters, set_adapter, merge/unmerge) so code written for peft layers works.
"""
import itertools
import warnings

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor
from torch.nn.modules import module as _module

from .._cache import caching, version_key
from ..ops._autograd import autocast_dtype, check_input


def base_weight_and_layout(base_layer):
    """(in_features, out_features, fan_in_fan_out) of an nn.Linear or transformers Conv1D."""
    if isinstance(base_layer, nn.Linear):
        return base_layer.in_features, base_layer.out_features, False
    if is_conv1d(base_layer):
        in_features, out_features = base_layer.weight.shape
        return in_features, out_features, True
    raise TypeError(f"Unsupported layer type {type(base_layer).__module__}.{type(base_layer).__qualname__}: "
                    "only torch.nn.Linear and transformers' Conv1D can be adapted")


# The types of a plain dense weight: a parameter, a tensor that torch.func.functional_call put in its place, or its
# stand-in while torch.export traces. Other tensor subclasses (quantized weights) are left to the base layer's call.
_DENSE_WEIGHTS = (nn.Parameter, torch.Tensor, FakeTensor)


def is_conv1d(layer):
    return type(layer).__name__ == "Conv1D" and hasattr(layer, "nf")


def runs_hooks(module):
    """Whether calling ``module`` runs more than its class's forward: hooks (forward or backward, its own or global
    ones, as module trackers such as FlopCounterMode register) or a forward set on the instance (accelerate's)."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks or "forward" in vars(module) or _module._global_forward_hooks
                or _module._global_forward_pre_hooks or _module._global_backward_hooks
                or _module._global_backward_pre_hooks)


def placement(module):
    """The (device, dtype) pairs of ``module``'s parameters and buffers: what a move (.to(), .half(), .cpu())
    changes."""
    return {(t.device, t.dtype) for t in itertools.chain(module.parameters(), module.buffers())}


class WatchesMoves:
    """A module mixin: ``_moved()`` runs after a move (.to(), .half(), .cpu()) that changed ``placement``, so that
    what was made for the old devices or dtypes is not left behind. A move to where the tensors are (e.g.
    .to(device) on every step) calls nothing."""

    def _apply(self, fn, *args, **kwargs):
        before = placement(self)
        result = super()._apply(fn, *args, **kwargs)
        if placement(self) != before:
            self._moved()
        return result


def computes_product_only(base):
    """Whether calling ``base``, an nn.Linear or transformers Conv1D, computes its product with its dense weight and
    bias and nothing more, as the fused ops do: no hooks (runs_hooks), no forward of its own (an nn.Linear
    subclass's), no quantized weight. Where it does more, the layers call it, as peft's layers do."""
    if not (type(base).forward is nn.Linear.forward or is_conv1d(base)):
        return False
    return type(member(base, "_parameters", "weight")) in _DENSE_WEIGHTS and not runs_hooks(base)


def member(module, kind, name):
    """``module.<name>``, a parameter, buffer or submodule (``kind``: "_parameters", "_buffers" or "_modules"),
    read from its registry: nn.Module's attribute lookup walks its registries in Python, and a cached eval call of
    a layer at one token, one GEMM, makes about ten such lookups. Falls back to that lookup for a name the registry
    lacks (a parametrized weight is a property)."""
    entries = module.__dict__[kind]
    return entries[name] if name in entries else getattr(module, name)


def adapter_entries(layer, table, kind):
    """The tensors or modules by adapter name of ``layer.<table>`` (a ParameterDict, BufferDict or ModuleDict;
    ``kind`` as for member), read as member reads them; where the registry lacks some, by attribute lookup, as the
    table's own indexing reads them: a parametrized parameter (torch.nn.utils.parametrize) is a property, and
    FSDP (use_orig_params=False) puts plain tensors in the parameters' place."""
    module = member(layer, "_modules", table)
    entries = module.__dict__[kind]
    if len(entries) != len(module):
        entries = {name: getattr(module, name) for name in module.keys()}
    return entries


def warn_new_active_adapter(deleted, new):
    """peft's warning when deleting the only active adapter makes another one active."""
    warnings.warn(f"Adapter {deleted} was active which is now deleted. Setting active adapter to {new}.")


class AdapterLayer(WatchesMoves, nn.Module):
    """Subclasses define ``adapter_layer_names`` (the adapters' parameters by name), ``other_param_names`` and
    ``delta_weight(adapter)`` (out, in).

    Eval cache: in eval mode without autograd a layer runs one GEMM with its effective
    weight (base and adapters folded together), built on the first call and reused
    until a tensor it was built from changes (its key holds their versions, so in-place
    writes count, and the torch.optim steps on them, as fused optimizers write without
    counting a version; writes through ``.data`` bypass versions, as for autograd). It
    holds one more copy of the base weight, is dropped when the layer goes back to
    training, and ``cache_effective_weight = False`` drops it and turns it off (eval calls
    then run the fused op, and OFT rebuilds its rotations without autograd too).
    """

    adapter_layer_names: tuple = ()
    other_param_names: tuple = ()  # the other per-adapter tables (dicts by adapter name), as in peft

    def __init__(self, base_layer):
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features, self._conv1d = base_weight_and_layout(base_layer)
        self._active_adapter = []
        self.merged_adapters = []
        self._disable_adapters = False
        self._cache_enabled = True
        self._cache = None

    @property
    def cache_effective_weight(self):
        return self._cache_enabled

    @cache_effective_weight.setter
    def cache_effective_weight(self, enabled):
        self._cache_enabled = bool(enabled)
        self._drop_caches()

    def _drop_caches(self):
        """Forget what the eval cache holds."""
        self._cache = None

    def __getstate__(self):  # copies and pickles of a layer leave its cache behind
        state = super().__getstate__()
        state["_cache"] = None
        return state

    def __setstate__(self, state):  # layers pickled before cache_effective_weight was a property kept it as is
        state.setdefault("_cache_enabled", state.pop("cache_effective_weight", True))
        super().__setstate__(state)

    @property
    def active_adapters(self):
        return list(self._active_adapter)

    @property
    def active_adapter(self):
        return list(self._active_adapter)  # as peft's layers, whose set_adapter stores a list

    @property
    def merged(self):
        return bool(self.merged_adapters)

    @property
    def disable_adapters(self):
        return self._disable_adapters

    def _adapters(self):
        return getattr(self, self.adapter_layer_names[0]).keys()

    def set_adapter(self, adapter_names, inference_mode=False):
        """Activate ``adapter_names`` (str or list); only their parameters train, and those not in inference mode."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        unknown = [n for n in names if n not in self._adapters()]
        if unknown:
            raise ValueError(f"unknown adapter(s) {unknown}; this layer has {list(self._adapters())}")
        for layer_name in self.adapter_layer_names:
            for key, param in getattr(self, layer_name).items():
                param.requires_grad_(key in names and not inference_mode)
        self._active_adapter = names

    def delete_adapter(self, adapter_name):
        """peft's delete_adapter: drop ``adapter_name``'s parameters and per-adapter state. If it was active, the
        other active adapters stay active (and trainable); if it was the only one, the first remaining one by name
        becomes active (with a warning, as peft), or none. Unlike peft's layer, it refuses a merged adapter (its
        delta would stay in the base weight) and an unknown name."""
        if adapter_name not in self._adapters():
            raise ValueError(f"unknown adapter {adapter_name!r}; this layer has {list(self._adapters())}")
        if adapter_name in self.merged_adapters:
            raise ValueError(f"cannot delete adapter {adapter_name!r} while it is merged: unmerge it first")
        self._drop_adapter(adapter_name)

    def _drop_adapter(self, adapter_name):
        """delete_adapter without its checks: also what an update_layer that failed part way left."""
        tables = [getattr(self, t) for t in (*self.adapter_layer_names, *self.other_param_names)]
        if not any(adapter_name in entries for entries in tables):
            return
        for entries in tables:
            if adapter_name in entries:  # tables shared between layers (FRoD's projections) go once
                del entries[adapter_name]
        self._drop_caches()
        if adapter_name not in self._active_adapter:
            return
        # As peft: the other active adapters stay active (and trainable), else the first remaining name in sorted order.
        active = [n for n in self._active_adapter if n != adapter_name]
        if not active and len(self._adapters()):
            active = sorted(self._adapters())[:1]
            warn_new_active_adapter(adapter_name, active[0])
        self.set_adapter(active)

    def enable_adapters(self, enabled):
        """peft's enable_adapters: False freezes every adapter's parameters and runs the base layer alone (merged
        adapters are unmerged at the next call); True makes the active adapters trainable again (set_adapter)."""
        if enabled:
            self.set_adapter(self.active_adapters)
        else:
            for table in self.adapter_layer_names:
                getattr(self, table).requires_grad_(False)
            self._drop_caches()  # the base layer runs alone
        self._disable_adapters = not enabled

    def train(self, mode=True):
        if mode:
            self._drop_caches()
        return super().train(mode)

    def _moved(self):
        self._drop_caches()

    def forward(self, x, *args, **kwargs):
        # As peft's layers: the result in x's dtype, also where torch.autocast ran the products in its own.
        y = self._forward(x, *args, **kwargs)
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def _eval_cache_applies(self, x):
        # Where nothing can be cached (traced graphs, torch.func, forward-mode AD) the fused op runs instead.
        return (self._cache_enabled and not self.training and not torch.is_grad_enabled() and x.dim() and caching()
                and not self._parametrized())

    def _parametrized(self):
        """Whether a parametrization (torch.nn.utils.parametrize) computes the base weight or an adapter's tensor:
        a new tensor on every read, from which the eval cache would rebuild on every call."""
        if "parametrizations" in self._base_layer()._modules:
            return True
        for table in self.adapter_layer_names:
            entries = member(self, "_modules", table)._modules
            if "parametrizations" in entries or any("parametrizations" in m._modules for m in entries.values()):
                return True
        return False

    def _cached_linear(self, op, x, bias, tensors, extra, build):
        """x W_eff^T + bias with the eval cache's effective weight W_eff, which ``build()`` makes when one of
        ``tensors`` (those it is computed from) was replaced, modified in place or stepped on by an optimizer, or
        ``extra`` or autocast's dtype changed (not kept for inference tensors); x gets the checks the fused op
        ``op``, which the cache skips, would make."""
        check_input(op, x, self.in_features)
        key = version_key(*tensors)
        if key is None:
            weight = build()
        else:
            key += (extra, autocast_dtype(x))
            cache = self._cache  # read once: another thread may replace it
            if cache is None or cache[0] != key:
                self._cache = None  # drop the old one before building the new one
                cache = self._cache = (key, build())
            weight = cache[1]
        if x.device != weight.device:
            raise RuntimeError(f"{op}: tensors on different devices: x on {x.device}, the layer on {weight.device}")
        if x.dtype != weight.dtype and autocast_dtype(x) is None:
            raise TypeError(f"{op}: x ({x.dtype}) and weight ({weight.dtype}) must have the same dtype")
        return nn.functional.linear(x, weight, bias)

    def get_base_layer(self):
        """peft's get_base_layer: the wrapped nn.Linear / Conv1D."""
        return self._base_layer()

    @property
    def weight(self):
        """The base layer's weight, as peft's layers expose it: model code reads it (T5's feed-forward casts to
        ``wo.weight.dtype``)."""
        return member(self._base_layer(), "_parameters", "weight")

    @property
    def bias(self):
        return self._bias()

    def release_base_layer(self):
        """The base layer, as unload hands it back to the model."""
        return self.base_layer

    def _base_layer(self):
        return member(self, "_modules", "base_layer")

    def _weight(self):
        """The base weight as (out_features, in_features), a view for Conv1D."""
        weight = member(self._base_layer(), "_parameters", "weight")
        return weight.t() if self._conv1d else weight

    def _bias(self):
        return member(self._base_layer(), "_parameters", "bias")

    def get_delta_weight(self, adapter):
        return self.delta_weight(adapter)

    def _adapters_to_merge(self, adapter_names):
        """The adapters merge takes: ``adapter_names`` (a list; default: the active ones) that this layer has and has
        not merged yet, with peft's warnings when some or all are merged already."""
        names = self.active_adapters if adapter_names is None else adapter_names
        if isinstance(names, str):
            raise TypeError(f"adapter_names should be a list of strings, got {names!r}.")
        names = [n for n in names if n not in self.merged_adapters]
        if self.merged:
            warnings.warn(f"Already following adapters were merged {','.join(self.merged_adapters)}. "
                          f"You are now additionally merging {','.join(names)}." if names else
                          "All adapters are already merged, nothing to do.")
        return [n for n in names if n in self._adapters()]

    @torch.no_grad()
    def merge(self, safe_merge=False, adapter_names=None):
        """Add the adapters' delta weights into the base weight (peft's merge)."""
        names = self._adapters_to_merge(adapter_names)
        weight = self.base_layer.weight
        for name in names:
            # As peft: added in the wider of the two dtypes (a float32 delta to a bfloat16 weight), rounded once.
            delta = self.delta_weight(name)
            delta = delta.t() if self._conv1d else delta
            if safe_merge:
                merged = (weight.data + delta).to(weight.dtype)
                if not torch.isfinite(merged).all():
                    raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")
                weight.data = merged
            else:
                weight.data += delta
            # Written through .data, as peft writes, outside autograd; the version counts the write, so that other
            # layers sharing the weight (tied) see it in eval mode.
            torch.autograd.graph.increment_version(weight)
            self.merged_adapters.append(name)
        self._drop_caches()  # the merged base layer runs alone

    @torch.no_grad()
    def unmerge(self):
        """Subtract every merged adapter's delta weight again (peft's unmerge)."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        weight = self.base_layer.weight
        while self.merged_adapters:
            delta = self.delta_weight(self.merged_adapters.pop())
            weight.data -= delta.t() if self._conv1d else delta
            torch.autograd.graph.increment_version(weight)  # as in merge
