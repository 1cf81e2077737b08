"""Render ``python -m bench`` results as markdown, optionally into README.md.

    python -m bench.report [results.json ...] [--readme README.md]

Without files: the newest cpu and the newest cuda results in bench/results. With
``--readme``, the text between ``<!-- bench:begin -->`` and ``<!-- bench:end -->`` is
replaced; a README without both markers is left alone.
"""
import argparse
import json
import sys
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
METRICS = ("fwd_bwd", "fwd", "eval_t1")


def number(value):
    """3 significant digits without exponents: 0.0123, 4.56, 789, 1880."""
    return f"{value:.3g}" if value < 100 else f"{value:.0f}"


def rows(run):
    """(method, metric, shape, tokens, unit, {impl: (value, ratio to base)}) per case, fwd_bwd first.

    On CUDA each fwd_bwd case is followed by its peak-memory row.
    """
    cases = sorted(run["cases"], key=lambda c: (c["method"], METRICS.index(c["metric"])))
    for case in cases:
        shape = f"{case['out_features']}x{case['in_features']}"
        impls = case["impls"]
        yield (case["method"], case["metric"], shape, case["tokens"], "ms",
               {name: (s["median_ms"], s["ratio"]) for name, s in impls.items()})
        if impls["base"].get("peak_mem_mib") is not None:
            yield (case["method"], "peak_mem", shape, case["tokens"], "MiB",
                   {name: (s["peak_mem_mib"], s["peak_mem_ratio"]) for name, s in impls.items()})


def impl_names(run):
    """The compared implementations (all but base), in first-seen order."""
    names = dict.fromkeys(name for case in run["cases"] for name in case["impls"])
    names.pop("base")
    return list(names)


def header(run):
    versions = ", ".join(f"{k} {v}" for k, v in run["versions"].items() if v)
    git = run["git"]
    commit = f"{git['commit'][:10]}{' (dirty)' if git['dirty'] else ''}" if git["commit"] else "unknown"
    available = ", ".join(name for name, reason in run["backends"].items() if reason is None)
    return (f"**{run['device']['kind']}**: {run['device']['name']}, {run['threads']} threads, {run['dtype']}  \n"
            f"{run['date']}, commit {commit}, backends available: {available}  \n{versions}")


def markdown(run):
    names = impl_names(run)
    lines = [header(run), "",
             "| method | metric | out x in | T | base | " + " | ".join(names) + " |",
             "|" + "---|" * (5 + len(names))]
    for method, metric, shape, tokens, unit, values in rows(run):
        cells = [f"{values[n][1]:.2f}x" if n in values else "-" for n in names]
        lines.append(f"| {method} | {metric} | {shape} | {tokens} | {number(values['base'][0])} {unit} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def newest():
    """The newest cpu and cuda results files (their names sort by date)."""
    files = [max(RESULTS.glob(f"{kind}-*.json"), default=None) for kind in ("cpu", "cuda")]
    return [f for f in files if f is not None]


def replace_between_markers(path, text):
    """Whether ``path`` had both markers (and now holds ``text`` between them)."""
    readme = Path(path)
    content = readme.read_text() if readme.exists() else ""
    begin, end = content.find(BEGIN), content.find(END)
    if begin < 0 or end < begin:
        return False
    readme.write_text(f"{content[:begin + len(BEGIN)]}\n{text}\n{content[end:]}")
    return True


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="*", type=Path, help="results JSON files (default: newest cpu and cuda)")
    parser.add_argument("--readme", type=Path, help="README to update between the bench markers")
    args = parser.parse_args(argv)
    files = args.files or newest()
    if not files:
        parser.error(f"no results files given and none in {RESULTS}")
    text = ("Ratios are median times (peak memory on CUDA) over the frozen base `nn.Linear` "
            "measured in the same run; lower is better.\n\n"
            + "\n\n".join(markdown(json.loads(f.read_text())) for f in files))
    print(text)
    if args.readme and not replace_between_markers(args.readme, text):
        print(f"{args.readme}: no '{BEGIN}' ... '{END}' markers, left unchanged", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
