"""``elasticzo plan``: the measured training memory of every ZO/BP split, and the plan for a budget.

For each split k = 0 .. n (k = number of last layers trained with BP; 0 is vanilla ZO, n is
plain BP) one training step is run on a random batch of the right shape and dtype, with the
learner ``train()`` would build, and its peak memory is measured (``bench.memory``). Nothing is
estimated. With a budget, ``choose_plan`` answers (k, micro-batch): the most BP layers that fit
(more BP layers, better accuracy), then the largest chunk that fits (fewer chunks, faster), then,
for INT8, untiled convolutions (``int8_tile`` 0, faster) if they still fit.

With a micro-batch the batch is streamed (``data.stream``): the resident input is its indices
and labels; the dataset itself is storage (flash on a device) and is not counted.

Example::

    rows = measure_splits("lenet5", batch_size=64, precision="fp32")
    best = largest_fitting(rows, parse_size("3MiB"))     # a SplitMemory, or None
    plan, tried = choose_plan("lenet5", 64, "int8", parse_size("256KiB"))   # a Plan, or None
"""
from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation

import torch

from elasticzo.bench.memory import CATEGORIES, measure_step_memory
from elasticzo.config import TrainConfig
from elasticzo.data import get_spec, normalise_images
from elasticzo.data.stream import StreamedBatch
from elasticzo.models import build_model, parametrised_layers
from elasticzo.train.learner import seeded
from elasticzo.train.loop import make_learner, resolve_device

UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE = re.compile(r"^\s*([-+]?[0-9]*\.?[0-9]+)\s*([a-z]*)\s*$", re.IGNORECASE)
IMAGE_SHAPE = (1, 28, 28)  # every dataset the models train on: [C, H, W]
PLAN_FIELDS = ("model", "method", "bp_layers", "precision", "batch_size", "device", "seed", "micro_batch")  # plan's own
CHOSEN = ("int8_tile",)  # with --budget, chosen by the plan (as --set they shape the table)


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
    micro_batch: int = 0  # examples per chunk of each pass (0: the whole batch)
    options: dict = field(default_factory=dict)  # INT8 settings the plan chose (int8_tile, int8_cache_perturbed)


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
                   device: str = "cpu", seed: int = 0, micro_batch: int = 0, **settings) -> list[SplitMemory]:
    """Peak memory of one training step for every split k = 0 .. n; ``settings`` go to TrainConfig."""
    layers = _check_and_layers(model, precision, num_classes, seed)
    return [measure_split(model, batch_size, precision, k, num_classes=num_classes, device=device, seed=seed,
                          micro_batch=micro_batch, **settings) for k in range(len(layers) + 1)]


def _check_and_layers(model: str, precision: str, num_classes: int, seed: int) -> list[torch.nn.Module]:
    with seeded(seed):
        return parametrised_layers(build_model(model, num_classes))


def measure_split(model: str, batch_size: int, precision: str, k: int, *, num_classes: int = 10, device: str = "cpu",
                  seed: int = 0, micro_batch: int = 0, **settings) -> SplitMemory:
    """Peak memory of one training step at split ``k`` (and ``micro_batch``; its batch streamed)."""
    layers = _check_and_layers(model, precision, num_classes, seed)
    dev = resolve_device(device)
    batch = random_batch(batch_size, precision, num_classes, seed, model, settings.get("num_points", 256))
    x, y = (t.to(dev) for t in batch)
    config = TrainConfig(**{**settings, "model": model, "method": "elasticzo", "bp_layers": k, "precision": precision,
                            "batch_size": batch_size, "device": device, "seed": seed,
                            "micro_batch": micro_batch}).validate()
    learner = make_learner(config, num_classes, dev)
    if 0 < micro_batch < batch_size:
        x = StreamedBatch(x, torch.arange(batch_size, device=dev))  # resident: indices and labels only
        inputs = (x.index, y)
    else:
        inputs = (x, y)
    mem = measure_step_memory(lambda: learner.train_step(x, y), inputs=inputs, **_memory_targets(learner))
    return SplitMemory(k, tuple(_layer_name(m) for m in layers[len(layers) - k:]), mem.peak_bytes,
                       {c: mem.breakdown_at_peak.get(c, 0) for c in CATEGORIES}, micro_batch,
                       {name: settings[name] for name in CHOSEN if name in settings})


def largest_fitting(rows: list[SplitMemory], budget: int) -> SplitMemory | None:
    """The split with the most BP layers whose measured peak is within ``budget`` bytes."""
    return max((r for r in rows if r.peak_bytes <= budget), key=lambda r: r.k, default=None)


def micro_candidates(batch_size: int) -> list[int]:
    """Chunk sizes the planner tries, ascending: powers of two below the batch, then the batch itself."""
    return [1 << i for i in range(batch_size.bit_length()) if 1 << i < batch_size] + [batch_size]


def choose_plan(model: str, batch_size: int, precision: str, budget: int, *, device: str = "cpu", seed: int = 0,
                num_classes: int = 10, log=None, memo: dict | None = None,
                **settings) -> tuple[SplitMemory | None, list[SplitMemory]]:
    """(the plan, every measurement taken): the most BP layers that fit ``budget`` at some chunk size,
    then the largest chunk that fits, then (INT8) the faster options that still fit. None if nothing fits.

    Memory grows with the chunk, so the largest fitting chunk below the batch is found by
    bisection, after the whole batch (no chunks) is tried; a split is dropped when neither the
    whole batch nor chunk 1 with the frugal options fits.
    """
    n = len(_check_and_layers(model, precision, num_classes, seed))
    settings = {k: v for k, v in settings.items() if k not in CHOSEN}
    frugal: dict = {}
    tried: list[SplitMemory] = []

    memo = {} if memo is None else memo  # (k, micro, options) -> SplitMemory: shared by plans for several budgets

    def measure(k: int, micro: int, **options) -> SplitMemory:
        key = (precision, k, micro, tuple(sorted(options.items())))
        if key not in memo:
            memo[key] = measure_split(model, batch_size, precision, k, num_classes=num_classes, device=device,
                                      seed=seed, micro_batch=0 if micro >= batch_size else micro, **settings, **options)
        row = memo[key]
        tried.append(row)
        if log is not None:
            log(f"  measured k={k} micro-batch {micro} {options or ''}: {format_size(row.peak_bytes)}")
        return row

    sizes = micro_candidates(batch_size)
    for k in range(n, -1, -1):
        whole = measure(k, batch_size, **frugal)
        if whole.peak_bytes <= budget:  # first, and apart: near the batch size, summing the chunks'
            return _finish(whole, budget, measure, batch_size, n, precision), tried  # BP gradients costs more
        if batch_size == 1:
            continue
        best = measure(k, sizes[0], **frugal)
        if best.peak_bytes > budget:
            continue
        lo, hi = 0, len(sizes) - 2
        while lo < hi:  # invariant: sizes[lo] fits
            mid = (lo + hi + 1) // 2
            row = measure(k, sizes[mid], **frugal)
            lo, hi, best = (mid, hi, row) if row.peak_bytes <= budget else (lo, mid - 1, best)
        return _finish(best, budget, measure, batch_size, n, precision), tried
    return None, tried


def _finish(best: SplitMemory, budget: int, measure, batch_size: int, num_layers: int, precision: str) -> SplitMemory:
    if precision != "int8":
        return best
    return _faster_int8(best, budget, measure, batch_size)


def _faster_int8(best: SplitMemory, budget: int, measure, batch_size: int) -> SplitMemory:
    """Untiled convolutions (``int8_tile`` 0: faster, 4 bytes of int32 per activation) when a chunk
    is larger than a tile and they still fit."""
    micro = best.micro_batch or batch_size
    if micro > TrainConfig.int8_tile:
        row = measure(best.k, micro, **{**best.options, "int8_tile": 0})
        if row.peak_bytes <= budget:
            best = row
    return best


def train_command(model: str, batch_size: int, precision: str, row: SplitMemory) -> str:
    """The ``elasticzo train`` command line of a plan."""
    flags = [f"--model {model}", f"--batch-size {batch_size}", f"--precision {precision}", "--method elasticzo",
             f"--bp-layers {row.k}"]
    if row.micro_batch:
        flags.append(f"--micro-batch {row.micro_batch}")
    if "int8_tile" in row.options:
        flags.append(f"--int8-tile {row.options['int8_tile']}")
    return "elasticzo train " + " ".join(flags)


def report(rows: list[SplitMemory], budget: int | None, header: str) -> str:
    lines = [header, f"{'k':>2}  {'micro':>5}  {'peak':>10}  {'bytes':>11}  {'fits':>4}  BP layers (the rest train with ZO)"]
    for r in rows:
        fits = "" if budget is None else ("yes" if r.peak_bytes <= budget else "no")
        layers = ", ".join(r.bp_layers) if r.bp_layers else "none (vanilla ZO)"
        options = "".join(f" [{k}={v}]" for k, v in r.options.items())
        lines.append(f"{r.k:>2}  {r.micro_batch or 'all':>5}  {format_size(r.peak_bytes):>10}  {r.peak_bytes:>11,}  "
                     f"{fits:>4}  {layers}{options}")
    return "\n".join(lines)


def plan_main(model: str, batch_size: int, precision: str, budget_text: str | None, device: str = "cpu",
              settings: dict | None = None, out=None, err=None, micro_batch: int = 0) -> int:
    """The ``elasticzo plan`` command: the table, or with a budget the plan of each precision; 1 when none fits."""
    out, err = out or sys.stdout, err or sys.stderr
    budget = parse_size(budget_text) if budget_text is not None else None
    if batch_size < 1:
        raise ValueError(f"--batch-size: must be >= 1, got {batch_size}")
    if micro_batch < 0:
        raise ValueError(f"--micro-batch: must be >= 0, got {micro_batch}")
    fixed = sorted(set(settings or {}) & set(PLAN_FIELDS))
    if fixed:
        raise ValueError(f"--set: {', '.join(fixed)} are set by plan itself (use its own flags)")
    precisions = ("fp32", "int8") if precision == "both" else (precision,)
    if budget is None:
        for p in precisions:
            rows = measure_splits(model, batch_size, p, device=device, micro_batch=micro_batch, **(settings or {}))
            print(report(rows, None, f"measured peak training memory per step: {model}, batch {batch_size}, {p}"
                         + (f", micro-batch {micro_batch}" if micro_batch else "")), file=out)
        return 0
    found = [_plan_one(model, batch_size, p, budget, device, settings or {}, out, err) for p in precisions]
    return 0 if any(found) else 1


def _plan_one(model, batch_size, precision, budget, device, settings, out, err) -> bool:
    best, tried = choose_plan(model, batch_size, precision, budget, device=device, **settings)
    print(report(tried, budget, f"measured peak training memory per step: {model}, batch {batch_size}, {precision}, "
                 f"budget {format_size(budget)} ({budget:,} B)"), file=out)
    if best is None:
        low = min(tried, key=lambda r: r.peak_bytes)
        parts = ", ".join(f"{c} {format_size(n)}" for c, n in low.breakdown.items() if n)
        print(f"elasticzo plan: {precision}: nothing fits in {format_size(budget)} ({budget:,} B): the smallest, k={low.k} "
              f"with micro-batch {low.micro_batch or batch_size}, needs {format_size(low.peak_bytes)} "
              f"({low.peak_bytes:,} B: {parts}) at batch {batch_size}. Raise --budget or lower --batch-size.", file=err)
        return False
    chunk = f"micro-batch {best.micro_batch}" if best.micro_batch else "the whole batch"
    print(f"plan {precision}: k={best.k} ({best.k} BP layer(s)), {chunk}, peak {format_size(best.peak_bytes)} "
          f"({best.peak_bytes:,} B) <= {format_size(budget)}; train with `{train_command(model, batch_size, precision, best)}`",
          file=out)
    return True
