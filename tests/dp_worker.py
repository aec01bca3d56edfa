"""Run under torchrun by tests/test_distributed.py: scenarios that need several ranks.

    python -m torch.distributed.run --standalone --nproc_per_node N tests/dp_worker.py SCENARIO RUN_DIR DATA_ROOT

- ``disagree``: the ranks' hashes differ (rank 1 holds other weights) -> ReplicaMismatch on
  every rank; then rank 1 is started with another --lr-bp -> ValueError naming it. Prints what
  each rank raised, one line per error, and exits 0 when both errors came.
- ``api``: the Python API: ``train(config)`` on each rank, as torchrun started it.
"""
from __future__ import annotations

import os
import sys

import torch

from elasticzo.config import TrainConfig
from elasticzo.train import distributed
from elasticzo.train.loop import train


def disagree(run_dir: str, data_root: str) -> int:
    rank = int(os.environ["RANK"])
    replicas = distributed.Replicas(torch.device("cpu"))
    caught = 0
    try:
        replicas.check_replicas({"w": torch.full((3,), float(rank == 1))}, step=7)
    except distributed.ReplicaMismatch as err:
        print(f"rank {rank} ReplicaMismatch: {err}", flush=True)
        caught += 1
    config = small_config(run_dir, data_root, lr_bp=0.1 if rank == 1 else 0.05)
    try:
        train(config)
    except ValueError as err:
        print(f"rank {rank} ValueError: {err}", flush=True)
        caught += 1
    replicas.close()
    return 0 if caught == 2 else 1


def small_config(run_dir: str, data_root: str, **changes) -> TrainConfig:
    settings = dict(data_root=data_root, train_limit=256, test_limit=128, epochs=1, batch_size=32,
                    run_dir=run_dir, progress=False, download=False, check_every=1)
    settings.update(changes)
    return TrainConfig(**settings)


if __name__ == "__main__":
    torch.set_num_threads(1)
    scenario, run_dir, data_root = sys.argv[1:4]
    if scenario == "disagree":
        sys.exit(disagree(run_dir, data_root))
    if scenario == "api":
        history = train(small_config(run_dir, data_root, precision=sys.argv[4]))
        print(f"rank {os.environ['RANK']} history {history}", flush=True)
        sys.exit(0)
    sys.exit(f"unknown scenario {scenario!r}")
