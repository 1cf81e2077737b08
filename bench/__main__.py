"""Benchmark the FourierFT, OFT and FRoD layers against the frozen base linear they wrap, peft and LoRA;
then a training step of a small model with each.

Layer cases. Per method, shape (out x in) and token count T, every implementation (the
frozen base nn.Linear, ours, our reference backend, peft's layer, peft LoRA r=32) wraps
its own copy of the same base layer and is timed on the same input, whose gradient is
required as inside a network (with --backends, ours once per backend, here and in the
training step):
  fwd      forward in train mode with autograd on,
  fwd_bwd  forward + backward of a fixed random output gradient (grads cleared untimed),
  eval_t1  eval mode, no_grad, one token (once per shape),
  peak_mem peak CUDA memory of fwd_bwd above the inputs and parameters (CUDA only).
Each implementation is warmed up, then all are repeated round-robin, so drift hits
all alike, for about 1 s each (0.2 s with --quick; at least 3 repetitions); CUDA times
come from CUDA events. Reported: median, min and max, the median over the rounds of each
round's ratio to base, and the cores other processes kept busy meanwhile (other_load),
which skews CPU timings.

Output: a table on the terminal, <out>/<device>-<date>.json (device, versions, commit,
arguments, every raw timing) and PNG plots of the ratios next to it. python -m
bench.report renders results files as markdown (the README's performance section).
"""
import argparse
import itertools
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime
from importlib import metadata
from pathlib import Path

import torch
from torch import nn

import spectral_kernels

from . import frod_init, plots, report, timing, train
from .methods import METHODS, implementations, peft

ROOT = Path(__file__).resolve().parent.parent
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
FULL_TOKENS = {"cpu": (1, 64, 512, 2048), "cuda": (1, 64, 512, 2048, 8192)}
FULL_SHAPES = {"cpu": ((768, 768), (1024, 1024), (3072, 768), (2048, 2048), (4096, 4096)),
               "cuda": ((1024, 1024), (3072, 768), (768, 3072), (2048, 2048), (4096, 4096))}
# Quick runs: only each method's target cases, as ((out, in), tokens) pairs, and the eval_t1 shapes.
QUICK_CASES = {
    "cpu": {"fourierft": (((1024, 1024), 2048), ((4096, 4096), 64)),
            "oft": (((1024, 1024), 2048), ((2048, 2048), 512)),
            "frod": (((1024, 1024), 2048), ((2048, 2048), 512))},
    "cuda": dict.fromkeys(METHODS, (((4096, 4096), 64), ((4096, 4096), 8192))),
}
# At 4096x4096 FRoD's set-up (QR, inverse and eigh of the weight, solves for U) is the largest part of a quick
# run on two cores: the first thing to drop should a quick run exceed two minutes there.
QUICK_EVAL_SHAPES = {"cpu": ((4096, 4096),), "cuda": ((4096, 4096),)}
# Average cores busy with other processes during a case above which its CPU timings are flagged.
OTHER_LOAD_WARNING = 0.2
PARTS = ("layers", "train", "frod_init")
# (seconds of timed calls per implementation and case, most repetitions) by --quick
BUDGET = {True: (0.2, 100), False: (1.0, 500)}


def parse_args(argv):
    def csv(convert):
        return lambda text: [convert(item) for item in text.split(",") if item]

    def shape(text):
        out_features, in_features = text.lower().split("x")
        return int(out_features), int(in_features)

    parser = argparse.ArgumentParser(prog="python -m bench", description=f"{__doc__}\n{train.__doc__}",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="short run (about 2 minutes on 2 CPU cores): the target cases only (unless "
                             "--tokens/--shapes) and ~0.2 s per timing")
    parser.add_argument("--methods", type=csv(str), default=list(METHODS),
                        help=f"comma-separated methods, from {', '.join(METHODS)} (default: all)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", choices=DTYPES, help="default: float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--tokens", type=csv(int), help="token counts, e.g. 1,64,2048 (default: the device's sweep)")
    parser.add_argument("--shapes", type=csv(shape),
                        help="OUTxIN shapes, e.g. 1024x1024,1000x37 (default: the device's sweep)")
    parser.add_argument("--backends", type=csv(str),
                        help="time our layers once per listed backend, side by side in the same rounds (columns "
                             "ours-<backend>; e.g. cuda,triton on a GPU); default: the automatic choice (ours)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (default: 2)")
    parser.add_argument("--n-frequency", type=int, default=1000, help="FourierFT coefficients (default: 1000)")
    parser.add_argument("--oft-block-size", type=int, default=32, help="OFT block size (default: 32)")
    parser.add_argument("--frod-sparse-rates", type=csv(float), default=[0.01, 0.02],
                        help="FRoD's fractions of trainable off-diagonal entries: the first over the whole sweep "
                             "(and in the training step and set-up), the others over the --quick cases "
                             "(default: 0.01,0.02)")
    parser.add_argument("--parts", type=csv(str), default=list(PARTS),
                        help="what to run: layers (the layer cases), train (the training step; needs peft), "
                             "frod_init (FRoD's projection set-up against peft's, when frod is among the methods; "
                             "needs peft) (default: all)")
    parser.add_argument("--default-malloc", action="store_true",
                        help="leave glibc's malloc as it is (by default a CPU run makes it keep freed memory, "
                             "see bench/timing.py: keep_freed_memory)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="results directory")
    args = parser.parse_args(argv)
    for option, known in (("method", METHODS), ("part", PARTS)):
        unknown = set(getattr(args, f"{option}s")) - set(known)
        if unknown:
            parser.error(f"unknown {option}(s) {sorted(unknown)}; known: {', '.join(known)}")
    if peft is None and {"train", "frod_init"} & set(args.parts):
        parser.error("the training step and frod_init compare with peft, which is not installed; use --parts layers")
    args.device = torch.device(args.device)
    args.dtype = args.dtype or ("bfloat16" if args.device.type == "cuda" else "float32")
    for backend in args.backends or ():
        try:
            spectral_kernels.dispatch.select_backend(args.device, backend)
        except (RuntimeError, ValueError) as err:
            parser.error(str(err))
    return args


def variants(method, args):
    """(config fields, quick) of each run of ``method``'s layer cases: FRoD once per sparse rate, the rates after
    the first over the quick sweep (the target cases) only."""
    if method != "frod":
        return [({}, args.quick)]
    return [({"sparse_rate": rate}, args.quick or i > 0) for i, rate in enumerate(args.frod_sparse_rates)]


def sweep(method, args, quick):
    """{(out, in): [tokens, ...]} for fwd and fwd_bwd, and the shapes for eval_t1."""
    kind = args.device.type
    if quick and not (args.tokens or args.shapes):
        cases, eval_shapes = QUICK_CASES[kind][method], QUICK_EVAL_SHAPES[kind]
    else:
        eval_shapes = args.shapes or FULL_SHAPES[kind]
        cases = itertools.product(eval_shapes, args.tokens or FULL_TOKENS[kind])
    by_shape = {}
    for shape, tokens in cases:
        by_shape.setdefault(shape, []).append(tokens)
    for shape in eval_shapes:
        by_shape.setdefault(shape, [])
    return by_shape, eval_shapes


def bench_shape(method, fields, shape, token_counts, with_eval, args, cases, total):
    """Append the cases of one method (its config ``fields`` overriding the arguments') and shape to ``cases``;
    they share one set of implementations."""
    out_features, in_features = shape
    device, dtype, cuda = args.device, DTYPES[args.dtype], args.device.type == "cuda"
    budget, max_reps = BUDGET[args.quick]
    torch.manual_seed(0)
    base = nn.Linear(in_features, out_features, device=device, dtype=dtype).requires_grad_(False)
    impls = implementations(method, base, args, **fields)

    def measure(metric, tokens, calls):
        stats, elapsed, other_load = timing.measure(calls, budget, max_reps, cuda, "base")
        cases.append({"method": method, "config": fields, "metric": metric, "out_features": out_features,
                      "in_features": in_features, "tokens": tokens, "other_load": round(other_load, 2),
                      "impls": stats})
        ratios = "  ".join(f"{n} {s['ratio']:.2f}x" for n, s in stats.items() if n != "base")
        base_ms = report.number(stats["base"]["median_ms"])
        print(f"[{len(cases)}/{total}] {report.label(cases[-1])} {metric:7} {out_features}x{in_features} T={tokens}: "
              f"base {base_ms} ms  {ratios}  ({elapsed:.1f} s, other processes {other_load:.2f} cores)", flush=True)
        return stats

    for module in impls.values():
        module.train()
    for tokens in token_counts:
        x = torch.randn(tokens, in_features, device=device, dtype=dtype, requires_grad=True)
        grad_out = torch.randn(tokens, out_features, device=device, dtype=dtype)

        def clear(module, x=x):
            x.grad = None
            module.zero_grad(set_to_none=True)

        forward = {name: (lambda m=m, x=x: m(x), lambda: None) for name, m in impls.items()}
        measure("fwd", tokens, forward)
        backward = {name: (lambda m=m, x=x, g=grad_out: m(x).backward(g), lambda m=m: clear(m))
                    for name, m in impls.items()}
        stats = measure("fwd_bwd", tokens, backward)
        # After the timings, so that one-time costs (autotuning, caches) are not counted.
        peak = {name: timing.peak_mem_mib(*call, device) if cuda else None for name, call in backward.items()}
        for name, entry in stats.items():
            entry["peak_mem_mib"] = peak[name]
            entry["peak_mem_ratio"] = peak[name] / peak["base"] if cuda else None
    if with_eval:
        x = torch.randn(1, in_features, device=device, dtype=dtype)
        for module in impls.values():
            module.eval()
        with torch.no_grad():
            measure("eval_t1", 1, {name: (lambda m=m: m(x), lambda: None) for name, m in impls.items()})


def cpu_name():
    """Model name, family and model of the first CPU (VMs often report just "AMD EPYC"), and the CPU count."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    fields = {}
    for line in cpuinfo.read_text().split("\n\n")[0].splitlines():
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    return (f"{fields.get('model name', platform.machine())} (family {fields.get('cpu family', '?')}, "
            f"model {fields.get('model', '?')}), {os.cpu_count()} CPUs")


def environment(args):
    def version(package):
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return None

    def git(*command):
        result = subprocess.run(["git", "--no-optional-locks", *command], cwd=ROOT, capture_output=True, text=True)
        return result.stdout.strip() if result.returncode == 0 else None

    if args.device.type == "cuda":
        name = torch.cuda.get_device_name(args.device)
    else:
        name = cpu_name()
    if os.environ.get("SPECTRAL_KERNELS_COMMIT"):
        # A copy of a checkout whose .git may be older than its files (bench/gpu.sh on a lent machine): the
        # sender names the commit and whether its tree was clean, as "<sha>" or "<sha>-dirty".
        commit, _, state = os.environ["SPECTRAL_KERNELS_COMMIT"].partition("-")
        dirty = state == "dirty"
    else:
        commit = git("rev-parse", "HEAD")
        # Untracked files count (uncommitted new code is dirty), earlier results do not.
        dirty = bool(git("status", "--porcelain", "--", ".", ":(exclude)bench/results")) if commit else None
    return {
        "device": {"kind": args.device.type, "name": name},
        "threads": torch.get_num_threads(),
        "dtype": args.dtype,
        "versions": {"python": platform.python_version(),
                     **{p: version(p) for p in ("torch", "peft", "triton", "transformers")}},
        "backends": spectral_kernels.backends(),
        # What "ours" runs on: the automatic choice for the device, or SPECTRAL_KERNELS_BACKEND's; with --backends
        # the listed ones, as ours-<backend>.
        "ours_backend": args.backends or spectral_kernels.dispatch.select_backend(args.device),
        "git": {"commit": commit, "dirty": dirty},
        "date": datetime.now().astimezone().isoformat(timespec="seconds"),
        "args": {"argv": sys.argv[1:], **vars(args)},
    }


def print_table(run):
    if run["cases"]:
        print(report.aligned(*report.layer_table(run, with_values=True)))
        if run["device"]["kind"] != "cuda":
            print("peak_mem: n/a on CPU")
    if "train" in run:
        print(f"\n{report.train_title(run)}:\n{report.aligned(*report.train_table(run))}")
    if "frod_init" in run:
        print(f"\n{report.frod_init_text(run)}")


def main(argv=None):
    started = time.perf_counter()
    args = parse_args(argv)
    malloc = None
    if args.device.type == "cpu":
        torch.set_num_threads(args.threads)
        malloc = None if args.default_malloc else timing.keep_freed_memory()
    run = environment(args)
    run["malloc"] = malloc
    sweeps = [(method, fields, *sweep(method, args, quick)) for method in args.methods
              for fields, quick in variants(method, args)]
    total = sum(2 * sum(map(len, by_shape.values())) + len(eval_shapes) for _, _, by_shape, eval_shapes in sweeps)
    print(f"{run['device']['name']}, {run['threads']} threads, {args.dtype}; "
          f"{total if 'layers' in args.parts else 0} layer cases{', training step' * ('train' in args.parts)}",
          flush=True)

    run["cases"] = []
    for method, fields, by_shape, eval_shapes in sweeps:
        for shape, token_counts in by_shape.items() if "layers" in args.parts else ():
            bench_shape(method, fields, shape, token_counts, shape in eval_shapes, args, run["cases"], total)
            if args.device.type == "cuda":
                torch.cuda.empty_cache()  # the next shape's copies should not inherit this one's cache
    if "train" in args.parts:
        run["train"] = train.bench_training(args, *BUDGET[args.quick])
    if "frod_init" in args.parts and "frod" in args.methods:
        run["frod_init"] = frod_init.bench_frod_init(args)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"{args.device.type}-{datetime.fromisoformat(run['date']):%Y%m%d-%H%M%S}"
    run["seconds"] = round(time.perf_counter() - started)
    stem.with_suffix(".json").write_text(json.dumps(run, indent=1, default=str))
    print()
    print_table(run)
    timed = run["cases"] + [run[part] for part in ("train", "frod_init") if part in run]
    disturbed = [c for c in timed if c["other_load"] > OTHER_LOAD_WARNING]
    if args.device.type == "cpu" and disturbed:
        print(f"warning: other processes used over {OTHER_LOAD_WARNING} cores during {len(disturbed)} of "
              f"{len(timed)} timings (other_load in the JSON); their CPU timings are unreliable")
    print(f"\nwrote {stem.with_suffix('.json')} after {run['seconds']} s")
    for path in plots.plot(run, stem):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
