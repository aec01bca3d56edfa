"""Peers timed in the same process as our steps, so that the ratios between them are honest.

``MeZOPeer`` is the MeZO step as the reference code writes it (Malladi et al., "Fine-Tuning
Language Models with Just Forward Passes", NeurIPS 2023, ``large_models/trainer.py``: the
methods ``zo_perturb_parameters``, ``zo_step`` and ``zo_update``)::

    seed = random integer                     # one per step
    perturb(+1): torch.manual_seed(seed); for each p: z = torch.normal(...); p.data = p.data + eps z
    L+ = loss(theta + eps z)
    perturb(-2)                               # same seed, so the same z
    L- = loss(theta - eps z)
    g  = ((L+ - L-) / (2 eps)).item()
    perturb(+1)                               # "restore" theta, up to rounding
    torch.manual_seed(seed); for each p: z = torch.normal(...); p.data = p.data - lr g z

z is regenerated parameter by parameter from the *global* generator, four times per step. In
floating point ``(theta + eps z) - 2 eps z + eps z`` is not theta bit for bit, so theta drifts
from the update rule (``restore_drift`` measures it); ``elasticzo`` never writes theta during the
perturbed passes. ``in_place=True`` is the same step with ``p.add_(z, alpha=...)`` instead of
the reference's out-of-place ``p.data = p.data + ...``, a faster peer than the reference, so that
a speed-up over MeZO can be quoted against both.

``PlainBPLoop`` is the textbook PyTorch loop: ``zero_grad``, forward, ``backward``,
``torch.optim.SGD.step``.

Both peers mark the same timing phases as ``ElasticZO`` (``bench.timing.phase``), plus
``"perturb"`` for MeZO's in-place perturbations, so the per-phase bars compare like with like.

Example::

    peer = MeZOPeer(LeNet5(), lr=1e-3, eps=1e-3, seed=0)
    loss = peer.step(x, y)
"""
from __future__ import annotations

import random

import torch
import torch.nn.functional as F
from torch import nn

from elasticzo.instrument import phase

MEZO_SEED_RANGE = 1_000_000_000  # the reference draws np.random.randint(1000000000) per step


def forward_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """One inference forward pass and its loss: the unit a ZO step is measured against."""
    with phase("forward"), torch.no_grad():
        return F.cross_entropy(model(x), y)


class MeZOPeer:
    """MeZO's SPSA step (q = 1, Gaussian z, no weight decay) over all parameters of ``model``.

    Warning: like the reference code, every step re-seeds the global torch generator. Its
    forward passes run under ``torch.inference_mode`` as in the reference; there the memory
    tracker sees composite ops whole and misses their internal temporaries (max-pool indices),
    so ``bench.memory`` under-counts this peer's peak.
    """

    def __init__(self, model: nn.Module, *, lr: float = 1e-3, eps: float = 1e-3, seed: int = 0,
                 in_place: bool = False):
        if not lr >= 0:
            raise ValueError(f"invalid lr={lr!r}: must be >= 0")
        if not eps > 0:
            raise ValueError(f"invalid eps={eps!r}: must be > 0")
        self.model, self.lr, self.eps, self.in_place = model, lr, eps, in_place
        self.params = [p for p in model.parameters() if p.requires_grad]
        self._seeds = random.Random(seed)  # stands in for the reference's np.random

    def perturb_parameters(self, seed: int, scale: float) -> None:
        """theta <- theta + scale * eps * z, z regenerated parameter by parameter from ``seed``."""
        torch.manual_seed(seed)
        for p in self.params:
            with phase("noise"):
                z = torch.normal(mean=0, std=1, size=p.data.size(), device=p.data.device, dtype=p.data.dtype)
            with phase("perturb"):
                if self.in_place:
                    p.data.add_(z, alpha=scale * self.eps)
                else:
                    p.data = p.data + scale * z * self.eps

    def _loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.model.eval()  # the reference's zo_forward turns dropout off
        with phase("forward"), torch.inference_mode():
            return F.cross_entropy(self.model(x), y).detach()

    @torch.no_grad()
    def step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One MeZO step on the batch; returns L+ as the reference does."""
        seed = self._seeds.randrange(MEZO_SEED_RANGE)
        self.perturb_parameters(seed, 1)
        loss_plus = self._loss(x, y)
        self.perturb_parameters(seed, -2)
        loss_minus = self._loss(x, y)
        projected_grad = ((loss_plus - loss_minus) / (2 * self.eps)).item()  # the reference's host sync
        self.perturb_parameters(seed, 1)
        self._update(seed, projected_grad)
        return loss_plus

    def _update(self, seed: int, projected_grad: float) -> None:
        torch.manual_seed(seed)
        for p in self.params:
            with phase("noise"):
                z = torch.normal(mean=0, std=1, size=p.data.size(), device=p.data.device, dtype=p.data.dtype)
            with phase("update"):
                if self.in_place:
                    p.data.add_(z, alpha=-self.lr * projected_grad)
                else:
                    p.data = p.data - self.lr * (projected_grad * z)

    @torch.no_grad()
    def restore_drift(self, repeats: int, seed: int = 0) -> float:
        """Max |theta_after - theta_before| after ``repeats`` perturb(+1), perturb(-2), perturb(+1).

        That sequence is meant to leave theta unchanged; the result is the rounding drift that
        MeZO's in-place perturbation adds to every step (0.0 only if every rounding cancelled).
        The parameters are left drifted, as a real run would leave them.
        """
        before = [p.detach().clone() for p in self.params]
        for r in range(repeats):
            for scale in (1, -2, 1):
                self.perturb_parameters(seed + r, scale)
        return max(float((p - b).abs().max()) for p, b in zip(self.params, before))


class PlainBPLoop:
    """The plain PyTorch training step: zero_grad, forward, backward, ``torch.optim.SGD.step``."""

    def __init__(self, model: nn.Module, *, lr: float = 0.02, momentum: float = 0.0, weight_decay: float = 0.0):
        self.model = model
        self.optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.model.train()
        with phase("forward_backward"):
            self.optimizer.zero_grad()
            loss = F.cross_entropy(self.model(x), y)
            loss.backward()
        with phase("update"):
            self.optimizer.step()
        return loss.detach()
