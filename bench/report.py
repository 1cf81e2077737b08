"""Render ``python -m bench`` results as markdown, optionally into README.md.

    python -m bench.report [results.json ...] [--readme [README.md]]

Without files: the newest cpu and the newest cuda results committed (tracked by git)
in bench/results, so that the README states only numbers anyone can look up. With
``--readme``, the text between ``<!-- bench:begin -->`` and ``<!-- bench:end -->`` is
replaced; a README without both markers is left alone. Publishing a run:

    python -m bench                                   # on a quiet machine, per device
    git add bench/results/<device>-<date>*            # its JSON and plots
    python -m bench.report --readme && git add README.md
"""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
METRICS = ("fwd_bwd", "fwd", "eval_t1")


def number(value):
    """3 significant digits without exponents: 0.0123, 4.56, 789, 1880."""
    return f"{value:.3g}" if value < 100 else f"{value:.0f}"


def label(case):
    """The method of a layer case and the config fields it ran with, e.g. ``frod (sparse_rate 0.02)``."""
    fields = case.get("config") or {}
    return case["method"] + (f" ({', '.join(f'{k} {v}' for k, v in fields.items())})" if fields else "")


def rows(run):
    """(method label, metric, shape, tokens, unit, {impl: (value, ratio to base)}) per case, fwd_bwd first.

    On CUDA each fwd_bwd case is followed by its peak-memory row.
    """
    cases = sorted(run["cases"], key=lambda c: (c["method"], label(c), METRICS.index(c["metric"])))
    for case in cases:
        shape = f"{case['out_features']}x{case['in_features']}"
        impls = case["impls"]
        yield (label(case), case["metric"], shape, case["tokens"], "ms",
               {name: (s["median_ms"], s["ratio"]) for name, s in impls.items()})
        if impls["base"].get("peak_mem_mib") is not None:
            yield (label(case), "peak_mem", shape, case["tokens"], "MiB",
                   {name: (s["peak_mem_mib"], s["peak_mem_ratio"]) for name, s in impls.items()})


def impl_names(run):
    """The compared implementations of the layer cases (all but base), in first-seen order."""
    names = dict.fromkeys(name for case in run["cases"] for name in case["impls"])
    names.pop("base", None)
    return list(names)


def header(run, source):
    versions = ", ".join(f"{k} {v}" for k, v in run["versions"].items() if v)
    git = run["git"]
    commit = f"{git['commit'][:10]}{' (dirty)' if git['dirty'] else ''}" if git["commit"] else "unknown"
    available = ", ".join(name for name, reason in run["backends"].items() if reason is None)
    if "ours_backend" in run:  # not in older results files; one per method in cuda-20261124-224634.json
        ours = run["ours_backend"]
        if isinstance(ours, dict):
            ours = ", ".join(f"{m} {b}" for m, b in ours.items())
        elif isinstance(ours, list):  # --backends: ours-<backend> per backend
            ours = ", ".join(ours) + " side by side"
        available += f" (ours on {ours})"
    timings = run["cases"] + [run[part] for part in ("train", "frod_init") if part in run]
    busy = max(t["other_load"] for t in timings) if timings and run["device"]["kind"] == "cpu" else None
    return (f"**{run['device']['kind']}**: {run['device']['name']}, {run['threads']} threads, {run['dtype']}  \n"
            f"{run['date']}, commit {commit}, backends available: {available}  \n{versions}  \n"
            f"`python -m bench {' '.join(run['args']['argv'])}`".rstrip() + f" → `{source}`"
            + ("" if busy is None else f"; other processes kept up to {busy:.2f} cores busy during a timing")
            + ("; glibc malloc kept freed memory" if run.get("malloc") else ""))


def layer_table(run, with_values):
    """(header, rows) of the layer cases: base's median, then each implementation's ratio to it,
    after its own median ``with_values``."""
    names = impl_names(run)
    table = []
    for method, metric, shape, tokens, unit, values in rows(run):
        def cell(name):
            if name not in values:
                return "-"
            value, ratio = values[name]
            return f"{number(value)} {unit} {ratio:.2f}x" if with_values else f"{ratio:.2f}x"

        table.append([method, metric, shape, str(tokens), f"{number(values['base'][0])} {unit}", *map(cell, names)])
    return ["method", "metric", "out x in", "T", "base", *names], table


def train_title(run):
    model = run["train"]["model"]
    return (f"Training step of a LLaMA-style model ({model['num_hidden_layers']} layers, hidden "
            f"{model['hidden_size']}, {model['num_attention_heads']} heads, {model['num_key_value_heads']} KV heads, "
            f"vocab {model['vocab_size']}; batch {model['sequences']}x{model['tokens_per_sequence']} tokens) "
            f"with {'/'.join(t.split('_')[0] for t in model['targets'])} adapted: median ms per step, "
            f"ratio to LoRA r=32" + (", peak memory" if run["device"]["kind"] == "cuda" else ""))


def train_table(run):
    """(header, rows) of the training steps, one row per method."""
    def cell(stats):
        text = f"{number(stats['median_ms'])} ms {stats['ratio']:.2f}x"
        return text if stats["peak_mem_mib"] is None else f"{text}, {number(stats['peak_mem_mib'])} MiB"

    names = list(dict.fromkeys(name for case in run["train"]["cases"] for name in case["impls"]))
    return ["method", *names], [[case["method"], *(cell(case["impls"][n]) for n in names)]
                                for case in run["train"]["cases"]]


def frod_init_text(run):
    entry = run["frod_init"]
    ours, peft = entry["impls"]["ours"], entry["impls"]["peft"]
    return (f"FRoD set-up of {entry['blocks']} blocks x {len(entry['categories'])} categories at "
            f"{entry['width']}x{entry['width']} (projections, U and lambda of every layer): ours "
            f"{ours['median_ms'] / 1e3:.1f} s, peft {peft['median_ms'] / 1e3:.1f} s, {ours['ratio']:.2f}x peft's time "
            f"(median of {ours['reps']}).")


def aligned(head, table):
    """A table for the terminal."""
    table = [head, *table]
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in table)


def pipes(head, table):
    """A markdown table."""
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in table])


def markdown(run, source):
    parts = [header(run, source)]
    if run["cases"]:
        parts.append(pipes(*layer_table(run, with_values=False)))
    if "train" in run:
        parts += [train_title(run) + ":", pipes(*train_table(run))]
    if "frod_init" in run:
        parts.append(frod_init_text(run))
    return "\n\n".join(parts)


def committed(pattern):
    """The files in bench/results matching ``pattern`` that git tracks, sorted by name (for results: by date)."""
    listed = subprocess.run(["git", "--no-optional-locks", "ls-files", "--", f"bench/results/{pattern}"],
                            cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    return sorted(ROOT / name for name in listed)


def newest():
    """The newest committed cpu and cuda results files."""
    return [files[-1] for files in (committed(f"{kind}-*.json") for kind in ("cpu", "cuda")) if files]


def plots(path, relative_to):
    """The committed plots written with the results file ``path``: fwd_bwd and train shown, the others linked."""
    stem = Path(path).stem
    shown, linked = [], []
    for plot in committed(f"{stem}-*.png"):
        name, target = plot.stem[len(stem) + 1:], os.path.relpath(plot, relative_to)
        (shown if name.endswith(("fwd_bwd", "train")) else linked).append(f"[{name}]({target})")
    return "\n".join(["!" + s for s in shown] + (["Other plots: " + " · ".join(linked)] if linked else []))


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
    parser.add_argument("files", nargs="*", type=Path,
                        help="results JSON files (default: the newest committed cpu and cuda ones)")
    parser.add_argument("--readme", type=Path, nargs="?", const=ROOT / "README.md",
                        help="README to update between the bench markers (default: the repository's README.md)")
    args = parser.parse_args(argv)
    files = args.files or newest()
    if not files:
        parser.error(f"no results files given and none committed in {RESULTS}")
    readme_dir = (args.readme or ROOT / "README.md").resolve().parent
    sections = []
    for path in files:
        images = plots(path, readme_dir)
        section = markdown(json.loads(path.read_text()), os.path.relpath(path.resolve(), ROOT))
        sections.append(section + (f"\n\n{images}" if images else ""))
    text = ("Layer cases: times (peak memory on CUDA) over the frozen base `nn.Linear` measured in the same "
            "run, the median over interleaved rounds of each round's ratio; training steps: over peft's LoRA r=32 "
            "in the same run. Lower is better; generated by "
            "`python -m bench.report --readme` from the results files named below.\n\n" + "\n\n".join(sections))
    print(text)
    if args.readme and not replace_between_markers(args.readme, text):
        print(f"{args.readme}: no '{BEGIN}' ... '{END}' markers, left unchanged", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
