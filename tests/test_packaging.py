"""What the package ships and declares: the sdist holds every source of the native build and the tests' shared
modules, and install_requires names what the package imports (no more: peft, triton and transformers are optional)."""
import ast
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
OPTIONAL = {"peft", "triton", "transformers"}  # imported only where present (spectral_kernels.peft needs peft)
pytestmark = pytest.mark.skipif(not (ROOT / "setup.py").exists(), reason="the tests run outside the source tree")


def test_sdist_holds_the_build_and_test_sources(tmp_path):
    pytest.importorskip("setuptools")
    # From a copy without the checkout's egg-info, whose file list setuptools would ship as well.
    source = shutil.copytree(ROOT, tmp_path / "source", ignore=shutil.ignore_patterns(
        ".*", "build", "*.egg-info", "*.so", "__pycache__", "results"))
    build = "import sys; from setuptools import build_meta; print(build_meta.build_sdist(sys.argv[1]))"
    name = subprocess.run([sys.executable, "-c", build, str(tmp_path)], cwd=source, check=True, capture_output=True,
                          text=True).stdout.split()[-1]
    with tarfile.open(tmp_path / name) as sdist:
        shipped = {Path(*Path(member).parts[1:]) for member in sdist.getnames()}
    needed = {Path("CMakeLists.txt"), Path("setup.py"), Path("tests/conftest.py")}
    needed |= {path.relative_to(ROOT) for pattern in ("csrc/**/*", "spectral_kernels/**/*.py", "tests/cuda_emulation/*")
               for path in ROOT.glob(pattern) if path.is_file()}
    assert needed <= shipped, sorted(map(str, needed - shipped))


def _install_requires():
    setup = ast.parse((ROOT / "setup.py").read_text())
    for node in ast.walk(setup):
        if isinstance(node, ast.keyword) and node.arg == "install_requires":
            return {re.match(r"[\w.-]+", requirement)[0] for requirement in ast.literal_eval(node.value)}
    raise AssertionError("setup.py has no install_requires")


def test_install_requires_names_the_imported_packages():
    imported = set()
    for path in (ROOT / "spectral_kernels").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                imported.add(node.module.split(".")[0])
    third_party = imported - set(sys.stdlib_module_names) - {"spectral_kernels"}
    assert third_party - OPTIONAL == _install_requires()
