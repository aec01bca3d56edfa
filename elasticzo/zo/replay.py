"""Rebuild the ZO part of a run from its seed log, without a single forward pass.

The ZO update is theta <- theta (1 - lr_t wd) - sum_j (g_j lr_t / q) z_j, with z_j a pure function
of (seed, step, j, layer) and g_j logged in ``seeds.jsonl``. Replaying those updates on the initial
weights reproduces the trained ZO weights bit for bit: a run can be audited, or shipped as its
initial seed plus one float per step.
"""
from __future__ import annotations

import torch

from elasticzo.optim.elastic import ElasticZO


def replay_zo(optimizer: ElasticZO, records: list[dict], lrs: list[float]) -> None:
    """Apply the logged ZO updates to the optimiser's ZO parameters.

    ``records`` are the lines of ``seeds.jsonl`` (each with ``step`` and ``g``), ``lrs[i]`` the
    ZO learning rate used at ``records[i]`` (the schedule is a pure function of the step): one
    float for every ZO param group, or a list with one per group.
    The optimiser must be built as in the run (same split, seed, queries, noise, weight decay).
    """
    zo = optimizer.zo_group()
    if zo is None:
        raise ValueError("replay_zo: the optimiser has no ZO part (bp_layers = all)")
    if len(records) != len(lrs):
        raise ValueError(f"replay_zo: {len(records)} log records but {len(lrs)} learning rates")
    device, dtype = zo["params"][0].device, optimizer._source(zo["params"][0]).dtype  # float32 for a bf16 master
    groups = [g for g in optimizer.param_groups if g["part"] == "zo"]
    for record, lr in zip(records, lrs):
        if record.get("g") is None:
            raise ValueError(f"replay_zo: step {record.get('step')} has no projected gradients in the log")
        for group, group_lr in zip(groups, lr if isinstance(lr, (list, tuple)) else [lr] * len(groups)):
            group["step"], group["lr"] = record["step"], group_lr
        grads = [torch.tensor(g, dtype=dtype, device=device) for g in record["g"]]
        optimizer.apply_zo_update(grads)
    for group in groups:
        group["step"] = records[-1]["step"] + 1 if records else group["step"]
