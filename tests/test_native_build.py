"""The native extension's build: a copy of libstdc++ linked into it is detected (its error messages would crash the
process), and the extension built here has none."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import spectral_kernels as sk
from spectral_kernels.kernels import native

SOURCE = """#include <sstream>
#include <string>
extern "C" const char* format_long(long v) { static std::string s; std::ostringstream o; o << v; s = o.str();
                                             return s.c_str(); }
"""


@pytest.mark.skipif(shutil.which("g++") is None, reason="no g++")
def test_private_libstdcxx_is_detected(tmp_path):
    (tmp_path / "lib.cpp").write_text(SOURCE)
    libraries = {}
    for name, flags in (("static", ["-static-libstdc++"]), ("shared", [])):
        libraries[name] = tmp_path / f"lib{name}.so"
        subprocess.run(["g++", "-shared", "-fPIC", *flags, str(tmp_path / "lib.cpp"), "-o", str(libraries[name])],
                       check=True)
    assert native.private_libstdcxx(str(libraries["static"]))
    assert not native.private_libstdcxx(str(libraries["shared"]))
    assert not native.private_libstdcxx(str(tmp_path / "missing.so"))


def test_built_extension_shares_libstdcxx():
    _C = pytest.importorskip("spectral_kernels._C")  # built wherever the README's test command ran
    assert not native.private_libstdcxx(_C.__file__)
    assert sk.backends()["cpu"] is None



def test_missing_extension_is_named_not_built(tmp_path):
    """A copy of the package without its extension (as pip's isolated build installs it, having no torch to build
    against): backends() says it is not built (the import error it quoted named a circular import)."""
    shutil.copytree(Path(sk.__file__).parent, tmp_path / "spectral_kernels",
                    ignore=shutil.ignore_patterns("*.so", "*.pyd", "__pycache__"))
    result = subprocess.run([sys.executable, "-c", _IMPORT_THE_COPY], cwd=tmp_path, capture_output=True, text=True,
                            check=True)
    assert result.stdout.splitlines() == [str(tmp_path / "spectral_kernels" / "__init__.py"),
                                          "native extension not built; build it against the installed torch: "
                                          "pip install --no-build-isolation"], result.stdout


# (an editable install's finder would import the checkout's package)
_IMPORT_THE_COPY = """
import sys
sys.meta_path[:] = [finder for finder in sys.meta_path if not finder.__module__.startswith("__editable__")]
import spectral_kernels as sk
print(sk.__file__)
print(sk.backends()["cpu"])
"""
