"""Drop-in swap: run the FourierFT, OFT and FRoD layers of an existing peft model on the fused ops.

``swap(model)`` switches every peft FourierFT / OFT / FRoD linear layer in ``model`` (a
PeftModel, a tuner model, or any module holding peft layers) to a subclass of its own
peft class whose ``forward`` calls the fused op on the layer's own parameters; nothing
else changes: the same instances, parameters, state_dict, adapters and peft methods
(update_layer, merge, delete_adapter, set_adapter, ...). ``unswap(model)`` restores
peft's class. peft's classes themselves are never modified.

A swapped layer falls back to peft's own forward where the fused op does not apply:
adapters disabled or merged, no active adapter, extra forward arguments, a base layer
that is not a plain nn.Linear / Conv1D (another method's peft layer in a mixed model, a
subclass with a forward of its own), has hooks (accelerate's too, and global module
hooks) or a weight of another tensor type (quantized), an input dtype other than the
base weight's outside torch.autocast (peft then casts; the fused ops take the base
layer's dtype, or autocast's for both), for OFT a rotation module that is wrapped (FSDP)
or hooked, and for FRoD several active adapters or active dropout. Like peft's, a swapped
layer returns its input's dtype. Layers that ``add_adapter`` creates later are peft's own
until the next ``swap``.

Importing this module imports peft; ``import spectral_kernels`` does not.
"""
import weakref

import torch
from peft.tuners.fourierft.layer import FourierFTLinear as PeftFourierFTLinear
from peft.tuners.frod.layer import Linear as PeftFrodLinear
from peft.tuners.oft.layer import Linear as PeftOFTLinear
from peft.tuners.oft.layer import OFTRotationModule
from torch import nn

from ._cache import ConcatCache, TensorCache
from .layers.base import WatchesMoves, computes_product_only, is_conv1d, runs_hooks
from .ops._autograd import autocast_dtype
from .ops.fourierft import fourierft_linear
from .ops.frod import frod_linear
from .ops.oft import oft_linear, oft_rotate, oft_rotation


def _base_weight(layer, x):
    """The base layer's (weight as (out, in), bias) when the fused op can replace the forward on ``x``, else None.

    The layer's own base layer, not get_base_layer(): in a PeftMixedModel (or after a second
    inject_adapter_in_model) it can be another method's peft layer, e.g. LoRA's, whose output
    peft's forward includes and the fused op alone would leave out. Likewise peft's forward calls
    the base layer with its hooks and its class's forward (an nn.Linear subclass may override it,
    e.g. to fake-quantize its weight); the fused op computes nn.Linear's forward alone.
    """
    base = layer.base_layer
    if not computes_product_only(base):
        return None
    if layer.disable_adapters or layer.merged or x.dim() == 0:
        return None
    if x.dtype != base.weight.dtype and autocast_dtype(x) is None:
        return None
    return (base.weight.t() if is_conv1d(base) else base.weight), base.bias


_copies = TensorCache()
_folded_indices = weakref.WeakKeyDictionary()  # swapped FourierFT layer -> ConcatCache of its active indices


def _on_device(t, device):
    """``t`` on ``device``: a copy kept until ``t`` changes, where peft copies it on every call (FourierFT's
    indices, FRoD's V and pattern: peft keeps them on the CPU unless the whole model is moved)."""
    return t if t.device == device else _copies.get(t, device, lambda: t.to(device))


class _DropsCopiesOnMoves(WatchesMoves):
    """A move of a swapped layer (model.cpu(), .to(dtype)) drops the copies that _on_device keeps, all of them: a
    peft model made on a GPU keeps FRoD's U and V on the CPU, so after model.cpu() their GPU copies would hold GPU
    memory as long as the model lives. The next calls copy again."""

    def _moved(self):
        _copies.clear()
        _folded_indices.clear()


class SwappedFourierFTLinear(_DropsCopiesOnMoves, PeftFourierFTLinear):
    """peft's FourierFTLinear with the fused forward; no dense complex ΔW is formed."""

    def forward(self, x, *args, **kwargs):
        names = [n for n in self.active_adapters if n in self.fourierft_spectrum]
        spectra = [self.fourierft_spectrum[n] for n in names]
        if not (self.disable_adapters or self.merged) and any(s.is_meta for s in spectra):
            # Offloaded coefficients wait for their module's forward to load them, which peft's forward never calls:
            # it would compute with them as they are and return garbage. (OFT's calls its rotation modules.)
            raise RuntimeError("FourierFT coefficients on the meta device (offloaded by accelerate?): peft's "
                               "FourierFT layer reads them without loading them; keep the adapted modules' weights "
                               "loaded on their execution device, or name FourierFTLinear in accelerate's "
                               "preload_module_classes")
        base = None if args or kwargs or not names else _base_weight(self, x)
        if base is None:
            return super().forward(x, *args, **kwargs)
        weight, bias = base
        if len(names) == 1:
            name = names[0]
            spectrum, scaling = spectra[0], self.fourierft_scaling[name]
            indices = _on_device(self.indices[name], x.device)
        else:  # ΔW is linear in the coefficients: fold the adapters into one spectrum
            spectrum = torch.cat([s * self.fourierft_scaling[n] for s, n in zip(spectra, names)])
            # The same concatenation across calls, so that its index check (a device sync on GPU) runs once.
            folded = _folded_indices.setdefault(self, ConcatCache())
            indices = folded.get([_on_device(self.indices[n], x.device) for n in names], 1)
            scaling = 1.0
        return fourierft_linear(x, weight, bias, spectrum, indices, scaling).to(x.dtype)  # as peft under autocast


class SwappedOFTLinear(PeftOFTLinear):
    """peft's OFT Linear with the fused forward: the input is rotated block-wise inside the linear op."""

    def _rotation(self, adapter):
        module = self.oft_R[adapter]
        if module.coft:  # peft projects the parameters in place on every forward
            with torch.no_grad():
                module.weight.copy_(module._project_batch(module.weight, eps=module.eps))
        return oft_rotation(module.weight, module.block_size, module.use_cayley_neumann,
                            module.num_cayley_neumann_terms)

    def forward(self, x, *args, **kwargs):
        names = [n for n in self.active_adapters if n in self.oft_R]
        # peft calls each rotation module: one wrapped (an FSDP unit of peft's fsdp_auto_wrap_policy, which gathers
        # its parameter in the call) or hooked does more there than _rotation's read of its weight.
        plain = all(type(m) is OFTRotationModule and not runs_hooks(m) for m in (self.oft_R[n] for n in names))
        base = None if args or kwargs or not names or not plain else _base_weight(self, x)
        if base is None:
            return super().forward(x, *args, **kwargs)
        weight, bias = base
        rotations = [self._rotation(n) for n in names]
        dtype = x.dtype  # the result's, as peft's under autocast
        for rot in rotations[:-1]:  # peft rotates by each active adapter in turn
            x = oft_rotate(x, rot)
        return oft_linear(x, weight, bias, rotations[-1]).to(dtype)


class SwappedFrodLinear(_DropsCopiesOnMoves, PeftFrodLinear):
    """peft's FRoD Linear with the fused forward: S stays sparse and W' = U (diag(lambda) + S) V^T is not formed
    (or formed once, by the op's weight path, when that is cheaper)."""

    def forward(self, x, *args, **kwargs):
        names = [n for n in self.active_adapters if n in self.frod_lambda_s_values]
        dropout = self.frod_dropout[names[0]] if len(names) == 1 else None
        stochastic = dropout is not None and not isinstance(dropout, nn.Identity) and dropout.training
        base = None if args or kwargs or len(names) != 1 or stochastic else _base_weight(self, x)
        if base is None:
            return super().forward(x, *args, **kwargs)
        name = names[0]
        if self.runtime_offload_base_weight.get(name, False):  # as peft: the base weight is not needed
            self._offload_base_weight_to_cpu()
        u, v = (_on_device(t[name], x.device).to(x.dtype) for t in (self.frod_U, self.frod_V))  # dtype: as peft
        bias = base[1]
        # The trainable tensors follow x as in peft, differentiably (peft's low_cpu_mem_usage loading leaves them on
        # a GPU where there is one, whatever the model's device).
        lam, s_values = (t[name].to(x.device) for t in (self.frod_lambda_l, self.frod_lambda_s_values))
        return frod_linear(x, u, v, lam, s_values, _on_device(self.frod_s_indices[name], x.device),
                           None if bias is None else bias.to(x.dtype)).to(x.dtype)  # as peft under autocast


# peft layer class -> its swapped subclass. A method joins with one entry (and its class above).
SWAPPED = {PeftFourierFTLinear: SwappedFourierFTLinear, PeftOFTLinear: SwappedOFTLinear,
           PeftFrodLinear: SwappedFrodLinear}
ORIGINAL = {swapped: original for original, swapped in SWAPPED.items()}
# accelerate (preload_module_classes, no_split_module_classes) and other tools match layers by their class's name: a
# swapped layer answers to its peft class's (type() still names spectral_kernels.peft.Swapped...).
for _original, _swapped in SWAPPED.items():
    _swapped.__name__ = _original.__name__


def swap(model):
    """Switch every peft FourierFT / OFT / FRoD linear layer in ``model`` to the fused kernels, in place; idempotent.

    Returns ``model``. Raises ValueError when ``model`` holds no such layer.
    """
    found = False
    for module in model.modules():
        swapped = SWAPPED.get(type(module))
        if swapped is not None:
            module.__class__ = swapped
        found = found or type(module) in ORIGINAL
    if not found:
        names = ", ".join(f"{c.__module__}.{c.__qualname__}" for c in SWAPPED)
        raise ValueError(f"{type(model).__name__} holds no peft layer the fused kernels replace ({names})")
    return model


def unswap(model):
    """Give every swapped layer in ``model`` its peft class back, and drop the copies the swapped layers kept (peft's
    layers copy on every call); returns ``model``."""
    for module in model.modules():
        original = ORIGINAL.get(type(module))
        if original is not None:
            module.__class__ = original
    _copies.clear()
    _folded_indices.clear()
    return model
