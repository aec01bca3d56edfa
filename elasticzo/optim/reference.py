"""Reference twin of ``ElasticZO``: the same update rule written the plain way.

It draws every direction z once and keeps it, evaluates the loss out of place with
``torch.func.functional_call`` at theta_Z +- eps z, takes the BP gradients with
``torch.autograd.grad`` on the full model, and applies the same update expressions. It stores
what the real optimiser regenerates (z) and builds what the real one avoids (perturbed copies of
all ZO parameters at once), so it is slow and memory-hungry, and exists to be compared with
``ElasticZO`` bit for bit in the tests.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.func import functional_call

from elasticzo.models.layers import split_layers
from elasticzo.optim.elastic import apply_direction
from elasticzo.zo.noise import derive_seed, layer_noise
from elasticzo.zo.perturb import perturb


class ReferenceElasticZO:
    """Plain ElasticZO step for ``model`` split at ``bp_layers``; ``loss_fn(output) -> loss``."""

    def __init__(self, model: nn.Module, bp_layers: int, *, lr_zo: float, lr_bp: float, eps: float,
                 queries: int = 1, noise: str = "gaussian", grad_clip: float | None = None, seed: int = 0):
        self.model = model
        self.zo_layers, self.bp_layers = split_layers(model, bp_layers)
        self.names = {id(p): n for n, p in model.named_parameters()}
        self.lr_zo, self.lr_bp, self.eps, self.q = lr_zo, lr_bp, eps, queries
        self.noise, self.grad_clip, self.seed, self.t = noise, grad_clip, seed, 0

    def _directions(self, j: int) -> dict[str, torch.Tensor]:
        z = {}
        for i, layer in enumerate(self.zo_layers):
            params = list(layer.parameters(recurse=False))
            for p, noise in zip(params, layer_noise(params, derive_seed(self.seed, self.t, j, i), self.noise)):
                z[self.names[id(p)]] = noise
        return z

    def _loss_and_bp_grads(self, x, loss_fn: Callable, shifted: dict[str, torch.Tensor]):
        params = {n: p for n, p in self.model.named_parameters()}
        bp = [p for layer in self.bp_layers for p in layer.parameters(recurse=False)]
        loss = loss_fn(functional_call(self.model, {**params, **shifted}, (x,)))
        grads = torch.autograd.grad(loss, bp) if bp else []
        return loss.detach(), list(grads)

    def step(self, x: torch.Tensor, loss_fn: Callable) -> None:
        zo_params = {self.names[id(p)]: p for layer in self.zo_layers for p in layer.parameters(recurse=False)}
        bp_params = [p for layer in self.bp_layers for p in layer.parameters(recurse=False)]
        grad_sum = [torch.zeros_like(p) for p in bp_params]
        coefs, directions = [], []
        for j in range(self.q):
            z = self._directions(j)
            plus = dict(zip(z, perturb(list(zo_params.values()), [v.clone() for v in z.values()], self.eps)))
            minus = dict(zip(z, perturb(list(zo_params.values()), [v.clone() for v in z.values()], -self.eps)))
            loss_p, grads_p = self._loss_and_bp_grads(x, loss_fn, plus)
            loss_m, grads_m = self._loss_and_bp_grads(x, loss_fn, minus)
            g = (loss_p - loss_m) / (2 * self.eps)
            if self.grad_clip is not None:
                g = g.clamp(-self.grad_clip, self.grad_clip)
            coefs.append(g * (-self.lr_zo / self.q))
            directions.append(z)
            grad_sum = [s + a + b for s, a, b in zip(grad_sum, grads_p, grads_m)] if zo_params else list(grads_p)
        with torch.no_grad():
            for coef, z in zip(coefs, directions):
                for name, p in zo_params.items():
                    apply_direction(p, z[name], coef)
            passes = 2 * self.q if zo_params else 1
            for p, s in zip(bp_params, grad_sum):
                p.add_(s / passes, alpha=-self.lr_bp)
        self.t += 1
