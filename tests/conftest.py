"""Shared test helpers: the backends runnable here, the per-dtype tolerance rule, a selective checkpointing policy."""
import functools
import os
import platform

import pytest
import torch
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

# The Triton kernels run on the CPU through the interpreter when there is no GPU;
# the flag must be set before triton decorates the kernels.
if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import spectral_kernels  # noqa: E402

# fp32/fp64: absolute error bound relative to the largest reference magnitude.
TOL = {torch.float64: 1e-10, torch.float32: 2e-5}
# bf16/fp16 (FlashAttention's rule): the error against the float64 result is at most
# twice the error of the PyTorch reference run in the same dtype, plus this floor
# relative to the largest magnitude.
LOW_PRECISION_FLOOR = {torch.bfloat16: 1e-2, torch.float16: 2e-3}


def device_backends():
    """(device, backend) pairs to test; those not available here are skipped with the reason. Without a GPU, the
    CUDA kernels run emulated on the CPU (tests/cuda_emulation) as the kernels of the ``cpu`` backend: pair
    ("cpu", "cpu") with id "cuda_emulated-cpu"."""
    available = spectral_kernels.backends()
    cuda = torch.cuda.is_available()
    pairs = [("cpu", "cpu"), ("cuda", "cuda"), ("cuda", "triton")]
    if os.environ.get("TRITON_INTERPRET") == "1":
        pairs.append(("cpu", "triton"))
    params = []
    for device, backend in pairs:
        reason = available[backend] or (None if device == "cpu" or cuda else "no CUDA device")
        marks = [pytest.mark.skip(reason=reason)] if reason else []
        params.append(pytest.param(device, backend, marks=marks, id=f"{backend}-{device}"))
    if not cuda:
        reason = cuda_emulation_unavailable()
        marks = [pytest.mark.cuda_emulated] + ([pytest.mark.skip(reason=reason)] if reason else [])
        params.append(pytest.param("cpu", "cpu", marks=marks, id="cuda_emulated-cpu"))
    return params


@functools.cache
def cuda_emulation_unavailable():
    """Why the CUDA emulation (tests/cuda_emulation) cannot run here, or None."""
    from torch.utils import cpp_extension

    if torch.cuda.is_available():
        return "a CUDA device runs the CUDA kernels themselves"
    if spectral_kernels.backends()["cpu"]:
        return spectral_kernels.backends()["cpu"]
    if platform.machine() != "x86_64":
        return "the CUDA emulation switches threads in x86-64 assembly"
    if not cpp_extension.is_ninja_available():
        return "ninja, which torch.utils.cpp_extension builds the CUDA emulation with, is not on PATH"
    from cuda_emulation import CSRC
    if not any((CSRC / "cuda").glob("*.cu")):
        return f"the CUDA sources are not here ({CSRC / 'cuda'}): the tests run outside the source tree"
    return None


def native_device_backends():
    """The (device, backend) pairs of the C++ kernels: ("cpu", "cpu"), ("cuda", "cuda") and, without a GPU, the
    emulated CUDA kernels ("cuda_emulated-cpu")."""
    return [p for p in device_backends() if p.id in ("cpu-cpu", "cuda-cuda", "cuda_emulated-cpu")]


@pytest.fixture(scope="session")
def cuda_emulation(tmp_path_factory):
    """The module tests/cuda_emulation, its kernels built and loaded."""
    import cuda_emulation as emulation

    emulation.build(tmp_path_factory.mktemp("cuda_emulation"))
    return emulation


@pytest.fixture
def kernel_device(request, device):
    """The device whose C++ kernels a test of ``device`` runs: "cuda" where they are the emulated CUDA kernels."""
    return "cuda" if request.node.get_closest_marker("cuda_emulated") else device


@pytest.fixture(autouse=True)
def _emulated_cuda_kernels(request):
    """Tests of the "cuda_emulated-cpu" pair run with the emulated CUDA kernels in place of the CPU ones."""
    if request.node.get_closest_marker("cuda_emulated") is None:
        yield
        return
    with request.getfixturevalue("cuda_emulation").active():
        yield


# What selective activation checkpointing keeps instead of recomputing in the tests: GEMMs and max (torchtitan's op
# list, in part), each in every variant (out= too), as policies matching on the op's overload packet keep them
# (torch's default op list).
_SAC_KEPT = {torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.max}


def _keep_gemms(ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if op.overloadpacket in _SAC_KEPT else CheckpointPolicy.PREFER_RECOMPUTE


def selective_checkpointing():
    """The context_fn of torch.utils.checkpoint for selective activation checkpointing that keeps GEMMs."""
    return create_selective_checkpoint_contexts(_keep_gemms)


def assert_raises_all(cases):
    """Each (message pattern, call) of ``cases`` raises a RuntimeError matching its pattern."""
    for match, call in cases:
        with pytest.raises(RuntimeError, match=match):
            call()


def assert_close(actual, expected, dtype, tol=None):
    """fp32/fp64: |actual - expected| <= tol * max|expected| (expected in the same dtype; tol TOL[dtype] unless
    given; an all-zero expected takes the bound tol)."""
    tol = TOL[dtype] if tol is None else tol
    scale = expected.abs().max().item() or 1.0
    err = (actual.double() - expected.double()).abs().max().item()
    assert err <= tol * scale, f"max error {err:.3g} > {tol * scale:.3g}"


def assert_compiled_matches_eager(layer, x):
    """torch.compile of ``layer`` (it traces the ops' custom ops) and eager autograd (their autograd.Functions)
    give the same output and the same gradients for x and every trainable parameter (None for both where a
    parameter is unused, as FRoD's base weight); in eval mode without autograd, the same output."""
    torch._dynamo.reset()  # each case compiles afresh: the layers' forward would hit the recompile limit
    params = [p for p in layer.parameters() if p.requires_grad]
    results = []
    for module in (layer, torch.compile(layer, fullgraph=True, backend="aot_eager")):
        xi = x.detach().clone().requires_grad_()
        y = module(xi)
        results.append((y, torch.autograd.grad(y.square().sum(), [xi, *params], allow_unused=True)))
    (y_eager, grads_eager), (y_compiled, grads_compiled) = results
    assert_close(y_compiled, y_eager, torch.float32)
    assert grads_eager[0] is not None and any(g is not None for g in grads_eager[1:])
    for compiled, eager in zip(grads_compiled, grads_eager):
        assert (compiled is None) == (eager is None)
        if eager is not None:
            assert_close(compiled, eager, torch.float32)
    # Eval mode without autograd: eager runs the cached effective weight, the traced graph the fused op.
    was_training = layer.training
    layer.eval()
    with torch.no_grad():
        assert_close(torch.compile(layer, fullgraph=True, backend="aot_eager")(x), layer(x), torch.float32)
    layer.train(was_training)


def assert_low_precision_close(actual, reference_lowp, exact):
    """FlashAttention's rule for bf16/fp16 against an exact (float64) result."""
    scale = exact.abs().max().item()
    ours = (actual.double() - exact).abs().max().item()
    ref = (reference_lowp.double() - exact).abs().max().item()
    bound = 2 * ref + LOW_PRECISION_FLOOR[actual.dtype] * scale
    assert ours <= bound, f"error {ours:.3g} > 2 x reference error {ref:.3g} + floor"
