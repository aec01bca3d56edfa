"""FP32 vanilla ZO step / one forward, this tree against an older commit, in one process.

    OMP_NUM_THREADS=1 python scripts/fp32_zo_step_ab.py --old 364cf1c --batch-size 64

The old commit's ``elasticzo`` package is unpacked with ``git archive`` into a temporary folder and
imported as ``elasticzo_old`` (its torch op namespace renamed, so both register), so the old step,
the new step and one forward run interleaved round by round in one thread, as
``elasticzo.bench.speed`` times its candidates: LeNet-5 through the learner (the defaults of
``elasticzo train --method zo``) and the 1M-parameter MLP through ``ElasticZO``. Prints the medians
of per-round ratios (thread CPU time), so load on a shared machine hits old and new alike.
"""
from __future__ import annotations

import argparse
import importlib
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
from io import BytesIO
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]


def import_old(commit: str, into: Path):
    """``elasticzo`` of ``commit`` as the package ``elasticzo_old`` (loaded from ``into``)."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit, "elasticzo"], check=True, capture_output=True).stdout
    tarfile.open(fileobj=BytesIO(archive)).extractall(into)
    (into / "elasticzo").rename(into / "elasticzo_old")
    for path in (into / "elasticzo_old").rglob("*.py"):
        text = re.sub(r"\belasticzo\.", "elasticzo_old.", path.read_text())
        path.write_text(text.replace('"elasticzo_int8"', '"elasticzo_old_int8"'))  # a torch op namespace registers once
    sys.path.insert(0, str(into))
    return importlib.import_module("elasticzo_old.train.loop"), importlib.import_module("elasticzo_old.optim.elastic")


def candidates(old_loop, old_elastic, root: str | None, batch_size: int) -> dict:
    from elasticzo.bench.speed import MLP_HIDDEN, _batch, _forward
    from elasticzo.config import TrainConfig
    from elasticzo.models import MLP
    from elasticzo.optim.elastic import ElasticZO
    from elasticzo.train.loop import make_learner

    batch = _batch(root, batch_size, torch.device("cpu"))
    x, y = batch["fp32"], batch["y"]
    new = make_learner(TrainConfig(method="zo", batch_size=batch_size), 10, torch.device("cpu"))
    old = old_loop.make_learner(old_loop.TrainConfig(method="zo", batch_size=batch_size), 10, torch.device("cpu"))
    lenet = make_learner(TrainConfig(method="zo"), 10, torch.device("cpu")).model
    torch.manual_seed(0)
    m_new, m_old, mlp = (MLP(hidden=MLP_HIDDEN) for _ in range(3))
    o_new = ElasticZO.for_model(m_new, 0, lr_zo=3e-4, normalize=True)
    o_old = old_elastic.ElasticZO.for_model(m_old, 0, lr_zo=3e-4, normalize=True)
    return {"lenet-new": lambda: new.train_step(x, y), "lenet-old": lambda: old.train_step(x, y),
            "lenet-forward": lambda: _forward(lenet, x, y),
            "mlp-new": lambda: o_new.step(lambda: F.cross_entropy(m_new(x), y)),
            "mlp-old": lambda: o_old.step(lambda: F.cross_entropy(m_old(x), y)),
            "mlp-forward": lambda: _forward(mlp, x, y)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--old", required=True, help="the commit to compare with, e.g. 364cf1c")
    p.add_argument("--data-root", default=None)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(1)
    from elasticzo.bench.speed import cpu_info, median_ratio, time_rounds

    with tempfile.TemporaryDirectory() as tmp:
        steps = candidates(*import_old(args.old, Path(tmp)), args.data_root, args.batch_size)
        times = time_rounds(steps, args.rounds, args.steps)
    print(f"CPU {cpu_info()}, torch {torch.__version__}, batch {args.batch_size}, old {args.old}")
    for model in ("lenet", "mlp"):
        print(f"{model}: step / forward old {median_ratio(times, f'{model}-old', f'{model}-forward'):.3f}, "
              f"new {median_ratio(times, f'{model}-new', f'{model}-forward'):.3f}; new / old step "
              f"{median_ratio(times, f'{model}-new', f'{model}-old'):.3f}; median ms "
              + ", ".join(f"{k} {1e3 * statistics.median(v):.3f}" for k, v in times.items() if k.startswith(model)))


if __name__ == "__main__":
    main()
