"""The native extension's build: a copy of libstdc++ linked into it is detected (its error messages would crash the
process), and the extension built here has none."""
import shutil
import subprocess

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
