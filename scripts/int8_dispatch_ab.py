"""INT8 step with the native ops called directly against through torch's dispatcher, interleaved.

    OMP_NUM_THREADS=1 python scripts/int8_dispatch_ab.py --data-root ../shared/datasets --batch-sizes 16 64

``native_ops.OPS`` runs an op's Python implementation directly when no dispatch mode watches;
"dispatcher" forces every call through ``torch.ops.elasticzo_int8`` (as before that change) by
making ``native_ops._watched`` answer True. Both arms train twin LeNet-5 copies (``bench.speed``'s
steps) from one seed; the script checks their weights stay bit-identical, then prints the median
of per-round ratios dispatcher / direct with the CPU's model and SIMD flags.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from elasticzo.bench.speed import METHODS, _batch, cpu_info
from elasticzo.config import TrainConfig
from elasticzo.int8 import native_ops
from elasticzo.train.loop import make_learner

_DIRECT = native_ops._watched


def _arm(through_dispatcher: bool) -> None:
    native_ops._watched = (lambda: True) if through_dispatcher else _DIRECT


def _step(method: str, batch: dict):
    """(step, model): an INT8 LeNet-5 learner with ``elasticzo train``'s defaults, as ``bench.speed``."""
    torch.manual_seed(0)
    tc = TrainConfig(precision="int8", batch_size=len(batch["y"]), **METHODS[method])
    learner = make_learner(tc, 10, torch.device("cpu"))
    return (lambda: learner.train_step(batch["int8"], batch["y"])), learner.model


def measure(method: str, batch_size: int, data_root: str | None, rounds: int, steps: int) -> float:
    batch = _batch(data_root, batch_size, torch.device("cpu"))
    arms = {False: _step(method, batch), True: _step(method, batch)}
    ratios = []
    for r in range(rounds + 1):  # round 0 warms up
        took = {}
        for through, (step, _) in arms.items():
            _arm(through)
            t0 = time.thread_time()  # as bench.speed: other jobs on the machine do not count
            for _ in range(steps):
                step()
            took[through] = time.thread_time() - t0
        if r:
            ratios.append(took[True] / took[False])
    _arm(False)
    for a, b in zip(arms[False][1].state_dict().values(), arms[True][1].state_dict().values()):
        if not torch.equal(a, b):
            raise SystemExit("direct and dispatcher arms diverged: the two paths are not bit-identical")
    return statistics.median(ratios)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", default=None)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 64])
    p.add_argument("--methods", nargs="+", default=["zo", "k1", "bp"], choices=sorted(METHODS))
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(1)
    print(cpu_info())
    for b in args.batch_sizes:
        for m in args.methods:
            ratio = measure(m, b, args.data_root, args.rounds, args.steps)
            print(f"batch {b:4d} {m:3s}: dispatcher / direct step time, median of {args.rounds} rounds: {ratio:.3f}")


if __name__ == "__main__":
    main()
