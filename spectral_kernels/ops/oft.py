r"""OFT linear: y = (x · blockdiag(R_1, ..., R_n)) W^T + b, each R_j a Cayley rotation.

Per layer (peft 0.21): in_features = n·b; block j has b(b-1)/2 parameters p_j
filling the strict upper triangle of A_j in ``torch.triu_indices(b, b, 1)`` order,
Q_j = A_j - A_j^T (skew), and

    R_j = (I - Q_j)(I + Q_j)^-1           exact Cayley, peft: solve(I+Q, I-Q, left=False)
    R_j = I + 2Q + 2Q^2 + ... + 2Q^(k-2) + Q^(k-1)      k-term Neumann (peft's default, k=5; peft's
                                                        k=3 gives k=4's series, k=2 gives I + 2Q)

block_share: one block R_1 for all n. The input is rotated block-wise and fed to the
frozen linear layer (W: (d_out, d_in)):

    x_rot[t, j, c] = sum_k x[t, j, k] R_j[k, c],      y = x_rot W^T + bias

R is built from the parameters by ``oft_rotation`` (differentiable) and the fused op
takes R; the op's backward returns dL/dR. Its FLOPs are negligible (n b x b
products), its time is not: as peft's torch code (~20 small ops and their autograd
graph) it cost 0.56 ms a training step for 16 blocks of 32 on the 2-core CPU, as much
as the rest of the adapter at width 512, T=128. So the Neumann series runs in one kernel
call each way (0.22 ms on the CPU); the exact Cayley transform, the reference backend and
blocks past the GPU kernels' limits keep peft's torch code (bitwise peft's R). With g = dy W:

    dx[t, j]  = g[t, j] R_j^T          dR_j = sum_t x[t, j]^T g[t, j]     (summed over j if shared)

both in one pass over g and x (the CPU kernel writes dx over g). No d_in x d_in
matrix is formed and x_rot is not saved (recomputed only for dL/dW).
Two forward algorithms, chosen by shape in dispatch.oft_path:
  token:  rotate x (T·d_in·b), then the GEMM with W.
  weight: W_eff = W · blockdiag(R)^T (d_out·d_in·b), then one GEMM with W_eff;
          cheaper when the call has more tokens than the layer has outputs.
Kernels accumulate in float32 (float64 for float64 inputs) for every input dtype.
"""
import torch
import torch.nn.functional as F

from .. import dispatch
from ..config import is_integer
from . import _autograd
from ..kernels.reference import oft as reference


def _kernels(backend):
    return dispatch.kernels("oft", backend)


def _rotate_backward(k, g2, x2, rot, need_dx, need_drot):
    """(dx, dR) of x_rot = x · blockdiag(R) for its gradient g2, a temporary the kernels may overwrite with dx;
    empty tensors for those not needed."""
    dx, drot = k.rotate_backward(g2, x2, rot, need_dx, need_drot)
    return (dx if need_dx else g2.new_empty(0)), (drot.to(rot.dtype) if need_drot else rot.new_empty(0))


def _linear_forward(x, weight, bias, rot, backend, path):
    """The body of the forward op: y as (tokens, out_features) (see _autograd.run)."""
    k = _kernels(backend)
    x2 = x.reshape(-1, weight.shape[1])
    if path == "weight":
        y = F.linear(x2, k.rotate(weight, rot, True), bias)
    else:
        y = F.linear(k.rotate(x2, rot, False), weight, bias)
    return y


@torch.library.custom_op("spectral_kernels::oft_linear_fwd", mutates_args=())
def _oft_linear_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, rot: torch.Tensor,
                    backend: str, path: str) -> torch.Tensor:
    _autograd.refuse_forward_mode("spectral_kernels::oft_linear_fwd")
    return _linear_forward(x, weight, bias, rot, backend, path)


@_oft_linear_fwd.register_fake
def _(x, weight, bias, rot, backend, path):
    return x.new_empty(x.numel() // weight.shape[1], weight.shape[0])


def _linear_backward_body(dy, x, weight, rot, backend, needs):
    """Gradients (dx, dweight, dbias, drot); empty tensors for those not needed."""
    k = _kernels(backend)
    m, n = weight.shape
    need_dx, need_dw, need_db, need_drot = needs
    dy2 = dy.reshape(-1, m).to(x.dtype)
    x2 = x.reshape(-1, n)
    dx, drot = x.new_empty(0), rot.new_empty(0)
    if need_dx or need_drot:
        # g = dy W is the base layer's own input-gradient GEMM; the rotation's
        # gradients then take one pass of b x b work over g and x, dx written over g.
        dx, drot = _rotate_backward(k, dy2 @ weight, x2, rot, need_dx, need_drot)
        dx = dx.reshape(x.shape) if need_dx else dx
    dw = (dy2.t() @ k.rotate(x2, rot, False)).to(weight.dtype) if need_dw else x.new_empty(0)
    db = dy2.sum(0).to(weight.dtype) if need_db else x.new_empty(0)
    return dx, dw, db, drot


@_autograd.first_order
@torch.library.custom_op("spectral_kernels::oft_linear_bwd", mutates_args=())
def _oft_linear_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rot: torch.Tensor, backend: str,
                    needs: list[bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _linear_backward_body(dy, x, weight, rot, backend, needs)


@_oft_linear_bwd.register_fake
def _(dy, x, weight, rot, backend, needs):
    def like(t, need):
        return torch.empty_like(t) if need else t.new_empty(0)

    return like(x, needs[0]), like(weight, needs[1]), weight.new_empty(weight.shape[0] if needs[2] else 0), \
        like(rot, needs[3])


def _linear_setup_context(ctx, inputs, output):
    x, weight, bias, rot, backend, path = inputs
    # x, not x_rot: the rotation's gradients need only x, and x_rot is rebuilt
    # (one b x b pass) only when the base weight itself trains.
    ctx.save_for_backward(x, weight, rot)
    ctx.backend = backend
    ctx.has_bias = bias is not None


def _linear_backward(ctx, dy):
    x, weight, rot = ctx.saved_tensors
    needs = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2],
             ctx.needs_input_grad[3]]
    grads = _autograd.backward_call(ctx, _oft_linear_bwd, _linear_backward_body, dy, x, weight, rot, ctx.backend, needs)
    dx, dw, db, drot = [g if need else None for g, need in zip(grads, needs)]
    return dx, dw, db, drot, None, None


_oft_linear_fwd.register_autograd(_linear_backward, setup_context=_linear_setup_context)
_OFTLinearFunction = _autograd.function("_OFTLinearFunction", _linear_forward, _linear_setup_context,
                                        _linear_backward)


def _rotate_forward(x, rot, backend):
    """x rotated, as (tokens, features) (see _autograd.run)."""
    return _kernels(backend).rotate(x.reshape(-1, x.shape[-1]), rot, False)


@torch.library.custom_op("spectral_kernels::oft_rotate_fwd", mutates_args=())
def _oft_rotate_fwd(x: torch.Tensor, rot: torch.Tensor, backend: str) -> torch.Tensor:
    _autograd.refuse_forward_mode("spectral_kernels::oft_rotate_fwd")
    return _rotate_forward(x, rot, backend)


@_oft_rotate_fwd.register_fake
def _(x, rot, backend):
    return x.new_empty(x.numel() // x.shape[-1], x.shape[-1])


def _rotate_backward_body(dy, x, rot, backend, needs):
    x2 = x.reshape(-1, x.shape[-1])
    # A copy: the kernels overwrite it with dx, and dy belongs to autograd.
    g2 = dy.reshape(x2.shape).to(x.dtype, memory_format=torch.contiguous_format, copy=True)
    dx, drot = _rotate_backward(_kernels(backend), g2, x2, rot, *needs)
    return (dx.reshape(x.shape) if needs[0] else dx), drot


@_autograd.first_order
@torch.library.custom_op("spectral_kernels::oft_rotate_bwd", mutates_args=())
def _oft_rotate_bwd(dy: torch.Tensor, x: torch.Tensor, rot: torch.Tensor, backend: str,
                    needs: list[bool]) -> tuple[torch.Tensor, torch.Tensor]:
    return _rotate_backward_body(dy, x, rot, backend, needs)


@_oft_rotate_bwd.register_fake
def _(dy, x, rot, backend, needs):
    return (torch.empty_like(x) if needs[0] else x.new_empty(0)), (torch.empty_like(rot) if needs[1] else
                                                                   rot.new_empty(0))


def _rotate_setup_context(ctx, inputs, output):
    x, rot, backend = inputs
    ctx.save_for_backward(x, rot)
    ctx.backend = backend


def _rotate_backward_autograd(ctx, dy):
    x, rot = ctx.saved_tensors
    needs = [ctx.needs_input_grad[0], ctx.needs_input_grad[1]]
    dx, drot = _autograd.backward_call(ctx, _oft_rotate_bwd, _rotate_backward_body, dy, x, rot, ctx.backend, needs)
    return (dx if needs[0] else None), (drot if needs[1] else None), None


_oft_rotate_fwd.register_autograd(_rotate_backward_autograd, setup_context=_rotate_setup_context)
_OFTRotateFunction = _autograd.function("_OFTRotateFunction", _rotate_forward, _rotate_setup_context,
                                        _rotate_backward_autograd)


def _check_rotation(name, x, rot, in_features):
    _autograd.check_input(name, x, in_features)
    if in_features == 0:
        raise ValueError(f"{name}: x has 0 features (in_features must be positive)")
    if not isinstance(rot, torch.Tensor) or not rot.is_floating_point() or rot.dim() != 3 \
            or rot.shape[1] != rot.shape[2]:
        raise ValueError(f"{name}: rot must be floating-point rotation blocks (n, b, b), "
                         f"got {getattr(rot, 'dtype', type(rot))} {tuple(getattr(rot, 'shape', ()))}")
    b = rot.shape[-1]
    if b == 0 or in_features % b:
        raise ValueError(f"{name}: block size {b} does not divide in_features={in_features}")
    if rot.shape[0] not in (1, in_features // b):
        raise ValueError(f"{name}: {rot.shape[0]} rotation blocks for {in_features // b} blocks of size {b} "
                         "(expected one per block, or one shared)")


def _check_devices(name, **tensors):
    devices = {k: t.device for k, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        raise RuntimeError(f"{name}: tensors on different devices: {devices}")


def _check_linear(x, weight, bias, rot):
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or 0 in weight.shape:
        raise ValueError(f"oft_linear: weight must be 2-D (out_features, in_features), both positive, "
                         f"got {tuple(getattr(weight, 'shape', ()))}")
    _check_rotation("oft_linear", x, rot, weight.shape[1])
    if weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        raise TypeError(f"oft_linear: x ({x.dtype}), weight ({weight.dtype}) and bias "
                        f"({None if bias is None else bias.dtype}) must have the same dtype")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"oft_linear: bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    _check_devices("oft_linear", x=x, weight=weight, bias=bias, rot=rot)


class _Neumann(torch.autograd.Function):
    """peft's Neumann rotation blocks from the cpu, cuda or triton kernels: the skew blocks, their powers and the
    series in one call each way, instead of ~20 small torch ops and their autograd graph (about half of the
    layer's own cost at width 512, b=32, T=128 on the 2-core CPU; on a GPU, as many launches).
    dL/dQ = sum_p c_p sum_{i+j=p-1} (Q^T)^i G (Q^T)^j, see csrc/cpu/oft.cpp."""

    @staticmethod
    def forward(ctx, params, block_size, coef, terms, backend):
        ctx.save_for_backward(params)
        ctx.block_size, ctx.coef, ctx.terms, ctx.backend = block_size, coef, terms, backend
        return _kernels(backend).neumann(params, block_size, coef)

    @staticmethod
    def backward(ctx, grad):
        (params,) = ctx.saved_tensors
        if _autograd.batched(grad):  # under vmap the kernels would see a batched tensor's storage: peft's math
            with torch.enable_grad():
                params = params.detach().requires_grad_()
                return torch.autograd.grad(reference.cayley(params, ctx.block_size, True, ctx.terms), params,
                                           grad)[0], None, None, None, None
        with torch.no_grad():
            dparams = _kernels(ctx.backend).neumann_backward(params, grad.contiguous(), ctx.block_size, ctx.coef)
        return _autograd.first_order_value("oft_rotation", dparams, params, grad), None, None, None, None


def oft_rotation(params, block_size, use_cayley_neumann=True, num_cayley_neumann_terms=5, backend=None):
    """Rotation blocks R (n, b, b) from skew parameters (n, b(b-1)/2), as peft builds them (differentiable).

    The Neumann series runs in the kernels of the ``cpu``, ``cuda`` and ``triton`` backends (the latter two for
    blocks of up to 64; same math, float rounding of their own), else (and for the exact Cayley transform) as peft's
    torch code.
    """
    if not isinstance(params, torch.Tensor) or not params.is_floating_point():
        raise TypeError(f"oft_rotation: parameters must be a floating-point tensor, got "
                        f"{getattr(params, 'dtype', type(params))}")
    if not is_integer(block_size) or block_size < 1:
        raise ValueError(f"oft_rotation: block_size must be a positive integer, got {block_size!r}")
    if not is_integer(num_cayley_neumann_terms):
        raise ValueError(f"oft_rotation: num_cayley_neumann_terms must be an integer, got {num_cayley_neumann_terms!r}")
    if params.dim() != 2 or params.shape[1] != block_size * (block_size - 1) // 2:
        raise ValueError(f"oft_rotation: parameters for block size {block_size} must have shape "
                         f"(n, {block_size * (block_size - 1) // 2}), got {tuple(params.shape)}")
    if use_cayley_neumann and num_cayley_neumann_terms < 1:
        raise ValueError(f"oft_rotation: num_cayley_neumann_terms must be >= 1, got {num_cayley_neumann_terms}")
    block_size, num_cayley_neumann_terms = int(block_size), int(num_cayley_neumann_terms)  # numpy integers too
    name = None if _autograd.tracing() else dispatch.select_backend(params.device, backend, "oft")  # checks it too
    # One Neumann term is R = I: it does not depend on the parameters, whose gradient is then None, as in peft.
    if use_cayley_neumann and num_cayley_neumann_terms > 1 and name not in (None, "reference"):
        coef = reference.neumann_coefficients(num_cayley_neumann_terms)
        if _kernels(name).neumann_fits(name, block_size, len(coef)):
            if not _autograd.needs_grad(params):
                # The kernel alone, as the fused ops' bodies run there: Function.apply on a live parameter without
                # autograd waits for its autograd lock holding the GIL, which another thread's autograd (a clone of
                # the parameter) can hold while it waits for the GIL, and the process hung (torch's inversion).
                return _kernels(name).neumann(params, block_size, coef)
            # The backward reads the parameters as they were: a copy, as peft's graph holds none of the parameters
            # themselves, which COFT projects in place on every forward (two forwards, one backward).
            return _Neumann.apply(params.clone(), block_size, coef, num_cayley_neumann_terms, name)
    return reference.cayley(params, block_size, use_cayley_neumann, num_cayley_neumann_terms)


def oft_linear(x, weight, bias, rot, backend=None, path=None):
    """y = (x · blockdiag(rot)) weight^T + bias for rotation blocks ``rot`` (n or 1, b, b).

    ``backend`` and ``path`` override the automatic choice (see spectral_kernels.dispatch).
    """
    dtype = _autograd.autocast_dtype(x)
    if dtype is not None and isinstance(weight, torch.Tensor):
        with torch.autocast(x.device.type, enabled=False):
            return oft_linear(x.to(dtype), weight.to(dtype), _autograd.cast(bias, dtype), rot, backend, path)
    _check_linear(x, weight, bias, rot)
    backend = dispatch.select_backend(x.device, backend, "oft")
    path = dispatch.oft_path(x.numel() // x.shape[-1], weight.shape[0], path)
    if backend == "reference":  # one algorithm, peft's: any valid path gives it
        return reference.oft_linear(x, weight, bias, rot)
    needs_grad = _autograd.needs_grad(x, weight, bias, rot)
    y = _autograd.run(_oft_linear_fwd, _OFTLinearFunction, _linear_forward, needs_grad, x, weight, bias, rot,
                      backend, path)
    return y.reshape(*x.shape[:-1], weight.shape[0])


def oft_rotate(x, rot, backend=None):
    """x · blockdiag(rot) over the last dimension (differentiable in x and rot)."""
    dtype = _autograd.autocast_dtype(x)
    if dtype is not None:
        with torch.autocast(x.device.type, enabled=False):
            return oft_rotate(x.to(dtype), rot, backend)
    _check_rotation("oft_rotate", x, rot, x.shape[-1] if isinstance(x, torch.Tensor) and x.dim() else -1)
    _check_devices("oft_rotate", x=x, rot=rot)
    backend = dispatch.select_backend(x.device, backend, "oft")
    if backend == "reference":
        return reference.rotate(x, rot).to(x.dtype)
    needs_grad = _autograd.needs_grad(x, rot)
    return _autograd.run(_oft_rotate_fwd, _OFTRotateFunction, _rotate_forward, needs_grad, x, rot,
                         backend).reshape(x.shape)


def oft_effective_weight(weight, rot, backend=None):
    """weight · blockdiag(rot)^T, the weight that multiplies x directly (merging, eval caches; no autograd)."""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"oft_effective_weight: weight must be 2-D (out_features, in_features), got "
                         f"{tuple(getattr(weight, 'shape', ()))}")
    _check_rotation("oft_effective_weight", weight, rot, weight.shape[-1])
    _check_devices("oft_effective_weight", weight=weight, rot=rot)
    backend = dispatch.select_backend(weight.device, backend, "oft")
    if backend == "reference" or _autograd.tracing():
        n_blocks = weight.shape[1] // rot.shape[-1]
        return (weight @ reference.block_diagonal(rot.to(weight.dtype), n_blocks).t()).detach()
    return _kernels(backend).rotate(weight.detach(), rot.detach(), True)
