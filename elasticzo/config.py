"""All settings of a training run in one typed place; the CLI is generated from it.

The resolved config is written to ``<run_dir>/config.json`` with every run, and ``--resume``
checks that the saved config matches the requested one.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

METHODS = ("bp", "zo", "elasticzo")
MODEL_NAMES = ("lenet5", "mlp", "pointnet")  # elasticzo.models.MODELS (a test keeps them equal)
DATASET_NAMES = ("mnist", "fashion-mnist", "mnist-points", "fashion-mnist-points", "modelnet40")  # data.DATASET_NAMES
PRECISIONS = ("fp32", "int8")
SCHEDULES = ("constant", "cosine")


@dataclass
class TrainConfig:
    # what to train
    model: str = "lenet5"  # lenet5 and mlp take images, pointnet the point datasets
    dataset: str = "mnist"  # image or point-cloud dataset (see README, Data)
    classes: str = ""  # keep only these labels, renumbered 0..n-1 in this order (e.g. 5-9 or 0,2,4); '' keeps all
    num_points: int = 256  # points per cloud of a point dataset
    points_3d: bool = False  # mnist-points / fashion-mnist-points: turn each cloud by a random 3D rotation
    init: str = ""  # fine-tune: start from this checkpoint's weights (a new head if the class count differs)
    method: str = "elasticzo"  # bp: all layers BP; zo: vanilla ZO; elasticzo: last --bp-layers in BP
    bp_layers: int = 1  # ElasticZO split: the last K parametrised layers train with backprop
    precision: str = "fp32"  # fp32 | int8 (integer-only ElasticZO-INT8)
    # schedule
    epochs: int = 5  # passes over the training set
    batch_size: int = 64  # examples per step
    schedule: str = "cosine"  # learning-rate schedule over all steps: constant | cosine
    # ZO part (SPSA)
    lr_zo: float | None = None  # ZO learning rate; default 3e-4 for --method zo, 1e-3 otherwise
    eps: float = 1e-3  # perturbation scale
    queries: int = 1  # random directions per step
    noise: str = "gaussian"  # gaussian | rademacher
    grad_clip: float = 100.0  # bound on |projected gradient|; 0 disables
    normalize: bool = True  # divide g by its running RMS: fixed ZO step size, no late divergence
    zo_weight_decay: float = 0.0  # L2 weight decay of the ZO part (decoupled: theta *= 1 - lr_zo * wd)
    # BP part (SGD)
    lr_bp: float = 0.05  # SGD learning rate of the BP part
    momentum: float = 0.9  # SGD momentum of the BP part (0: plain SGD, no momentum buffer)
    weight_decay: float = 0.0  # L2 weight decay of the BP part (SGD's weight_decay)
    bp_grad: str = "mean"  # mean: average grads of the + and - passes; plus: + passes only
    # int8 (ElasticZO-INT8)
    int8_lr_bits: int = 3  # NITI learning rate: bit width of the largest BP weight step
    int8_tile: int = 8  # images per int32 conv accumulator tile (0: whole batch; faster, more memory)
    int8_zo_shift: int = 4  # ZO step of about 2**-shift weight units per step at the typical |L+ - L-|
    # run
    seed: int = 0  # initial weights, batch order and every ZO direction derive from it
    device: str = "auto"  # auto | cpu | cuda
    threads: int = 1  # torch CPU threads (0: torch's default, one per core); 1 is much faster for these small models (docs/bench/threads.json)
    data_root: str | None = None  # else $ELASTICZO_DATA, else ./data
    download: bool = True  # fetch missing dataset files (checksummed)
    train_limit: int = 0  # use only the first N training examples (0: all)
    test_limit: int = 0  # use only the first N test examples (0: all)
    run_dir: str = ""  # default: runs/<dataset>-<model>-<method>[-k<K>]-<precision>-s<seed>
    resume: bool = False  # continue the run in run_dir from its last checkpoint
    checkpoint_every: int = 500  # steps between mid-epoch checkpoints (0: only at epoch ends)
    progress: bool = True  # show a progress bar
    tensorboard: bool = False  # also write TensorBoard event files to <run_dir>/tensorboard (pip install 'elasticzo[tensorboard]')

    def validate(self) -> "TrainConfig":
        """Raise ValueError naming the first bad value; returns self for chaining."""
        choices = {"model": MODEL_NAMES, "dataset": DATASET_NAMES, "method": METHODS, "precision": PRECISIONS, "schedule": SCHEDULES,
                   "noise": ("gaussian", "rademacher"), "bp_grad": ("mean", "plus"),
                   "device": ("auto", "cpu", "cuda")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"--{_flag(name)}: {getattr(self, name)!r} is not one of {', '.join(allowed)}")
        positive = ("epochs", "batch_size", "queries", "eps", "num_points")
        non_negative = ("bp_layers", "lr_bp", "grad_clip", "zo_weight_decay", "weight_decay",
                        "train_limit", "test_limit", "checkpoint_every", "int8_zo_shift", "int8_tile", "threads")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"--{_flag(name)}: must be > 0, got {getattr(self, name)!r}")
        for name in non_negative:
            if not getattr(self, name) >= 0:
                raise ValueError(f"--{_flag(name)}: must be >= 0, got {getattr(self, name)!r}")
        if self.lr_zo is not None and not self.lr_zo >= 0:
            raise ValueError(f"--lr-zo: must be >= 0, got {self.lr_zo!r}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"--momentum: must be in [0, 1), got {self.momentum!r}")
        if not 1 <= self.int8_lr_bits <= 8:
            raise ValueError(f"--int8-lr-bits: must be in 1..8, got {self.int8_lr_bits!r}")
        return self

    def zo_learning_rate(self) -> float:
        """--lr-zo, or the default measured to work for the method (see README, Results)."""
        if self.lr_zo is not None:
            return self.lr_zo
        return 3e-4 if self.method == "zo" else 1e-3

    def default_run_dir(self) -> str:
        split = f"-k{self.bp_layers}" if self.method == "elasticzo" else ""
        data = self.dataset + (f"-c{self.classes.replace(',', '_')}" if self.classes else "")
        tune = "-ft" if self.init else ""  # a fine-tuning run never lands in its pretraining run's dir
        return f"runs/{data}-{self.model}-{self.method}{split}-{self.precision}{tune}-s{self.seed}"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> "TrainConfig":
        data = json.loads(path.read_text())
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{path}: unknown config keys {unknown}")
        return cls(**data)


# Settings that may differ between a run and its resumption without changing the result.
RESUME_FREE = ("resume", "progress", "data_root", "download", "device", "threads", "run_dir", "checkpoint_every",
               "epochs", "tensorboard")


def field_kind(name: str) -> type:
    """The scalar type of a TrainConfig field (bool, int, float or str), from its annotation."""
    annotation = str({f.name: f.type for f in dataclasses.fields(TrainConfig)}[name])
    for kind in (bool, int, float):
        if kind.__name__ in annotation:
            return kind
    return str


def _flag(name: str) -> str:
    return name.replace("_", "-")
