"""``elasticzo plan``: the measured training memory of every ZO/BP split, and the best split for a budget.

For each split k = 0 .. n (k = number of last layers trained with BP; 0 is vanilla ZO, n is
plain BP) one training step is run on a random batch of the right shape and dtype, with the
learner ``train()`` would build, and its peak memory is measured (``bench.memory``). More BP
layers give better accuracy, so the answer is the largest k whose measured peak fits the budget.

Example::

    rows = measure_splits("lenet5", batch_size=64, precision="fp32")
    best = largest_fitting(rows, parse_size("3MiB"))     # a SplitMemory, or None
"""
from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

import torch

from elasticzo.bench.memory import CATEGORIES, measure_step_memory
from elasticzo.config import TrainConfig
from elasticzo.data import get_spec, normalise_images
from elasticzo.models import build_model, parametrised_layers
from elasticzo.train.learner import seeded
from elasticzo.train.loop import make_learner, resolve_device

UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE = re.compile(r"^\s*([-+]?[0-9]*\.?[0-9]+)\s*([a-z]*)\s*$", re.IGNORECASE)
IMAGE_SHAPE = (1, 28, 28)  # every dataset the models train on: [C, H, W]
PLAN_FIELDS = ("model", "method", "bp_layers", "precision", "batch_size", "device", "seed")  # set per split


def parse_size(text: str) -> int:
    """Bytes in ``text``: "256KiB", "3MB", "1.5MiB", "1000000" (bytes). kB = 1000 B, KiB = 1024 B."""
    match = _SIZE.match(str(text))
    unit = match.group(2).lower() if match else None
    if unit not in UNITS:
        raise ValueError(f"--budget: cannot read {text!r} as a memory size; write a number with an optional "
                         "unit, e.g. 256KiB, 3MB, 1.5MiB or 1000000 (bytes); units: B, kB, MB, GB, KiB, MiB, GiB")
    try:
        value = Decimal(match.group(1)) * UNITS[unit]
    except InvalidOperation:
        raise ValueError(f"--budget: cannot read the number in {text!r}") from None
    if value != value.to_integral_value():
        raise ValueError(f"--budget: {text!r} is not a whole number of bytes")
    if value <= 0:
        raise ValueError(f"--budget: {text!r} must be more than 0 bytes")
    return int(value)


def format_size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


@dataclass(frozen=True)
class SplitMemory:
    """Measured peak memory of one training step with the last ``k`` parametrised layers in BP."""

    k: int
    bp_layers: tuple[str, ...]  # e.g. ("Linear(84->10)",)
    peak_bytes: int
    breakdown: dict[str, int]


def _layer_name(layer: torch.nn.Module) -> str:
    if isinstance(layer, torch.nn.Linear):
        return f"Linear({layer.in_features}->{layer.out_features})"
    if isinstance(layer, torch.nn.Conv2d):
        return f"Conv2d({layer.in_channels}->{layer.out_channels}, {layer.kernel_size[0]}x{layer.kernel_size[1]})"
    return type(layer).__name__


def random_batch(batch_size: int, precision: str, num_classes: int, seed: int = 0, model: str = "lenet5",
                 num_points: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Random inputs and labels with the shape and dtype training gives for ``precision``: images (raw
    uint8 for int8) or, for ``pointnet``, clouds [B, num_points, 3] (int8 for int8, quantised once)."""
    gen = torch.Generator().manual_seed(seed)
    if model == "pointnet":
        from elasticzo.int8.inputs import quantize_points

        points = torch.rand(batch_size, num_points, 3, generator=gen) * 2 - 1
        labels = torch.randint(0, num_classes, (batch_size,), generator=gen)
        return (quantize_points(points) if precision == "int8" else points), labels
    pixels = torch.randint(0, 256, (batch_size, *IMAGE_SHAPE), generator=gen, dtype=torch.uint8)
    labels = torch.randint(0, num_classes, (batch_size,), generator=gen)
    if precision == "int8":
        return pixels, labels  # the integer engine quantises raw pixels itself
    return normalise_images(pixels, get_spec("mnist")), labels


def _memory_targets(learner) -> dict:
    return dict(params=learner.model, optimizer=learner.optimizer)


def measure_splits(model: str = "lenet5", batch_size: int = 64, precision: str = "fp32", *, num_classes: int = 10,
                   device: str = "cpu", seed: int = 0, **settings) -> list[SplitMemory]:
    """Peak memory of one training step for every split k = 0 .. n; ``settings`` go to TrainConfig."""
    with seeded(seed):
        layers = parametrised_layers(build_model(model, num_classes))
    dev = resolve_device(device)
    batch = random_batch(batch_size, precision, num_classes, seed, model, settings.get("num_points", 256))
    x, y = (t.to(dev) for t in batch)
    rows = []
    for k in range(len(layers) + 1):
        config = TrainConfig(**{**settings, "model": model, "method": "elasticzo", "bp_layers": k,
                                "precision": precision, "batch_size": batch_size, "device": device,
                                "seed": seed}).validate()
        learner = make_learner(config, num_classes, dev)
        mem = measure_step_memory(lambda: learner.train_step(x, y), inputs=(x, y), **_memory_targets(learner))
        rows.append(SplitMemory(k, tuple(_layer_name(m) for m in layers[len(layers) - k:]), mem.peak_bytes,
                                {c: mem.breakdown_at_peak.get(c, 0) for c in CATEGORIES}))
    return rows


def largest_fitting(rows: list[SplitMemory], budget: int) -> SplitMemory | None:
    """The split with the most BP layers whose measured peak is within ``budget`` bytes."""
    return max((r for r in rows if r.peak_bytes <= budget), key=lambda r: r.k, default=None)


def report(rows: list[SplitMemory], budget: int | None, header: str) -> str:
    lines = [header, f"{'k':>2}  {'peak':>10}  {'bytes':>11}  {'fits':>4}  BP layers (the rest train with ZO)"]
    for r in rows:
        fits = "" if budget is None else ("yes" if r.peak_bytes <= budget else "no")
        layers = ", ".join(r.bp_layers) if r.bp_layers else "none (vanilla ZO)"
        lines.append(f"{r.k:>2}  {format_size(r.peak_bytes):>10}  {r.peak_bytes:>11,}  {fits:>4}  {layers}")
    return "\n".join(lines)


def plan_main(model: str, batch_size: int, precision: str, budget_text: str | None, device: str = "cpu",
              settings: dict | None = None, out=None, err=None) -> int:
    """The ``elasticzo plan`` command: print the table and the choice; 1 when no split fits."""
    out, err = out or sys.stdout, err or sys.stderr
    budget = parse_size(budget_text) if budget_text is not None else None
    if batch_size < 1:
        raise ValueError(f"--batch-size: must be >= 1, got {batch_size}")
    fixed = sorted(set(settings or {}) & set(PLAN_FIELDS))
    if fixed:
        raise ValueError(f"--set: {', '.join(fixed)} are set by plan itself (use its own flags)")
    rows = measure_splits(model, batch_size, precision, device=device, **(settings or {}))
    print(report(rows, budget, f"measured peak training memory per step: {model}, batch {batch_size}, {precision}"
                 + (f", budget {format_size(budget)} ({budget:,} B)" if budget else "")), file=out)
    if budget is None:
        return 0
    best = largest_fitting(rows, budget)
    if best is None:
        low = min(rows, key=lambda r: r.peak_bytes)
        parts = ", ".join(f"{c} {format_size(n)}" for c, n in low.breakdown.items() if n)
        print(f"elasticzo plan: no split fits in {format_size(budget)} ({budget:,} B): the smallest, k={low.k}, "
              f"needs {format_size(low.peak_bytes)} ({low.peak_bytes:,} B: {parts}) at batch {batch_size}. "
              "Raise --budget or lower --batch-size.", file=err)
        return 1
    print(f"largest split that fits: k={best.k} ({best.k} BP layer(s)), peak {format_size(best.peak_bytes)} "
          f"({best.peak_bytes:,} B) <= {format_size(budget)}; train with "
          f"`elasticzo train --model {model} --batch-size {batch_size} --precision {precision} "
          f"--method elasticzo --bp-layers {best.k}`", file=out)
    return 0
