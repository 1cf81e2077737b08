"""The one place that decides which backend and which algorithm run.

Backends: ``reference`` (pure PyTorch, peft's algorithm), ``cpu`` and ``cuda`` (C++
kernels in csrc/), ``triton``. The choice per call is, in order: the ``backend``
argument, the ``SPECTRAL_KERNELS_BACKEND`` environment variable, then the fastest
available one for the tensors' device (a deterministic one under
torch.use_deterministic_algorithms, see NONDETERMINISTIC). Under torch.func
transforms (vmap, grad, jacrev, ...) and forward-mode AD (torch.autograd.forward_ad)
only ``reference`` runs: the kernels have no batching, functorch or forward-mode rules.
"""
import importlib
import os
import warnings

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true

from ._cache import transformed

# Imported here, not at the first call: a first call inside a traced region (torch.compile of an activation
# checkpoint) may not fill a module-level cache. It never fails: it records why the extension is unusable.
from .kernels import native

BACKENDS = ("reference", "cpu", "cuda", "triton")
ENV_BACKEND = "SPECTRAL_KERNELS_BACKEND"
ENV_FOURIERFT_PATH = "SPECTRAL_KERNELS_FOURIERFT_PATH"
FOURIERFT_PATHS = ("token", "weight")


_modules = {}


def _triton_error():
    try:
        import triton  # noqa: F401
    except ImportError as err:
        return f"triton not importable ({err})"
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        return "no CUDA device (set TRITON_INTERPRET=1 to run the Triton kernels on the CPU)"
    return None


def _unavailable_reason(name):
    if name == "reference":
        return None
    if name == "cpu":
        return native.IMPORT_ERROR
    if name == "cuda":
        if native.IMPORT_ERROR:
            return native.IMPORT_ERROR
        if not native.CUDA_BUILT:
            return "native extension built without CUDA (needs nvcc and a CUDA build of torch at build time)"
        if not torch.cuda.is_available():
            return "no CUDA device"
        return None
    return _triton_error()


def backends():
    """{name: None if available here, else the reason why not}."""
    return {name: _unavailable_reason(name) for name in BACKENDS}


def _serves(name, device):
    """Whether backend ``name`` runs tensors on ``device``."""
    if name == "cpu":
        return device.type == "cpu"
    if name == "cuda":
        return device.type == "cuda"
    if name == "triton":
        # The interpreter runs Triton kernels on CPU tensors.
        return device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")
    return True


# (method, backend) pairs whose kernels add floating-point numbers with atomics, so that their results vary from
# run to run in the last bits: FourierFT's spectrum scatter and mix on the GPU (csrc/cuda/fourierft.cu,
# kernels/triton/fourierft.py), and its coefficient gradient on cuda. The cpu backend's results depend only on the
# thread count, as torch's CPU ops do.
NONDETERMINISTIC = {("fourierft", "cuda"), ("fourierft", "triton")}


def _deterministic(method, name, requested):
    """Whether backend ``name`` may run ``method`` as torch.use_deterministic_algorithms asks; a backend that was
    requested and is not deterministic alerts as torch's own ops do (RuntimeError, or a warning with
    warn_only=True)."""
    if (method, name) not in NONDETERMINISTIC or not torch.are_deterministic_algorithms_enabled():
        return True
    if not requested:
        return False
    message = (f"{method} on the {name} backend does not have a deterministic implementation, but you set "
               "'torch.use_deterministic_algorithms(True)'; backend='reference' (which the automatic choice takes "
               "then) is deterministic")
    if not torch.is_deterministic_algorithms_warn_only_enabled():
        raise RuntimeError(message)
    warnings.warn(message, stacklevel=4)
    return True


def select_backend(device, requested=None, method=None):
    """Backend name for ``method``'s tensors on ``device``; raises if the requested one cannot run there.

    Under torch.use_deterministic_algorithms(True) the automatic choice passes over the
    backends whose kernels for ``method`` are not deterministic (NONDETERMINISTIC).
    """
    requested = requested or os.environ.get(ENV_BACKEND) or None
    if transformed():
        if requested not in (None, "reference"):
            raise RuntimeError(f"backend {requested!r} cannot run under torch.func transforms (vmap, grad, ...) or "
                               "forward-mode AD; backend='reference' can")
        return "reference"
    if requested is not None:
        if requested not in BACKENDS:
            raise ValueError(f"unknown backend {requested!r}; expected one of {BACKENDS}")
        reason = _unavailable_reason(requested)
        if reason is not None:
            raise RuntimeError(f"backend {requested!r} is not available: {reason}")
        if not _serves(requested, device):
            raise RuntimeError(f"backend {requested!r} cannot run tensors on {device}")
        _deterministic(method, requested, True)
        return requested
    # CUDA before Triton on a GPU. On the lent H100 machine a Triton launch costs the host several times what a
    # torch op's does (python -m bench.profile --python), and in a training step of many layers the host sets the
    # pace: ours over peft's step, OFT 1.16 and FRoD 0.92 with Triton for both
    # (bench/results/cuda-20261124-224634.json), 1.06 and 0.72 with CUDA (cuda-20261124-225045.json). Triton's
    # sparse mix is the faster on one large FRoD layer (4096 x 4096, T=8192, sparse_rate 0.02: 5.32x against
    # 6.42x the base layer in those two files).
    order = ("cpu",) if device.type == "cpu" else ("cuda", "triton")
    for name in order:
        if _unavailable_reason(name) is None and _serves(name, device) and _deterministic(method, name, False):
            return name
    return "reference"


def holds(condition):
    """``condition`` (on sizes, possibly symbolic) as a bool, for choosing between exact algorithms.

    Under torch.compile a symbolic condition is decided for the traced sizes and
    guarded, so each path gets its own graph. torch.export must give one program valid
    for every size in its dynamic ranges: there, a condition the ranges do not settle
    counts as False, which picks each op's path for few tokens (all paths are exact).
    The flag behind torch.compiler.is_exporting() is read because dynamo before torch 2.12 folds
    that call to True under torch.compile too; export sets the flag while dynamo traces.
    """
    if torch.compiler._is_exporting_flag:
        return statically_known_true(condition)
    return bool(condition)


def kernels(method, backend):
    """The module holding ``method``'s primitives for ``backend`` (not for ``reference``)."""
    package = "native" if backend in ("cpu", "cuda") else backend
    key = f"spectral_kernels.kernels.{package}.{method}"
    if key not in _modules:
        _modules[key] = importlib.import_module(key)
    return _modules[key]


# The token path costs a few length-d FFTs per token, the weight path one build of
# W + dW per call (ops/fourierft.py: _delta_weight), whose cost per element grows with
# the matrix: 1.7 ms at 1024 x 1024 on the 2-core CPU, 14 ms at 2048 x 2048, 128 ms at
# 4096 x 4096 (page faults of the fresh arrays take much of it). Measured there,
# forward + backward over the frozen base layer, token vs weight path, by
# r = tokens * (d_out + d_in) / (d_out * d_in):
#   512^2:         r = 0.5 1.91x vs 1.96x,  r = 1 1.76x vs 1.63x
#   768^2:         r = 1 1.46x vs 1.41x,    r = 1.33 1.44x vs 1.34x
#   1024^2:        r = 0.75 1.31x vs 1.34x, r = 1 1.32x vs 1.30x, r = 1.5 1.31x vs 1.23x
#   2048^2:        r = 0.5 1.14x vs 1.63x,  r = 1 1.13x vs 1.19x, r = 1.5 1.13x vs 1.14x
#   4096^2:        r = 1 1.10x vs 1.20x,    r = 1.5 1.11x vs 1.12x
#   4096 x 1024:   r = 1.25 1.16x vs 1.29x; 1024 x 4096: r = 1.25 1.17x vs 1.18x
# so the weight path is taken from r = 1 on for matrices of up to 1024 x 1024
# elements, from r = 1.5 on for larger ones.
FOURIERFT_WEIGHT_PATH_RATIO = {"small": 1.0, "large": 1.5}
FOURIERFT_SMALL_MATRIX = 1024 * 1024


def fourierft_path(tokens, out_features, in_features, requested=None):
    """'token' (per-token spectral path) or 'weight' (effective-weight GEMM path)."""
    requested = requested or os.environ.get(ENV_FOURIERFT_PATH) or None
    if requested is not None:
        if requested not in FOURIERFT_PATHS:
            raise ValueError(f"unknown FourierFT path {requested!r}; expected one of {FOURIERFT_PATHS}")
        return requested
    ratio = tokens * (out_features + in_features) / (out_features * in_features)
    size = "small" if out_features * in_features <= FOURIERFT_SMALL_MATRIX else "large"
    return "weight" if holds(ratio >= FOURIERFT_WEIGHT_PATH_RATIO[size]) else "token"


# The FourierFT weight path transforms the rows of the sparse spectrum directly, at
# n / 2 + 1 bins per coefficient, while that is cheaper than a real FFT of every row
# of the dense spectrum. Measured on the 2-core CPU, direct vs FFT: at 1024 x 1024
# 0.34 vs 0.64 ms for 1000 coefficients, 0.65 vs 0.65 for 3000, 1.76 vs 0.67 for
# 10000; at 4096 x 4096 41 vs 62 ms for 10000, 60 vs 62 for 30000.
FOURIERFT_DIRECT_COEFFICIENTS_PER_ROW = 3


def fourierft_direct_rows(coefficients, out_features):
    """Whether the FourierFT weight path transforms the spectrum's rows directly."""
    return coefficients <= FOURIERFT_DIRECT_COEFFICIENTS_PER_ROW * out_features


# FourierFT transforms tokens a chunk at a time (the backward's spectra of dy and x,
# the token path's forward) and uses each chunk's spectra at once, so those of a whole
# batch (2 x 8.4 MB at T=2048, 1024 x 1024 in float32; 2 x 268 MB at T=8192, 4096 x
# 4096) never exist together. The CPU chunk keeps a chunk's spectra in cache; smaller
# chunks pay MKL's per-call set-up. Measured on the 2-core CPU, forward + backward over the frozen base layer, chunks of 4 MB /
# 1 MB / the whole batch: 1.18x / 1.19x / 1.17x at 1024^2 T=2048, 1.23x / 1.26x / 1.33x
# at 768^2 T=2048, 1.14x / 1.14x / 1.16x at 4096^2 T=4096.
FOURIERFT_CHUNK_BYTES = {"cpu": 4 << 20, "cuda": 32 << 20}


def fourierft_chunk_tokens(device, out_features, in_features):
    """Tokens per FourierFT chunk: both complex64 spectra of a chunk in
    FOURIERFT_CHUNK_BYTES of ``device``'s type (the CPU's for other devices)."""
    per_token = 8 * (out_features // 2 + in_features // 2 + 2)
    budget = FOURIERFT_CHUNK_BYTES.get(device.type, FOURIERFT_CHUNK_BYTES["cpu"])
    return max(1, budget // per_token)


ENV_OFT_PATH = "SPECTRAL_KERNELS_OFT_PATH"
OFT_PATHS = ("token", "weight")
# Both OFT forward algorithms rotate rows of length d_in by b x b blocks: the token
# path the T rows of x, the weight path the d_out rows of W (after which the GEMM
# costs the same), so the weight path wins once T exceeds d_out. Measured on the
# 2-core CPU (float32, b=32, forward with autograd): weight/token time 1.11, 1.08,
# 1.00, 0.91 at T = 0.25, 0.5, 1, 2 x d_out for 1024 x 1024, and 1.00 at T = d_out
# for 4096 x 1024 and 1024 x 4096 as well.
OFT_WEIGHT_PATH_RATIO = 1.0


def oft_path(tokens, out_features, requested=None):
    """'token' (rotate x, then the GEMM) or 'weight' (rotate W into W_eff, then the GEMM)."""
    requested = requested or os.environ.get(ENV_OFT_PATH) or None
    if requested is not None:
        if requested not in OFT_PATHS:
            raise ValueError(f"unknown OFT path {requested!r}; expected one of {OFT_PATHS}")
        return requested
    return "weight" if holds(tokens >= OFT_WEIGHT_PATH_RATIO * out_features) else "token"


ENV_FROD_PATH = "SPECTRAL_KERNELS_FROD_PATH"
FROD_PATHS = ("factored", "weight")


def frod_path(tokens, out_features, in_features, needs_grad, requested=None):
    """'factored' (x V, the sparse mix, then U) or 'weight' (W' = U (diag + S) V^T, then one GEMM).

    Both are exact; this compares their multiply-adds (ops/frod.py): with gradients
    the weight path pays 2·m·n² to save T·n·(2n - m), so it wins once T > 2n for
    square layers; for a forward alone once T > n. A tie goes to the weight path:
    its sparse kernels run over n rows of V instead of T tokens (measured on the
    2-core CPU, T=2048, 1024 x 1024, forward+backward: 2.19x vs 2.25x the base layer).
    """
    requested = requested or os.environ.get(ENV_FROD_PATH) or None
    if requested is not None:
        if requested not in FROD_PATHS:
            raise ValueError(f"unknown FRoD path {requested!r}; expected one of {FROD_PATHS}")
        return requested
    t, m, n = tokens, out_features, in_features
    if needs_grad:
        factored, weight = 2 * t * n * (n + m), 2 * m * n * n + 3 * t * m * n
    else:
        factored, weight = t * n * (n + m), m * n * n + t * m * n
    return "weight" if holds(weight <= factored) else "factored"
