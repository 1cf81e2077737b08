"""Caches keyed on tensor versions: what the ops and layers keep between calls (FRoD's sparse plans, V^T and
LU factors, the layers' eval-mode weights) is rebuilt when a tensor it came from is replaced or modified in
place (optimizer steps included)."""
import itertools

import torch
from torch.autograd import forward_ad
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.weak import WeakIdKeyDictionary

# A serial number per storage, never reused: an address and a version count alone can repeat, since a new
# tensor (load_state_dict(assign=True), Module.half().float()) may get the freed memory of the one a cache
# was built from, at version 0 or at the version its Parameter kept.
_next_serial = itertools.count()


def _storage_serial(t):
    # torch keeps one Python object per storage while the storage lives, attributes included (an attribute costs
    # a tenth of a WeakIdKeyDictionary lookup, on the eval cache's per-call path).
    storage = t.untyped_storage()
    serial = getattr(storage, "_spectral_kernels_serial", None)
    if serial is None:
        serial = storage._spectral_kernels_serial = next(_next_serial)
    return serial


def caching():
    """Whether values may be kept between calls: not while torch.compile traces, as a graph cannot keep Python-side
    caches, nor under torch.func transforms or forward-mode AD, whose tensors carry what a kept value would drop."""
    return not (torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active()
                or forward_ad._current_level >= 0)


def version_key(*tensors):
    """(storage serial, data_ptr, version, shape, strides) of each tensor, or None (nothing is cached) where one is
    an inference tensor, which has no version counter, or where ``caching()`` says no. As for autograd, in-place
    writes that bypass the version counter (through ``.data`` or a numpy view) are not seen."""
    if not caching():
        return None
    key = []
    for t in tensors:  # one plain loop: on the eval cache's per-call path
        if t.is_inference():
            return None
        key.append((_storage_serial(t), t.data_ptr(), t._version, t.shape, t.stride()))
    return tuple(key)


# Fused optimizers (torch.optim's fused=True, transformers' default) write parameters without counting a version:
# the layers' eval caches are keyed on the number of optimizer steps taken too.
_optimizer_steps = 0


def _count_step(optimizer, args, kwargs):
    global _optimizer_steps
    _optimizer_steps += 1


register_optimizer_step_post_hook(_count_step)


def optimizer_steps():
    """How many torch.optim optimizer steps this process has taken."""
    return _optimizer_steps


class TensorCache:
    """Values computed from one tensor (held weakly, by identity), rebuilt when its version key or ``extra``
    changes."""

    def __init__(self):
        self._entries = WeakIdKeyDictionary()

    def get(self, tensor, extra, build):
        key = version_key(tensor)
        if key is None:
            return build()
        key += (extra,)
        cached = self._entries.get(tensor)
        if cached is None or cached[0] != key:
            cached = self._entries[tensor] = (key, build())
        return cached[1]


class ConcatCache:
    """torch.cat(parts, dim) kept until a part is replaced or modified in place: one tensor across calls, so that
    what is cached on that tensor (its index check, an eval-mode weight built from it) is kept too."""

    def __init__(self):
        self._value = None

    def get(self, parts, dim=0):
        key = version_key(*parts)
        if key is None:
            return torch.cat(parts, dim)
        key += (dim,)
        if self._value is None or self._value[0] != key:
            self._value = (key, torch.cat(parts, dim))
        return self._value[1]
