"""Where the time of a layer goes on a GPU: every backend and path of each method at one case, timed side by side
with the frozen base layer, then each under torch.profiler (its kernels by device and by host time) and, with
--python, cProfile (the host's Python functions).

    python -m bench.profile [--methods oft] [--shape 4096x4096] [--tokens 8192] [--backends triton] [--python]

For reading only (the figures to quote come from python -m bench and its results file).
"""
import argparse
import cProfile
import os
import pstats
from contextlib import contextmanager

import torch
from torch.profiler import ProfilerActivity, profile

from spectral_kernels import dispatch

from . import timing
from .__main__ import DTYPES
from .methods import METHODS, implementations

PATH_ENV = {"fourierft": (dispatch.ENV_FOURIERFT_PATH, dispatch.FOURIERFT_PATHS),
            "oft": (dispatch.ENV_OFT_PATH, dispatch.OFT_PATHS),
            "frod": (dispatch.ENV_FROD_PATH, dispatch.FROD_PATHS)}


@contextmanager
def environment(**values):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k)
            else:
                os.environ[k] = v


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--shape", default="4096x4096")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    parser.add_argument("--backends", default="cuda,triton")
    parser.add_argument("--top", type=int, default=14)
    parser.add_argument("--python", action="store_true",
                        help="also the host's Python time per function (cProfile over 20 steps, by own time)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device (the CPU's costs are in python -m bench)")
    out_features, in_features = map(int, args.shape.split("x"))
    dtype, device = DTYPES[args.dtype], torch.device("cuda")
    bench_args = argparse.Namespace(n_frequency=1000, oft_block_size=32, frod_sparse_rates=[0.01])
    for method in args.methods.split(","):
        torch.manual_seed(0)
        base = torch.nn.Linear(in_features, out_features, device=device, dtype=dtype).requires_grad_(False)
        impls = implementations(method, base, bench_args)
        x = torch.randn(args.tokens, in_features, device=device, dtype=dtype, requires_grad=True)
        dy = torch.randn(args.tokens, out_features, device=device, dtype=dtype)
        path_env, paths = PATH_ENV[method]
        variants = {"base": (impls["base"], {}), "peft": (impls.get("peft"), {})}
        for backend in args.backends.split(","):
            for path in paths:
                variants[f"{backend}/{path}"] = (impls["ours"], {dispatch.ENV_BACKEND: backend, path_env: path})
        variants = {name: v for name, v in variants.items() if v[0] is not None}

        def step(module, env):
            with environment(**env):
                module(x).backward(dy)

        def clear():
            for module, _ in variants.values():
                module.zero_grad(set_to_none=True)
            x.grad = None

        calls = {name: (lambda m=m, e=e: step(m, e), clear) for name, (m, e) in variants.items()}
        times = timing.interleaved(calls, 0.3, 200, True)
        base_ms = sorted(t for t, _ in times["base"])[len(times["base"]) // 2]
        print(f"\n=== {method} {args.shape} T={args.tokens} {args.dtype} fwd_bwd: median ms (ratio to base)")
        for name, ts in times.items():
            ms = sorted(t for t, _ in ts)[len(ts) // 2]
            print(f"  {name:18s} {ms:8.3f} ms  {ms / base_ms:5.2f}x")
        for name, (module, env) in variants.items():
            if name == "base":
                continue
            clear()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(3):
                    step(module, env)
                torch.cuda.synchronize()
            if args.python:
                with cProfile.Profile() as host:
                    for _ in range(20):
                        step(module, env)
                    torch.cuda.synchronize()
                print(f"\n--- {method} {name}: host Python over 20 steps")
                pstats.Stats(host).sort_stats("tottime").print_stats(args.top)
            averages = prof.key_averages()
            for sort in ("self_device_time_total", "self_cpu_time_total"):
                print(f"\n--- {method} {name}: over 3 steps, by {sort}")
                print(averages.table(sort_by=sort, row_limit=args.top, max_name_column_width=60))


if __name__ == "__main__":
    main()
