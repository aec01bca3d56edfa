"""The bench's settings: the grid (methods x precisions x datasets), the sizes (quick or full),
and the training settings every run shares (``--set``), checked in one place.
"""
from __future__ import annotations

import dataclasses
import shlex
import sys
from dataclasses import dataclass, field
from typing import Any

from elasticzo.config import TrainConfig, acts_on, field_kind


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
