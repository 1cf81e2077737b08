"""How a fused op is entered: its torch custom op while tracing (torch.compile, export,
fake or proxy tensor modes: _cache.tracing), a plain autograd.Function in eager
autograd, its body alone in eager inference.

The custom ops (torch.library) are what torch.compile traces without graph breaks.
In eager mode their Python dispatch layers are pure overhead: about 0.1 ms per
forward + backward of a layer on the 2-core CPU (measured against an
autograd.Function with the same bodies), i.e. 2% of a training step of the bench's
small LLaMA. Both wrappers run the same forward, setup_context and backward
functions, so the two modes compute the same thing.
"""
import torch
from torch.autograd import forward_ad

from .._cache import TensorCache, tracing


def function(name, forward, setup_context, backward):
    """An autograd.Function class with the custom op's body, setup_context and backward; its contexts are
    marked so that ``backward_call`` runs the backward's body directly. Its forward takes the context
    and calls setup_context itself: with a separate setup_context, Function.apply binds the arguments
    through inspect.signature on every call: a FourierFT layer step (64 x 64, 4 tokens) took 583 us with
    it, 505 us without, on the 2-core CPU."""
    def forward_with_context(ctx, *inputs):
        output = forward(*inputs)
        setup_context(ctx, inputs, output)
        ctx.eager = True
        return output

    methods = {"forward": staticmethod(forward_with_context), "backward": staticmethod(backward)}
    return type(name, (torch.autograd.Function,), methods)


def autocast_dtype(x):
    """The dtype torch.autocast runs matmuls in on x's device, or None where it is off (or x is float64, which
    autocast leaves alone).

    Under autocast a fused op does what F.linear does there: x, the base weight and
    the bias go in that dtype, and so comes the result. The adapter's own parameters
    go in as they are (the kernels accumulate them in float32). The op then runs with
    autocast off, so every backend computes the same thing.
    """
    if not (isinstance(x, torch.Tensor) and x.is_floating_point()) or x.dtype == torch.float64:
        return None
    if not tracing() and not torch._C._is_any_autocast_enabled():  # the common case, at a tenth of the cost
        return None
    device = x.device.type
    # is_autocast_available guards is_autocast_enabled against device types autocast lacks; dynamo cannot trace
    # it (torch 2.11) and traces only tensors of the devices autocast has.
    if (tracing() or torch.amp.is_autocast_available(device)) and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return None


def cast(t, dtype):
    return None if t is None else t.to(dtype)


def check_values(ok, message):
    """Raise ValueError(message) unless the boolean tensor ``ok`` holds: read at once in eager mode (a device
    sync on GPU), an asynchronous assert in traced graphs, which cannot branch on tensor values."""
    if tracing():
        torch._assert_async(ok, message)
    elif not ok:
        raise ValueError(message)


_checked_indices = TensorCache()


def check_index_values(indices, bounds, message):
    """ValueError(message) unless every index of ``indices`` (one row per entry of ``bounds``) is in [0, bound).
    The outcome is kept per indices tensor until it is modified in place or replaced, so a layer's index
    buffers cost one check (a device sync on GPU) per change, e.g. after load_state_dict, not one per call.
    Meta tensors have no values to check."""
    if indices.is_meta:
        return

    def check():
        if indices.numel():
            ok = indices.min() >= 0
            for row, bound in zip(indices, bounds):
                ok = ok & (row.max() < bound)
            check_values(ok, message)
        return True

    _checked_indices.get(indices, tuple(bounds), check)


def check_input(name, x, in_features):
    """The checks every fused op makes of its input x: a floating-point tensor of ``in_features`` features."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"{name}: x must be a floating-point tensor, got {getattr(x, 'dtype', type(x))}")
    if x.dim() == 0:
        raise ValueError(f"{name}: x is 0-d; it must have shape (..., features)")
    if x.shape[-1] != in_features:
        raise ValueError(f"{name}: x has {x.shape[-1]} features, the layer expects in_features={in_features}")


def check_tensors(name, **tensors):
    """TypeError unless every keyword argument is a torch.Tensor."""
    for label, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: {label} must be a tensor, got {type(t).__name__}")


def needs_grad(*tensors):
    """Whether autograd records a call on ``tensors`` (None entries allowed)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def run(custom_op, eager_function, body, needs_grad, *args):
    """The forward op on ``args``: ``custom_op`` while tracing (torch.compile, export, fake or proxy modes),
    ``eager_function`` when autograd records (``needs_grad``), else ``body`` alone (eager inference: at T=1,
    4096 x 4096 on the CPU the wrappers' Python layers cost ~0.2 ms, a fifth of the GEMV, once the GEMV has pushed
    them out of the caches).

    The ops' outputs are (tokens, features) and their callers give them x's leading dimensions after this returns:
    a view made inside the autograd Function could not be modified in place (model code adds into a layer's
    output, e.g. Falcon's mlp_output += attention_output).
    """
    if tracing():
        return custom_op(*args)
    return eager_function.apply(*args) if needs_grad else body(*args)


def refuse_forward_mode(name):
    """Raise where forward-mode AD (torch.func.jvp, jacfwd, torch.autograd.forward_ad) reaches the custom op
    ``name`` itself, as in a torch.export program: custom ops have no forward-mode rule, and torch.func.jvp gives
    their outputs zero tangents. (Called as functions, the ops run the reference backend there.)"""
    if forward_ad._current_level >= 0:
        raise RuntimeError(f"{name}: the fused kernels have no forward-mode derivatives (torch.func.jvp, jacfwd, "
                           "forward_ad); trace with backend='reference' (SPECTRAL_KERNELS_BACKEND=reference) for them")


def batched(grad):
    """Whether ``grad`` is a batched tensor: autograd runs a backward under vmap for is_grads_batched=True (and
    torch.autograd.functional.jacobian(vectorize=True)). The kernels cannot read its storage."""
    return torch._C._functorch.is_legacy_batchedtensor(grad)


def backward_call(ctx, custom_op, body, *args):
    """A backward's inner op: its ``body`` under the eager autograd.Function, else ``custom_op`` (traced
    graphs, opcheck and torch.compile, must see the op; so must autograd when the backward itself is
    recorded, with create_graph=True, so that ``first_order`` can refuse to differentiate it; and vmap when
    the gradient ``args[0]`` is ``batched``, which runs a functional custom op on one row at a time)."""
    eager = getattr(ctx, "eager", False) and not torch.is_grad_enabled() and not batched(args[0])
    return body(*args) if eager else custom_op(*args)


def first_order(backward_op):
    """Give ``backward_op``, a custom op computing a fused op's gradients, an autograd formula that raises.

    The kernels' gradients are not differentiable themselves. Without a formula, torch
    only warns when a graph recorded with create_graph=True runs through the op, and
    second derivatives come out silently wrong; with it, differentiating them raises
    (recording them still works, as with torch's own once_differentiable).
    """
    def backward(ctx, *grads):
        raise _not_differentiable(backward_op._qualname)

    backward_op.register_autograd(backward)
    return backward_op


def _not_differentiable(name):
    return RuntimeError(f"{name}: the fused kernels' gradients are not differentiable (double backward, e.g. "
                        "create_graph=True); use backend='reference' for higher derivatives")


class _FirstOrderValue(torch.autograd.Function):
    @staticmethod
    def forward(ctx, name, value, *inputs):
        ctx.name = name
        return value.view_as(value)

    @staticmethod
    def backward(ctx, *grads):
        raise _not_differentiable(ctx.name)


def first_order_value(name, value, *inputs):
    """``value``, a gradient an eager autograd.Function's backward computed with the kernels from ``inputs``: where
    autograd records that backward (create_graph=True), tied to them by a node that raises when differentiated, as
    first_order's ops do. (once_differentiable would leave it unconnected to the saved tensors it depends on, whose
    second derivatives then came out as None.)"""
    return _FirstOrderValue.apply(name, value, *inputs) if torch.is_grad_enabled() else value
