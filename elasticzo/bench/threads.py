"""How many torch threads the main job should use: 1 against all cores, measured.

The bundled models are small (LeNet-5: 61k parameters, batch 64): a step is many short ops,
and with several threads each op pays a fork/join. On a loaded machine a thread that is
descheduled stalls the whole op. This script times the README's main job (ElasticZO k=1 on
MNIST, FP32 and INT8) at 1 thread and at torch's default (one per core), interleaved round by
round in one process, alone and with a CPU-bound process beside it, and writes the per-round
ratios and their median with the CPU model, SIMD flags and load average::

    python -m elasticzo.bench.threads --data-root ../shared/datasets --out docs/bench/threads.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from elasticzo.bench.machine import cpu_info, describe
from elasticzo.config import TrainConfig
from elasticzo.data import BatchLoader, load_dataset
from elasticzo.train.loop import make_learner

BUSY_LOOP = "while True: pass"  # the CPU-bound neighbour


def _learner_and_batches(precision: str, data_root: str | None, steps: int):
    cfg = TrainConfig(precision=precision, data_root=data_root, train_limit=64 * steps)
    data = load_dataset("mnist", data_root, "train", limit=64 * steps, raw=precision == "int8")
    batches = list(BatchLoader(data.x, data.y, 64, seed=0).epoch_batches(0))
    return make_learner(cfg, 10, torch.device("cpu")), batches


def ms_per_step(learner, batches, threads: int) -> float:
    """Mean wall time of one training step over ``batches`` at ``threads`` torch threads (ms)."""
    torch.set_num_threads(threads)
    learner.train_step(*batches[0])  # warm-up: thread pool and caches at this thread count
    start = time.perf_counter()
    for x, y in batches:
        float(learner.train_step(x, y))  # the host sync the loop also pays, once per step here
    return 1e3 * (time.perf_counter() - start) / len(batches)


def compare(precision: str, data_root: str | None, counts: tuple[int, int], rounds: int, steps: int) -> dict:
    """Interleaved rounds of (1 thread, all threads), the order alternating; per-round ratios."""
    learner, batches = _learner_and_batches(precision, data_root, steps)
    times = {n: [] for n in counts}
    for r in range(rounds):
        for n in (counts if r % 2 == 0 else counts[::-1]):
            times[n].append(ms_per_step(learner, batches, n))
    one, many = counts
    ratios = [m / o for o, m in zip(times[one], times[many])]
    return {"precision": precision, "ms_per_step": {str(n): [round(t, 2) for t in v] for n, v in times.items()},
            "median_ms": {str(n): round(statistics.median(v), 2) for n, v in times.items()},
            f"ratio_{many}_over_{one}": [round(x, 3) for x in ratios],
            "median_ratio": round(statistics.median(ratios), 3)}


def run(data_root: str | None, rounds: int, steps: int, log=print) -> dict:
    default = torch.get_num_threads()
    counts = (1, max(default, 2))
    results = []
    for neighbour in ("none", "busy"):
        busy = subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) if neighbour == "busy" else None
        try:
            for precision in ("fp32", "int8"):
                row = {"neighbour": neighbour, "load_before": cpu_info()["load_avg"],
                       **compare(precision, data_root, counts, rounds, steps)}
                log(f"{precision}, neighbour {neighbour}: {row['median_ms']} ms/step, "
                    f"median ratio {counts[1]} threads / 1 thread = {row['median_ratio']}")
                results.append(row)
        finally:
            if busy is not None:
                busy.kill()
                busy.wait()
    torch.set_num_threads(default)
    from elasticzo.bench.runner import _git_state

    return {"command": " ".join([Path(sys.executable).name, "-m", "elasticzo.bench.threads", *sys.argv[1:]]),
            "git": _git_state(), "cpu": cpu_info(), "torch": torch.__version__, "default_threads": default, "rounds": rounds,
            "steps_per_round": steps, "job": "elasticzo train (lenet5, elasticzo k=1, batch 64, mnist)",
            "results": results}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default=None, help="else $ELASTICZO_DATA, else ./data")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per setting")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per round and thread count")
    parser.add_argument("--out", default="threads.json", help="where the figures go (JSON)")
    args = parser.parse_args(argv)
    print(f"machine: {describe(cpu_info())}")
    report = run(args.data_root, args.rounds, args.steps)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"figures written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
