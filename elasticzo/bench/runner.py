"""``elasticzo bench``: the method grid trained with ``train()``, measured memory and time per step,
and same-process peers, written as results.json, results.csv, results.md and plots.

Three parts, each reusing the library rather than re-implementing it:

1. **Grid**: for every dataset and method (BP, vanilla ZO, ElasticZO k = 1, 2, 3; INT8
   counterparts when the INT8 learner exists) one ``train(TrainConfig)`` run in ``<out>/runs/``:
   test accuracy per epoch, time per epoch. An interrupted bench continues from the checkpoints.
2. **Measurements** on one real batch (``--batch-size``) of the first dataset: peak training
   memory of one step with its breakdown (``bench.memory.measure_step_memory``) and time per step
   by phase (``bench.timing.StepTimer``). Memory and time do not depend on the pixel values, so
   they are measured once per method, not once per dataset.
3. **Peers** (``bench.peer``) timed in the same process, interleaved round by round with our
   steps so that a change of machine load hits all of them alike: one inference forward pass,
   MeZO's step (reference form and in-place form) and the plain PyTorch BP loop.

The ratios the project promises (and the paper's claims) are computed from these figures.

Example::

    results = run_bench(BenchConfig(out="bench-out", quick=True, data_root="../shared/datasets"))
    results["ratios"][0]   # {"name": "zo_step_over_forward", "value": 2.1, "target": "<= 2.3", ...}
"""
from __future__ import annotations

import dataclasses
import json
import math
import platform
import subprocess
import time
from pathlib import Path
from typing import Callable

import torch

from elasticzo.bench.grid import BenchConfig, Method, grid_methods
from elasticzo.bench.machine import cpu_info
from elasticzo.bench.measure import measure, restore_drift
from elasticzo.bench.ratios import compute_ratios
from elasticzo.bench.report import write_plots, write_results
from elasticzo.train.loop import TrainingDiverged, resolve_device, train


def train_grid(cfg: BenchConfig, methods: list[Method], notes: list[str], log: Callable) -> list[dict]:
    runs = []
    for dataset in cfg.datasets:
        for m in methods:
            run_dir = Path(cfg.out) / "runs" / f"{dataset}-{m.key}"
            reuse = (run_dir / "checkpoint.safetensors").exists()
            tc = m.train_config(cfg, dataset=dataset, epochs=cfg.epochs, train_limit=cfg.train_limit,
                                test_limit=cfg.test_limit, run_dir=str(run_dir), resume=reuse)
            if reuse:
                log(f"[bench] reusing the existing run {run_dir}: resumed from its checkpoint, not retrained "
                    "(delete it to train afresh)")
                notes.append(f"{dataset} {m.label}: reused the existing run {run_dir} (resumed from its checkpoint).")
            log(f"[bench] train {dataset} {m.label} ({cfg.epochs} epochs) -> {run_dir}")
            try:
                history = train(tc, log=lambda line: log(f"[bench]   {line}"))
            except TrainingDiverged as err:
                notes.append(f"{dataset} {m.label}: diverged ({err})")
                history = []
            except Exception as err:  # noqa: BLE001 - an unfinished INT8 engine must not sink the grid
                if m.precision == "fp32":
                    raise
                notes.append(f"{dataset} {m.label}: failed ({type(err).__name__}: {err})")
                history = []
            runs.append(_run_record(dataset, m, run_dir, history))
    return runs


def _run_record(dataset: str, m: Method, run_dir: Path, history: list[dict]) -> dict:
    acc = [h["test_acc"] for h in history]
    return {"dataset": dataset, "method": m.key, "label": m.label, "precision": m.precision,
            "acc_per_epoch": acc, "final_acc": acc[-1] if acc else math.nan,
            "final_train_loss": history[-1]["train_loss"] if history else math.nan,
            "epoch_seconds": [h["epoch_seconds"] for h in history],
            "loop_step_ms": 1e3 * sum(h["step_seconds"] for h in history) / len(history) if history else math.nan,
            "run_dir": str(run_dir)}


# ---------------------------------------------------------------------------------------------
# 2 and 3. Memory and time of our steps and of the peers, on one batch


def run_bench(cfg: BenchConfig, log: Callable[[str], None] = print) -> dict:
    """Run the bench as ``cfg`` says, write results.json/csv/md (and plots) into ``cfg.out``."""
    cfg = cfg.resolved()
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        notes: list[str] = []
        meta = _meta(cfg)  # the commit of the code this process runs, taken before the long work
        methods = grid_methods(cfg)
        out = Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        runs = train_grid(cfg, methods, notes, log) if cfg.train_grid else []
        if not cfg.train_grid:
            notes.append("Training grid not run (--measure-only): accuracy rows are absent.")
        meas = measure(cfg, methods, notes, log)
        runs, meas = merge_previous(out / "results.json", runs, meas, notes, log)
        results = {"meta": meta, "notes": notes, "runs": runs, "measurements": meas,
                   "restore_drift": restore_drift(cfg, cfg.timing_steps), "ratios": compute_ratios(meas, runs)}
        write_results(results, out)
        if cfg.plots:
            write_plots(results, out, notes)
            write_results(results, out)  # with the plot note, if any
    finally:
        torch.set_num_threads(threads)
    log(f"[bench] results: {out / 'results.json'}, {out / 'results.csv'}, {out / 'results.md'}"
        + (f"; plots: {', '.join(str(out / p) for p in results.get('plots', []))}" if results.get("plots") else "")
        + (f"; runs: {out / 'runs'}" if cfg.train_grid else ""))
    return results


def merge_previous(path: Path, runs: list[dict], meas: dict[str, dict], notes: list[str],
                   log: Callable) -> tuple[list[dict], dict[str, dict]]:
    """Keep the rows of an earlier report in the same --out that this invocation did not redo.

    A second bench into the same folder (say, one more dataset) must not shrink the report to
    its own rows; what is kept is named in a note, with the commit and date it came from.
    """
    if not path.is_file():
        return runs, meas
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        notes.append(f"The earlier report {path} could not be read ({err}); it was replaced.")
        return runs, meas
    done = {(r["dataset"], r["method"]) for r in runs}
    kept_runs = [r for r in old.get("runs", []) if (r.get("dataset"), r.get("method")) not in done]
    kept_meas = {k: v for k, v in old.get("measurements", {}).items() if k not in meas}
    if kept_runs or kept_meas:
        meta = old.get("meta", {})
        names = [f"{r['dataset']} {r.get('label', r['method'])}" for r in kept_runs] + sorted(kept_meas)
        note = (f"Kept from the earlier report in this folder (commit {(meta.get('git') or {}).get('commit')}, "
                f"{meta.get('date')}): {', '.join(names)}.")
        notes.append(note)
        log(f"[bench] {note}")
    return runs + kept_runs, {**meas, **kept_meas}


def _git_state() -> dict:
    """The commit the figures come from and the files that differed from it (None outside a checkout)."""
    repo = Path(__file__).resolve().parents[2]
    try:
        run = lambda *a: subprocess.run(["git", *a], cwd=repo, capture_output=True, text=True, timeout=10,
                                        check=True).stdout
        return {"commit": run("rev-parse", "HEAD").strip(),
                "modified": [ln[3:] for ln in run("status", "--porcelain", "--untracked-files=no").splitlines()]}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "modified": None}


def _meta(cfg: BenchConfig) -> dict:
    return {"command": cfg.command, "git": _git_state(), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "torch": torch.__version__,
            "python": platform.python_version(), "machine": f"{platform.machine()} {platform.processor()}".strip(),
            "device": str(resolve_device(cfg.device)), "threads": torch.get_num_threads(), "cpu": cpu_info(),
            "config": dataclasses.asdict(cfg)}
