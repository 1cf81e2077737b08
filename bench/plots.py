"""PNG plots of a run: ratio to base per implementation, one file per method and metric; training steps."""
import re

import matplotlib

matplotlib.use("Agg")  # files only; no display on benchmark machines
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FormatStrFormatter, LogLocator, NullLocator  # noqa: E402

from .report import impl_names, rows  # noqa: E402


def _ratio_axis(ax, baseline):
    # Ratios span 1x to ~100x: log scale, with labelled 1-2-5 ticks instead of bare powers of ten.
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
    ax.yaxis.set_major_formatter(FormatStrFormatter("%gx"))
    ax.yaxis.set_minor_formatter(FormatStrFormatter(""))
    ax.axhline(1, color="black", linestyle="--", linewidth=0.8, label=baseline)
    ax.grid(True, which="both", alpha=0.3)


def _save(fig, legend_ax, title, path):
    legend_ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1))  # outside: the data fill the axes
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _over_tokens(path, title, ylabel, names, cases):
    """One subplot per shape: ratio vs tokens, one line per implementation."""
    shapes = list(dict.fromkeys(shape for shape, _, _ in cases))
    fig, axes = plt.subplots(1, len(shapes), figsize=(1.5 + 3.5 * len(shapes), 4), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        for name in names:
            points = sorted((t, v[name][1]) for s, t, v in cases if s == shape and name in v)
            if points:
                ax.plot(*zip(*points), marker="o", label=name)
        ax.set_xscale("log")
        tokens = sorted({t for s, t, _ in cases if s == shape})
        ax.set_xticks(tokens, [str(t) for t in tokens])
        ax.xaxis.set_minor_locator(NullLocator())
        _ratio_axis(ax, "base")
        ax.set(title=shape, xlabel="tokens", ylabel=ylabel)
    _save(fig, axes[0][-1], title, path)


def _bars(path, title, ylabel, names, cases, xlabel="out x in", baseline="base"):
    """Grouped bars: one group per case (labelled by its first item), one bar per implementation."""
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(max(8, 2.5 + 1.8 * len(cases)), 4))
    for i, name in enumerate(names):
        bars = [(j, v[name][1]) for j, (_, _, v) in enumerate(cases) if name in v]
        if bars:
            positions, ratios = zip(*bars)
            drawn = ax.bar([p + (i - (len(names) - 1) / 2) * width for p in positions], ratios, width, label=name)
            # Bars on a log axis are hard to read off: write the ratio on each.
            ax.bar_label(drawn, [f"{r:.3g}x" for r in ratios], fontsize=7)
    ax.set_xticks(range(len(cases)), [label for label, _, _ in cases])
    _ratio_axis(ax, baseline)
    ax.set(xlabel=xlabel, ylabel=ylabel)
    _save(fig, ax, title, path)


def plot(run, stem):
    """Write ``<stem>-<method>-<metric>.png`` for every method and metric in ``run`` and ``<stem>-train.png``
    for its training steps; returns the paths."""
    names = impl_names(run)
    groups = {}
    for method, metric, shape, tokens, _, values in rows(run):
        groups.setdefault((method, metric), []).append((shape, tokens, values))
    paths = []
    for (method, metric), cases in groups.items():
        name = re.sub(r"[^\w.]+", "_", method).strip("_")  # "frod (sparse_rate 0.02)" -> frod_sparse_rate_0.02
        path = stem.with_name(f"{stem.name}-{name}-{metric}.png")
        title = f"{method} {metric}: {run['device']['name']}, {run['dtype']}, {run['date'][:10]}"
        ylabel = f"{'peak memory' if metric == 'peak_mem' else 'median time'} / base"
        draw = _bars if metric == "eval_t1" else _over_tokens
        draw(path, title, ylabel, names, cases)
        paths.append(path)
    if "train" in run:
        path = stem.with_name(f"{stem.name}-train.png")
        cases = [(c["method"], None, {n: (s["median_ms"], s["ratio"]) for n, s in c["impls"].items() if n != "lora"})
                 for c in run["train"]["cases"]]
        names = list(dict.fromkeys(n for c in run["train"]["cases"] for n in c["impls"] if n != "lora"))
        _bars(path, f"training step: {run['device']['name']}, {run['dtype']}, {run['date'][:10]}",
              "median time per step / LoRA r=32", names, cases, xlabel="method", baseline="lora")
        paths.append(path)
    return paths
