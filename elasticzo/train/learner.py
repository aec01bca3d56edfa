"""A learner = a model + how it is trained, behind the few calls the training loop needs.

The loop (``train.loop``) is the same for every method and precision; only the learner differs:
``FloatLearner`` trains a float model with ``ElasticZO`` (BP, vanilla ZO and the hybrid), the
INT8 learner trains an integer network with integer-only arithmetic.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from elasticzo.config import TrainConfig
from elasticzo.models import build_model, parametrised_layers
from elasticzo.optim.elastic import ElasticZO


def resolve_bp_layers(config: TrainConfig, num_layers: int) -> int:
    """The split k for a method: bp -> all layers, zo -> 0, elasticzo -> --bp-layers (checked)."""
    if config.method == "bp":
        return num_layers
    if config.method == "zo":
        return 0
    if not 0 <= config.bp_layers <= num_layers:
        raise ValueError(f"--bp-layers: {config.bp_layers} is out of range; {config.model} has "
                         f"{num_layers} parametrised layers, so use 0..{num_layers}")
    return config.bp_layers


def schedule_factor(schedule: str, progress: float) -> float:
    """Learning-rate multiplier at ``progress`` in [0, 1] of the run (a pure function: resume-safe)."""
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))
    return 1.0


@contextlib.contextmanager
def seeded(seed: int):
    """Run a block (model init) with the global RNG seeded, then give the caller's RNG state back."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


class FloatLearner:
    """A float model trained by ``ElasticZO`` with the split of ``config``."""

    def __init__(self, config: TrainConfig, num_classes: int, device: torch.device):
        with seeded(config.seed):
            self.model: nn.Module = build_model(config.model, num_classes).to(device)
        self.bp_layers = resolve_bp_layers(config, len(parametrised_layers(self.model)))
        self.optimizer = ElasticZO.for_model(
            self.model, self.bp_layers, lr_zo=config.zo_learning_rate(), lr_bp=config.lr_bp, eps=config.eps,
            queries=config.queries, noise=config.noise, grad_clip=config.grad_clip or None, normalize=config.normalize,
            zo_weight_decay=config.zo_weight_decay, momentum=config.momentum,
            weight_decay=config.weight_decay, bp_grad=config.bp_grad, seed=config.seed)
        self.base_lrs = [g["lr"] for g in self.optimizer.param_groups]
        self.schedule = config.schedule

    def set_progress(self, progress: float) -> None:
        """Set the learning rates for ``progress`` (fraction of all steps done)."""
        factor = schedule_factor(self.schedule, progress)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * factor

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One optimiser step on a batch; returns the loss as a 0-dim tensor (no host sync)."""
        self.model.train()

        def closure(backward: bool = True) -> torch.Tensor:
            loss = F.cross_entropy(self.model(x), y)
            if backward:
                loss.backward()
            return loss

        return self.optimizer.step(closure)

    def step_record(self) -> torch.Tensor | None:
        """Projected gradients [q] of the last step (for the seed log), None without a ZO part."""
        return self.optimizer.last_projected_grads

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        self.model.eval()
        return self.model(x).argmax(dim=1)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Everything tensor-valued a resume needs: weights and optimiser state (momentum, g RMS)."""
        tensors = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        for i, p in enumerate(params):
            for key, value in self.optimizer.state.get(p, {}).items():
                tensors[f"optim.{i}.{key}"] = value
        return tensors

    def state_meta(self) -> dict:
        return {"steps": [g["step"] for g in self.optimizer.param_groups]}

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict, path) -> None:
        from elasticzo.train.checkpoint import load_into_module

        load_into_module(self.model, tensors, path)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        for name, value in tensors.items():
            if name.startswith("optim."):
                _, index, key = name.split(".", 2)
                param = params[int(index)]
                self.optimizer.state[param][key] = value.to(param.device).clone()
        for group, step in zip(self.optimizer.param_groups, meta["steps"]):
            group["step"] = step
