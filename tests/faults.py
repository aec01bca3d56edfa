"""Fault cases generated from a real run's files: each damages one thing in a copy of the run.

A case is a name, a function that damages a run dir in place, and the text the one-line error
must contain (the key it is about). The generators read the real checkpoint and config, so the
cases follow the model and optimiser instead of a hand-written list.
"""
from __future__ import annotations

import json
import random
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file

from elasticzo.train.checkpoint import META_KEY, save_checkpoint
from elasticzo.train.loop import CHECKPOINT

FLOAT_DTYPES = (torch.int32, torch.bool, torch.float16)
INT_DTYPES = (torch.int32, torch.float32, torch.int16)


@dataclass
class Fault:
    name: str
    apply: Callable[[Path], None]  # damages the run dir it is given
    expect: str  # the error must name this (a file, key or flag)


def _write(tensors: dict, meta) -> Callable[[Path], None]:
    return lambda run: save_checkpoint(run / CHECKPOINT, tensors, meta)


def tensor_faults(tensors: dict[str, torch.Tensor], meta: dict) -> list[Fault]:
    """Per tensor: missing, other dtypes, other shape, out-of-range values; plus extra tensors."""
    faults = []
    for name, t in tensors.items():
        others = {k: v for k, v in tensors.items() if k != name}
        faults.append(Fault(f"{name} missing", _write(others, meta), name))
        for dtype in (FLOAT_DTYPES if t.is_floating_point() else INT_DTYPES):
            faults.append(Fault(f"{name} as {dtype}", _write({**others, name: t.to(dtype)}, meta), name))
        reshaped = t.reshape(1, *t.shape) if t.dim() == 0 else torch.cat([t, t], dim=-1)  # not a class count
        faults.append(Fault(f"{name} shape {list(reshaped.shape)}", _write({**others, name: reshaped}, meta), name))
        bad = _out_of_range(name, t)
        if bad is not None:
            faults.append(Fault(f"{name} value {bad.flatten()[0].item()}", _write({**others, name: bad}, meta), name))
    first = next(iter(tensors.values())).clone()
    for extra in ("model.99.weight", "optim.99.momentum_buffer", "optim.x"):
        faults.append(Fault(f"extra {extra}", _write({**tensors, extra: first.clone()}, meta), extra))
    return faults


def _out_of_range(name: str, t: torch.Tensor) -> torch.Tensor | None:
    """A copy with one value the schema must refuse: nan in floats, -128 in int8 weights, d < 0."""
    bad = t.clone().reshape(-1)
    if t.is_floating_point():
        bad[0] = float("nan")
    elif t.dtype == torch.int8:
        bad[0] = -128
    elif name.endswith("d_scale"):
        bad[0] = -5
    elif name.endswith("exponent"):
        bad[0] = 1000
    else:
        return None
    return bad.reshape(t.shape)


def meta_faults(tensors: dict, meta: dict) -> list[Fault]:
    """The metadata: its structure, every position field, the learner's step counters (and exponents)."""
    faults = []
    for bad in (None, [], 42, "x", {}):
        faults.append(Fault(f"meta {bad!r}", _write(tensors, bad), "metadata"))
    for part in ("learner", "position"):
        faults.append(Fault(f"meta without {part}", _write(tensors, _drop(meta, part)), part))
        faults.append(Fault(f"meta {part} as a list", _write(tensors, {**meta, part: []}), part))
    faults.append(Fault("meta extra entry", _write(tensors, {**meta, "extra": 1}), "extra"))
    for key, values in _position_values(meta["position"]).items():
        for value in values:
            damaged = _drop(meta["position"], key) if value is _MISSING else {**meta["position"], key: value}
            faults.append(Fault(f"position.{key}={value!r}", _write(tensors, {**meta, "position": damaged}), key))
    for name, damaged, expect in _learner_variants(meta["learner"]):
        faults.append(Fault(name, _write(tensors, {**meta, "learner": damaged}), expect))
    return faults


_MISSING = object()


def _drop(d: dict, key: str) -> dict:
    return {k: v for k, v in d.items() if k != key}


def _position_values(pos: dict) -> dict[str, list]:
    """Wrong values per position field: missing, wrong types, out of range, inconsistent."""
    ints = [_MISSING, None, "a", 0.5, True, -1]
    history = pos["history"]
    return {"epoch": ints + [pos["epoch"] + 1, pos["epoch"] + 0.5],
            "step_in_epoch": ints + [pos["step_in_epoch"] + 1000],
            "global_step": ints + [pos["global_step"] + 1, pos["global_step"] - 1],
            "loss_sum": [_MISSING, None, "a", True, -1.0, float("nan"), float("inf")],
            "epoch_seconds": [_MISSING, "a", -1.0, float("inf")],
            "history": [_MISSING, "x", None, [], history + history, ["x"], [{**history[0], "epoch": 7}],
                        [{**history[0], "test_acc": 200.0}], [{**history[0], "test_acc": "a"}]],
            "extra": [1]}


def _learner_variants(learner: dict) -> list[tuple[str, dict, str]]:
    """(name, damaged learner metadata, key the error must name): the optimiser's param groups."""
    groups = learner["param_groups"]
    out = [("learner.param_groups missing", _drop(learner, "param_groups"), "param_groups"),
           ("learner.param_groups='x'", {**learner, "param_groups": "x"}, "param_groups"),
           ("learner.param_groups one short", {**learner, "param_groups": groups[:-1]}, "param_groups"),
           ("learner.param_groups[0]='x'", {**learner, "param_groups": ["x", *groups[1:]]}, "param_groups[0]"),
           ("learner.extra", {**learner, "extra": 1}, "extra")]
    for i, group in enumerate(groups):
        def with_group(changed: dict) -> dict:
            return {**learner, "param_groups": [changed if j == i else g for j, g in enumerate(groups)]}

        for value in ("4", -1, group["step"] + 1, float(group["step"]), True, None):
            out.append((f"learner.param_groups[{i}].step={value!r}", with_group({**group, "step": value}), "step"))
        for key, value in group.items():
            if key == "step":
                continue
            out.append((f"learner.param_groups[{i}].{key} missing", with_group(_drop(group, key)), key))
            out.append((f"learner.param_groups[{i}].{key}={_other(value)!r}",
                        with_group({**group, key: _other(value)}), key))
        out.append((f"learner.param_groups[{i}].bogus", with_group({**group, "bogus": 1}), "bogus"))
    return out


def _other(value):
    """A wrong value of another type (a hyper-parameter, a rate, the parameter indices)."""
    if isinstance(value, list):
        return value[:-1] or [99]
    return "a" if not isinstance(value, str) else 5


def byte_faults(data: bytes) -> list[Fault]:
    """Byte-level damage: truncations, flipped header bytes, zeros, random bytes, a header dtype edit."""
    rng = random.Random(0)
    n = struct.unpack("<Q", data[:8])[0]
    header = data[8:8 + n]
    variants = {"empty": b"", "7 bytes": data[:7], "header cut": data[:8 + n // 2], "half": data[:len(data) // 2],
                "last byte cut": data[:-1], "header length flipped": bytes([data[0] ^ 0xFF]) + data[1:],
                "header byte flipped": data[:8] + bytes([header[0] ^ 0x20]) + data[9:],
                "zeros": bytes(len(data)), "random": bytes(rng.randrange(256) for _ in range(len(data))),
                "trailing garbage": data + b"\x00" * 16}
    for old, new in ((b'"F32"', b'"I32"'), (b'"I8"', b'"U8"')):
        if old in header:  # a dtype edit that keeps the file well-formed
            variants[f"header {old.decode()} -> {new.decode()}"] = data[:8] + header.replace(old, new, 1) + data[8 + n:]
    return [Fault(f"bytes: {name}", _bytes(value), CHECKPOINT) for name, value in variants.items()]


def _bytes(value: bytes) -> Callable[[Path], None]:
    return lambda run: (run / CHECKPOINT).write_bytes(value)


def raw_meta_faults(tensors: dict) -> list[Fault]:
    """Metadata that is not our JSON at all: no elasticzo entry, not JSON."""
    plain = {k: v.contiguous() for k, v in tensors.items()}
    return [Fault("raw meta absent", lambda run: save_file(plain, str(run / CHECKPOINT)), "metadata"),
            Fault("raw meta not JSON", lambda run: save_file(plain, str(run / CHECKPOINT), metadata={META_KEY: "{x"}),
                  CHECKPOINT)]


def config_faults(config: dict) -> list[Fault]:
    """config.json: not an object, unreadable, unknown keys, and a wrong type or range per field."""
    text = lambda s: (lambda run: (run / "config.json").write_text(s))
    faults = [Fault(f"config {s!r}", text(s), "config.json") for s in ("null", "[]", "42", '"x"', "{", "", "\x00\xff")]
    faults.append(Fault("config is a directory", _dir_config, "config.json"))
    faults.append(Fault("config unknown key", text(json.dumps({**config, "bogus": 1})), "bogus"))
    for key, value in config.items():
        for bad in _wrong_values(value):
            faults.append(Fault(f"config {key}={bad!r}", text(json.dumps({**config, key: bad})), key))
    ranges = {"epochs": 0, "batch_size": -1, "momentum": 1.5, "method": "adam", "lr_bp": -1.0, "eps": 0.0,
              "int8_lr_bits": 9, "classes": ",", "model": "", "bp_layers": -1, "lr_zo": float("nan")}
    for key, bad in ranges.items():
        faults.append(Fault(f"config {key}={bad!r} (range)", text(json.dumps({**config, key: bad})), key))
    return faults


def _dir_config(run: Path) -> None:
    (run / "config.json").unlink()
    (run / "config.json").mkdir()


def _wrong_values(value) -> list:
    """Values of another JSON type than a field's own."""
    if isinstance(value, bool):
        return [1, "yes"]
    if isinstance(value, int):
        return ["a", 1.5, True]
    if isinstance(value, float):
        return ["a", True]
    if isinstance(value, str):
        return [5, ["x"]]
    return [True, [1]]  # an optional field saved as null


def record_faults(steps_done: int) -> list[Fault]:
    """Records that do not fit the checkpoint: a garbled line, a seed log with a gap or cut short."""
    def edit(name: str, change: Callable[[list[str]], list[str]]) -> Callable[[Path], None]:
        def apply(run: Path) -> None:
            lines = (run / name).read_text().splitlines()
            (run / name).write_text("".join(ln + "\n" for ln in change(lines)))
        return apply

    return [Fault("metrics garbled line", edit("metrics.jsonl", lambda ls: ls + ["{not json"]), "metrics.jsonl"),
            Fault("metrics line not an object", edit("metrics.jsonl", lambda ls: ["[1]"] + ls), "metrics.jsonl"),
            Fault("metrics epoch record lost", edit("metrics.jsonl", lambda ls: ls[1:]), "metrics.jsonl"),
            Fault("seeds step lost", edit("seeds.jsonl", lambda ls: ls[:1] + ls[2:]), "seeds.jsonl"),
            Fault("seeds cut short", edit("seeds.jsonl", lambda ls: ls[: steps_done // 2]), "seeds.jsonl"),
            Fault("seeds step as string",
                  edit("seeds.jsonl", lambda ls: [ls[0].replace('"step": 0', '"step": "0"')] + ls[1:]), "seeds.jsonl")]
