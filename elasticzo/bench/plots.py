"""Plots of a bench's results (the dict ``runner.run_bench`` returns, or its results.json).

Three figures, each written as PNG and SVG:

- ``accuracy_vs_epoch``: test accuracy per epoch, one line per method, one panel per dataset;
- ``accuracy_vs_memory``: final accuracy against measured peak memory, the elastic trade-off
  curve from vanilla ZO (k = 0) through k = 1, 2, 3 to BP, one curve per precision;
- ``time_per_phase``: time per step stacked by phase (mean self time, so the bars add up), our
  methods and the peers side by side.

matplotlib is imported only when a plot is made (Agg backend: no display needed), so the rest
of the bench works without it. Re-plot a saved run with::

    python -m elasticzo.bench.plots bench-results/results.json
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from elasticzo.bench.timing import PHASE_ORDER

FORMATS = ("png", "svg")
CURVE = ("zo", "k1", "k2", "k3", "bp")  # keys of grid.GRID_METHODS, in order along the trade-off


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out: Path, name: str) -> list[Path]:
    paths = [out / f"{name}.{ext}" for ext in FORMATS]
    for p in paths:
        fig.savefig(p, dpi=120, bbox_inches="tight")
    return paths


def _datasets(runs: list[dict]) -> list[str]:
    return list(dict.fromkeys(r["dataset"] for r in runs))


def plot_accuracy_vs_epoch(results: dict, out: Path) -> list[Path]:
    plt = _pyplot()
    datasets = _datasets(results["runs"])
    fig, axes = plt.subplots(1, len(datasets), figsize=(5.5 * len(datasets), 4), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        for r in (r for r in results["runs"] if r["dataset"] == dataset and r["acc_per_epoch"]):
            epochs = range(1, len(r["acc_per_epoch"]) + 1)
            ax.plot(epochs, r["acc_per_epoch"], marker="o", label=r["label"],
                    linestyle="--" if r["precision"] == "int8" else "-")
        ax.set(title=dataset, xlabel="epoch", ylabel="test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    paths = _save(fig, out, "accuracy_vs_epoch")
    plt.close(fig)
    return paths


def plot_accuracy_vs_memory(results: dict, out: Path) -> list[Path]:
    plt = _pyplot()
    meas = results["measurements"]
    datasets = _datasets(results["runs"])
    fig, axes = plt.subplots(1, len(datasets), figsize=(5.5 * len(datasets), 4), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        acc = {r["method"]: r["final_acc"] for r in results["runs"] if r["dataset"] == dataset}
        for precision in ("fp32", "int8"):
            keys = [f"{m}-{precision}" for m in CURVE if f"{m}-{precision}" in acc and f"{m}-{precision}" in meas]
            if not keys:
                continue
            xs = [meas[k]["peak_bytes"] / 1024 for k in keys]
            ys = [acc[k] for k in keys]
            ax.plot(xs, ys, marker="o", label=precision.upper())
            for k, x, y in zip(keys, xs, ys):
                ax.annotate(k.split("-")[0], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set(title=f"{dataset}: accuracy vs memory", xlabel="measured peak training memory (KiB)",
               ylabel="final test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    paths = _save(fig, out, "accuracy_vs_memory")
    plt.close(fig)
    return paths


def plot_time_per_phase(results: dict, out: Path) -> list[Path]:
    plt = _pyplot()
    meas = results["measurements"]
    labels = [m["label"] for m in meas.values()]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(labels)), 4.5))
    bottom = [0.0] * len(labels)
    for phase in PHASE_ORDER:
        heights = [m["mean_phase_ms"].get(phase, 0.0) for m in meas.values()]
        if any(heights):
            ax.bar(range(len(labels)), heights, bottom=bottom, label=phase)
            bottom = [b + h for b, h in zip(bottom, heights)]
    ax.set_xticks(range(len(labels)), labels, rotation=35, ha="right", fontsize=8)
    ax.set(ylabel="ms per step (mean self time per phase)", title="time per step by phase")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    paths = _save(fig, out, "time_per_phase")
    plt.close(fig)
    return paths


def make_plots(results: dict, out: Path) -> list[Path]:
    """All figures that the results have data for; returns the files written."""
    out = Path(out)
    paths = plot_time_per_phase(results, out)
    if any(r["acc_per_epoch"] for r in results["runs"]):
        paths = plot_accuracy_vs_epoch(results, out) + plot_accuracy_vs_memory(results, out) + paths
    return paths


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m elasticzo.bench.plots RESULTS.json")
    source = Path(sys.argv[1])
    for path in make_plots(json.loads(source.read_text()), source.parent):
        print(path)
