"""ElasticZO: zeroth-order SPSA for the early layers, backprop (SGD) for the last layers.

One step on a mini-batch, for each query j = 1..q (seeds are a pure function of
(seed, step, j, layer), so the run can be replayed from its seed log):

    L+_j = loss(theta_Z + eps z_j, theta_B)    backward through the BP layers only -> grad+
    L-_j = loss(theta_Z - eps z_j, theta_B)    backward through the BP layers only -> grad-
    g_j  = clip((L+_j - L-_j) / (2 eps))        the projected gradient
    theta_Z <- theta_Z (1 - lr_zo wd_zo) - sum_j (g_j lr_zo / q) z_j
    theta_B <- SGD(theta_B, mean of the 2q BP gradients, lr_bp, momentum, weight_decay)

theta_Z is never written during the perturbed passes (see ``zo.perturb``), so after a step it is
bit-exactly the update rule applied to the old value. ZO parameters have ``requires_grad=False``:
the ZO part builds no autograd graph and stores no activations. ``bp_layers=0`` is vanilla ZO
(MeZO without the in-place drift); all layers in BP is exactly ``torch.optim.SGD``.

Example::

    opt = ElasticZO.for_model(model, bp_layers=2, lr_zo=1e-3, lr_bp=0.05)
    def closure(backward=True):
        loss = F.cross_entropy(model(x), y)
        if backward:
            loss.backward()
        return loss
    loss = opt.step(closure)
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn
from torch.optim.sgd import sgd

from elasticzo.instrument import phase
from elasticzo.models.layers import layer_params, split_layers
from elasticzo.zo.noise import NOISE_KINDS, derive_seed, layer_noise
from elasticzo.zo.perturb import perturbed

Closure = Callable[[bool], torch.Tensor]
RMS_DECAY = 0.99


def _check(name: str, value: float, ok: bool, rule: str) -> None:
    if not ok:
        raise ValueError(f"invalid {name}={value!r}: must be {rule}")


def apply_direction(param: torch.Tensor, z: torch.Tensor, coef: torch.Tensor) -> None:
    """param += coef * z in one pass (the one definition of the ZO update of a parameter)."""
    param.addcmul_(z, coef)


class ElasticZO(torch.optim.Optimizer):
    """Hybrid ZO/BP optimiser over an ordered list of ZO layers and BP layers.

    Args:
        zo_layers: modules trained with SPSA (their parameters get ``requires_grad=False``).
        bp_layers: modules trained with SGD on autograd gradients.
        lr_zo, lr_bp: learning rates of the two parts.
        eps: perturbation scale of SPSA.
        queries: number q of random directions per step (the BP gradient averages all 2q passes).
        noise: ``"gaussian"`` or ``"rademacher"`` directions.
        grad_clip: bound on |g| of each projected gradient (``None``: unbounded). The projected
            gradient of a network trained from scratch grows as training proceeds; the bound
            keeps a step from blowing up. Non-finite g are always replaced by 0 (no update).
        normalize: divide each g by the running RMS of past g (decay 0.99, bias-corrected), so the
            ZO step has a fixed size in parameter space whatever the scale of the loss; this
            breaks the feedback loop (larger weights -> larger g -> larger steps) that makes
            plain SPSA diverge late in training. lr_zo then means lr per unit-RMS direction.
        zo_weight_decay: decoupled weight decay on the ZO part; counters the random-walk growth
            of the weights that SPSA noise causes.
        momentum, weight_decay, dampening, nesterov: ``torch.optim.SGD`` options of the BP part.
        bp_grad: ``"mean"`` averages the gradients of the + and - passes, ``"plus"`` keeps only
            the + passes (half the backward work).
        seed: run seed; the directions of step t, query j, layer i come from
            ``derive_seed(seed, t, j, i)``.
    """

    def __init__(
        self,
        zo_layers: list[nn.Module],
        bp_layers: list[nn.Module],
        *,
        lr_zo: float = 1e-3,
        lr_bp: float = 0.05,
        eps: float = 1e-3,
        queries: int = 1,
        noise: str = "gaussian",
        grad_clip: float | None = 100.0,
        normalize: bool = False,
        zo_weight_decay: float = 0.0,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        dampening: float = 0.0,
        nesterov: bool = False,
        bp_grad: str = "mean",
        seed: int = 0,
    ):
        _check("lr_zo", lr_zo, lr_zo >= 0, ">= 0")
        _check("lr_bp", lr_bp, lr_bp >= 0, ">= 0")
        _check("eps", eps, eps > 0 and math.isfinite(eps), "a finite number > 0")
        _check("queries", queries, isinstance(queries, int) and queries >= 1, "an integer >= 1")
        _check("noise", noise, noise in NOISE_KINDS, f"one of {NOISE_KINDS}")
        _check("grad_clip", grad_clip, grad_clip is None or grad_clip > 0, "> 0 or None")
        _check("zo_weight_decay", zo_weight_decay, zo_weight_decay >= 0, ">= 0")
        _check("momentum", momentum, 0 <= momentum < 1, "in [0, 1)")
        _check("weight_decay", weight_decay, weight_decay >= 0, ">= 0")
        _check("bp_grad", bp_grad, bp_grad in ("mean", "plus"), "'mean' or 'plus'")
        _check("nesterov", nesterov, not nesterov or (momentum > 0 and dampening == 0),
               "False unless momentum > 0 and dampening == 0")
        zo_params, bp_params = layer_params(zo_layers), layer_params(bp_layers)
        if not zo_params and not bp_params:
            raise ValueError("ElasticZO got no parameters: both the ZO and the BP part are empty")
        groups = []
        if zo_params:
            groups.append(dict(params=zo_params, part="zo", lr=lr_zo, eps=eps, queries=queries, noise=noise,
                               grad_clip=grad_clip, normalize=normalize, weight_decay=zo_weight_decay, seed=seed, step=0))
        if bp_params:
            groups.append(dict(params=bp_params, part="bp", lr=lr_bp, momentum=momentum, weight_decay=weight_decay,
                               dampening=dampening, nesterov=nesterov, bp_grad=bp_grad, step=0))
        super().__init__(groups, defaults={})
        for p in zo_params:
            p.requires_grad_(False)  # the ZO part builds no graph and stores nothing for backward
        for p in bp_params:
            p.requires_grad_(True)
        self.zo_layers = list(zo_layers)
        self.last_projected_grads: torch.Tensor | None = None  # [q] of the last step, on device

    @classmethod
    def for_model(cls, model: nn.Module, bp_layers: int, **options) -> "ElasticZO":
        """The optimiser for ``model`` with its last ``bp_layers`` parametrised layers in BP."""
        zo_layers, bp = split_layers(model, bp_layers)
        return cls(zo_layers, bp, **options)

    def _group(self, part: str) -> dict | None:
        return next((g for g in self.param_groups if g["part"] == part), None)

    def zo_group(self) -> dict | None:
        """The ZO parameter group (its hyper-parameters and ``step``); None when every layer is in BP."""
        return self._group("zo")

    @torch.no_grad()
    def apply_zo_update(self, grads: list[torch.Tensor]) -> None:
        """The ZO update for projected gradients ``grads`` (one per query) at the ZO group's current
        ``step`` and ``lr``: what ``step`` applies after its passes, and what a replay repeats."""
        zo = self.zo_group()
        if zo is None:
            raise ValueError("apply_zo_update: the optimiser has no ZO part (bp_layers = all)")
        if len(grads) != zo["queries"]:
            raise ValueError(f"apply_zo_update: {len(grads)} projected gradients for queries={zo['queries']}")
        self._zo_update(zo, grads)

    @torch.no_grad()
    def step(self, closure: Closure) -> torch.Tensor:  # type: ignore[override]
        """One ElasticZO step; returns the mean loss over all passes (a 0-dim tensor, no host sync)."""
        if closure is None:
            raise ValueError("ElasticZO.step needs a closure(backward: bool) that returns the loss")
        zo, bp = self._group("zo"), self._group("bp")
        if bp is not None:
            for p in bp["params"]:
                p.grad = None
        if zo is None:
            loss = self._evaluate(closure, backward=True)
        else:
            loss = self._zo_step(zo, closure, backward=bp is not None)
        if bp is not None:
            self._bp_update(bp, passes=1 if zo is None else self._bp_passes(zo, bp))
            bp["step"] += 1
        return loss

    @staticmethod
    def _bp_passes(zo: dict, bp: dict) -> int:
        return zo["queries"] * (2 if bp["bp_grad"] == "mean" else 1)

    def _evaluate(self, closure: Closure, backward: bool) -> torch.Tensor:
        with torch.enable_grad(), phase("forward_backward" if backward else "forward"):
            return closure(backward).detach()

    def _zo_step(self, zo: dict, closure: Closure, backward: bool) -> torch.Tensor:
        """Evaluate the 2q perturbed losses, then apply the ZO update; returns the mean loss."""
        eps, q, kind, t = zo["eps"], zo["queries"], zo["noise"], zo["step"]
        bp_plus_only = backward and self._group("bp")["bp_grad"] == "plus"
        grads, losses = [], []
        for j in range(q):
            seeds = lambda i, j=j: derive_seed(zo["seed"], t, j, i)
            with perturbed(self.zo_layers, seeds, eps, kind):
                loss_plus = self._evaluate(closure, backward)
            with perturbed(self.zo_layers, seeds, -eps, kind):
                loss_minus = self._evaluate(closure, backward and not bp_plus_only)
            grads.append(self._projected_grad(loss_plus, loss_minus, zo))
            losses += [loss_plus, loss_minus]
        self.last_projected_grads = torch.stack(grads)
        with phase("update"):
            self._zo_update(zo, grads)
        zo["step"] += 1
        return torch.stack(losses).mean()

    def _projected_grad(self, loss_plus: torch.Tensor, loss_minus: torch.Tensor, zo: dict) -> torch.Tensor:
        g = (loss_plus - loss_minus) / (2 * zo["eps"])
        g = torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0)  # a NaN/inf pass must not poison theta
        if zo["grad_clip"] is not None:
            g = g.clamp(-zo["grad_clip"], zo["grad_clip"])
        if zo["normalize"]:
            g = g / self._running_rms(zo, g)
        return g

    def _running_rms(self, zo: dict, g: torch.Tensor) -> torch.Tensor:
        """Bias-corrected EMA of g^2 (kept in the state of the first ZO parameter), then its root."""
        state = self.state[zo["params"][0]]
        if "g2_ema" not in state:
            state["g2_ema"] = torch.zeros((), dtype=g.dtype, device=g.device)
            state["g2_count"] = torch.zeros((), dtype=g.dtype, device=g.device)
        state["g2_ema"].mul_(RMS_DECAY).add_(g * g, alpha=1 - RMS_DECAY)
        state["g2_count"].add_(1)
        corrected = state["g2_ema"] / (1 - RMS_DECAY ** state["g2_count"])
        return corrected.sqrt().clamp_min(1e-12)

    def _zo_update(self, zo: dict, grads: list[torch.Tensor]) -> None:
        """theta <- theta (1 - lr wd) + sum_j (-g_j lr / q) z_j, regenerating each z_j from its seed."""
        lr, q = zo["lr"], zo["queries"]
        if zo["weight_decay"]:
            torch._foreach_mul_(zo["params"], 1 - lr * zo["weight_decay"])
        for j, g in enumerate(grads):
            coef = g * (-lr / q)  # 0-dim tensor: no host sync
            for i, layer in enumerate(self.zo_layers):
                params = [p for p in layer.parameters(recurse=False)]
                with phase("noise"):
                    noise = layer_noise(params, derive_seed(zo["seed"], zo["step"], j, i), zo["noise"])
                for p, z in zip(params, noise):
                    apply_direction(p, z, coef)

    def _bp_update(self, bp: dict, passes: int) -> None:
        """SGD on the BP part with the mean gradient of the passes, as ``torch.optim.SGD`` does it."""
        params = [p for p in bp["params"] if p.grad is not None]
        grads = [p.grad for p in params]
        if passes > 1:
            torch._foreach_div_(grads, passes)
        buffers = [self.state[p].get("momentum_buffer") for p in params]
        with phase("update"):
            sgd(params, grads, buffers, weight_decay=bp["weight_decay"], momentum=bp["momentum"], lr=bp["lr"],
                dampening=bp["dampening"], nesterov=bp["nesterov"], maximize=False, foreach=None, fused=None)
        if bp["momentum"] != 0:
            for p, buffer in zip(params, buffers):
                self.state[p]["momentum_buffer"] = buffer
