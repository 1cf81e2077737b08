r"""FRoD linear: y = x W'^T + bias with the adapted weight W' = U (diag(lam) + S) V^T.

Per layer (peft 0.21): x (..., n), n = in_features; V (n, n) the fixed projection of
the layer's category, U (m, n) fixed, lam (n,) trainable, S (n, n) sparse with
trainable values s_k at (r_k, c_k) (peft's COO indices (2, nnz), off the diagonal).
M = diag(lam) + S is one coefficient list coef = [lam, s] at positions
[(i, i)] + [(r_k, c_k)], duplicates summed as peft's coalesce does. Activations are
kept feature-major (features, T), so each entry of M is a row operation over tokens:
mix (out[i] += M_ij in[j]) for the forward, and for the backward one pass that does
both dz[j] += M_ij g[i] and the sampled dM_ij = sum_t g[i, t] z[j, t] (SDDMM).

  factored path, peft's algorithm without rebuilding or densifying S:
    z^T = V^T x^T      h^T = M z^T  (mix)      y = h U^T + bias
  backward with g^T = U^T dy^T:
    dz^T  = M^T g^T,  dM_ij = sum_t g^T[i, t] z^T[j, t]   (one pass; dM sampled, never dense n x n)
    dx = dz V^T
  z^T is saved for the backward (it is what the gradients need; x is not).

  weight path: A = M V^T (mix over the rows of V^T), W' = U A, y = x W'^T + bias;
    backward: dx = dy W', dM_ij = P_ij for P = U^T (dy^T x) V, sampled from U^T dW and V^T.
    W' is saved where x needs a gradient.

Multiply-adds of forward + backward: factored 2·T·n·(n + m), weight 2·m·n² + 3·T·m·n
(forward alone: T·n·(n + m) against m·n² + T·m·n); dispatch.frod_path picks the
smaller. GEMMs run in x's dtype (U and V cast to it, as peft does); mix and sddmm
accumulate in float32 (float64 for float64).
"""
import torch
import torch.nn.functional as F

from .. import dispatch
from .._cache import TensorCache, version_key
from . import _autograd
from ..kernels.reference import frod as reference


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


_plans = TensorCache()


def _plan(s_indices, n, transpose):
    """CSR order of M's entries (the diagonal first, then S): (ptr, src, perm), grouped by row of M (of M^T
    with ``transpose``). Cached per indices tensor (layers share theirs) until it is modified in place."""
    def build():
        diag = torch.arange(n, device=s_indices.device)
        rows, cols = torch.cat([diag, s_indices[0]]), torch.cat([diag, s_indices[1]])
        plans = []
        for out_rows, in_rows in ((rows, cols), (cols, rows)):
            perm = torch.argsort(out_rows, stable=True)
            ptr = torch.zeros(n + 1, dtype=torch.long, device=s_indices.device)
            torch.cumsum(torch.bincount(out_rows, minlength=n), 0, out=ptr[1:])
            plans.append((ptr, in_rows[perm].contiguous(), perm))
        return plans

    return _plans.get(s_indices, n, build)[1 if transpose else 0]


_transposes = TensorCache()


def _v_t(v, dtype):
    """V^T contiguous in ``dtype``, the rows the weight path mixes; kept per projection (shared by its layers)
    until V is modified in place. Always a copy: a view of V (a column-major V, e.g. a QR factor) would keep V, the
    cache's key, alive for good."""
    return _transposes.get(v, dtype, lambda: v.t().to(dtype, memory_format=torch.contiguous_format, copy=True))


def _v_t_operand(v, dtype):
    """V^T as an operand of the factored path's GEMMs: the kept contiguous copy (_v_t), else (nothing is kept for
    inference tensors) the transposed view. The copy turns V^T x^T and dz V^T into GEMMs of one transposed
    operand instead of two, which MKL runs faster when T is small, and, for half-precision x, saves a cast of V
    on every call."""
    return v.to(dtype).t() if version_key(v) is None else _v_t(v, dtype)


def _forward(x, u, v, lam, s_values, s_indices, bias, backend, path):
    """(y as (tokens, out_features) (see _autograd.run), state): state is z^T (factored path) or W' (weight
    path), what the backward needs."""
    k = dispatch.kernels("frod", backend)
    m, n = u.shape
    x2 = x.reshape(-1, n)
    coef = torch.cat([lam, s_values]).to(_acc_dtype(x.dtype))
    plan = _plan(s_indices, n, False)
    if path == "weight":
        state = u.to(x.dtype) @ k.mix(_v_t(v, x.dtype), coef, *plan)
        y = F.linear(x2, state, bias)
    else:
        u = u.to(x.dtype)
        state = torch.mm(_v_t_operand(v, x.dtype), x2.t())
        h_t = k.mix(state, coef, *plan)
        y = torch.mm(h_t.t(), u.t()) if bias is None else torch.addmm(bias.to(x.dtype), h_t.t(), u.t())
    return y, state


@torch.library.custom_op("spectral_kernels::frod_linear_fwd", mutates_args=())
def _frod_fwd(x: torch.Tensor, u: torch.Tensor, v: torch.Tensor, lam: torch.Tensor, s_values: torch.Tensor,
              s_indices: torch.Tensor, bias: torch.Tensor | None, backend: str,
              path: str) -> tuple[torch.Tensor, torch.Tensor]:
    _autograd.refuse_forward_mode("spectral_kernels::frod_linear_fwd")
    return _forward(x, u, v, lam, s_values, s_indices, bias, backend, path)


@_frod_fwd.register_fake
def _(x, u, v, lam, s_values, s_indices, bias, backend, path):
    m, n = u.shape
    state = x.new_empty(m, n) if path == "weight" else x.new_empty(n, x.numel() // n)
    return x.new_empty(x.numel() // n, m), state


def _backward_body(dy, x, state, u, v, lam, s_values, s_indices, backend, path, needs):
    """Gradients (dx, dlam, ds, dbias); empty tensors for those not needed. x only for the weight path."""
    k = dispatch.kernels("frod", backend)
    m, n = u.shape
    dtype = state.dtype
    need_dx, need_dlam, need_ds, need_db = needs
    dy2 = dy.reshape(-1, m).to(dtype)
    u = u.to(dtype)
    coef = torch.cat([lam, s_values]).to(_acc_dtype(dtype))
    plan_t = _plan(s_indices, n, True)
    dx = dcoef = None
    if path == "weight":
        if need_dx:
            dx = dy2 @ state
        if need_dlam or need_ds:
            # U^T dy^T x sums over tokens what the factored path samples first: in float32 for float16, whose range
            # it would leave where peft's gradients and the factored path's do not (bfloat16 has float32's range).
            wide = torch.float32 if dtype == torch.float16 else dtype
            udw = u.to(wide).t() @ (dy2.t().to(wide) @ x.reshape(-1, n).to(wide))
            dcoef = k.mix_backward(udw, _v_t(v, wide), coef, *plan_t, False)[1]
    elif need_dx or need_dlam or need_ds:
        dz_t, dcoef = k.mix_backward(torch.mm(u.t(), dy2.t()), state, coef, *plan_t, need_dx)
        if need_dx:
            dx = torch.mm(dz_t.t(), _v_t_operand(v, dtype))
    dx = dx if need_dx else state.new_empty(0)  # (tokens, n): _backward gives it x's shape
    dlam = dcoef[:n].to(lam.dtype, copy=True) if need_dlam else lam.new_empty(0)  # not a view of ds
    ds = dcoef[n:].to(s_values.dtype) if need_ds else s_values.new_empty(0)
    db = dy2.sum(0) if need_db else dy2.new_empty(0)
    return dx, dlam, ds, db


@_autograd.first_order
@torch.library.custom_op("spectral_kernels::frod_linear_bwd", mutates_args=())
def _frod_bwd(dy: torch.Tensor, x: torch.Tensor | None, state: torch.Tensor, u: torch.Tensor, v: torch.Tensor,
              lam: torch.Tensor, s_values: torch.Tensor, s_indices: torch.Tensor, backend: str, path: str,
              needs: list[bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward_body(dy, x, state, u, v, lam, s_values, s_indices, backend, path, needs)


@_frod_bwd.register_fake
def _(dy, x, state, u, v, lam, s_values, s_indices, backend, path, needs):
    def like(t, need):
        return torch.empty_like(t) if need else t.new_empty(0)

    dx = state.new_empty(*dy.shape[:-1], u.shape[1]) if needs[0] else state.new_empty(0)
    return dx, like(lam, needs[1]), like(s_values, needs[2]), state.new_empty(u.shape[0] if needs[3] else 0)


def _setup_context(ctx, inputs, output):
    x, u, v, lam, s_values, s_indices, bias, backend, path = inputs
    # The factored path's backward needs z^T = V^T x^T, not x; the weight path x and W' (for dx only).
    state = output[1] if path == "factored" or ctx.needs_input_grad[0] else output[1].new_empty(0)
    ctx.save_for_backward(x if path == "weight" else None, state, u, v, lam, s_values, s_indices)
    ctx.backend, ctx.path, ctx.x_shape = backend, path, x.shape
    ctx.bias_dtype = None if bias is None else bias.dtype
    # The state is an output only so the backward can reuse it; without this,
    # autograd would allocate and zero a gradient of its size every step.
    ctx.set_materialize_grads(False)


def _backward(ctx, dy, _dstate):
    if dy is None:  # only the (internal) saved state was used
        return (None,) * 9
    x, state, u, v, lam, s_values, s_indices = ctx.saved_tensors
    needs = [ctx.needs_input_grad[0], ctx.needs_input_grad[3], ctx.needs_input_grad[4],
             ctx.bias_dtype is not None and ctx.needs_input_grad[6]]
    dx, dlam, ds, db = _autograd.backward_call(ctx, _frod_bwd, _backward_body, dy, x, state, u, v, lam, s_values,
                                               s_indices, ctx.backend, ctx.path, needs)
    # No S values (sparse_rate 0): no gradient for them, as peft, which then leaves S out of the graph.
    ds = ds if needs[2] and s_values.numel() else None
    return (dx.reshape(ctx.x_shape) if needs[0] else None), None, None, (dlam if needs[1] else None), ds, \
        None, (db.to(ctx.bias_dtype) if needs[3] else None), None, None


_frod_fwd.register_autograd(_backward, setup_context=_setup_context)
_FrodFunction = _autograd.function("_FrodFunction", _forward, _setup_context, _backward)


def _check_adapter(name, u, v, lam, s_values, s_indices):
    """The shapes, dtypes and devices of U, V, lambda and S (the ones every FRoD op takes)."""
    _autograd.check_tensors(name, U=u, V=v, lam=lam, s_values=s_values, s_indices=s_indices)
    if u.dim() != 2 or v.dim() != 2 or v.shape[0] != v.shape[1] or u.shape[1] != v.shape[0] or 0 in u.shape:
        raise ValueError(f"{name}: U must be (out_features, n) and V (n, n), both sizes positive, got "
                         f"{tuple(u.shape)} and {tuple(v.shape)}")
    n = v.shape[0]
    if lam.shape != (n,):
        raise ValueError(f"{name}: lambda must have shape ({n},), got {tuple(lam.shape)}")
    if s_indices.dtype != torch.long or s_indices.dim() != 2 or s_indices.shape[0] != 2 \
            or s_values.shape != (s_indices.shape[1],):
        raise ValueError(f"{name}: S needs int64 indices (2, nnz) and values (nnz,), got "
                         f"{s_indices.dtype} {tuple(s_indices.shape)} and {tuple(s_values.shape)}")
    for label, t in (("U", u), ("V", v), ("lambda", lam), ("S values", s_values)):
        if not t.is_floating_point():
            raise TypeError(f"{name}: {label} must be floating point, got {t.dtype}")
    devices = {label: t.device for label, t in (("U", u), ("V", v), ("lambda", lam), ("S values", s_values),
                                                ("S indices", s_indices))}
    if len(set(devices.values())) > 1:
        raise RuntimeError(f"{name}: tensors on different devices: {devices}")


def _check(x, u, v, lam, s_values, s_indices, bias):
    _check_adapter("frod_linear", u, v, lam, s_values, s_indices)
    _autograd.check_input("frod_linear", x, v.shape[0])
    if u.requires_grad or v.requires_grad:
        raise ValueError("frod_linear: U and V are fixed projections; gradients with respect to them are not "
                         "supported (detach them)")
    if bias is not None and bias.shape != (u.shape[0],):
        raise ValueError(f"frod_linear: bias must have shape ({u.shape[0]},), got {tuple(bias.shape)}")
    devices = {name: t.device for name, t in (("x", x), ("U", u), ("bias", bias)) if t is not None}
    if len(set(devices.values())) > 1:
        raise RuntimeError(f"frod_linear: tensors on different devices: {devices}")


def _check_index_values(s_indices, n, name="frod_linear"):
    _autograd.check_index_values(s_indices, (n, n), f"{name}: S indices out of range for a ({n}, {n}) matrix")


def frod_linear(x, u, v, lam, s_values, s_indices, bias=None, backend=None, path=None):
    """y = x (U (diag(lam) + S) V^T)^T + bias, S the sparse matrix of ``s_values`` at ``s_indices`` (2, nnz).

    Differentiable in x, lam, s_values and bias; U and V are fixed. ``backend`` and
    ``path`` override the automatic choice (see spectral_kernels.dispatch).
    """
    _check(x, u, v, lam, s_values, s_indices, bias)
    _check_index_values(s_indices, v.shape[0])
    return _apply(x, u, v, lam, s_values, s_indices, bias, backend, path)


def _apply(x, u, v, lam, s_values, s_indices, bias, backend, path):
    dtype = _autograd.autocast_dtype(x)
    if dtype is not None:  # U and V go in x's dtype in any case
        with torch.autocast(x.device.type, enabled=False):
            return _apply(x.to(dtype), u, v, lam, s_values, s_indices, _autograd.cast(bias, dtype), backend, path)
    if bias is not None and bias.dtype != x.dtype:
        raise TypeError(f"frod_linear: x ({x.dtype}) and bias ({bias.dtype}) must have the same dtype")
    backend = dispatch.select_backend(x.device, backend, "frod")
    m, n = u.shape
    needs_grad = _autograd.needs_grad(x, lam, s_values, bias)
    path = dispatch.frod_path(x.numel() // n, m, n, needs_grad, path)
    if backend == "reference":  # one algorithm, peft's: any valid path gives it
        return reference.frod_linear(x, u, v, lam, s_values, s_indices, bias)
    args = (x, u, v, lam, s_values, s_indices, bias, backend, path)
    return _autograd.run(_frod_fwd, _FrodFunction, _forward, needs_grad, *args)[0].reshape(*x.shape[:-1], m)


def frod_effective_weight(u, v, lam, s_values, s_indices, backend=None):
    """W' = U (diag(lam) + S) V^T (out_features, in_features) in U's dtype: differentiable where autograd records
    (then by peft's dense torch math: the kernels' build has no backward)."""
    _check_adapter("frod_effective_weight", u, v, lam, s_values, s_indices)
    _check_index_values(s_indices, v.shape[0], "frod_effective_weight")
    backend = dispatch.select_backend(u.device, backend, "frod")
    if backend == "reference" or _autograd.needs_grad(u, v, lam, s_values) or _autograd.tracing():
        return reference.effective_weight(u, v, lam, s_values, s_indices)
    coef = torch.cat([lam, s_values]).to(_acc_dtype(u.dtype))
    return u @ dispatch.kernels("frod", backend).mix(_v_t(v, u.dtype), coef, *_plan(s_indices, v.shape[0], False))
