"""The CUDA kernels of csrc/cuda, run on the CPU through emulation.h, for machines without a GPU.

``build()`` compiles each csrc/cuda source as C++ after a few textual rewrites (the
CUDA headers give way to emulation.h, ``kernel<<<...>>>(args)`` to an emulated
launch, ``extern __shared__`` arrays to the launch's dynamic shared memory) and
registers its entry points as the CPU kernels of ops ``sk_emulated_cuda::*``, with
the schemas of ``spectral_kernels::*``. ``active()`` puts them in place of the
spectral_kernels CPU kernels, so that the ``cpu`` backend's Python code runs the
CUDA kernels (with the CUDA kernels' Neumann limits).

With SPECTRAL_KERNELS_EMULATION_REVERSE=1 blocks and threads run last first. With
SPECTRAL_KERNELS_EMULATION_ASAN=1 the kernels are built with AddressSanitizer, which
must then be loaded first, as .ci/run does (with both):
LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so.6)"
ASAN_OPTIONS=detect_leaks=0 python -m pytest tests --capture=sys -k "cuda_emulated or cuda_emulation"
"""
import contextlib
import os
import re
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
CSRC = HERE.parent.parent / "csrc"
NAMESPACE = "sk_emulated_cuda"

_LAUNCH = re.compile(r"([A-Za-z_]\w*(?:<[\w:, ]*>)?)<<<(.*?)>>>\(", re.S)
_EXTERN_SHARED = re.compile(r"extern __shared__[^;\[]*?(\w+)\[\];")
_CUDA_INCLUDE = re.compile(r"#include <(?:c10/cuda/\w+\.h|cuda_runtime\.h)>\n")
_REGISTRATION = "TORCH_LIBRARY_IMPL(spectral_kernels, CUDA, m)"
_IMPL = re.compile(r'm\.impl\("(\w+)"')


def rewrite(source):
    """The C++ that emulation.h compiles for the CUDA source text ``source``."""
    launches = source.count("<<<")
    source, n = _LAUNCH.subn(r"::sk_emu::launch(\2, [&](auto... sk_args) { \1(sk_args...); })(", source)
    assert n == launches, f"rewrote {n} of {launches} kernel launches"
    source = _EXTERN_SHARED.sub(r"unsigned char* \1 = ::sk_emu::dynamic_shared();", source)
    assert "extern __shared__" not in source
    source, n = _CUDA_INCLUDE.subn("", source)
    assert n > 0 and source.count(_REGISTRATION) == 1
    after_includes = source.index("\n", source.rindex("#include")) + 1  # after torch's CUDA_KERNEL_ASSERT
    source = source[:after_includes] + '#include "emulation.h"\n' + source[after_includes:]
    return source.replace(_REGISTRATION, f"TORCH_LIBRARY_IMPL({NAMESPACE}, CPU, m)")


_library = None  # the schemas of the emulated ops, once their kernels are loaded
_ops = []  # their names


def build(build_dir):
    """Compile the emulated CUDA kernels in ``build_dir`` and load them (once per process)."""
    global _library, _ops
    if _library is not None:
        return
    import spectral_kernels.kernels.native  # noqa: F401  (defines spectral_kernels' schemas)
    from torch.utils import cpp_extension

    build_dir = Path(build_dir)
    sources, ops = [str(HERE / "control.cpp")], []
    for cu in sorted((CSRC / "cuda").glob("*.cu")):
        path = build_dir / f"{cu.stem}.cpp"
        path.write_text(rewrite(cu.read_text()))
        sources.append(str(path))
        ops += _IMPL.findall(cu.read_text())
    assert ops, f"no CUDA kernels in {CSRC / 'cuda'}"
    library = torch.library.Library(NAMESPACE, "DEF")
    for name in ops:
        schema = str(getattr(torch.ops.spectral_kernels, name).default._schema)
        library.define(schema.split("::", 1)[1])
    sanitize = ["-fsanitize=address"] if os.environ.get("SPECTRAL_KERNELS_EMULATION_ASAN") == "1" else []
    cpp_extension.load(name="spectral_kernels_emulated_cuda", sources=sources, build_directory=str(build_dir),
                       extra_include_paths=[str(HERE), str(CSRC / "cuda")],
                       extra_cflags=["-std=c++20", "-O1", "-DSPECTRAL_KERNELS_WITH_CUDA", "-Wno-unknown-pragmas",
                                     *sanitize], extra_ldflags=sanitize, is_python_module=False, verbose=False)
    _library, _ops = library, ops


@contextlib.contextmanager
def active(reverse=None):
    """The emulated CUDA kernels serve spectral_kernels' ops on CPU tensors. Blocks and threads run last first with
    ``reverse``, by default where SPECTRAL_KERNELS_EMULATION_REVERSE=1."""
    if reverse is None:
        reverse = os.environ.get("SPECTRAL_KERNELS_EMULATION_REVERSE") == "1"
    from spectral_kernels.kernels.native import oft

    library = torch.library.Library("spectral_kernels", "IMPL")
    emulated = getattr(torch.ops, NAMESPACE)
    for name in _ops:
        library.impl(name, getattr(emulated, name).default, "CPU")
    limits = dict(oft._NEUMANN_LIMITS)
    oft._NEUMANN_LIMITS["cpu"] = limits["cuda"]
    emulated.set_reverse(reverse)
    try:
        yield
    finally:
        emulated.set_reverse(False)
        oft._NEUMANN_LIMITS.update(limits)
        library._destroy()
