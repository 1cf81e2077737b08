"""Caches keyed on tensor versions: what the ops and layers keep between calls (FRoD's sparse plans, V^T and
LU factors, the layers' eval-mode weights) is rebuilt when a tensor it came from is replaced or modified in
place (torch.optim steps included, fused ones too)."""
import itertools

import torch
from torch.autograd import forward_ad
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch.utils._python_dispatch import _disable_current_modes, is_traceable_wrapper_subclass
from torch.utils.weak import WeakIdKeyDictionary

# Per storage, [serial, optimizer steps]. The serial is never reused: an address and a version count alone can
# repeat, since a new tensor (load_state_dict(assign=True), Module.half().float()) may get the freed memory of the
# one a cache was built from, at version 0 or at the version its Parameter kept. The steps count the torch.optim
# steps that update the storage's tensors: fused optimizers (fused=True, transformers' default) write them without
# counting a version.
_next_serial = itertools.count()


def _record(storage):
    # torch keeps one Python object per storage while the storage lives, attributes included (an attribute costs
    # a tenth of a WeakIdKeyDictionary lookup, on the eval cache's per-call path).
    record = getattr(storage, "_spectral_kernels", None)
    if record is None:
        record = storage._spectral_kernels = [next(_next_serial), 0]
    return record


# Steps of optimizers with a sharded parameter, whose layers read other tensors (gathered ones): FSDP's flat
# parameters, or views into one (use_orig_params=True; a parameter with no elements on this rank), and tensor
# subclasses that wrap others (FSDP2's DTensor shards, whose storage spans the whole tensor). Every version key
# holds this count. (A parameter that is a view for another reason, e.g. a slice of a fused checkpoint tensor,
# counts too: its steps then rebuild every eval cache, which costs time, not correctness.)
_shared_steps = 0


def _sharded(p, storage):
    return (getattr(p, "_is_flat_param", False) or is_traceable_wrapper_subclass(p) or not p.numel()
            or storage.nbytes() != p.numel() * p.element_size())


@torch.compiler.disable  # traced in a compiled optimizer.step, it was recompiled for every parameter
def _count_step(optimizer, args, kwargs):
    """Before and after each optimizer step (an optimizer's own post-step hooks run first), on its parameters."""
    global _shared_steps
    shared = False
    for group in optimizer.param_groups:
        for p in group["params"]:
            try:
                storage = p.untyped_storage()
            except (RuntimeError, NotImplementedError):  # no storage (some tensor subclasses): as sharded
                shared = True
                continue
            _record(storage)[1] += 1
            shared = shared or _sharded(p, storage)
    _shared_steps += shared


register_optimizer_step_pre_hook(_count_step)
register_optimizer_step_post_hook(_count_step)


def transformed():
    """Whether torch.func transforms or forward-mode AD are on: their tensors carry what the kernels (which have no
    batching or forward-mode rules) and kept values would drop."""
    return torch._C._are_functorch_transforms_active() or forward_ad._current_level >= 0


_FAKE, _PROXY = torch._C._TorchDispatchModeKey.FAKE, torch._C._TorchDispatchModeKey.PROXY


def tracing():
    """Whether the ops are traced into a graph, where tensors have no values to read: by torch.compile (and
    torch.export), or under a fake or proxy tensor mode (FakeTensorMode, make_fx, aot_function,
    torch.func.linearize)."""
    return torch.compiler.is_compiling() or (torch._C._len_torch_dispatch_stack() > 0 and (
        torch._C._get_dispatch_mode(_FAKE) is not None or torch._C._get_dispatch_mode(_PROXY) is not None))


def caching():
    """Whether values may be kept between calls: not while ``tracing()`` or torch.jit.trace traces, as a graph
    cannot keep Python-side caches, nor where ``transformed()``."""
    return not (tracing() or torch.jit.is_tracing() or transformed())


def version_key(*tensors):
    """(storage serial, optimizer steps, data_ptr, version, shape, strides) of each tensor, after the count of
    steps on sharded parameters, or None (nothing is cached) where one is an inference tensor, which has no version
    counter, a trainable tensor in shared memory (model.share_memory(), Hogwild training), which other processes
    write unseen, or where ``caching()`` says no. As for autograd, in-place writes that bypass the version counter
    (through ``.data`` or a numpy view) are not seen."""
    if not caching():
        return None
    key = [_shared_steps]
    for t in tensors:  # one plain loop: on the eval cache's per-call path
        if t.is_inference():
            return None
        storage = t.untyped_storage()
        if t.requires_grad and t.is_cpu and storage.is_shared():
            return None
        serial, steps = _record(storage)
        key.append((serial, steps, t.data_ptr(), t._version, t.shape, t.stride()))
    return tuple(key)


def _kept(build):
    """``build()`` for a cache: never inference tensors (made by a first call in inference mode, e.g. an HF
    pipeline), which have no version counter, so that what is cached on them in turn (an index check, a device
    sync on GPU; an eval-mode weight) would be rebuilt on every call, nor be saved for a backward later. Nor values
    with an autograd graph (inference_mode(False) turns grad mode on): a graph back to the key kept it alive. Nor
    seen by dispatch modes (traced graphs keep nothing, see ``caching``): selective activation checkpointing hands
    the recompute the kept outputs of each op in the order of the first run, which a build ran in only."""
    with torch.inference_mode(False), torch.no_grad(), _disable_current_modes():
        return build()


class TensorCache:
    """Values computed from one tensor, rebuilt when its version key or ``extra`` changes. Held per view of its
    storage, the storage weakly: a weak reference to the tensor itself would make torch.utils.swap_tensors refuse
    it, which load_state_dict calls on every parameter and buffer under
    torch.__future__.set_swap_module_params_on_conversion(True). The values of a view no longer used stay as long
    as the storage: the callers' keys are parameters, buffers and tensors that own their storage."""

    def __init__(self):
        self._entries = WeakIdKeyDictionary()  # storage -> {(data_ptr, dtype, shape, strides): (key, value)}

    def get(self, tensor, extra, build):
        key = version_key(tensor)
        if key is None:
            return build()
        key += (extra,)
        storage = tensor.untyped_storage()
        views = self._entries.get(storage)
        if views is None:
            views = self._entries[storage] = {}
        _, (_, _, data_ptr, _, shape, strides), _ = key  # the view's place, read from its version key
        view = (data_ptr, tensor.dtype, shape, strides)
        cached = views.get(view)
        if cached is None or cached[0] != key:
            cached = views[view] = (key, _kept(build))
        return cached[1]

    def clear(self):
        self._entries.clear()


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
            self._value = (key, _kept(lambda: torch.cat(parts, dim)))
        return self._value[1]
