"""Reference twin of ``IntElasticZO``: the integer update rule written the plain way.

Every hyper-parameter (eps, zo_shift, mu, seed) and every rule is written out once, on whole
int64 tensors, with none of the real optimiser's machinery: the directions are drawn and kept,
the perturbed tensors are swapped into the layers for a pass and swapped back, the whole
network stores and runs its backward, and the updates are computed without chunks or in-place
carries. The trained tensors are the weights in order, then the biases (``int8.bias``); tensor
i draws its z from derive_seed(seed, step, 0, i):

    d = L+ - L-,  D <- D - (D >> 4) + (|d| >> 4),  s = clamp(bitlength(max(D, 1)) + zo_shift, 0, 62)
    T = R + d z 2**(8 - s) (rounded when s > 8),  W_Z <- sat(W_Z - (T >> 8)),  R <- T mod 2**8  (R starts at 128)
    W_B <- sat(W_B - round_ps(G / 2**max(bitlength(G) - mu, 0)))      G: NITI gradient of the + pass
    b_B <- the same with G = the bias gradient, the errors summed over the batch

It exists to be compared with ``IntElasticZO`` bit for bit in the tests: a change of either
side's rule (the EMA of |d|, the carry, the NITI shift) makes them disagree.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

from elasticzo.int8.inputs import quantize_input
from elasticzo.int8.sequential import IntSequential
from elasticzo.int8.loss import cross_entropy, cross_entropy_loss
from elasticzo.int8.rounding import bitlength, saturate_int8, shift_round_nearest, shift_round_pseudo_stochastic
from elasticzo.int8.update import int8_noise
from elasticzo.zo.noise import derive_seed

D_DECAY_SHIFT = 4  # D forgets 1/16 per step
CARRY_FRACTION_BITS = 8  # the carry holds 1/256 weight units


def _trained(layers) -> list[tuple[object, str]]:
    """(layer, attribute) of every trained tensor: the weights, then the biases."""
    return [(l, "weight") for l in layers] + [(l, "bias") for l in layers if l.bias is not None]


class ReferenceIntElasticZO:
    """Plain ElasticZO-INT8 step for ``net`` with its last ``bp_layers`` weight layers in BP.

    Takes the same keyword arguments, with the same defaults, as ``IntElasticZO``.
    """

    def __init__(self, net: IntSequential, bp_layers: int, *, eps: int = 1, zo_shift: int = 4, mu: int = 3,
                 seed: int = 0):
        layers = net.weight_layers()
        self.net, self.cut = net, len(layers) - bp_layers
        self.eps, self.zo_shift, self.mu, self.seed, self.t = eps, zo_shift, mu, seed, 0
        self.d_mean = 0  # D, a Python int
        self.carries = [torch.full(getattr(l, a).shape, 1 << (CARRY_FRACTION_BITS - 1), dtype=torch.int64)
                        for l, a in _trained(layers[:self.cut])]

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        layers = self.net.weight_layers()
        zo, bp = _trained(layers[:self.cut]), _trained(layers[self.cut:])
        xq = quantize_input(x)
        if not zo:
            _, grad = cross_entropy(self.net.forward(xq, store=True), y)
            self.net.backward(grad)
        else:
            zs = [int8_noise(getattr(l, a).shape, torch.Generator().manual_seed(derive_seed(self.seed, self.t, 0, i)))
                  for i, (l, a) in enumerate(zo)]
            with self._shifted(zo, zs, +1):
                loss_plus, grad = cross_entropy(self.net.forward(xq, store=True), y)
                if bp:
                    self.net.backward(grad)
            with self._shifted(zo, zs, -1):
                loss_minus = cross_entropy_loss(self.net.forward(xq, store=False), y)
            self._zo_update(zo, zs, int(loss_plus - loss_minus))
        for layer, name in bp:  # NITI: the largest step has about mu bits
            g = (layer.grad_acc if name == "weight" else layer.bias_grad).to(torch.int64)
            s = max(int(bitlength(g)) - self.mu, 0)
            setattr(layer, name, saturate_int8(getattr(layer, name).to(torch.int64) - shift_round_pseudo_stochastic(g, s)))
        self.net.clear()
        for layer in layers:
            layer.grad_acc = layer.grad_exponent = layer.bias_grad = None
        self.t += 1

    @contextmanager
    def _shifted(self, zo, zs, sign: int):
        """Within the block, every ZO tensor is sat(T + sign eps z); the originals come back after."""
        saved = [getattr(l, a) for l, a in zo]
        for (l, a), t, z in zip(zo, saved, zs):
            setattr(l, a, saturate_int8(t.to(torch.int64) + sign * self.eps * z.to(torch.int64)))
        try:
            yield
        finally:
            for (l, a), t in zip(zo, saved):
                setattr(l, a, t)

    def _zo_update(self, zo, zs, d: int) -> None:
        self.d_mean = self.d_mean - (self.d_mean >> D_DECAY_SHIFT) + (abs(d) >> D_DECAY_SHIFT)
        s = max(min(int(bitlength(torch.tensor(max(self.d_mean, 1)))) + self.zo_shift, 62), 0)
        for (layer, name), z, carry in zip(zo, zs, self.carries):
            dz = d * z.to(torch.int64)  # the step d z / 2**s, in 2**-8 weight units:
            scaled = dz * 2 ** (CARRY_FRACTION_BITS - s) if s <= CARRY_FRACTION_BITS else \
                shift_round_nearest(dz, s - CARRY_FRACTION_BITS)  # exact, or rounded to nearest
            total = carry + scaled
            setattr(layer, name, saturate_int8(getattr(layer, name).to(torch.int64) - (total >> CARRY_FRACTION_BITS)))
            carry.copy_(total & ((1 << CARRY_FRACTION_BITS) - 1))
