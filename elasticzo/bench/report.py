"""results.json, results.csv, results.md (and the plots) from the bench's results.
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

from elasticzo.bench.machine import describe
from elasticzo.bench.memory import CATEGORIES
from elasticzo.bench.timing import PHASE_ORDER


def write_results(results: dict, out: Path) -> None:
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    _write_csv(results, out / "results.csv")
    (out / "results.md").write_text(markdown(results))


def _write_csv(results: dict, path: Path) -> None:
    """One row per (dataset, method) of the grid and one per measured step without a run (peers)."""
    epochs = max([len(r["acc_per_epoch"]) for r in results["runs"]], default=0)
    header = (["dataset", "method", "label", "precision"] + [f"acc_epoch_{e + 1}" for e in range(epochs)]
              + ["final_acc", "mean_epoch_seconds", "peak_bytes"] + [f"mem_{c}" for c in CATEGORIES]
              + ["median_step_ms"] + [f"ms_{p}" for p in PHASE_ORDER])
    rows = [(r["dataset"], r["method"]) for r in results["runs"]]
    rows += [("", k) for k in results["measurements"] if not any(k == m for _, m in rows)]
    runs = {(r["dataset"], r["method"]): r for r in results["runs"]}
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for dataset, key in rows:
            run, meas = runs.get((dataset, key), {}), results["measurements"].get(key, {})
            acc = run.get("acc_per_epoch", [])
            secs = run.get("epoch_seconds", [])
            phases = meas.get("mean_phase_ms", {})
            writer.writerow([dataset, key, meas.get("label", run.get("label", "")), meas.get("precision", "")]
                            + [acc[e] if e < len(acc) else "" for e in range(epochs)]
                            + [run.get("final_acc", ""), sum(secs) / len(secs) if secs else "",
                               meas.get("peak_bytes", "")]
                            + [meas.get("breakdown", {}).get(c, "") for c in CATEGORIES]
                            + [meas.get("median_step_ms", "")] + [phases.get(p, "") for p in PHASE_ORDER])


def _num(v: Any, fmt: str = "{:.2f}") -> str:
    return "—" if v is None or v == "" or (isinstance(v, float) and not math.isfinite(v)) else fmt.format(v)


def _kib(n: int) -> str:
    return f"{n / 1024:.1f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def markdown(results: dict) -> str:
    meta, cfg = results["meta"], results["meta"]["config"]
    lines = ["# elasticzo bench", "",
             f"Command: `{meta['command'] or 'run_bench(...)'}`  ",
             f"{meta['date']}, torch {meta['torch']}, {meta['device']} ({meta['machine']}), "
             f"{meta['threads']} thread(s); {cfg['model']}, batch {cfg['batch_size']}, {cfg['epochs']} epoch(s), "
             f"train limit {cfg['train_limit'] or 'all'}, test limit {cfg['test_limit'] or 'all'}"
             + (f", settings {cfg['overrides']}" if cfg["overrides"] else "") + ".  ",
             _git_line(meta.get("git") or {}), ""]
    if results["notes"]:
        lines += ["Notes:", ""] + [f"- {n}" for n in results["notes"]] + [""]
    lines += _accuracy_section(results["runs"]) + _memory_section(results, cfg) + _time_section(results, cfg)
    lines += ["## Ratios", ""]
    lines += _table(["ratio", "measured", "target / claim", "met"],
                    [[r["what"], _num(r["value"], "{:.3f}"), r["target"] or "",
                      {True: "yes", False: "**no**", None: ""}[r["met"]]] for r in results["ratios"]])
    drift = results["restore_drift"]
    lines += ["", f"Restore drift (float32, eps {drift['eps']}): after {drift['repeats']} rounds of MeZO's "
              f"+eps z, -2 eps z, +eps z, max |theta - theta_0| = {drift['max_abs']:.3g}; after "
              f"{drift['repeats']} of our ZO steps with lr_zo = 0, {drift['ours_max_abs']:.3g}."]
    if results.get("plots"):
        lines += ["", "Plots: " + ", ".join(f"[{p}]({p})" for p in results["plots"])]
    return "\n".join(lines) + "\n"


def _git_line(git: dict) -> str:
    if not git.get("commit"):
        return "Code: not in a git checkout."
    changed = git.get("modified") or []
    return f"Code: commit {git['commit'][:10]}" + (f" with uncommitted changes in {', '.join(changed)}." if changed
                                                 else " (clean).")


def _accuracy_section(runs: list[dict]) -> list[str]:
    if not runs:
        return []
    epochs = max(len(r["acc_per_epoch"]) for r in runs)
    pad = lambda r: ["—"] * (epochs - len(r["acc_per_epoch"]))  # a diverged or failed run has fewer epochs
    rows = [[r["dataset"], r["label"]] + [_num(a) for a in r["acc_per_epoch"]] + pad(r)
            + [_num(r["final_acc"]), _num(r["final_train_loss"], "{:.4f}"),
               _num(sum(r["epoch_seconds"]) / len(r["epoch_seconds"]) if r["epoch_seconds"] else None, "{:.1f}"),
               _num(r["loop_step_ms"])] for r in runs]
    header = ["dataset", "method"] + [f"ep {e + 1}" for e in range(epochs)] + ["final acc %", "final train loss",
                                                                              "s / epoch", "ms / step (loop)"]
    return ["## Test accuracy (%) per epoch", ""] + _table(header, rows) + [""]


def _memory_section(results: dict, cfg: dict) -> list[str]:
    meas = results["measurements"]
    zo = meas.get("zo-fp32", {}).get("peak_bytes")
    rows = [[m["label"], _kib(m["peak_bytes"])] + [_kib(m["breakdown"][c]) for c in CATEGORIES]
            + [_num(100.0 * (m["peak_bytes"] - zo) / zo, "{:+.2f}") if zo else "—"] for m in meas.values()]
    return ([f"## Peak training memory of one step (KiB of live tensors, batch {cfg['batch_size']}, "
             "breakdown at the peak)", ""]
            + _table(["step", "peak"] + list(CATEGORIES) + ["vs ZO %"], rows)
            + ["", "\\* under `torch.inference_mode`, as MeZO's code runs, the tracker sees composite ops whole "
               "and misses their internal temporaries (the max-pool indices), so these peaks are under-counted.", ""])


def _time_section(results: dict, cfg: dict) -> list[str]:
    meas = results["measurements"]
    rows = [[m["label"], _num(m["median_step_ms"])] + [_num(m["mean_phase_ms"].get(p, 0.0)) for p in PHASE_ORDER]
            for m in meas.values()]
    steps = next(iter(meas.values()))["steps"]
    cpu = results["meta"].get("cpu")
    machine = [f"Machine: {describe(cpu)}; {results['meta'].get('threads')} torch thread(s).", ""] if cpu else []
    return ([f"## Time per step (ms; median of {steps} steps after {cfg['warmup']} warm-up, interleaved in "
             f"{cfg['rounds']} rounds; phases: mean self time)", ""] + machine
            + _table(["step", "median"] + list(PHASE_ORDER), rows) + [""])
def write_plots(results: dict, out: Path, notes: list[str]) -> None:
    try:
        from elasticzo.bench.plots import make_plots

        results["plots"] = [str(p.name) for p in make_plots(results, out)]
    except ModuleNotFoundError as err:
        if err.name != "matplotlib":
            raise
        notes.append("Plots skipped: matplotlib is not installed (pip install 'elasticzo[bench]').")
