"""Every Triton kernel launch compiles for the H100 (sm_90), on a machine without a GPU.

The CPU tests run the Triton kernels in Triton's interpreter, which checks nothing the
compiler checks (tl.dot's operand shapes and dtypes, block shapes, type promotion in
the lowering). Here the wrappers in spectral_kernels/kernels/triton are called for every
input dtype and block size they choose between, each kernel launch is recorded instead
of run, and the recorded signature is compiled ahead of time, with the launch's options,
down to a cubin with the ptxas that Triton ships, whose threads must not spill much to
local memory. Each module's check runs this file as a script in a process of
its own, without TRITON_INTERPRET: in interpreter mode triton.language's own jit helpers
are interpreted functions, which the compiler cannot lower.
"""
import json
import os
import re
import subprocess
import sys
import tempfile

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.backends.nvidia  # noqa: E402  (its bin/ holds the cuobjdump used below)
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from spectral_kernels.kernels.triton import fourierft, frod, oft  # noqa: E402

H100 = GPUTarget("cuda", 90, 32)
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
POINTERS = {torch.float32: "*fp32", torch.float64: "*fp64", torch.bfloat16: "*bf16", torch.float16: "*fp16",
            torch.int64: "*i64", torch.int32: "*i32"}


def _arg_type(value):
    """The Triton signature type of a launch argument, as the runtime derives it."""
    if isinstance(value, torch.Tensor):
        return POINTERS[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2 ** 31 <= value < 2 ** 31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"unexpected kernel argument {value!r}")


LAUNCH_OPTIONS = ("num_warps", "num_stages")


def record(module, calls):
    """Replace the @triton.jit kernels of ``module`` with recorders, run ``calls`` and return each distinct launch
    as {(kernel name, signature items, constexpr and option items as text): (kernel, signature, constexprs,
    options)}."""
    seen = {}

    def recorder(kernel):
        def launch(*args, **kwargs):
            bound = dict(zip(kernel.arg_names, args)) | kwargs
            signature = {p.name: "constexpr" if p.is_constexpr else _arg_type(bound[p.name]) for p in kernel.params}
            constexprs = {p.name: bound[p.name] for p in kernel.params if p.is_constexpr}
            options = {k: kwargs[k] for k in LAUNCH_OPTIONS if k in kwargs}
            key = (kernel.__name__, tuple(signature.items()),
                   tuple((k, str(v)) for k, v in (constexprs | options).items()))
            seen[key] = (kernel, signature, constexprs, options)

        class Grid:
            def __getitem__(self, grid):
                return launch

        return Grid()

    for name in jit_kernels(module):
        setattr(module, name, recorder(getattr(module, name)))
    calls()
    return seen


def jit_kernels(module):
    """Names of the module's @triton.jit kernels (JITFunction, or InterpretedFunction under TRITON_INTERPRET)."""
    return sorted(name for name, value in vars(module).items() if hasattr(value, "fn") and hasattr(value, "arg_names"))


# Local memory a thread of a launch may use: a kernel whose tiles do not fit its registers spills them there, which
# compiles and runs correctly, only many times slower (the OFT Neumann backward at b = 64 on four warps took 6480
# bytes).
MAX_STACK_BYTES = 512


def compile_all(seen):
    """Compile every recorded launch for the H100 with its launch options: [kernel, signature, constexprs and
    options, error] per failure, a launch whose threads spill more than MAX_STACK_BYTES to local memory included."""
    failures = []
    for (name, _, settings), (kernel, signature, values, options) in seen.items():
        try:
            compiled = triton.compile(ASTSource(kernel, signature, constexprs=values), target=H100, options=options)
        except Exception as error:  # noqa: BLE001 - reported whole below
            failures.append([name, signature, dict(settings), str(error).strip().splitlines()[-1]])
            continue
        stack = _stack_bytes(compiled.asm["cubin"])
        if stack > MAX_STACK_BYTES:
            failures.append([name, signature, dict(settings), f"{stack} bytes of local memory a thread (spilled "
                             "registers)"])
    return failures


def _stack_bytes(cubin):
    """The largest per-thread stack (local memory) of the kernels in ``cubin``, by the cuobjdump Triton ships."""
    tool = os.path.join(os.path.dirname(triton.backends.nvidia.__file__), "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        report = subprocess.run([tool, "-res-usage", file.name], capture_output=True, text=True, check=True).stdout
    return max(int(n) for n in re.findall(r"STACK:(\d+)", report))


def call_oft():
    for dtype in DTYPES:
        for b in (2, 32, 48):  # tiles of 16, 32 and 64 columns
            x = torch.randn(5, 2 * b).to(dtype)
            for rot_dtype in {torch.float32, dtype}:  # tensor cores when both are half precision
                for blocks in (1, 2):
                    rot = torch.randn(blocks, b, b).to(rot_dtype)
                    oft.rotate(x, rot, False)
                    oft.rotate(x, rot, True)
                    oft.rotate_backward(x.clone(), x, rot, True, True)
        for b in (2, 17, 32, 64):  # Neumann blocks of 16 to 64
            params = torch.randn(3, b * (b - 1) // 2).to(dtype)
            oft.neumann(params, b, [1.0, 2.0, 1.0])
            oft.neumann_backward(params, torch.randn(3, b, b).to(dtype), b, [1.0, 2.0, 1.0])


def call_frod():
    ptr, src, perm = torch.tensor([0, 2, 3, 3, 5]), torch.tensor([1, 0, 2, 3, 0]), torch.arange(5)
    coef = torch.randn(5)
    for dtype in DTYPES:
        for tokens in (1, 20, 40, 100, 300):  # token blocks of 16 to 256
            z = torch.randn(4, tokens).to(dtype)
            frod.mix(z, coef, ptr, src, perm)
            for need_dz in (True, False):
                frod.mix_backward(z, z, coef, ptr, src, perm, need_dz)


def call_fourierft():
    m, n = 6, 10
    rows, cols = torch.tensor([0, 1, 2, 3, 4]), torch.tensor([1, 2, 3, 4, 5])
    for acc in (torch.float32, torch.float64):  # spectra in float32, float64 for float64 inputs
        coef = torch.randn(5, dtype=acc)
        fourierft.spectrum_rows(coef, rows, cols, m, n, 0.5)
        ft = torch.randn(m, n // 2 + 1, dtype=acc.to_complex()).t()
        bases = [torch.float64] if acc == torch.float64 else [torch.float32, torch.bfloat16, torch.float16]
        for base in [None] + [torch.randn(m, n).to(dtype) for dtype in bases]:
            fourierft.real_mirror(ft, base, n)
        xf = torch.randn(3, n // 2 + 1, dtype=acc.to_complex())
        fourierft.mix(xf, coef, cols, rows, n, m, 0.5)
        yf = torch.randn(3, m // 2 + 1, dtype=acc.to_complex())
        fourierft.coef_grad(xf, yf, cols, rows, n, m, 0.5)


CASES = {"oft": (oft, call_oft), "frod": (frod, call_frod), "fourierft": (fourierft, call_fourierft)}


@pytest.mark.parametrize("name", CASES)
def test_kernels_compile_for_h100(name):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, __file__, name], env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["launched"] == jit_kernels(CASES[name][0])  # every kernel of the module, at least once
    assert report["failures"] == []


if __name__ == "__main__":
    module, calls = CASES[sys.argv[1]]
    launches = record(module, calls)
    print(json.dumps({"launched": sorted({name for name, _, _ in launches}), "failures": compile_all(launches)}))
