"""ElasticZO-INT8: integer SPSA for the early layers, NITI integer backprop for the last layers.

One step on an int8 batch, integer arithmetic only:

    L+ = CE_int(net(x; W_Z + eps z, W_B))      tail stores its inputs, NITI backward -> G+
    L- = CE_int(net(x; W_Z - eps z, W_B))      forward only, nothing stored
    d  = L+ - L-                               integer loss units (2**-16 bits, batch sum)
    s  = bitlength(D) + zo_shift               D: running mean of |d| (integer EMA, 1/16 decay)
    T  = R + d * z * 2**(F - s)                the step in 2**-F weight units (rounded if s > F), plus carry
    W_Z <- sat(W_Z - (T >> F)),  R <- T & (2**F - 1)
    W_B <- NITI(W_B, G+, mu)                   the largest step has about mu bits

The carry R (uint8 per ZO weight, F = 8 bits) keeps the fraction of a weight unit
that the int8 weight cannot hold yet, so small steps add up exactly instead of being rounded
away. Stochastic rounding (``carry=False``) is unbiased too, but its variance is about
2**(s - bitlength|d|) times that of the step itself: with steps of 1/16 unit it buries the
SPSA signal under 16x more noise. The carry costs one byte per ZO weight.

The BP part takes the gradient of the + pass only (METHOD.md allows it): NITI normalises the
step by the gradient's bit length anyway, so averaging with G- changes little, while skipping
the second backward saves its time and keeps the weight gradients in int32.

z is int8 Rademacher, regenerated per layer from derive_seed(seed, step, 0, layer) and never
stored; perturbed weights sat(W +- eps z) are built out of place one layer at a time, so W_Z
restores exactly. Dividing d by its running scale (``s`` follows |d|) is the integer twin of the
float optimiser's ``normalize``: the step size does not grow as the loss differences grow.
"""
from __future__ import annotations

import torch

from elasticzo.bench.memory import memory_tag
from elasticzo.bench.timing import phase
from elasticzo.int8.format import QTensor
from elasticzo.int8.layers import IntSequential
from elasticzo.int8.loss import cross_entropy, cross_entropy_loss
from elasticzo.int8.rounding import bitlength
from elasticzo.int8.update import CARRY_BITS, int8_noise, niti_update, perturb, zo_update
from elasticzo.zo.noise import derive_seed, layer_generator

EMA_SHIFT = 4  # running mean of |d| with decay 1 - 1/16


class IntElasticZO:
    """Integer-only ElasticZO step for an ``IntSequential`` with its last ``bp_layers`` weight layers in BP.

    Args:
        eps: perturbation in weight units (integer >= 1).
        zo_shift: extra right shift of the ZO step; the expected |step| is about 2**-zo_shift units
            per weight when |d| is at its running mean.
        mu: NITI learning rate of the BP part, a bit width in 1..8.
        carry: accumulate ZO steps exactly with a uint8 carry per weight (else stochastic rounding).
        seed: the directions and the rounding noise of step t come from derive_seed(seed, t, ...).
    """

    def __init__(self, net: IntSequential, bp_layers: int, *, eps: int = 1, zo_shift: int = 4, mu: int = 3,
                 carry: bool = True, seed: int = 0):
        weights = net.weight_layers()
        if not 0 <= bp_layers <= len(weights):
            raise ValueError(f"bp_layers={bp_layers} is out of range: the network has {len(weights)} "
                             f"weight layers, so bp_layers must be in 0..{len(weights)}")
        if not (isinstance(eps, int) and 1 <= eps <= 127):
            raise ValueError(f"eps={eps!r} must be an integer in 1..127 (weight units)")
        if not 0 <= zo_shift <= 30:
            raise ValueError(f"zo_shift={zo_shift!r} must be in 0..30")
        if not 1 <= mu <= 8:
            raise ValueError(f"mu={mu!r} must be in 1..8 bits")
        self.net, self.eps, self.zo_shift, self.mu, self.seed = net, eps, zo_shift, mu, seed
        self.zo_layers = weights[: len(weights) - bp_layers]
        self.bp_layers = weights[len(weights) - bp_layers:]
        first_bp = net.layers.index(self.bp_layers[0]) if self.bp_layers else len(net.layers)
        self.head, self.tail = net.layers[:first_bp], net.layers[first_bp:]
        self.step_count = 0
        half = 1 << (CARRY_BITS - 1)  # start each carry at half a unit: floor then rounds to nearest
        self.carries = [torch.full(l.weight.shape, half, dtype=torch.uint8, device=l.weight.device)
                        for l in self.zo_layers] if carry else []
        self.d_scale = torch.zeros((), dtype=torch.int64, device=net.weight_layers()[0].weight.device)
        self.last_d: torch.Tensor | None = None

    def _direction(self, index: int) -> torch.Tensor:
        """z of ZO layer ``index`` at this step, regenerated from its seed (never stored)."""
        layer = self.zo_layers[index]
        gen = layer_generator(derive_seed(self.seed, self.step_count, 0, index), layer.weight.device)
        with memory_tag("zo_noise"):
            return int8_noise(layer.weight.shape, gen)

    def forward(self, x: QTensor, sign: int = 0, store: bool = False) -> QTensor:
        """Logits at W_Z + sign * eps z (sign 0: unperturbed); the tail stores for backward when ``store``."""
        zo_index = 0
        for layer in self.head:
            if layer.has_weight and sign != 0:
                weight = perturb(layer.weight, self._direction(zo_index), sign * self.eps)
                x = layer.forward(x, store=False, weight=weight)
            else:
                x = layer.forward(x, store=False)
            zo_index += int(layer.has_weight)
        for layer in self.tail:
            x = layer.forward(x, store=store)
        return x

    def _pass(self, x: QTensor, y: torch.Tensor, sign: int, backward: bool) -> torch.Tensor:
        """One (perturbed) pass: the integer loss; with ``backward``, NITI gradients in the tail."""
        with phase("forward"):
            logits = self.forward(x, sign, store=backward)
        if not backward:
            return cross_entropy_loss(logits, y)
        loss, grad = cross_entropy(logits, y)
        with phase("backward"):
            for layer in reversed(self.tail):
                grad = layer.backward(grad, input_grad=layer is not self.tail[0])
        return loss

    def step(self, x: QTensor, y: torch.Tensor) -> torch.Tensor:
        """One training step; returns the integer loss summed over the batch (mean of the passes)."""
        has_bp = bool(self.bp_layers)
        if not self.zo_layers:
            loss = self._pass(x, y, 0, backward=True)
        else:
            loss_plus = self._pass(x, y, +1, backward=has_bp)
            loss_minus = self._pass(x, y, -1, backward=False)
            with phase("update"):
                self._zo_update(loss_plus - loss_minus)
            loss = (loss_plus + loss_minus) >> 1
        with phase("update"):
            for layer in self.bp_layers:
                layer.weight = niti_update(layer.weight, layer.grad_acc, self.mu)
                layer.grad_acc = layer.grad_exponent = None
        self.step_count += 1
        return loss

    def _zo_update(self, d: torch.Tensor) -> None:
        """W <- sat(W - d z / 2**s), carried or stochastically rounded; s follows |d| (no host sync)."""
        self.d_scale = self.d_scale - (self.d_scale >> EMA_SHIFT) + (d.abs() >> EMA_SHIFT)
        s = (bitlength(self.d_scale.clamp(min=1)) + self.zo_shift).clamp(max=62)
        self.last_d = d
        for i, layer in enumerate(self.zo_layers):
            z = self._direction(i)  # drawn before the rounding generator is reseeded (one per device)
            if self.carries:
                layer.weight = zo_update(layer.weight, z, d, s, carry=self.carries[i])
            else:
                gen = layer_generator(derive_seed(self.seed, self.step_count, 1, i), layer.weight.device)
                layer.weight = zo_update(layer.weight, z, d, s, generator=gen)  # query 1: rounding noise
