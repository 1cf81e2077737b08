"""C++ kernels (csrc/cpu, csrc/cuda), reached through the torch dispatcher.

The op schemas are defined here, in Python, before the extension is loaded, so the
namespace exists even when `_C` could not be built; `_C` then only adds CPU and
(when compiled with CUDA) CUDA implementations. Torch picks CPU or CUDA by device.
"""
import ctypes
import importlib.util

import torch

_lib = torch.library.Library("spectral_kernels", "DEF")
_lib.define(
    "fourierft_spectrum_rows(Tensor coef, Tensor rows, Tensor cols, int m, int n, float scale) -> Tensor")
_lib.define("fourierft_real_mirror(Tensor ft, Tensor? base, int n) -> Tensor")
_lib.define(
    "fourierft_mix(Tensor xf, Tensor coef, Tensor gather_idx, Tensor scatter_idx, int n_in, int n_out, "
    "float scale) -> Tensor")
_lib.define(
    "fourierft_coef_grad(Tensor xf, Tensor yf, Tensor x_idx, Tensor y_idx, int n_x, int n_y, float scale) -> Tensor")
_lib.define("frod_mix(Tensor x, Tensor coef, Tensor ptr, Tensor src, Tensor perm) -> Tensor")
_lib.define("frod_mix_backward(Tensor g, Tensor z, Tensor coef, Tensor ptr, Tensor src, Tensor perm, bool need_dz) "
            "-> (Tensor, Tensor)")
_lib.define("oft_rotate(Tensor x, Tensor rot, bool transpose) -> Tensor")
_lib.define("oft_rotate_backward_(Tensor(a!) g, Tensor x, Tensor rot, bool need_dx, bool need_drot) -> Tensor")
_lib.define("oft_neumann(Tensor params, int b, float[] coef) -> Tensor")
_lib.define("oft_neumann_backward(Tensor params, Tensor grad, int b, float[] coef) -> Tensor")


def private_libstdcxx(path):
    """Whether the shared library at ``path`` carries a copy of its own of libstdc++'s stream code (some
    toolchains link libstdc++ statically, e.g. the g++ in /opt/gcc of the lent GPU machines' image). Its C++
    error messages then crash the process: formatting a number for a TORCH_CHECK message dies with SIGSEGV."""
    symbol = "_ZNSo9_M_insertIlEERSoT_"  # std::ostream::_M_insert<long>, exported by libstdc++.so
    try:
        own, shared = (ctypes.cast(getattr(ctypes.CDLL(lib), symbol), ctypes.c_void_p).value
                       for lib in (path, "libstdc++.so.6"))
    except (OSError, AttributeError):  # not a libstdc++ platform, or the symbol is not there to compare
        return False
    return own != shared


try:
    from spectral_kernels import _C  # noqa: F401  (registers the kernels)

    IMPORT_ERROR = None
    CUDA_BUILT = bool(_C.cuda_built)
    if private_libstdcxx(_C.__file__):
        IMPORT_ERROR = (f"native extension {_C.__file__} links its own copy of libstdc++, so its error messages "
                        "would crash the process; rebuild it with a compiler that links libstdc++ as a shared "
                        "library (e.g. CXX=/usr/bin/g++ CUDAHOSTCXX=/usr/bin/g++)")
except ImportError as err:  # extension not built: reference/Triton paths only
    # pip's default isolated build has no torch to compile against, so it installs the package without it.
    why = "not built" if importlib.util.find_spec("spectral_kernels._C") is None else f"not importable ({err})"
    IMPORT_ERROR = f"native extension {why}; build it against the installed torch: pip install --no-build-isolation"
    CUDA_BUILT = False
