"""Step-time ratios FP32 / INT8 and ZO step / forward, measured the way a shared CPU allows.

    python -m elasticzo.bench.speed --data-root ../shared/datasets --batch-sizes 16 64 256

Every candidate step runs in this one process, one thread, interleaved round by round; a round
times ``--steps`` steps of each candidate in thread CPU time (``time.thread_time``: other
processes on the machine do not inflate it). Each ratio is the median over rounds of that
round's ratio. The CPU model and SIMD flags and the integer products ``"auto"`` chose are
printed with the table and written to ``speed.json`` / ``speed.md`` in ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from elasticzo.config import TrainConfig
from elasticzo.data.vision import load_split
from elasticzo.int8 import ops
from elasticzo.int8.ops import IMPLS, choose_impl, set_matmul_impl
from elasticzo.models import MLP
from elasticzo.optim.elastic import ElasticZO
from elasticzo.train.loop import make_learner

SIMD = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8",
        "asimd", "asimddp", "i8mm", "sve")
METHODS = {"zo": dict(method="zo"), "k1": dict(method="elasticzo", bp_layers=1),
           "k2": dict(method="elasticzo", bp_layers=2), "bp": dict(method="bp")}
MLP_HIDDEN = (1024, 256)  # 784*1024 + 1024*256 + 256*10 + biases = 1.07M parameters


def cpu_info() -> dict:
    """Model name and the SIMD flags that decide integer speed (from /proc/cpuinfo)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model in ("", platform.machine(), platform.processor()):
                model = value.strip()
            if key.strip() in ("flags", "Features") and not flags:
                flags = set(value.split())
    except OSError:
        pass
    return {"model": model, "simd": [f for f in SIMD if f in flags], "machine": platform.machine()}


def _batch(root: str | None, batch: int, device: torch.device) -> dict:
    raw, y = load_split("mnist", root, "train", False, batch, normalise=False)
    x, _ = load_split("mnist", root, "train", False, batch, normalise=True)
    return {"fp32": x.to(device), "int8": raw.to(device), "y": y.to(device)}


def lenet_steps(batch: dict, device: torch.device, methods=METHODS) -> dict[str, Callable[[], object]]:
    """Training steps of LeNet-5 (defaults of ``elasticzo train``) per method and precision, plus a forward."""
    steps = {}
    for name, fields in methods.items():
        for precision in ("fp32", "int8"):
            tc = TrainConfig(precision=precision, batch_size=len(batch["y"]), **fields)
            learner = make_learner(tc, 10, device)
            x = batch[precision]
            steps[f"{name}-{precision}"] = lambda learner=learner, x=x: learner.train_step(x, batch["y"])
    fwd = make_learner(TrainConfig(method="zo"), 10, device).model
    steps["forward-fp32"] = lambda: _forward(fwd, batch["fp32"], batch["y"])
    return steps


def mlp_steps(batch: dict, device: torch.device) -> dict[str, Callable[[], object]]:
    """Vanilla ZO step and one forward of the 1M-parameter MLP."""
    x, y = batch["fp32"], batch["y"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model, fwd = MLP(hidden=MLP_HIDDEN).to(device), MLP(hidden=MLP_HIDDEN).to(device)
    opt = ElasticZO.for_model(model, 0, lr_zo=3e-4, normalize=True)
    closure = lambda backward=True: F.cross_entropy(model(x), y)
    return {"mlp1m-zo": lambda: opt.step(closure), "mlp1m-forward": lambda: _forward(fwd, x, y)}


@torch.no_grad()
def _forward(model, x, y):
    return F.cross_entropy(model(x), y)


def time_rounds(steps: dict[str, Callable[[], object]], rounds: int, per_round: int, warmup: int = 3) -> dict:
    """Thread CPU seconds per step, per round: {name: [round means]} (interleaved round by round)."""
    for fn in steps.values():
        for _ in range(warmup):
            fn()
    out = {name: [] for name in steps}
    for _ in range(rounds):
        for name, fn in steps.items():
            t0 = time.thread_time()
            for _ in range(per_round):
                fn()
            out[name].append((time.thread_time() - t0) / per_round)
    return out


def median_ratio(times: dict, num: str, den: str) -> float:
    return statistics.median(a / b for a, b in zip(times[num], times[den]))


RATIOS = [  # (name, numerator, denominator, target)
    ("FP32 / INT8 step, vanilla ZO (k=0)", "zo-fp32", "zo-int8", ">= 1.5"),
    ("FP32 / INT8 step, ElasticZO k=1", "k1-fp32", "k1-int8", ">= 1.5"),
    ("FP32 / INT8 step, ElasticZO k=2", "k2-fp32", "k2-int8", ">= 1.5"),
    ("FP32 / INT8 step, NITI-BP", "bp-fp32", "bp-int8", ">= 1.2"),
    ("FP32 vanilla ZO step / one forward, LeNet-5", "zo-fp32", "forward-fp32", "<= 2.3"),
    ("FP32 vanilla ZO step / one forward, 1M MLP", "mlp1m-zo", "mlp1m-forward", "<= 3"),
]


def measure(root: str | None, batch_sizes: list[int], rounds: int, per_round: int, device: torch.device) -> dict:
    results = {}
    for b in batch_sizes:
        batch = _batch(root, b, device)
        steps = {**lenet_steps(batch, device), **(mlp_steps(batch, device) if b == 64 else {})}
        print(f"[speed] batch {b}: {len(steps)} steps x {rounds} rounds x {per_round}", flush=True)
        times = time_rounds(steps, rounds, per_round)
        results[b] = {"median_step_ms": {k: 1e3 * statistics.median(v) for k, v in times.items()},
                      "ratios": {name: median_ratio(times, n, d) for name, n, d, _ in RATIOS if n in times and d in times}}
    return results


def profile_steps(root: str | None, device: torch.device, steps: int = 30, top: int = 15) -> str:
    """cProfile of the FP32 vanilla ZO step (LeNet-5 and the 1M MLP, batch 64): where a step's
    time goes beyond its two forward passes (noise, hooks, Python), functions by own time."""
    import cProfile
    import io
    import pstats

    batch = _batch(root, 64, device)
    candidates = {"LeNet-5": lenet_steps(batch, device, {"zo": METHODS["zo"]})["zo-fp32"],
                  "1M MLP": mlp_steps(batch, device)["mlp1m-zo"]}
    out = io.StringIO()
    for name, fn in candidates.items():
        fn()  # warm-up: kernels built, hooks installed
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(steps):
            fn()
        prof.disable()
        out.write(f"## FP32 vanilla ZO step, {name}, batch 64, {steps} steps (cProfile, own time)\n")
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(top)
    return out.getvalue()


def markdown(meta: dict, results: dict) -> str:
    sizes = list(results)
    lines = [f"CPU: {meta['cpu']['model']} ({meta['cpu']['machine']}; SIMD: {' '.join(meta['cpu']['simd'])}), "
             f"torch {meta['torch']}, {meta['threads']} thread, native kernels built with -march={meta['march']}, "
             f"int8 products: {meta['int8_impl']}", "",
             f"`{meta['command']}`", "",
             "| ratio (median of per-round ratios) | target | " + " | ".join(f"batch {b}" for b in sizes) + " |",
             "| --- | --- | " + " | ".join("---" for _ in sizes) + " |"]
    for name, _, _, target in RATIOS:
        cells = [f"{results[b]['ratios'][name]:.2f}" if name in results[b]["ratios"] else "—" for b in sizes]
        lines.append(f"| {name} | {target} | " + " | ".join(cells) + " |")
    lines += ["", "| step (median ms, thread CPU time) | " + " | ".join(f"batch {b}" for b in sizes) + " |",
              "| --- | " + " | ".join("---" for _ in sizes) + " |"]
    for key in dict.fromkeys(k for b in sizes for k in results[b]["median_step_ms"]):
        lines.append(f"| {key} | " + " | ".join(f"{results[b]['median_step_ms'].get(key, float('nan')):.3f}"
                                                 for b in sizes) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m elasticzo.bench.speed", description=__doc__.splitlines()[0])
    p.add_argument("--data-root", default=None, help="else $ELASTICZO_DATA, else ./data")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 64, 256])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--steps", type=int, default=3, help="steps of each candidate per round")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--out", default="bench-results")
    p.add_argument("--profile", action="store_true", help="also write profile.txt: cProfile of the FP32 ZO step")
    p.add_argument("--int8-impl", default="auto", choices=IMPLS,
                   help="integer products: auto (speed probe) or one forced, e.g. native where _int_mm is a slow loop")
    args = p.parse_args(argv)
    threads, impl = torch.get_num_threads(), ops._default_impl
    torch.set_num_threads(1)
    set_matmul_impl(args.int8_impl)
    try:
        return _run(args, argv)
    finally:
        torch.set_num_threads(threads)
        set_matmul_impl(impl)


def _run(args: argparse.Namespace, argv: list[str] | None) -> int:
    """Measure, print the tables, write speed.json / speed.md into ``args.out``."""
    device = torch.device(args.device)
    meta = {"cpu": cpu_info(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "int8_impl": choose_impl(device.type) if args.int8_impl == "auto" else args.int8_impl,
            "march": os.environ.get("ELASTICZO_MARCH", "native"),
            "command": "python -m elasticzo.bench.speed " + " ".join(sys.argv[1:] if argv is None else argv)}
    results = measure(args.data_root, args.batch_sizes, args.rounds, args.steps, device)
    text = markdown(meta, results)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "speed.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    (out / "speed.md").write_text(text)
    if args.profile:
        (out / "profile.txt").write_text(profile_steps(args.data_root, device))
        print(f"[speed] profile of the FP32 ZO step: {out / 'profile.txt'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
