"""Measurements on one real batch: peak memory of a step with its breakdown, time per step by
phase, our methods and the same-process peers (inference, MeZO, plain PyTorch BP) timed
interleaved round by round, and MeZO's restore drift.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

from elasticzo.bench.grid import BenchConfig, Method
from elasticzo.bench.memory import CATEGORIES, measure_step_memory
from elasticzo.bench.peer import MeZOPeer, PlainBPLoop, forward_loss
from elasticzo.bench.timing import StepTimer
from elasticzo.config import TrainConfig
from elasticzo.data import get_spec, load_split
from elasticzo.models import build_model
from elasticzo.optim.elastic import ElasticZO
from elasticzo.train.learner import seeded
from elasticzo.train.loop import make_learner, resolve_device


@dataclass
class Candidate:
    """Something whose step is measured: ``step()`` runs one training step on the fixed batch."""

    key: str
    label: str
    step: Callable[[], Any]
    targets: dict  # params / optimizer / inputs for measure_step_memory
    precision: str = "fp32"


def _batch(cfg: BenchConfig, device: torch.device) -> dict[str, torch.Tensor]:
    """The first ``batch_size`` training examples, normalised (fp32) and raw (int8)."""
    name = cfg.datasets[0]
    raw, y = load_split(name, cfg.data_root, "train", cfg.download, cfg.batch_size, normalise=False)
    x, _ = load_split(name, cfg.data_root, "train", cfg.download, cfg.batch_size, normalise=True)
    return {"fp32": x.to(device), "int8": raw.to(device), "y": y.to(device)}


def _ours(cfg: BenchConfig, m: Method, batch: dict, device: torch.device) -> Candidate:
    tc = m.train_config(cfg, dataset=cfg.datasets[0])
    learner = make_learner(tc, get_spec(tc.dataset).num_classes, device)
    x, y = batch[m.precision], batch["y"]
    targets = dict(params=learner.model, optimizer=learner.optimizer)
    return Candidate(m.key, m.label, lambda: learner.train_step(x, y), {**targets, "inputs": (x, y)}, m.precision)


def _peers(cfg: BenchConfig, batch: dict, device: torch.device) -> list[Candidate]:
    tc = TrainConfig(**cfg.overrides)  # the same hyper-parameters as our rows
    x, y = batch["fp32"], batch["y"]

    def fresh():
        with seeded(cfg.seed):
            return build_model(cfg.model, get_spec(cfg.datasets[0]).num_classes).to(device)

    fwd, mezo, mezo_ip, plain = fresh(), fresh(), fresh(), fresh()
    mezo_peer = MeZOPeer(mezo, lr=tc.zo_learning_rate(), eps=tc.eps, seed=cfg.seed)
    mezo_ip_peer = MeZOPeer(mezo_ip, lr=tc.zo_learning_rate(), eps=tc.eps, seed=cfg.seed, in_place=True)
    plain_peer = PlainBPLoop(plain, lr=tc.lr_bp, momentum=tc.momentum, weight_decay=tc.weight_decay)
    inputs = (x, y)
    return [
        Candidate("forward", "one forward pass (no grad)", lambda: forward_loss(fwd, x, y),
                  dict(params=fwd, inputs=inputs)),
        Candidate("mezo", "MeZO peer (reference form)*", lambda: mezo_peer.step(x, y),
                  dict(params=mezo, inputs=inputs)),
        Candidate("mezo_inplace", "MeZO peer (in-place add_)*", lambda: mezo_ip_peer.step(x, y),
                  dict(params=mezo_ip, inputs=inputs)),
        Candidate("plain_bp", "plain PyTorch BP loop", lambda: plain_peer.step(x, y),
                  dict(params=plain, optimizer=plain_peer.optimizer, inputs=inputs)),
    ]


def time_interleaved(steps: dict[str, Callable[[], Any]], total: int, warmup: int, rounds: int) -> dict:
    """Warm every step up, then time them round by round (each ``total/rounds`` steps per round)."""
    for fn in steps.values():
        for _ in range(warmup):
            fn()
    timers = {k: StepTimer() for k in steps}
    per_round = math.ceil(total / rounds)
    for _ in range(rounds):
        for key, fn in steps.items():
            for _ in range(per_round):
                with timers[key].step():
                    fn()
    return {k: t.report() for k, t in timers.items()}


def measure(cfg: BenchConfig, methods: list[Method], notes: list[str], log: Callable) -> dict[str, dict]:
    """Peak memory with breakdown and per-phase step time of every method and peer."""
    device = resolve_device(cfg.device)
    batch = _batch(cfg, device)
    candidates = []
    for m in methods:
        try:
            candidates.append(_ours(cfg, m, batch, device))
        except Exception as err:  # noqa: BLE001 - see train_grid
            if m.precision == "fp32":
                raise
            notes.append(f"{m.label}: not measured ({type(err).__name__}: {err})")
    candidates += _peers(cfg, batch, device)
    results: dict[str, dict] = {}
    for c in candidates:
        log(f"[bench] memory of one step: {c.label}")
        mem = measure_step_memory(c.step, **c.targets)
        results[c.key] = {"label": c.label, "precision": c.precision, "peak_bytes": mem.peak_bytes,
                          "breakdown": {k: mem.breakdown_at_peak.get(k, 0) for k in CATEGORIES}}
    log(f"[bench] timing {len(candidates)} steps x {cfg.timing_steps} (interleaved, {cfg.rounds} rounds)")
    reports = time_interleaved({c.key: c.step for c in candidates}, cfg.timing_steps, cfg.warmup, cfg.rounds)
    for key, rep in reports.items():
        results[key].update(steps=rep.steps, median_step_ms=1e3 * rep.median_step_s,
                            median_phase_ms={k: 1e3 * v for k, v in rep.median_phase_s.items()},
                            mean_phase_ms={k: 1e3 * v for k, v in rep.mean_phase_s.items()})
    return results


def restore_drift(cfg: BenchConfig, repeats: int) -> dict:
    """max |theta - theta_0| after ``repeats`` perturbation rounds that should leave theta as it was.

    MeZO: +eps z, -2 eps z, +eps z in place. Ours: ``repeats`` vanilla ZO steps with lr_zo = 0
    (perturbed forward passes, then an update by 0) on a small batch.
    """
    def fresh():
        with seeded(cfg.seed):
            return build_model(cfg.model, get_spec(cfg.datasets[0]).num_classes)

    eps = TrainConfig(**cfg.overrides).eps
    mezo = MeZOPeer(fresh(), eps=eps).restore_drift(repeats, seed=cfg.seed)
    model = fresh()
    before = [p.detach().clone() for p in model.parameters()]
    opt = ElasticZO.for_model(model, 0, lr_zo=0.0, eps=eps, seed=cfg.seed)
    x, y = torch.randn(8, 1, 28, 28), torch.arange(8) % 10
    for _ in range(repeats):
        opt.step(lambda backward=False: torch.nn.functional.cross_entropy(model(x), y))
    ours = max(float((p - b).abs().max()) for p, b in zip(model.parameters(), before))
    return {"repeats": repeats, "eps": eps, "max_abs": mezo, "ours_max_abs": ours}


# ---------------------------------------------------------------------------------------------
# Ratios: the project's performance targets and the paper's claims
