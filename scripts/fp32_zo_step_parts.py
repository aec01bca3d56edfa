"""Where an FP32 vanilla ZO step's time goes beyond its two forward passes (LeNet-5, one batch).

    OMP_NUM_THREADS=1 python scripts/fp32_zo_step_parts.py --data-root ../shared/datasets --batch-size 64

1. The aten ops of one step and of one forward (counted by a dispatch mode).
2. Ablations, timed as ``elasticzo.bench.speed`` times its candidates (one thread, interleaved
   round by round, thread CPU time, median of per-round ratios to one forward): the step as it
   is; without the perturbed copies (the hooks run, the layers compute with theta); without the
   hooks at all; without the projected gradient and the update; without hooks and update ("bare":
   the two closures and the optimiser's scaffolding). Each ablation has its own learner; the
   numbers it trains to are meaningless, only its time is read.
"""
from __future__ import annotations

import argparse
import collections
import statistics

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from elasticzo.bench.speed import _batch, _forward, time_rounds
from elasticzo.config import TrainConfig
from elasticzo.optim.elastic import ElasticZO
from elasticzo.train.loop import make_learner
from elasticzo.zo.counter import LayerDirections

ABLATIONS = {"step": (), "no copies": ("copies",), "no hooks": ("hooks",), "no update": ("update",),
             "bare": ("hooks", "update")}


class OpCount(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


def _unchanged(self, xs, key, kind, scales, in_place=False):
    return xs  # the layer computes with theta itself


def ablated_step(learner, x, y, removed: tuple):
    """learner.train_step with the parts in ``removed`` taken out (its hooks are cleared up front)."""
    real_call, real_apply = LayerDirections.__call__, ElasticZO._zo_apply
    if "hooks" in removed:
        for m in learner.model.modules():
            m._forward_pre_hooks.clear(), m._forward_hooks.clear()

    def step():
        LayerDirections.__call__ = _unchanged if "copies" in removed else real_call
        ElasticZO._zo_apply = (lambda self, zo, losses: None) if "update" in removed else real_apply
        try:
            learner.train_step(x, y)
        finally:
            LayerDirections.__call__, ElasticZO._zo_apply = real_call, real_apply
    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", default=None)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--rounds", type=int, default=30)
    args = p.parse_args()
    torch.set_num_threads(1)
    batch = _batch(args.data_root, args.batch_size, torch.device("cpu"))
    x, y = batch["fp32"], batch["y"]
    config = TrainConfig(method="zo", batch_size=args.batch_size)
    learner = make_learner(config, 10, torch.device("cpu"))
    learner.train_step(x, y)  # hooks installed, kernel built
    for name, fn in (("step", lambda: learner.train_step(x, y)), ("forward", lambda: _forward(learner.model, x, y))):
        with OpCount() as count:
            fn()
        print(f"aten ops per {name}: {sum(count.ops.values())}  {dict(count.ops.most_common())}")
    steps = {}
    for name, removed in ABLATIONS.items():
        ablated = make_learner(config, 10, torch.device("cpu"))
        ablated.train_step(x, y)
        steps[name] = ablated_step(ablated, x, y, removed)
    forward = make_learner(TrainConfig(method="zo"), 10, torch.device("cpu")).model
    steps["forward"] = lambda: _forward(forward, x, y)
    times = time_rounds(steps, args.rounds, 3)
    for name in steps:
        ratio = statistics.median(a / b for a, b in zip(times[name], times["forward"]))
        print(f"{name:10s} {1e3 * statistics.median(times[name]):7.3f} ms   / one forward: {ratio:.3f}")


if __name__ == "__main__":
    main()
