"""The checkpoint schema: what a checkpoint must hold to be trusted, checked in full before use.

A resumed run must never train on garbage, so nothing in a checkpoint is used until all of it
has been checked:

* tensors: the expected set comes from the learner being built (``learner.state_spec``), so it
  follows the model and optimiser instead of a hand-written list: every expected tensor present,
  none extra, each with its dtype, shape and value range (floats finite);
* metadata: the learner's part must equal what the learner would write at the checkpoint's step
  (``learner.state_meta`` with its step counters set), the position is typed and consistent
  (``global_step = epoch * steps_per_epoch + step_in_epoch``, one history record per epoch).

Every failure is a ``CheckpointError`` of one line that names the file, the key and what was
expected.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass

import torch

from elasticzo.train.checkpoint import CheckpointError

MAX_EXPONENT = 64  # |an INT8 weight exponent| beyond this is damage, not a trained network
POSITION_FIELDS = ("epoch", "step_in_epoch", "global_step", "loss_sum", "epoch_seconds", "history")


@dataclass(frozen=True)
class TensorSpec:
    """One expected tensor: dtype, shape and an optional closed value range."""
    dtype: torch.dtype
    shape: tuple[int, ...]
    lo: float | None = None
    hi: float | None = None

    @classmethod
    def like(cls, t: torch.Tensor, lo: float | None = None, hi: float | None = None) -> "TensorSpec":
        return cls(t.dtype, tuple(t.shape), lo, hi)

    def __str__(self) -> str:
        bounds = "" if self.lo is None and self.hi is None else f" in [{self.lo}, {self.hi}]"
        return f"{str(self.dtype).replace('torch.', '')} {list(self.shape)}{bounds}"


def check_tensors(tensors: dict[str, torch.Tensor], expected: dict[str, TensorSpec], path, hint: str = "") -> None:
    """Every expected tensor present with its spec, none extra; CheckpointError naming the first defect."""
    hint = f" ({hint})" if hint else ""
    missing = [k for k in expected if k not in tensors]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{path}: tensor {missing[0]} is missing, expected {expected[missing[0]]}{more}{hint}")
    extra = sorted(k for k in tensors if k not in expected)
    if extra:
        raise CheckpointError(f"{path}: unexpected tensor {extra[0]} {describe(tensors[extra[0]])}; "
                              f"the model and optimiser being built have no such state{hint}")
    for name, spec in expected.items():
        _check_tensor(tensors[name], spec, f"{path}: tensor {name}", hint)


def _check_tensor(t: torch.Tensor, spec: TensorSpec, where: str, hint: str = "") -> None:
    if t.dtype != spec.dtype or tuple(t.shape) != spec.shape:
        raise CheckpointError(f"{where} is {describe(t)}, expected {spec}{hint}")
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise CheckpointError(f"{where} holds non-finite values (nan or inf)")
    if t.numel() and spec.lo is not None and bool((t < spec.lo).any()):
        raise CheckpointError(f"{where} holds {t.min().item()}, below {spec.lo}; expected {spec}")
    if t.numel() and spec.hi is not None and bool((t > spec.hi).any()):
        raise CheckpointError(f"{where} holds {t.max().item()}, above {spec.hi}; expected {spec}")


def describe(t: torch.Tensor) -> str:
    return f"{str(t.dtype).replace('torch.', '')} {list(t.shape)}"


def need_dict(value, where: str) -> dict:
    if not isinstance(value, dict):
        raise CheckpointError(f"{where} must be a JSON object, got {_short(value)}")
    return value


def need_int(value, where: str, lo: int | None = 0, hi: int | None = None) -> int:
    """An int (not a bool, not 1.0) in [lo, hi]."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise CheckpointError(f"{where} must be an integer, got {_short(value)}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise CheckpointError(f"{where} must be in [{lo}, {'' if hi is None else hi}], got {value}")
    return value


def need_number(value, where: str, lo: float | None = 0.0, hi: float | None = None) -> float:
    """A finite int or float (not a bool) in [lo, hi]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise CheckpointError(f"{where} must be a finite number, got {_short(value)}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise CheckpointError(f"{where} must be in [{lo}, {'' if hi is None else hi}], got {value}")
    return float(value)


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def split_meta(meta, path) -> tuple[dict, dict]:
    """The (learner, position) parts of checkpoint metadata, both JSON objects."""
    meta = need_dict(meta, f"{path}: metadata")
    for key in ("learner", "position"):
        if key not in meta:
            raise CheckpointError(f"{path}: metadata has no '{key}' entry")
    extra = sorted(set(meta) - {"learner", "position"})
    if extra:
        raise CheckpointError(f"{path}: metadata has an unexpected entry {extra[0]!r}")
    return (need_dict(meta["learner"], f"{path}: metadata learner"),
            need_dict(meta["position"], f"{path}: metadata position"))


SCHEDULED = {"lr": 0, "mu": 1, "zo_shift": 0}  # param-group keys the schedule moves: type and lower bound only


def check_learner_meta(saved: dict, learner, global_step: int, path) -> None:
    """The optimiser's param groups must be this learner's, at ``global_step``: the same groups,
    keys and hyper-parameters; the step counters equal to it; the scheduled rates typed and in range."""
    fresh = learner.state_meta()
    extra = sorted(set(saved) - set(fresh))
    if extra:
        raise CheckpointError(f"{path}: metadata learner has an unexpected entry {extra[0]!r}")
    groups = saved.get("param_groups")
    want = fresh["param_groups"]
    if not isinstance(groups, list) or len(groups) != len(want):
        raise CheckpointError(f"{path}: metadata learner.param_groups is {_short(groups)}, expected a list of "
                              f"{len(want)} parameter groups")
    for i, (group, fresh_group) in enumerate(zip(groups, want)):
        where = f"{path}: metadata learner.param_groups[{i}]"
        group = need_dict(group, where)
        for key in sorted(set(group) | set(fresh_group)):
            if key not in fresh_group or key not in group:
                raise CheckpointError(f"{where}.{key} is {'unexpected' if key in group else 'missing'}")
            _check_group_value(group[key], fresh_group[key], key, global_step, f"{where}.{key}")


def _check_group_value(value, fresh, key: str, global_step: int, where: str) -> None:
    if key == "step":
        if need_int(value, where) != global_step:
            raise CheckpointError(f"{where} is {value}, expected the checkpoint's global_step {global_step}")
    elif key in SCHEDULED:
        (need_int if isinstance(fresh, int) else need_number)(value, where, SCHEDULED[key])
    elif json.dumps(value) != json.dumps(fresh):  # strict: 3.0 is not 3, true is not 1
        raise CheckpointError(f"{where} is {_short(value)}, expected {_short(fresh)} (this run's setting)")


def check_position(position: dict, path, steps_per_epoch: int) -> dict:
    """The run position, typed and self-consistent; returns it with floats as floats."""
    where = f"{path}: metadata position"
    missing = [k for k in POSITION_FIELDS if k not in position]
    if missing:
        raise CheckpointError(f"{where}.{missing[0]} is missing")
    extra = sorted(set(position) - set(POSITION_FIELDS))
    if extra:
        raise CheckpointError(f"{where} has an unexpected entry {extra[0]!r}")
    epoch = need_int(position["epoch"], f"{where}.epoch")
    step = need_int(position["step_in_epoch"], f"{where}.step_in_epoch", 0, steps_per_epoch - 1)
    total = need_int(position["global_step"], f"{where}.global_step")
    if total != epoch * steps_per_epoch + step:
        raise CheckpointError(f"{where}.global_step is {total}, expected epoch * {steps_per_epoch} + step_in_epoch "
                              f"= {epoch * steps_per_epoch + step} ({steps_per_epoch} steps per epoch)")
    loss_sum = need_number(position["loss_sum"], f"{where}.loss_sum")
    seconds = need_number(position["epoch_seconds"], f"{where}.epoch_seconds")
    if step == 0 and (loss_sum or seconds):
        raise CheckpointError(f"{where}: loss_sum and epoch_seconds must be 0 at the start of an epoch, "
                              f"got {loss_sum} and {seconds}")
    history = check_history(position["history"], f"{where}.history", epoch)
    return {"epoch": epoch, "step_in_epoch": step, "global_step": total, "loss_sum": loss_sum,
            "epoch_seconds": seconds, "history": history}


def check_history(history, where: str, epoch: int) -> list[dict]:
    """One record per finished epoch, numbered 1..epoch (after an optional epoch-0 record of --init)."""
    if not isinstance(history, list):
        raise CheckpointError(f"{where} must be a list of epoch records, got {_short(history)}")
    first = 0 if history and isinstance(history[0], dict) and history[0].get("epoch") == 0 else 1
    want = list(range(first, epoch + 1))
    if len(history) != len(want):
        raise CheckpointError(f"{where} holds {len(history)} records, expected {len(want)} (epochs {first}..{epoch})")
    for i, (record, number) in enumerate(zip(history, want)):
        record = need_dict(record, f"{where}[{i}]")
        if need_int(record.get("epoch"), f"{where}[{i}].epoch") != number:
            raise CheckpointError(f"{where}[{i}].epoch is {record['epoch']}, expected {number}")
        need_number(record.get("test_acc"), f"{where}[{i}].test_acc", 0.0, 100.0)
        for key, value in record.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                need_number(value, f"{where}[{i}].{key}", None)
    return history


def validate_state(learner, tensors: dict[str, torch.Tensor], learner_meta, path) -> int:
    """Check a learner's saved state on its own (the Python loader, no run position): the step
    count comes from the param groups. Returns it."""
    groups = need_dict(learner_meta, f"{path}: metadata learner").get("param_groups")
    first = groups[0] if isinstance(groups, list) and groups and isinstance(groups[0], dict) else {}
    global_step = need_int(first.get("step"), f"{path}: metadata learner.param_groups[0].step")
    check_learner_meta(learner_meta, learner, global_step, path)
    check_tensors(tensors, learner.state_spec(global_step), path)
    return global_step


def validate_checkpoint(learner, tensors: dict[str, torch.Tensor], meta, path, steps_per_epoch: int) -> dict:
    """Check a resume checkpoint in full against ``learner``; returns the validated position."""
    learner_meta, position = split_meta(meta, path)
    position = check_position(position, path, steps_per_epoch)
    check_learner_meta(learner_meta, learner, position["global_step"], path)
    check_tensors(tensors, learner.state_spec(position["global_step"]), path)
    return position


def spec_of(name: str, t: torch.Tensor) -> TensorSpec:
    """The spec of a model tensor: int8 weights saturate at +-127 (NITI), exponents stay small."""
    if t.dtype == torch.int8:
        return TensorSpec.like(t, -127, 127)
    if name.endswith("exponent"):
        return TensorSpec.like(t, -MAX_EXPONENT, MAX_EXPONENT)
    return TensorSpec.like(t)
