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

import csv
import dataclasses
import json
import math
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from elasticzo.bench.machine import cpu_info, describe
from elasticzo.bench.memory import CATEGORIES, measure_step_memory
from elasticzo.bench.peer import MeZOPeer, PlainBPLoop, forward_loss
from elasticzo.bench.timing import PHASE_ORDER, StepTimer
from elasticzo.config import TrainConfig, acts_on, field_kind
from elasticzo.data import get_spec, load_split
from elasticzo.models import build_model
from elasticzo.optim.elastic import ElasticZO
from elasticzo.train.learner import seeded
from elasticzo.train.loop import TrainingDiverged, make_learner, resolve_device, train

GRID_METHODS = {"bp": ("bp", 0), "zo": ("zo", 0), "k1": ("elasticzo", 1), "k2": ("elasticzo", 2), "k3": ("elasticzo", 3)}
PRECISION_CHOICES = ("fp32", "int8", "all")
GRID_DATASETS = ("mnist", "fashion-mnist")
# TrainConfig fields the grid itself sets; --set may change every other one.
GRID_FIELDS = ("model", "dataset", "method", "bp_layers", "precision", "epochs", "batch_size", "seed", "device",
               "data_root", "download", "train_limit", "test_limit", "run_dir", "resume", "progress", "threads")
QUICK = dict(epochs=1, train_limit=1000, test_limit=500, timing_steps=20, warmup=3, rounds=2)
FULL = dict(epochs=5, train_limit=0, test_limit=0, timing_steps=200, warmup=10, rounds=20)


@dataclass
class BenchConfig:
    out: str = "bench-results"  # folder for results.json/csv/md, plots and runs/
    datasets: tuple[str, ...] = GRID_DATASETS
    methods: tuple[str, ...] = tuple(GRID_METHODS)  # bp, zo, k1, k2, k3
    precision: str = "all"  # fp32 | int8 | all (int8 rows only when the INT8 learner exists)
    model: str = "lenet5"
    batch_size: int = 64
    quick: bool = False  # subset of the data, 1 epoch, few timed steps (the CI test)
    epochs: int | None = None  # None: 5, quick 1
    train_limit: int | None = None  # None: all, quick 1000
    test_limit: int | None = None  # None: all, quick 500
    timing_steps: int | None = None  # timed steps per method and peer; None: 200, quick 20
    warmup: int | None = None  # untimed steps first; None: 10, quick 3
    rounds: int | None = None  # timed steps are split into this many interleaved rounds
    train_grid: bool = True  # False: only the measurements, peers and ratios (minutes less)
    seed: int = 0
    device: str = "auto"
    threads: int = 1  # torch.set_num_threads for the bench (0: leave as is)
    data_root: str | None = None
    download: bool = True
    overrides: dict[str, Any] = field(default_factory=dict)  # TrainConfig settings for every run
    plots: bool = True
    command: str = ""  # the command line, recorded with the results

    def resolved(self) -> "BenchConfig":
        """Fill the None sizes from the quick or full preset and check every value."""
        preset = QUICK if self.quick else FULL
        filled = {k: preset[k] if getattr(self, k) is None else getattr(self, k) for k in preset}
        cfg = dataclasses.replace(self, **filled)
        cfg._check()
        return cfg

    def _check(self) -> None:
        bad = [d for d in self.datasets if d not in GRID_DATASETS]
        if bad or not self.datasets:
            raise ValueError(f"--datasets: {bad or 'none given'}; choose from {', '.join(GRID_DATASETS)}")
        bad = [m for m in self.methods if m not in GRID_METHODS]
        if bad or not self.methods:
            raise ValueError(f"--methods: {bad or 'none given'}; choose from {', '.join(GRID_METHODS)}")
        if self.precision not in PRECISION_CHOICES:
            raise ValueError(f"--precision: {self.precision!r} is not one of {', '.join(PRECISION_CHOICES)}")
        for name in ("epochs", "batch_size", "timing_steps", "rounds"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(self, name)}")
        for name in ("train_limit", "test_limit", "warmup", "threads"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')}: must be >= 0, got {getattr(self, name)}")
        if self.train_limit and self.train_limit < self.batch_size:
            raise ValueError(f"--train-limit {self.train_limit} is smaller than one batch ({self.batch_size})")
        fixed = sorted(set(self.overrides) & set(GRID_FIELDS))
        if fixed:
            raise ValueError(f"--set: {', '.join(fixed)} are set by the bench itself (use its own flags)")


@dataclass(frozen=True)
class Method:
    """One row of the grid: a method name of ``GRID_METHODS`` in one precision."""

    name: str
    precision: str

    @property
    def key(self) -> str:
        return f"{self.name}-{self.precision}"

    @property
    def label(self) -> str:
        base = {"bp": "BP", "zo": "ZO"}.get(self.name, f"ElasticZO k={self.name[1:]}")
        return base if self.precision == "fp32" else f"INT8 {base}"

    def train_config(self, cfg: BenchConfig, **fields) -> TrainConfig:
        method, k = GRID_METHODS[self.name]
        overrides = {k: v for k, v in cfg.overrides.items() if acts_on(k, method, self.precision)}
        return TrainConfig(**{**overrides, "model": cfg.model, "method": method,
                              "bp_layers": k if method == "elasticzo" else None,
                              "precision": self.precision, "batch_size": cfg.batch_size, "seed": cfg.seed,
                              "device": cfg.device, "data_root": cfg.data_root, "download": cfg.download,
                              "threads": cfg.threads, "progress": False, **fields}).validate()


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["lr_zo=3e-4", "normalize=true"]`` -> typed TrainConfig settings; ValueError names a bad item."""
    types = {f.name: field_kind(f.name) for f in dataclasses.fields(TrainConfig)}
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in types:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE with KEY a training setting "
                             f"(see `elasticzo train --help`)")
        kind = types[key]
        try:
            if kind is bool:
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError
                out[key] = value.lower() in ("true", "1")
            else:
                out[key] = kind(value) if kind in (int, float) else value
        except ValueError:
            raise ValueError(f"--set {item!r}: {value!r} is not a valid {kind.__name__}") from None
    return out


def bench_config_from_args(args, argv: list[str] | None = None) -> BenchConfig:
    """The BenchConfig of parsed ``elasticzo bench`` flags; records the command line."""
    argv = sys.argv[1:] if argv is None else argv
    return BenchConfig(
        out=args.out, datasets=tuple(args.datasets), methods=tuple(args.methods), precision=args.precision,
        model=args.model, batch_size=args.batch_size, quick=args.quick, epochs=args.epochs,
        train_limit=args.train_limit, test_limit=args.test_limit, timing_steps=args.timing_steps,
        warmup=args.warmup, rounds=args.rounds, train_grid=not args.measure_only, seed=args.seed,
        device=args.device, threads=args.threads, data_root=args.data_root, download=args.download,
        overrides=parse_overrides(args.overrides), plots=args.plots, command=shlex.join(["elasticzo", *argv]))


def grid_methods(cfg: BenchConfig) -> list[Method]:
    """Every method of the grid in every precision asked for (fp32 rows first)."""
    precisions = ["fp32", "int8"] if cfg.precision == "all" else [cfg.precision]
    return [Method(name, p) for p in precisions for name in cfg.methods]


# ---------------------------------------------------------------------------------------------
# 1. The grid, trained by train()


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


@dataclass
class Candidate:
    """Something whose step is measured: ``step()`` runs one training step on the fixed batch."""

    key: str
    label: str
    step: Callable[[], Any]
    targets: dict  # params / optimizer / inputs for measure_step_memory
    precision: str = "fp32"


def _batch(cfg: BenchConfig, device: torch.device) -> dict[str, torch.Tensor]:
    """The first ``batch_size`` training examples, normalised (fp32) and raw (int8)."""
    name = cfg.datasets[0]
    raw, y = load_split(name, cfg.data_root, "train", cfg.download, cfg.batch_size, normalise=False)
    x, _ = load_split(name, cfg.data_root, "train", cfg.download, cfg.batch_size, normalise=True)
    return {"fp32": x.to(device), "int8": raw.to(device), "y": y.to(device)}


def _ours(cfg: BenchConfig, m: Method, batch: dict, device: torch.device) -> Candidate:
    tc = m.train_config(cfg, dataset=cfg.datasets[0])
    learner = make_learner(tc, get_spec(tc.dataset).num_classes, device)
    x, y = batch[m.precision], batch["y"]
    targets = dict(params=learner.model, optimizer=learner.optimizer)
    return Candidate(m.key, m.label, lambda: learner.train_step(x, y), {**targets, "inputs": (x, y)}, m.precision)


def _peers(cfg: BenchConfig, batch: dict, device: torch.device) -> list[Candidate]:
    tc = TrainConfig(**cfg.overrides)  # the same hyper-parameters as our rows
    x, y = batch["fp32"], batch["y"]

    def fresh():
        with seeded(cfg.seed):
            return build_model(cfg.model, get_spec(cfg.datasets[0]).num_classes).to(device)

    fwd, mezo, mezo_ip, plain = fresh(), fresh(), fresh(), fresh()
    mezo_peer = MeZOPeer(mezo, lr=tc.zo_learning_rate(), eps=tc.eps, seed=cfg.seed)
    mezo_ip_peer = MeZOPeer(mezo_ip, lr=tc.zo_learning_rate(), eps=tc.eps, seed=cfg.seed, in_place=True)
    plain_peer = PlainBPLoop(plain, lr=tc.lr_bp, momentum=tc.momentum, weight_decay=tc.weight_decay)
    inputs = (x, y)
    return [
        Candidate("forward", "one forward pass (no grad)", lambda: forward_loss(fwd, x, y),
                  dict(params=fwd, inputs=inputs)),
        Candidate("mezo", "MeZO peer (reference form)*", lambda: mezo_peer.step(x, y),
                  dict(params=mezo, inputs=inputs)),
        Candidate("mezo_inplace", "MeZO peer (in-place add_)*", lambda: mezo_ip_peer.step(x, y),
                  dict(params=mezo_ip, inputs=inputs)),
        Candidate("plain_bp", "plain PyTorch BP loop", lambda: plain_peer.step(x, y),
                  dict(params=plain, optimizer=plain_peer.optimizer, inputs=inputs)),
    ]


def time_interleaved(steps: dict[str, Callable[[], Any]], total: int, warmup: int, rounds: int) -> dict:
    """Warm every step up, then time them round by round (each ``total/rounds`` steps per round)."""
    for fn in steps.values():
        for _ in range(warmup):
            fn()
    timers = {k: StepTimer() for k in steps}
    per_round = math.ceil(total / rounds)
    for _ in range(rounds):
        for key, fn in steps.items():
            for _ in range(per_round):
                with timers[key].step():
                    fn()
    return {k: t.report() for k, t in timers.items()}


def measure(cfg: BenchConfig, methods: list[Method], notes: list[str], log: Callable) -> dict[str, dict]:
    """Peak memory with breakdown and per-phase step time of every method and peer."""
    device = resolve_device(cfg.device)
    batch = _batch(cfg, device)
    candidates = []
    for m in methods:
        try:
            candidates.append(_ours(cfg, m, batch, device))
        except Exception as err:  # noqa: BLE001 - see train_grid
            if m.precision == "fp32":
                raise
            notes.append(f"{m.label}: not measured ({type(err).__name__}: {err})")
    candidates += _peers(cfg, batch, device)
    results: dict[str, dict] = {}
    for c in candidates:
        log(f"[bench] memory of one step: {c.label}")
        mem = measure_step_memory(c.step, **c.targets)
        results[c.key] = {"label": c.label, "precision": c.precision, "peak_bytes": mem.peak_bytes,
                          "breakdown": {k: mem.breakdown_at_peak.get(k, 0) for k in CATEGORIES}}
    log(f"[bench] timing {len(candidates)} steps x {cfg.timing_steps} (interleaved, {cfg.rounds} rounds)")
    reports = time_interleaved({c.key: c.step for c in candidates}, cfg.timing_steps, cfg.warmup, cfg.rounds)
    for key, rep in reports.items():
        results[key].update(steps=rep.steps, median_step_ms=1e3 * rep.median_step_s,
                            median_phase_ms={k: 1e3 * v for k, v in rep.median_phase_s.items()},
                            mean_phase_ms={k: 1e3 * v for k, v in rep.mean_phase_s.items()})
    return results


def restore_drift(cfg: BenchConfig, repeats: int) -> dict:
    """max |theta - theta_0| after ``repeats`` perturbation rounds that should leave theta as it was.

    MeZO: +eps z, -2 eps z, +eps z in place. Ours: ``repeats`` vanilla ZO steps with lr_zo = 0
    (perturbed forward passes, then an update by 0) on a small batch.
    """
    def fresh():
        with seeded(cfg.seed):
            return build_model(cfg.model, get_spec(cfg.datasets[0]).num_classes)

    eps = TrainConfig(**cfg.overrides).eps
    mezo = MeZOPeer(fresh(), eps=eps).restore_drift(repeats, seed=cfg.seed)
    model = fresh()
    before = [p.detach().clone() for p in model.parameters()]
    opt = ElasticZO.for_model(model, 0, lr_zo=0.0, eps=eps, seed=cfg.seed)
    x, y = torch.randn(8, 1, 28, 28), torch.arange(8) % 10
    for _ in range(repeats):
        opt.step(lambda backward=False: torch.nn.functional.cross_entropy(model(x), y))
    ours = max(float((p - b).abs().max()) for p, b in zip(model.parameters(), before))
    return {"repeats": repeats, "eps": eps, "max_abs": mezo, "ours_max_abs": ours}


# ---------------------------------------------------------------------------------------------
# Ratios: the project's performance targets and the paper's claims


def _entry(name: str, what: str, value: float, target: str | None = None, ok: bool | None = None) -> dict:
    return {"name": name, "what": what, "value": value, "target": target, "met": ok}


def compute_ratios(meas: dict[str, dict], runs: list[dict]) -> list[dict]:
    ms = lambda k: meas[k]["median_step_ms"]
    peak = lambda k: meas[k]["peak_bytes"]
    out = []
    if "zo-fp32" in meas:
        v = ms("zo-fp32") / ms("forward")
        out.append(_entry("zo_step_over_forward", "vanilla ZO step / one forward pass (time)", v, "<= 2.3", v <= 2.3))
        for peer, form in (("mezo", "reference form"), ("mezo_inplace", "in-place form")):
            v = ms(peer) / ms("zo-fp32")
            out.append(_entry(f"{peer}_over_ours", f"MeZO peer step ({form}) / our ZO step (time)", v, ">= 1.3",
                              v >= 1.3))
    for k in (1, 2, 3):
        if "zo-fp32" in meas and f"k{k}-fp32" in meas:
            v = 100.0 * (peak(f"k{k}-fp32") - peak("zo-fp32")) / peak("zo-fp32")
            target, ok = ("<= 1.7", v <= 1.7) if k == 1 else ("paper: 0.072 to 1.7", None)
            out.append(_entry(f"k{k}_memory_overhead_pct", f"ElasticZO k={k} peak over vanilla ZO peak (%)",
                              v, target, ok))
    if "bp-fp32" in meas:
        v = ms("bp-fp32") / ms("plain_bp")
        out.append(_entry("bp_over_plain", "our BP step / plain PyTorch loop step (time)", v, "<= 1.05", v <= 1.05))
    for name in GRID_METHODS:
        if f"{name}-fp32" in meas and f"{name}-int8" in meas:
            label = meas[f"{name}-fp32"]["label"]
            out.append(_entry(f"{name}_int8_memory_gain", f"{label}: FP32 peak / INT8 peak",
                              peak(f"{name}-fp32") / peak(f"{name}-int8"), "paper: 1.46 to 1.60"))
            out.append(_entry(f"{name}_int8_time_gain", f"{label}: FP32 step / INT8 step (time)",
                              ms(f"{name}-fp32") / ms(f"{name}-int8"), "paper: 1.38 to 1.42"))
    return out + _accuracy_claims(runs)


def _accuracy_claims(runs: list[dict]) -> list[dict]:
    acc = {(r["dataset"], r["method"]): r["final_acc"] for r in runs}
    out = []
    for (dataset, key), value in acc.items():
        name, precision = key.split("-")
        zo = acc.get((dataset, f"zo-{precision}"))
        if name in ("k1", "k2", "k3") and zo is not None:
            out.append(_entry(f"{dataset}_{key}_acc_gain", f"{dataset}: {key} - zo-{precision} final accuracy "
                              "(points)", value - zo, "paper: +5.2 to +9.5"))
        fp32 = acc.get((dataset, f"{name}-fp32"))
        if precision == "int8" and fp32 is not None:
            out.append(_entry(f"{dataset}_{name}_int8_acc_change", f"{dataset}: {key} - {name}-fp32 final "
                              "accuracy (points)", value - fp32, "paper: no loss"))
    return out


# ---------------------------------------------------------------------------------------------
# Entry point and writers


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
            _plots(results, out, notes)
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


def _plots(results: dict, out: Path, notes: list[str]) -> None:
    try:
        from elasticzo.bench.plots import make_plots

        results["plots"] = [str(p.name) for p in make_plots(results, out)]
    except ModuleNotFoundError as err:
        if err.name != "matplotlib":
            raise
        notes.append("Plots skipped: matplotlib is not installed (pip install 'elasticzo[bench]').")


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
