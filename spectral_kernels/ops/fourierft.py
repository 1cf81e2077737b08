r"""FourierFT linear: y = x (W + dW)^T + b, with dW built from n spectral coefficients.

For W of shape (M, N) = (d_out, d_in), coefficients c_k at spectrum positions
(u_k, v_k) (peft's ``indices``: rows u, cols v) and scaling s:

    dW[p, q] = s / (M N) * sum_k c_k cos(2 pi (u_k p / M + v_k q / N))
             = s * Re(ifft2(S)),   S zero except S[u_k, v_k] = c_k        (peft)

With X^[t, v] = sum_q x[t, q] exp(+2 pi i v q / N) (read off rfft(x), see
csrc/fourierft_fold.h):

    (x dW^T)[t, p]  = (s / N) * irfft_M( sum_k c_k X^[t, v_k] at bin u_k )[p]
    dL/dc_k         = s / (M N) * sum_t Re(X^[t, v_k] Y^[t, u_k]),   Y^ from rfft(dL/dy)
    (dy dW)[t, q]   = (s / M) * irfft_N( sum_k c_k Y^[t, u_k] at bin v_k )[q]

Two exact algorithms, chosen by shape in dispatch.fourierft_path:
  token:  per token O((M + N) log + n); no dense M x N tensor is ever formed. Tokens
          go a chunk at a time (dispatch.fourierft_chunk_tokens); when they fit in
          one, the forward keeps rfft(x) for dc (small, and recomputing it costs a
          transform), else the backward recomputes it chunk by chunk, so the saved
          activations stay x alone.
  weight: dW from the sparse spectrum in O(n N + M N log M) (_delta_weight), one
          GEMM with W + dW; the backward reuses that effective weight for dx (kept only
          where x needs a gradient) and gets dc from the sampled reduction above (no
          dense gradient). rfft(x) is only computed in the backward, chunk by chunk of
          tokens with rfft(dy): for many tokens the whole-batch spectra would be as big
          as x and dy in float32.
FFTs run in float32 (float64 for float64 inputs), whatever the input dtype.
"""
import torch
import torch.nn.functional as F

from .. import dispatch
from ..config import is_integer, is_real
from . import _autograd
from ..kernels.reference import fourierft as reference


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _delta_weight(k, coef, rows, cols, m, n, scaling, base):
    """base + dW (dW in float32/float64 without base) from the coefficients, as the real
    part of the forward 2-D transform of the real spectrum S (equal to Re(ifft2(S)) up
    to the 1/(M N), since the cosines are even): the rows of S are transformed (directly
    while S is sparse enough, see dispatch.fourierft_direct_rows), the columns by one
    complex FFT, and the half of the bins this leaves out is read back by Hermitian
    symmetry. No complex-to-real transform runs: with MKL that row pass was 1.6 of
    irfft2's 2.4 ms at 1024 x 1024. W + dW took 1.7 ms against 2.5 ms for irfft2 and
    the add, 14 against 20 ms at 2048 x 2048 (2-core CPU, n = 1000)."""
    scale = scaling / (m * n)
    if dispatch.fourierft_direct_rows(coef.numel(), m):
        rows_done = k.spectrum_rows(coef, rows, cols, m, n, scale)
    else:
        dense = coef.new_zeros(m, n).index_put_((rows, cols), coef * scale, accumulate=True)
        rows_done = torch.fft.rfft(dense, dim=1)
    return k.real_mirror(torch.fft.fft(rows_done, dim=0).t(), base, n)


def _forward(x, weight, bias, spectrum, rows, cols, scaling, backend, path, keep):
    """(y as (tokens, out_features) (see _autograd.run), state kept for the backward: the effective weight, or
    rfft(x) when ``keep`` (the tokens fit one chunk, see _apply) and else an empty spectrum); the forward op's
    body."""
    k = dispatch.kernels("fourierft", backend)
    m, n = weight.shape
    acc = _acc_dtype(x.dtype)
    x2 = x.reshape(-1, n)
    coef = spectrum.to(acc)
    if path == "weight":
        state = _delta_weight(k, coef, rows, cols, m, n, scaling, weight.to(x.dtype))
        y = F.linear(x2, state, bias)
    else:
        tokens, chunk = x2.shape[0], dispatch.fourierft_chunk_tokens(x.device, m, n)
        state = x.new_empty(0, n // 2 + 1, dtype=acc.to_complex())
        # The sum goes into a buffer of the op's own, not into the GEMM's output: selective activation
        # checkpointing may keep that for the recompute (a policy keeping GEMMs), and refuses writes to it.
        base = F.linear(x2, weight, bias)
        y = torch.empty_like(base)
        for t0 in range(0, tokens, chunk):
            part = slice(t0, t0 + chunk)
            xf = torch.fft.rfft(x2[part].to(acc), dim=-1)
            torch.add(base[part], torch.fft.irfft(k.mix(xf, coef, cols, rows, n, m, scaling / n), n=m), out=y[part])
            if keep:  # kept for the backward; several chunks' spectra are recomputed there
                state = xf
    return y, state


@torch.library.custom_op("spectral_kernels::fourierft_linear_fwd", mutates_args=())
def _fourierft_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, spectrum: torch.Tensor,
                   rows: torch.Tensor, cols: torch.Tensor, scaling: float, backend: str,
                   path: str, keep: bool) -> tuple[torch.Tensor, torch.Tensor]:
    _autograd.refuse_forward_mode("spectral_kernels::fourierft_linear_fwd")
    return _forward(x, weight, bias, spectrum, rows, cols, scaling, backend, path, keep)


@_fourierft_fwd.register_fake
def _(x, weight, bias, spectrum, rows, cols, scaling, backend, path, keep):
    m, n = weight.shape
    tokens = x.numel() // n
    if path == "weight":
        state = x.new_empty(m, n)
    else:
        state = x.new_empty(tokens if keep else 0, n // 2 + 1, dtype=_acc_dtype(x.dtype).to_complex())
    return x.new_empty(tokens, m), state


def _backward_body(dy, x, weight, spectrum, rows, cols, state, scaling, backend, path, needs):
    """Gradients (dx, dweight, dbias, dspectrum); empty tensors for those not needed.

    The spectra of dy (and of x, unless the forward kept it) are taken a chunk of tokens
    at a time (dispatch.fourierft_chunk_tokens) and used at once, so they never exist
    for all tokens together.
    """
    k = dispatch.kernels("fourierft", backend)
    m, n = weight.shape
    acc = _acc_dtype(x.dtype)
    dy2 = dy.reshape(-1, m).to(x.dtype)
    x2 = x.reshape(-1, n)
    coef = spectrum.to(acc)
    need_dx, need_dw, need_db, need_dc = needs
    spectral_dx = need_dx and path == "token"
    dx = dy2 @ (state if path == "weight" else weight.to(x.dtype)) if need_dx else x.new_empty(0)
    dc = torch.zeros_like(coef) if need_dc else x.new_empty(0)
    if spectral_dx or need_dc:
        chunk = dispatch.fourierft_chunk_tokens(x.device, m, n)
        for t0 in range(0, x2.shape[0], chunk):
            part = slice(t0, t0 + chunk)
            yf = torch.fft.rfft(dy2[part].to(acc), dim=-1)
            if spectral_dx:
                dx[part].add_(torch.fft.irfft(k.mix(yf, coef, rows, cols, m, n, scaling / m), n=n))
            if need_dc:
                xf = state[part] if path == "token" and state.shape[0] else torch.fft.rfft(x2[part].to(acc), dim=-1)
                dc += k.coef_grad(xf, yf, cols, rows, n, m, scaling / (m * n))
    dw = (dy2.t() @ x2).to(weight.dtype) if need_dw else x.new_empty(0)
    db = dy2.sum(0).to(weight.dtype) if need_db else x.new_empty(0)
    return dx.reshape(x.shape) if need_dx else dx, dw, db, dc.to(spectrum.dtype)


@_autograd.first_order
@torch.library.custom_op("spectral_kernels::fourierft_linear_bwd", mutates_args=())
def _fourierft_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, spectrum: torch.Tensor,
                   rows: torch.Tensor, cols: torch.Tensor, state: torch.Tensor, scaling: float, backend: str,
                   path: str, needs: list[bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward_body(dy, x, weight, spectrum, rows, cols, state, scaling, backend, path, needs)


@_fourierft_bwd.register_fake
def _(dy, x, weight, spectrum, rows, cols, state, scaling, backend, path, needs):
    def like(t, need):
        return torch.empty_like(t) if need else x.new_empty(0)

    return like(x, needs[0]), like(weight, needs[1]), weight.new_empty(weight.shape[0] if needs[2] else 0), \
        like(spectrum, needs[3])


def _setup_context(ctx, inputs, output):
    x, weight, bias, spectrum, rows, cols, scaling, backend, path, _keep = inputs
    # The state serves dx (the effective weight) or dc (rfft(x)) only: not kept where that gradient is not needed.
    used = ctx.needs_input_grad[0 if path == "weight" else 3]
    ctx.save_for_backward(x, weight, spectrum, rows, cols, output[1] if used else output[1].new_empty(0))
    ctx.scaling, ctx.backend, ctx.path = scaling, backend, path
    ctx.has_bias = bias is not None
    # The state is an output only so the backward can reuse it; without this,
    # autograd would allocate and zero a gradient of its size every step.
    ctx.set_materialize_grads(False)


def _backward(ctx, dy, _dstate):
    if dy is None:  # only the (internal) saved state was used
        return (None,) * 10
    x, weight, spectrum, rows, cols, state = ctx.saved_tensors
    needs = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2],
             ctx.needs_input_grad[3]]
    dx, dw, db, dc = _autograd.backward_call(ctx, _fourierft_bwd, _backward_body, dy, x, weight, spectrum, rows, cols,
                                             state, ctx.scaling, ctx.backend, ctx.path, needs)
    grads = [g if need else None for g, need in zip((dx, dw, db, dc), needs)]
    return grads[0], grads[1], grads[2], grads[3], None, None, None, None, None, None


_fourierft_fwd.register_autograd(_backward, setup_context=_setup_context)
_FourierFTFunction = _autograd.function("_FourierFTFunction", _forward, _setup_context, _backward)


def _check(x, weight, bias, spectrum, indices, scaling):
    _autograd.check_tensors("fourierft_linear", weight=weight)
    if weight.dim() != 2:
        raise ValueError(f"fourierft_linear: weight must be 2-D (out_features, in_features), got {tuple(weight.shape)}")
    m, n = weight.shape
    _autograd.check_input("fourierft_linear", x, n)
    _check_spectrum("fourierft_linear", spectrum, indices, scaling)
    if bias is not None and bias.shape != (m,):
        raise ValueError(f"fourierft_linear: bias must have shape ({m},), got {tuple(bias.shape)}")
    device = x.device
    if (weight.device != device or spectrum.device != device or indices.device != device
            or (bias is not None and bias.device != device)):
        devices = {"x": device, "weight": weight.device, "spectrum": spectrum.device, "indices": indices.device,
                   "bias": None if bias is None else bias.device}
        raise RuntimeError(f"fourierft_linear: tensors on different devices: {devices}")


def _check_spectrum(name, spectrum, indices, scaling):
    if isinstance(scaling, torch.Tensor):
        if scaling.requires_grad:
            raise TypeError(f"{name}: scaling is a fixed hyper-parameter; gradients with respect to it are not "
                            "supported (pass a float)")
        real = scaling.dim() == 0 and not scaling.is_complex() and scaling.dtype != torch.bool
        scaling = scaling.item() if real else scaling
    if not is_real(scaling):
        raise ValueError(f"{name}: scaling must be a finite real number, got {scaling!r}")
    if not isinstance(spectrum, torch.Tensor) or spectrum.dim() != 1 or not spectrum.is_floating_point():
        raise ValueError(f"{name}: spectrum must be a 1-D floating-point tensor")
    if not isinstance(indices, torch.Tensor) or indices.dim() != 2 or indices.shape[0] != 2 \
            or indices.shape[1] != spectrum.numel():
        raise ValueError(f"{name}: indices must have shape (2, {spectrum.numel()}), "
                         f"got {tuple(getattr(indices, 'shape', ()))}")
    if indices.dtype != torch.int64:
        raise TypeError(f"{name}: indices must be int64, got {indices.dtype}")
    # No upper bound: positions may repeat (their coefficients add), as when several adapters are folded into one
    # call; a layer's own n_frequency is checked against out * in when the layer draws its positions.
    if spectrum.numel() == 0:
        raise ValueError(f"{name}: n_frequency must be at least 1, got an empty spectrum")


def _check_index_values(indices, m, n, name="fourierft_linear"):
    _autograd.check_index_values(indices, (m, n), f"{name}: indices out of range for a ({m}, {n}) spectrum")


def fourierft_linear(x, weight, bias, spectrum, indices, scaling, backend=None, path=None):
    """y = x (weight + dW)^T + bias for FourierFT coefficients ``spectrum`` at ``indices`` (2, n).

    ``backend`` and ``path`` override the automatic choice (see spectral_kernels.dispatch).
    """
    _check(x, weight, bias, spectrum, indices, scaling)
    _check_index_values(indices, *weight.shape)
    return _apply(x, weight, bias, spectrum, indices, scaling, backend, path)


def _apply(x, weight, bias, spectrum, indices, scaling, backend, path):
    dtype = _autograd.autocast_dtype(x)
    if dtype is not None:
        with torch.autocast(x.device.type, enabled=False):
            return _apply(x.to(dtype), weight.to(dtype), _autograd.cast(bias, dtype), spectrum, indices, scaling,
                          backend, path)
    if weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        raise TypeError(f"fourierft_linear: x ({x.dtype}), weight ({weight.dtype}) and bias "
                        f"({None if bias is None else bias.dtype}) must have the same dtype")
    backend = dispatch.select_backend(x.device, backend, "fourierft")
    (m, n), tokens = weight.shape, x.numel() // x.shape[-1]
    path = dispatch.fourierft_path(tokens, m, n, path)
    if backend == "reference":  # one algorithm, peft's: any valid path gives it
        return reference.fourierft_linear(x, weight, bias, spectrum, indices, scaling)
    keep = path == "token" and dispatch.holds(tokens <= dispatch.fourierft_chunk_tokens(x.device, m, n))
    args = (x, weight, bias, spectrum, indices[0], indices[1], float(scaling), backend, path, keep)
    needs_grad = _autograd.needs_grad(x, weight, spectrum, bias)
    y = _autograd.run(_fourierft_fwd, _FourierFTFunction, _forward, needs_grad, *args)[0]
    return y.reshape(*x.shape[:-1], m)


def fourierft_delta_weight(spectrum, indices, out_features, in_features, scaling, backend=None):
    """dW (out_features, in_features) in spectrum.dtype, as peft's get_delta_weight returns it: differentiable in
    the spectrum where autograd records (then by peft's torch.fft math: the kernels' build has no backward)."""
    name = "fourierft_delta_weight"
    if not (is_integer(out_features) and is_integer(in_features)) or out_features < 1 or in_features < 1:
        raise ValueError(f"{name}: out_features and in_features must be positive integers, got {out_features!r} x "
                         f"{in_features!r}")
    out_features, in_features = int(out_features), int(in_features)  # numpy integers too, for the kernels
    _check_spectrum(name, spectrum, indices, scaling)
    if indices.device != spectrum.device:
        raise RuntimeError(f"{name}: spectrum on {spectrum.device}, indices on {indices.device}")
    _check_index_values(indices, out_features, in_features, name)
    backend = dispatch.select_backend(spectrum.device, backend, "fourierft")
    if backend == "reference" or _autograd.needs_grad(spectrum) or _autograd.tracing():
        return reference.fourierft_delta_weight(spectrum, indices, out_features, in_features, scaling)
    coef = spectrum.to(_acc_dtype(spectrum.dtype))
    k = dispatch.kernels("fourierft", backend)
    return _delta_weight(k, coef, indices[0], indices[1], out_features, in_features, float(scaling),
                         None).to(spectrum.dtype)
