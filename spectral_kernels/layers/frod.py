"""FrodLinear: peft's FRoD layer, computed by the fused op, and FRoD's projection set-up.

The fixed tensors follow peft: per module category (``frod_category``) one projection
V (in, in) and one sparse pattern (2, nnz) per adapter, built from the stacked base
weights of the category (``frod_projections``) and shared by its layers; per layer
U and lambda from W = U diag(lambda) V^T.
"""
import warnings

import torch
from torch import nn

from ..config import FrodConfig
from ..ops.frod import frod_effective_weight, frod_linear
from .base import AdapterLayer, adapter_entries, computes_product_only


def frod_category(key):
    """peft's projection-sharing category of a dotted module name (``layers.3.self_attn.q_proj`` -> ``self_attn_q_proj``)."""
    parts = key.split(".")
    if len(parts) == 1:
        return parts[0]
    if parts[-2].isdigit():
        return parts[-1]
    if parts[-2:] == ["output", "dense"] and len(parts) >= 3 and parts[-3] == "attention":
        return "attention_output"  # BERT's attention output, apart from the MLP's output.dense
    return f"{parts[-2]}_{parts[-1]}"


def frod_layer_index(key, fallback):
    """peft's block index of a module name: the number after ``layers``, else the first number, else ``fallback``."""
    parts = key.split(".")
    if "layers" in parts:
        after = parts.index("layers") + 1
        if after < len(parts) and parts[after].isdigit():
            return int(parts[after])
    return next((int(part) for part in parts if part.isdigit()), fallback)


def frod_projection(matrices, regularization_alpha):
    """V (in, in) of one category from its layers' weights (each (out_i, in), float32), as peft builds it.

    With more stacked rows than columns: QR of the stack, the average over layers of
    (Q_i^T Q_i + alpha I)^-1, and V = R^T times its eigenvectors; otherwise the right
    singular vectors of the stack. Runs on the matrices' device.
    """
    stacked = torch.cat(matrices, dim=0)
    if stacked.shape[0] < stacked.shape[1]:
        return torch.linalg.svd(stacked, full_matrices=True)[2].T
    q, r = torch.linalg.qr(stacked)
    n = r.shape[1]
    ridge = regularization_alpha * torch.eye(n, dtype=r.dtype, device=r.device)
    t_pi = torch.zeros(n, n, dtype=r.dtype, device=r.device)
    for q_i in q.split([m.shape[0] for m in matrices]):
        t_pi += torch.linalg.inv(q_i.T @ q_i + ridge)
    t_pi /= len(matrices)
    return r.T @ torch.linalg.eigh(t_pi)[1]


def frod_sparse_indices(n, sparse_rate, generator):
    """peft's sparse pattern: nnz = n² · sparse_rate (at least 1 if the rate is positive) positions off the
    diagonal, the first nnz of a seeded permutation of the off-diagonal positions in row-major order."""
    off_diagonal = n * n - n
    nnz = min(int(n * n * sparse_rate), off_diagonal)
    if sparse_rate > 0 and off_diagonal > 0:
        nnz = max(1, nnz)
    if not nnz:
        return torch.empty(2, 0, dtype=torch.long)
    p = torch.randperm(off_diagonal, generator=generator)[:nnz]
    rows, j = p // (n - 1), p % (n - 1)
    return torch.stack([rows, j + (j >= rows)])


def frod_projections(weights, config, progressbar=None):
    """{category: (V, s_indices)} for ``weights`` = {category: [weight (out, in), ...]} in block order.

    One generator seeded with ``config.projection_prng_key`` draws the patterns of the
    categories in sorted order, as peft does; V is computed on the weights' device
    (a GPU when the model is on one) and returned in the first weight's dtype.
    """
    from tqdm.auto import tqdm

    generator = torch.Generator().manual_seed(config.projection_prng_key)
    show = config.progressbar if progressbar is None else progressbar
    result = {}
    bar = tqdm(sorted(weights), disable=not show, desc="FRoD hierarchical joint decomposition", unit="category")
    for category in bar:
        matrices = [w.detach().to(torch.float32) for w in weights[category]]
        widths = sorted({m.shape[1] for m in matrices})
        if len(widths) > 1:  # peft's stack of them fails
            raise ValueError(f"FRoD's projection of module category {category!r} is shared by its layers, whose "
                             f"in_features differ ({widths}): target modules of one width in each category")
        bar.set_postfix(category=category, layers=len(matrices), dim=matrices[0].shape[1])
        v = frod_projection(matrices, config.regularization_alpha).to(weights[category][0].dtype)
        result[category] = (v, frod_sparse_indices(v.shape[0], config.sparse_rate, generator).to(v.device))
    return result


def frod_u_and_lambda(v, weight, factors=None):
    """U (out, in) and lambda (in,) with W = U diag(lambda) V^T: lambda the column norms of W V^-T (float64, as
    peft), U those columns normalised. ``factors``, a TensorCache that the layers of V's category share while
    they are built (the injector's, for one inject), keeps V's LU factorisation for the others; the factors are
    freed with it."""
    w = weight.detach().to(torch.float64)

    def factorize():
        return torch.linalg.lu_factor_ex(v.detach().to(w.device, torch.float64))

    lu, pivots, info = factorize() if factors is None else factors.get(v, w.device, factorize)
    if info.item() == 0:
        bi = torch.linalg.lu_solve(lu, pivots, w.T).T
    else:  # singular V
        bi = w @ torch.linalg.pinv(v.detach().to(w.device, torch.float64), rtol=1e-6).T
    lam = torch.linalg.norm(bi, dim=0)
    u = torch.zeros_like(bi)
    nonzero = lam > 1e-12
    u[:, nonzero] = bi[:, nonzero] / lam[nonzero]
    return u.float(), lam.float()


class BufferDict(nn.Module):
    """Tensors by adapter name, as buffers (moved by ``.to()``), persistent or not."""

    def __init__(self, persistent=False):
        super().__init__()
        self.persistent = persistent

    def __setitem__(self, key, tensor):
        self.register_buffer(key, tensor, persistent=self.persistent)

    def __getitem__(self, key):
        return self._buffers[key]

    def __delitem__(self, key):
        delattr(self, key)

    def __contains__(self, key):
        return key in self._buffers

    def __iter__(self):
        return iter(self._buffers)

    def __len__(self):
        return len(self._buffers)

    def keys(self):
        return self._buffers.keys()


class FrodLinear(AdapterLayer):
    """Wraps an nn.Linear or transformers Conv1D; parameters ``frod_lambda_l.<adapter>`` and
    ``frod_lambda_s_values.<adapter>`` as in peft.

    ``frod_V`` and ``frod_s_indices`` (BufferDicts by adapter) are the category's shared
    projection and sparse pattern, held by whoever shares them (the injector); without
    them the layer builds its own from its weight alone (a category of one layer) and
    keeps them as non-persistent buffers. Layers built together may share ``factors``, a
    TensorCache for their projections' LU factors (frod_u_and_lambda). In eval mode without
    autograd, W' comes from the eval cache (see AdapterLayer).
    """

    adapter_layer_names = ("frod_lambda_l", "frod_lambda_s_values")
    other_param_names = ("r", "frod_V", "frod_U", "frod_s_indices", "frod_dropout", "runtime_offload_base_weight")

    def __init__(self, base_layer, adapter_name="default", config=None, frod_V=None, frod_s_indices=None,
                 backend=None, factors=None):
        super().__init__(base_layer)
        self.frod_lambda_l = nn.ParameterDict({})
        self.frod_lambda_s_values = nn.ParameterDict({})
        self.frod_U = BufferDict()
        self.frod_dropout = nn.ModuleDict({})
        self.r, self.runtime_offload_base_weight = {}, {}
        self.backend = backend
        self._weight_before_merge = None
        if (frod_V is None) != (frod_s_indices is None):
            raise ValueError("FrodLinear: pass both frod_V and frod_s_indices (shared projections) or neither")
        self.update_layer(adapter_name, config or FrodConfig(), frod_V, frod_s_indices, factors)

    def _share(self, frod_V, frod_s_indices):
        if frod_V is None:
            if not isinstance(getattr(self, "frod_V", None), BufferDict):
                self.frod_V, self.frod_s_indices = BufferDict(), BufferDict()
        else:  # references, not submodules: the owner registers (and moves, and saves) them once
            object.__setattr__(self, "frod_V", frod_V)
            object.__setattr__(self, "frod_s_indices", frod_s_indices)

    def update_layer(self, adapter_name, config, frod_V=None, frod_s_indices=None, factors=None):
        """Add adapter ``adapter_name`` (peft's update_layer) and activate the current set; ``factors`` as in
        frod_u_and_lambda."""
        self._share(frod_V, frod_s_indices)
        weight = self._weight()
        if adapter_name not in self.frod_V:
            if len(self.frod_V.keys()):  # the category's projection is shared by its adapters
                first = next(iter(self.frod_V))
                self.frod_V[adapter_name], self.frod_s_indices[adapter_name] = \
                    self.frod_V[first], self.frod_s_indices[first]
            else:
                v, s_indices = frod_projections({"layer": [weight]}, config, progressbar=False)["layer"]
                self.frod_V[adapter_name], self.frod_s_indices[adapter_name] = v, s_indices
        v, s_indices = self.frod_V[adapter_name], self.frod_s_indices[adapter_name]
        if v.shape != (self.in_features, self.in_features):
            raise ValueError(f"FrodLinear: projection V {tuple(v.shape)} does not fit in_features={self.in_features}")
        if s_indices.numel() and (s_indices.min() < 0 or s_indices.max() >= self.in_features):
            raise ValueError(f"FrodLinear: sparse indices out of range for in_features={self.in_features}")
        # As peft: the adapter is made on the device and in the dtype of the layer's adapters when the weight is on
        # the CPU (float32 once autocast_adapter_dtype upcast a half-precision model's first), else the weight's,
        # then goes to the weight's dtype (to be upcast again by autocast_adapter_dtype): so the random initial
        # values of a later adapter are drawn in float32, then rounded.
        dtype = weight.dtype if weight.is_floating_point() else torch.float32
        existing = next((t for t in self.frod_lambda_l.values() if not t.is_meta), None)
        device, draw_dtype = weight.device, dtype
        if weight.device.type == "cpu" and existing is not None:
            device, draw_dtype = existing.device, existing.dtype
        u, lam = frod_u_and_lambda(v, weight, factors)
        self.r[adapter_name] = self.out_features
        self.runtime_offload_base_weight[adapter_name] = config.runtime_offload_base_weight
        self.frod_dropout[adapter_name] = nn.Dropout(config.frod_dropout) if config.frod_dropout > 0 else nn.Identity()
        s_values = torch.zeros(s_indices.shape[1], device=device, dtype=draw_dtype)
        lam = lam.to(device, draw_dtype)
        if not config.init_weights:  # peft's order of random draws
            with torch.no_grad():
                nn.init.normal_(s_values, std=0.1)
                lam.add_(torch.randn_like(lam) * 0.1)
        self.frod_lambda_s_values[adapter_name] = nn.Parameter(s_values.to(dtype))
        self.frod_lambda_l[adapter_name] = nn.Parameter(lam.to(dtype))
        self.frod_U[adapter_name] = u.to(device, dtype)
        self.set_adapter(self.active_adapters or [adapter_name], config.inference_mode)

    def _tensors(self, adapter):
        """(U, V, lambda, s values, s indices) of ``adapter``, on lambda's device."""
        lam = adapter_entries(self, "frod_lambda_l", "_parameters")[adapter]
        s_values = adapter_entries(self, "frod_lambda_s_values", "_parameters")[adapter]
        fixed = [adapter_entries(self, name, "_buffers")[adapter] for name in ("frod_U", "frod_V", "frod_s_indices")]
        u, v, s_indices = (t if t.device == lam.device else t.to(lam.device) for t in fixed)
        return u, v, lam, s_values, s_indices

    def delta_weight(self, adapter):
        """peft's get_delta_weight: W' - W, W the base weight as it was before any merge."""
        weight = self._weight_before_merge if self._weight_before_merge is not None else self._weight()
        u, v, lam, s_values, s_indices = self._tensors(adapter)
        adapted = frod_effective_weight(u.to(weight.dtype), v.to(weight.dtype), lam, s_values, s_indices, self.backend)
        return adapted - weight.to(adapted.device)

    def get_delta_weight(self, adapter):
        """As peft's: in the base weight's own layout ((in, out) for a Conv1D)."""
        delta = self.delta_weight(adapter)
        return delta.t() if self._conv1d else delta

    @torch.no_grad()
    def merge(self, safe_merge=False, adapter_names=None):
        """Add each adapter's W' - W into the base weight (peft's merge); unmerge restores W exactly."""
        self._restore_base_weight()
        if not self.merged:
            self._weight_before_merge = self._weight().detach().clone()
        try:
            super().merge(safe_merge, adapter_names)
        finally:
            if not self.merged:  # nothing merged (no adapter to merge, or safe_merge found NaNs): no copy kept
                self._weight_before_merge = None

    @torch.no_grad()
    def unmerge(self):
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        weight = self.base_layer.weight
        original = self._weight_before_merge
        weight.data.copy_(original.t() if self._conv1d else original)
        torch.autograd.graph.increment_version(weight)  # as AdapterLayer.merge
        self._weight_before_merge = None
        self.merged_adapters.clear()

    def _offload_base_weight(self):
        """runtime_offload_base_weight: the base weight waits on the CPU while the fused path does not need it."""
        weight = self.base_layer.weight
        if weight.device.type != "cpu":
            weight.data = weight.data.cpu()

    def _restore_base_weight(self):
        """The base weight back on the adapters' device (where the model is); a layer without adapters has none
        offloaded (delete_adapter restores it first)."""
        adapter = next(iter(self.frod_lambda_l.values()), None)
        weight = self.base_layer.weight
        if adapter is not None and weight.device != adapter.device:
            weight.data = weight.data.to(adapter.device)

    def _drop_adapter(self, adapter_name):
        self._restore_base_weight()
        super()._drop_adapter(adapter_name)

    def release_base_layer(self):
        self._restore_base_weight()
        return super().release_base_layer()

    def _frod(self, adapter, x, bias, cache=True):
        tensors = self._tensors(adapter)
        bias = bias if bias is None or bias.dtype == x.dtype else bias.to(x.dtype)
        u, v, lam, s_values, s_indices = tensors
        if cache and self._eval_cache_applies(x):
            # Keyed by the adapter's own tensors (not by their copies cast to x's dtype).
            return self._cached_linear("frod_linear", x, bias, tensors, x.dtype, lambda: frod_effective_weight(
                u.to(x.dtype), v.to(x.dtype), lam, s_values, s_indices, self.backend))
        return frod_linear(x, u, v, lam, s_values, s_indices, bias, self.backend)  # U and V go in x's dtype

    def _summed_weight(self, names, dtype):
        """W + sum over the adapters ``names`` of W'_k - W, in ``dtype``, summed in float32 at least."""
        acc = torch.promote_types(dtype, torch.float32)
        total = (1 - len(names)) * self._weight().to(acc)
        for name in names:
            u, v, lam, s_values, s_indices = self._tensors(name)
            total += frod_effective_weight(u.to(dtype), v.to(dtype), lam, s_values, s_indices, self.backend).to(acc)
        return total.to(dtype)

    def _forward(self, x, *args, **kwargs):
        if self._disable_adapters or self.merged_adapters:
            if self._disable_adapters and self.merged_adapters:
                self.unmerge()
            self._restore_base_weight()
            return self._base_layer()(x, *args, **kwargs)
        values = adapter_entries(self, "frod_lambda_s_values", "_parameters")
        names = [n for n in self._active_adapter if n in values]
        if not names:
            self._restore_base_weight()
            return self._base_layer()(x, *args, **kwargs)
        bias = self._bias()
        dropout = adapter_entries(self, "frod_dropout", "_modules")[names[0]]
        if len(names) == 1 and (isinstance(dropout, nn.Identity) or not dropout.training):
            # FRoD replaces the weight: the base layer's own product is not needed.
            if self.runtime_offload_base_weight[names[0]]:
                self._offload_base_weight()
            return self._frod(names[0], x, bias)
        # Several adapters or active dropout: peft's sum of each adapter's change of the base output.
        self._restore_base_weight()
        base_layer = self._base_layer()
        if not (args or kwargs) and computes_product_only(base_layer) and self._eval_cache_applies(x):
            # no dropout: one GEMM with W + sum_k (W'_k - W), where calling the base layer computes no more
            tensors = [t for name in names for t in self._tensors(name)]
            return self._cached_linear("frod_linear", x, bias, (*tensors, self._weight()), x.dtype,
                                       lambda: self._summed_weight(names, x.dtype))
        result = base_layer(x, *args, **kwargs)
        base_out = result if bias is None else result - bias
        for name in names:
            dropout = self.frod_dropout[name]
            h = dropout(x)
            stochastic = not isinstance(dropout, nn.Identity) and dropout.training
            own_base = nn.functional.linear(h, self._weight().to(x.dtype)) if stochastic else base_out
            result = result + self._frod(name, h, None, cache=False) - own_base  # (one slot: they would take turns)
        return result

    def _apply(self, fn, *args, **kwargs):
        result = super()._apply(fn, *args, **kwargs)
        if any(self.runtime_offload_base_weight.values()):
            self._offload_base_weight()
        return result

    def __repr__(self):
        return "spectral_kernels.frod." + super().__repr__()
