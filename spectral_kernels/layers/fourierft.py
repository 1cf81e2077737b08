"""FourierFTLinear: peft's FourierFT layer, computed by the fused op."""
import torch
from torch import nn

from .._cache import ConcatCache
from ..config import FourierFTConfig
from ..ops.fourierft import fourierft_delta_weight, fourierft_linear
from .base import AdapterLayer, adapter_entries, computes_product_only


def fourierft_indices(out_features, in_features, n_frequency, random_loc_seed):
    """peft's spectrum positions: (2, n) int64 rows/cols of a seeded randperm."""
    flat = torch.randperm(out_features * in_features, generator=torch.Generator().manual_seed(random_loc_seed),
                          device="cpu")[:n_frequency]  # on the CPU whatever the default device
    return torch.stack([flat // in_features, flat % in_features], dim=0)


class FourierFTLinear(AdapterLayer):
    """Wraps an nn.Linear or transformers Conv1D; parameters ``fourierft_spectrum.<adapter>`` as in peft.

    In eval mode without autograd: W + dW from the eval cache (see AdapterLayer).
    """

    adapter_layer_names = ("fourierft_spectrum",)
    other_param_names = ("fourierft_n_frequency", "fourierft_scaling", "fourierft_random_loc_seed", "indices")

    def __init__(self, base_layer, adapter_name="default", config=None, n_frequency=None, backend=None):
        super().__init__(base_layer)
        self.fourierft_spectrum = nn.ParameterDict({})
        self.fourierft_n_frequency, self.fourierft_scaling, self.fourierft_random_loc_seed = {}, {}, {}
        self.indices = {}
        self._folded_indices = ConcatCache()  # of the active adapters' indices, when several
        self.backend = backend
        self.update_layer(adapter_name, config or FourierFTConfig(), n_frequency)

    def update_layer(self, adapter_name, config, n_frequency=None):
        """Add adapter ``adapter_name`` (peft's update_layer) and activate the current set."""
        n_frequency = config.n_frequency if n_frequency is None else n_frequency
        if n_frequency <= 0:
            raise ValueError(f"`n_frequency` should be a positive integer value but the value passed is {n_frequency}")
        if n_frequency > self.in_features * self.out_features:
            raise ValueError(
                "`n_frequency` should be less than or equal to the product of the input and output dimensions "
                f"but the value passed is {n_frequency} and the product is {self.in_features * self.out_features}")
        weight = self.base_layer.weight
        self.fourierft_n_frequency[adapter_name] = n_frequency
        self.fourierft_scaling[adapter_name] = config.scaling
        self.fourierft_random_loc_seed[adapter_name] = config.random_loc_seed
        # On the CPU while the weight is on 'meta' (as peft): they move with the spectrum once it is materialised.
        indices = fourierft_indices(self.out_features, self.in_features, n_frequency, config.random_loc_seed)
        self.indices[adapter_name] = indices if weight.device.type == "meta" else indices.to(weight.device)
        spectrum = torch.randn(n_frequency)  # drawn even when zeroed below, as peft does (same global RNG stream)
        if config.init_weights:
            spectrum.zero_()
        dtype = weight.dtype if weight.is_floating_point() else torch.float32
        self.fourierft_spectrum[adapter_name] = nn.Parameter(spectrum.to(weight.device, dtype))
        self.set_adapter(self.active_adapters or [adapter_name], config.inference_mode)

    def _indices(self, adapter, spectrum):
        """The indices of ``adapter`` on the device of its ``spectrum``."""
        indices, device = self.indices[adapter], spectrum.device
        if indices.device != device:  # the layer was moved: follow the spectrum
            indices = indices.to(device)
            if device.type != "meta":  # kept on their device: they are not in the state dict that fills the layer later
                self.indices[adapter] = indices
        return indices

    def _drop_adapter(self, adapter_name):
        super()._drop_adapter(adapter_name)
        self._folded_indices = ConcatCache()  # it held the deleted adapter's indices

    def _moved(self):
        super()._moved()
        self._folded_indices = ConcatCache()  # on the old device

    def delta_weight(self, adapter):
        spectrum = self.fourierft_spectrum[adapter]
        return fourierft_delta_weight(spectrum, self._indices(adapter, spectrum), self.out_features,
                                      self.in_features, self.fourierft_scaling[adapter], self.backend)

    def _adapter_terms(self):
        """(spectrum, indices, scaling) of the active adapters, folded into one when several, and the eval cache's
        key for them: (the tensors they come from, their scalings). The spectrum comes as a function that reads
        the coefficients when called: the eval cache calls it after taking the versions of its key, so that what it
        keeps is not older than its key says (a step in another thread in between would leave it stale)."""
        spectra = adapter_entries(self, "fourierft_spectrum", "_parameters")
        names = [n for n in self._active_adapter if n in spectra]
        if not names:
            return None
        scalings = tuple(self.fourierft_scaling[n] for n in names)
        if len(names) == 1:
            spectrum = spectra[names[0]]
            indices = self._indices(names[0], spectrum)
            return (lambda: spectrum), indices, scalings[0], ((spectrum, indices), scalings)
        # dW is linear in the coefficients: sum_a s_a Re(ifft2(S_a)) = Re(ifft2(sum_a s_a S_a)). The indices are
        # concatenated once, not per call, so their check (a device sync on GPU) runs once too.
        parts = [spectra[n] for n in names]
        indices = self._folded_indices.get([self._indices(n, spectra[n]) for n in names], 1)
        return (lambda: torch.cat([s * a for s, a in zip(parts, scalings)]), indices, 1.0,
                ((*parts, indices), scalings))

    def _effective_weight(self, weight, spectrum, indices, scaling):
        delta = fourierft_delta_weight(spectrum, indices, self.out_features, self.in_features, scaling, self.backend)
        return weight + delta.to(weight.dtype)

    def _forward(self, x, *args, **kwargs):
        base_layer = self._base_layer()
        if self._disable_adapters:
            if self.merged_adapters:
                self.unmerge()
            return base_layer(x, *args, **kwargs)
        terms = None if self.merged_adapters else self._adapter_terms()
        if terms is None:
            return base_layer(x, *args, **kwargs)
        spectrum, indices, scaling, (sources, scalings) = terms
        if args or kwargs or not computes_product_only(base_layer):  # peft's forward: base_layer(x) + x dW^T
            spectrum = spectrum()
            if spectrum.device != x.device:  # coefficients that accelerate offloaded: peft would compute garbage
                raise RuntimeError(f"fourierft_linear: tensors on different devices: x on {x.device}, the "
                                   f"coefficients on {spectrum.device}")
            delta = fourierft_delta_weight(spectrum, indices, self.out_features, self.in_features, scaling,
                                           self.backend)
            return base_layer(x, *args, **kwargs) + nn.functional.linear(x.to(delta.dtype), delta)
        weight, bias = self._weight(), self._bias()
        if self._eval_cache_applies(x):
            return self._cached_linear("fourierft_linear", x, bias, (*sources, weight), scalings,
                                       lambda: self._effective_weight(weight, spectrum(), indices, scaling))
        return fourierft_linear(x, weight, bias, spectrum(), indices, scaling, self.backend)

    def __repr__(self):
        return "spectral_kernels.fourierft." + super().__repr__()
