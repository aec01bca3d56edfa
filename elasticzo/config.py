"""All settings of a training run in one typed place; the CLI is generated from it.

One meaning per flag: every setting either acts on the run or is rejected. A setting that has
no effect for the chosen method or precision (``--momentum`` with ``--method zo``,
``--lr-zo`` with ``--precision int8``, ``--bp-layers`` with ``--method bp``) raises a
ValueError naming the flag when it differs from its default; ``APPLIES`` says which setting
acts where. The lists of choices are defined here and nowhere else (``CHOICES``).

``resolved()`` fills what "auto" or "default" left open (the ZO learning rate, the split, the
device, the run dir); that resolved config is written to ``<run_dir>/config.json`` with every
run, and ``--resume`` checks that the saved config matches the requested one.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

METHODS = ("bp", "zo", "elasticzo")
MODEL_NAMES = ("lenet5", "mlp", "pointnet")  # elasticzo.models.MODELS (a test keeps them equal)
DATASET_NAMES = ("mnist", "fashion-mnist", "mnist-points", "fashion-mnist-points", "modelnet40")  # data.DATASET_NAMES
PRECISIONS = ("fp32", "int8")
SCHEDULES = ("constant", "cosine")
NOISE_KINDS = ("gaussian", "rademacher")  # float ZO directions (INT8 uses int8 Rademacher)
BP_GRADS = ("mean", "plus")
DEVICES = ("auto", "cpu", "cuda")
INT8_ZO_SHIFTS = (-8, 30)  # -8: a step of up to 2**8 units at the mean |d|, as far as an int8 weight can move

CHOICES = {"model": MODEL_NAMES, "dataset": DATASET_NAMES, "method": METHODS, "precision": PRECISIONS,
           "schedule": SCHEDULES, "noise": NOISE_KINDS, "bp_grad": BP_GRADS, "device": DEVICES}

_ZO = ("lr_zo", "eps", "queries", "noise", "grad_clip", "normalize", "zo_weight_decay")
_BP = ("lr_bp", "momentum", "weight_decay")
# Where a setting acts: (precisions, methods). A setting not listed acts in every run.
APPLIES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    **{name: (("fp32",), ("zo", "elasticzo")) for name in _ZO},
    **{name: (("fp32",), ("bp", "elasticzo")) for name in _BP},
    "bp_grad": (("fp32",), ("elasticzo",)),  # the + and - passes exist only with a ZO part and a BP part
    "bp_layers": (PRECISIONS, ("elasticzo",)),
    "int8_lr_bits": (("int8",), ("bp", "elasticzo")),
    "int8_zo_shift": (("int8",), ("zo", "elasticzo")),
    "int8_tile": (("int8",), METHODS),
}


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
    bp_layers: int | None = None  # ElasticZO split: the last K parametrised layers train with backprop (default 1)
    precision: str = "fp32"  # fp32 | int8 (integer-only ElasticZO-INT8)
    # schedule
    epochs: int = 5  # passes over the training set
    batch_size: int = 64  # examples per step
    schedule: str = "cosine"  # learning-rate schedule over all steps: constant | cosine
    micro_batch: int = 0  # examples per chunk of each pass, streamed from the dataset (0: whole batch); same update, less memory
    # ZO part (SPSA)
    lr_zo: float | None = None  # ZO learning rate (fp32); default 3e-4 for --method zo, 1e-3 otherwise
    eps: float = 1e-3  # perturbation scale
    queries: int = 1  # random directions per step
    noise: str = "gaussian"  # gaussian (unit-variance sum of 4 uniform bytes, zo/counter.py) | rademacher (+-1)
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
    check_every: int = 0  # under torchrun: steps between checks that all replicas hold equal weights (0: each epoch end)
    progress: bool = True  # show a progress bar
    tensorboard: bool = False  # also write TensorBoard event files to <run_dir>/tensorboard (pip install 'elasticzo[tensorboard]')

    def validate(self) -> "TrainConfig":
        """Raise ValueError naming the first bad value; returns self for chaining."""
        for f in dataclasses.fields(self):
            _check_type(f.name, getattr(self, f.name))
        if self.data_root is not None and not self.data_root.strip():
            raise ValueError("--data-root: must not be empty (leave it out to use $ELASTICZO_DATA or ./data)")
        if self.classes and not all(part.strip() for part in self.classes.split(",")):
            raise ValueError(f"--classes: {self.classes!r} has an empty entry; write labels like 5-9 or 0,2,4")
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"--{_flag(name)}: {getattr(self, name)!r} is not one of {', '.join(allowed)}")
        positive = ("epochs", "batch_size", "queries", "eps", "num_points")
        non_negative = ("lr_bp", "grad_clip", "zo_weight_decay", "weight_decay", "train_limit", "test_limit",
                        "checkpoint_every", "check_every", "int8_tile", "threads", "micro_batch")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"--{_flag(name)}: must be > 0, got {getattr(self, name)!r}")
        for name in non_negative:
            if not getattr(self, name) >= 0:
                raise ValueError(f"--{_flag(name)}: must be >= 0, got {getattr(self, name)!r}")
        for name in ("lr_zo", "bp_layers"):
            if getattr(self, name) is not None and not getattr(self, name) >= 0:
                raise ValueError(f"--{_flag(name)}: must be >= 0, got {getattr(self, name)!r}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"--momentum: must be in [0, 1), got {self.momentum!r}")
        low, high = INT8_ZO_SHIFTS
        if not low <= self.int8_zo_shift <= high:
            raise ValueError(f"--int8-zo-shift: must be in {low}..{high}, got {self.int8_zo_shift!r}")
        if not 1 <= self.int8_lr_bits <= 8:
            raise ValueError(f"--int8-lr-bits: must be in 1..8, got {self.int8_lr_bits!r}")
        self._reject_settings_without_effect()
        return self

    def _reject_settings_without_effect(self) -> None:
        """A setting changed from its default where it acts on nothing is a mistake: name it."""
        defaults = TrainConfig()
        for name, (precisions, methods) in APPLIES.items():
            if getattr(self, name) == getattr(defaults, name):
                continue
            if self.precision not in precisions:
                raise ValueError(f"--{_flag(name)}: has no effect with --precision {self.precision} "
                                 f"(it applies to {' and '.join(precisions)}); leave it at its default")
            if self.method not in methods:
                raise ValueError(f"--{_flag(name)}: has no effect with --method {self.method} "
                                 f"(it applies to --method {' and '.join(methods)}); leave it at its default")

    def split(self, num_layers: int) -> int:
        """The number k of BP layers for a model of ``num_layers``: bp -> all, zo -> 0,
        elasticzo -> --bp-layers (default 1), checked against the model."""
        if self.method == "bp":
            return num_layers
        if self.method == "zo":
            return 0
        k = 1 if self.bp_layers is None else self.bp_layers
        if not 0 <= k <= num_layers:
            raise ValueError(f"--bp-layers: {k} is out of range; {self.model} has "
                             f"{num_layers} parametrised layers, so use 0..{num_layers}")
        return k

    def resolved(self, device: str, num_layers: int) -> "TrainConfig":
        """The values this run uses where the settings left a choice open: the ZO learning rate,
        the split, the device and the run dir (written to config.json)."""
        k = self.split(num_layers)
        lr_zo = self.zo_learning_rate() if acts_on("lr_zo", self.method, self.precision) else self.lr_zo
        done = dataclasses.replace(self, lr_zo=lr_zo, bp_layers=k if self.method == "elasticzo" else None,
                                   device=device)
        return dataclasses.replace(done, run_dir=self.run_dir or done.default_run_dir())

    def zo_learning_rate(self) -> float:
        """--lr-zo, or the default measured to work for the method (see README, Results)."""
        if self.lr_zo is not None:
            return self.lr_zo
        return 3e-4 if self.method == "zo" else 1e-3

    def default_run_dir(self) -> str:
        split = f"-k{1 if self.bp_layers is None else self.bp_layers}" if self.method == "elasticzo" else ""
        data = self.dataset + (f"-c{self.classes.replace(',', '_')}" if self.classes else "")
        tune = "-ft" if self.init else ""  # a fine-tuning run never lands in its pretraining run's dir
        return f"runs/{data}-{self.model}-{self.method}{split}-{self.precision}{tune}-s{self.seed}"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def json(self) -> str:
        """The text of config.json."""
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def save(self, path: Path) -> None:
        Path(path).write_text(self.json())

    @classmethod
    def load(cls, path: Path) -> "TrainConfig":
        """Read a saved config.json, checked like the flags; ValueError naming the file and the key.
        Keys it lacks take their defaults (a run saved before a setting existed)."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ValueError(f"{path}: missing; the run's settings cannot be checked") from None
        except (OSError, UnicodeDecodeError, ValueError) as err:
            raise ValueError(f"{path}: not a readable config file ({err})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: must hold a JSON object of settings, got {type(data).__name__}")
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"{path}: unknown config key {unknown[0]!r}")
        try:
            return cls(**data).validate()
        except ValueError as err:  # '--lr-zo: must be ...' -> 'config.json: lr_zo: must be ...'
            flag, sep, rest = str(err).partition(": ")
            key = flag[2:].replace("-", "_") if flag.startswith("--") else flag
            raise ValueError(f"{path}: {key}{sep}{rest}") from None


# Settings that may differ between a run and its resumption without changing the result.
RESUME_FREE = ("resume", "progress", "data_root", "download", "device", "threads", "run_dir", "checkpoint_every",
               "check_every", "epochs", "tensorboard")


def field_kind(name: str) -> type:
    """The scalar type of a TrainConfig field (bool, int, float or str), from its annotation."""
    annotation = str({f.name: f.type for f in dataclasses.fields(TrainConfig)}[name])
    for kind in (bool, int, float):
        if kind.__name__ in annotation:
            return kind
    return str


def _check_type(name: str, value) -> None:
    """``value`` has the type of field ``name`` (bool, int, finite float, str; None where allowed)."""
    annotation = str({f.name: f.type for f in dataclasses.fields(TrainConfig)}[name])
    if value is None and "None" in annotation:
        return
    kind = field_kind(name)
    ok = {bool: isinstance(value, bool),
          int: isinstance(value, int) and not isinstance(value, bool),
          float: isinstance(value, (int, float)) and not isinstance(value, bool),
          str: isinstance(value, str)}[kind]
    if not ok:
        raise ValueError(f"--{_flag(name)}: must be {'a' if kind is not int else 'an'} {kind.__name__}, got {value!r}")
    if kind is float and not math.isfinite(value):
        raise ValueError(f"--{_flag(name)}: must be a finite number, got {value!r}")


def _flag(name: str) -> str:
    return name.replace("_", "-")


def acts_on(name: str, method: str, precision: str) -> bool:
    """Whether setting ``name`` acts on a run of ``method`` in ``precision`` (``APPLIES``)."""
    precisions, methods = APPLIES.get(name, (PRECISIONS, METHODS))
    return precision in precisions and method in methods
