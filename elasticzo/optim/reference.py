"""Reference twin of ``ElasticZO``: the same update rule written the plain way, every hyper-parameter.

It draws every direction z once and keeps it, evaluates the loss out of place with
``torch.func.functional_call`` at theta_Z +- eps z, takes the BP gradients with
``torch.autograd.grad`` on the full model, and writes each rule out in one place: the projected
gradient (non-finite -> 0, clip, running-RMS normalisation with bias correction), the decoupled
ZO weight decay, the ZO step, and SGD with weight decay, momentum, dampening and Nesterov as
``torch.optim.SGD`` documents it. It stores what the real optimiser regenerates (z) and builds
what the real one avoids (perturbed copies of all ZO parameters at once), so it is slow and
memory-hungry, and exists to be compared with ``ElasticZO`` bit for bit in the tests: a change
of either side's update rule makes them disagree.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.func import functional_call

from elasticzo.config import TrainConfig
from elasticzo.models.layers import split_layers
from elasticzo.zo.noise import derive_seed, layer_noise

RMS_DECAY = 0.99  # the running mean of g^2 forgets 1 % per step
_CLI = TrainConfig()  # the defaults of ElasticZO and the CLI


class ReferenceElasticZO:
    """Plain ElasticZO step for ``model`` split at ``bp_layers``; ``loss_fn(output) -> loss``.

    Takes the same keyword arguments, with the same defaults, as ``ElasticZO``.
    """

    def __init__(self, model: nn.Module, bp_layers: int, *, lr_zo: float | None = None, lr_bp: float = _CLI.lr_bp,
                 eps: float = _CLI.eps, queries: int = _CLI.queries, noise: str = _CLI.noise,
                 grad_clip: float | None = _CLI.grad_clip, normalize: bool = _CLI.normalize,
                 zo_weight_decay: float = _CLI.zo_weight_decay, momentum: float = _CLI.momentum,
                 weight_decay: float = _CLI.weight_decay, dampening: float = 0.0, nesterov: bool = False,
                 bp_grad: str = _CLI.bp_grad, seed: int = _CLI.seed):
        if lr_zo is None:  # the measured default of the method: vanilla ZO takes a smaller step
            lr_zo = TrainConfig(method="elasticzo" if bp_layers else "zo").zo_learning_rate()
        self.model = model
        self.zo_layers, self.bp_layers = split_layers(model, bp_layers)
        self.names = {id(p): n for n, p in model.named_parameters()}
        self.lr_zo, self.lr_bp, self.eps, self.q, self.noise = lr_zo, lr_bp, eps, queries, noise
        self.grad_clip, self.normalize, self.zo_wd = grad_clip, normalize, zo_weight_decay
        self.momentum, self.wd, self.dampening, self.nesterov = momentum, weight_decay, dampening, nesterov
        self.bp_grad, self.seed, self.t = bp_grad, seed, 0
        self.g2_sum = self.g2_count = None  # running mean of g^2 (0-dim tensors once used)
        self.buffers: dict[int, torch.Tensor] = {}  # momentum buffer per BP parameter

    def _directions(self, j: int) -> dict[str, torch.Tensor]:
        z = {}
        for i, layer in enumerate(self.zo_layers):
            params = list(layer.parameters(recurse=False))
            for p, noise in zip(params, layer_noise(params, derive_seed(self.seed, self.t, j, i), self.noise)):
                z[self.names[id(p)]] = noise.clone()
        return z

    def _loss_and_bp_grads(self, x, loss_fn: Callable, shifted: dict[str, torch.Tensor]):
        params = dict(self.model.named_parameters())
        bp = [p for layer in self.bp_layers for p in layer.parameters(recurse=False)]
        loss = loss_fn(functional_call(self.model, {**params, **shifted}, (x,)))
        grads = torch.autograd.grad(loss, bp) if bp else []
        return loss.detach(), list(grads)

    def _projected_grad(self, loss_plus: torch.Tensor, loss_minus: torch.Tensor) -> torch.Tensor:
        """g = (L+ - L-) / (2 eps); non-finite -> 0; clipped; divided by the running RMS of g."""
        g = (loss_plus - loss_minus) / (2 * self.eps)
        if not torch.isfinite(g):
            g = torch.zeros_like(g)
        if self.grad_clip is not None:
            g = g.clamp(-self.grad_clip, self.grad_clip)
        if self.normalize:
            if self.g2_sum is None:
                self.g2_sum, self.g2_count = torch.zeros_like(g), torch.zeros_like(g)
            self.g2_sum = self.g2_sum.mul(RMS_DECAY).add(g * g, alpha=1 - RMS_DECAY)
            self.g2_count = self.g2_count + 1
            mean_g2 = self.g2_sum / (1 - torch.pow(RMS_DECAY, self.g2_count))  # bias-corrected
            g = g / mean_g2.sqrt().clamp_min(1e-12)
        return g

    def _sgd(self, p: torch.Tensor, grad: torch.Tensor) -> None:
        """One torch.optim.SGD step of ``p`` (its documented rule, written out)."""
        if self.wd:
            grad = grad.add(p, alpha=self.wd)
        if self.momentum:
            buf = self.buffers.get(id(p))
            buf = grad.clone() if buf is None else buf.mul(self.momentum).add(grad, alpha=1 - self.dampening)
            self.buffers[id(p)] = buf
            grad = grad.add(buf, alpha=self.momentum) if self.nesterov else buf
        p.add_(grad, alpha=-self.lr_bp)

    def step(self, x: torch.Tensor, loss_fn: Callable) -> None:
        zo_params = {self.names[id(p)]: p for layer in self.zo_layers for p in layer.parameters(recurse=False)}
        bp_params = [p for layer in self.bp_layers for p in layer.parameters(recurse=False)]
        if not zo_params:  # plain SGD: one pass
            _, grad_sum = self._loss_and_bp_grads(x, loss_fn, {})
        else:
            grad_sum = [torch.zeros_like(p) for p in bp_params]
        coefs, directions = [], []
        for j in range(self.q if zo_params else 0):
            z = self._directions(j)
            plus = {n: zo_params[n] + self.eps * z[n] for n in z}
            minus = {n: zo_params[n] + -self.eps * z[n] for n in z}
            loss_p, grads_p = self._loss_and_bp_grads(x, loss_fn, plus)
            loss_m, grads_m = self._loss_and_bp_grads(x, loss_fn, minus)
            coefs.append(self._projected_grad(loss_p, loss_m) * (-self.lr_zo / self.q))
            directions.append(z)
            grad_sum = [s + a for s, a in zip(grad_sum, grads_p)]
            if self.bp_grad == "mean":
                grad_sum = [s + b for s, b in zip(grad_sum, grads_m)]
        with torch.no_grad():
            if self.zo_wd:
                for p in zo_params.values():
                    p.mul_(1 - self.lr_zo * self.zo_wd)  # decoupled: the decay scales with the learning rate
            for coef, z in zip(coefs, directions):
                for name, p in zo_params.items():
                    p.add_(coef * z[name])  # p + (coef * z): two roundings
            passes = 1 if not zo_params else self.q * (2 if self.bp_grad == "mean" else 1)
            for p, s in zip(bp_params, grad_sum):
                self._sgd(p, s / passes)
        self.t += 1
