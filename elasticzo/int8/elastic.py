"""ElasticZO-INT8: integer SPSA for the early layers, NITI integer backprop for the last layers.

One step on an int8 batch, integer arithmetic only:

    L+ = CE_int(net(x; W_Z + eps z, W_B))      tail stores its inputs, NITI backward -> G+
    L- = CE_int(net(x; W_Z - eps z, W_B))      forward only, nothing stored
    d  = L+ - L-                               integer loss units (2**-16 bits, batch sum)
    D <- D - D / 16 + |d| / 16                 running mean of |d| (integer EMA, shifts)
    s  = max(bitlength(D) + zo_shift, 0)
    T  = R + d * z * 2**(F - s)                the step in 2**-F weight units (rounded if s > F), plus carry
    W_Z <- sat(W_Z - (T >> F)),  R <- T & (2**F - 1)
    W_B <- NITI(W_B, G+, mu)                   the largest step has about mu bits

A layer's integer bias (``int8.bias``) is one more tensor of its part, trained by the same
rules: its own z (generator index ``len(zo_layers) + j`` for the j-th bias, so a bias-free network
draws what it always drew), its own carry, and NITI on its gradient (the summed errors).

The carry R (uint8 per ZO weight, F = 8 bits, starting at half a unit) keeps the fraction of a
weight unit that the int8 weight cannot hold yet, so small steps add up exactly instead of being
rounded away. The carry costs one byte per ZO weight.

The BP part takes the gradient of the + pass only (METHOD.md allows it): NITI normalises the
step by the gradient's bit length anyway, so averaging with G- changes little, while skipping
the second backward saves its time and keeps the weight gradients in int32.

z is int8 Rademacher, regenerated per layer from derive_seed(seed, step, 0, layer) and never
stored; perturbed weights sat(W +- eps z) are built out of place one layer at a time, so W_Z
restores exactly. Dividing d by its running scale (``s`` follows |d|) is the integer twin of the
float optimiser's ``normalize``: the step size does not grow as the loss differences grow.

The optimiser has the shape of the float ``ElasticZO``: built by ``for_model(model, bp_layers)``,
stepped with a closure ``closure(backward) -> integer loss`` (``loss_closure`` builds the usual
one), and a ``torch.optim.Optimizer`` whose ``state_dict()`` holds the carries, the running |d|
and the step counters, so a run saved and loaded continues bit-identically. Example::

    net = convert(LeNet5(), init=torch.Generator().manual_seed(0))
    opt = IntElasticZO.for_model(net, bp_layers=2, seed=0)
    loss = opt.step(loss_closure(net, pixels, labels))   # int64 loss, 2**-16 units, batch sum
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch

from elasticzo.config import INT8_ZO_SHIFTS
from elasticzo.instrument import memory_tag, phase
from elasticzo.int8.layers import _WeightLayer
from elasticzo.int8.sequential import IntSequential
from elasticzo.int8.rounding import bitlength
from elasticzo.int8.update import CARRY_BITS, niti_update, perturbed_weight, zo_update_
from elasticzo.zo.noise import derive_seed, layer_generator

EMA_SHIFT = 4  # running mean of |d| with decay 1 - 1/16
Closure = Callable[[bool], torch.Tensor]


def _check(name: str, value, ok: bool, rule: str) -> None:
    if not ok:
        raise ValueError(f"invalid {name}={value!r}: must be {rule}")


def split_weight_layers(net: IntSequential, bp_layers: int) -> tuple[list[_WeightLayer], list[_WeightLayer]]:
    """(ZO layers, BP layers) of an integer network: the last ``bp_layers`` weight layers in BP."""
    layers = net.weight_layers()
    if not 0 <= bp_layers <= len(layers):
        raise ValueError(f"bp_layers={bp_layers} is out of range: the network has {len(layers)} "
                         f"weight layers, so bp_layers must be in 0..{len(layers)}")
    cut = len(layers) - bp_layers
    return layers[:cut], layers[cut:]


class IntElasticZO(torch.optim.Optimizer):
    """Integer-only ElasticZO over an ordered list of ZO weight layers and BP weight layers.

    Args:
        zo_layers, bp_layers: integer weight layers (``IntLinear`` / ``IntConv2d``) trained
            with integer SPSA and with NITI backprop; ZO layers get ``backprop = False``.
        eps: perturbation in weight units (integer 1..127).
        zo_shift: extra right shift of the ZO step; the expected |step| is about 2**-zo_shift units
            per weight when |d| is at its running mean (integer -8..30; below 0 the step is
            several units, which small models converted from float need: docs/digits.md).
        mu: NITI learning rate of the BP part, a bit width in 1..8.
        seed: the directions of step t come from derive_seed(seed, t, 0, layer).
    """

    def __init__(self, zo_layers: list[_WeightLayer], bp_layers: list[_WeightLayer], *, eps: int = 1,
                 zo_shift: int = 4, mu: int = 3, seed: int = 0):
        _check("eps", eps, isinstance(eps, int) and 1 <= eps <= 127, "an integer in 1..127 (weight units)")
        low, high = INT8_ZO_SHIFTS
        _check("zo_shift", zo_shift, isinstance(zo_shift, int) and low <= zo_shift <= high, f"an integer in {low}..{high}")
        _check("mu", mu, isinstance(mu, int) and 1 <= mu <= 8, "an integer in 1..8 (bits)")
        if not zo_layers and not bp_layers:
            raise ValueError("IntElasticZO got no weight layers: both the ZO and the BP part are empty")
        groups = []
        if zo_layers:
            groups.append(dict(params=[t for _, t in _tensors(zo_layers)], part="zo", eps=eps, zo_shift=zo_shift,
                               seed=seed, step=0))
        if bp_layers:
            groups.append(dict(params=[t for _, t in _tensors(bp_layers)], part="bp", mu=mu, step=0))
        super().__init__(groups, defaults={})
        self.zo_layers, self.bp_layers = list(zo_layers), list(bp_layers)
        for layer in self.zo_layers:
            layer.backprop = False
        for layer in self.bp_layers:
            layer.backprop = True
        self._init_state()
        self.last_projected_grads: torch.Tensor | None = None  # [1]: d of the last step, integer loss units
        # reduce(losses, bp_layers) -> losses: sums the passes of data-parallel replicas
        # (train.distributed); None in a single process.
        self.reduce: Callable[[torch.Tensor, list[_WeightLayer]], torch.Tensor] | None = None

    def _init_state(self) -> None:
        """A carry of half a unit per ZO weight (floor then rounds to nearest) and D = 0."""
        half = 1 << (CARRY_BITS - 1)
        for _, tensor in _tensors(self.zo_layers):
            self.state[tensor]["carry"] = torch.full_like(tensor, half, dtype=torch.uint8)
        if self.zo_layers:
            first = self.zo_layers[0].weight
            self.state[first]["d_scale"] = torch.zeros((), dtype=torch.int64, device=first.device)

    @classmethod
    def for_model(cls, model: IntSequential, bp_layers: int, **options) -> "IntElasticZO":
        """The optimiser for ``model`` with its last ``bp_layers`` weight layers in BP."""
        zo_layers, bp = split_weight_layers(model, bp_layers)
        return cls(zo_layers, bp, **options)

    def _group(self, part: str) -> dict | None:
        return next((g for g in self.param_groups if g["part"] == part), None)

    def zo_group(self) -> dict | None:
        """The ZO parameter group (eps, zo_shift, seed and ``step``); None when every layer is in BP."""
        return self._group("zo")

    def apply_zo_update(self, d: torch.Tensor) -> None:
        """The ZO update for the integer loss difference ``d`` = L+ - L- at the ZO group's current
        ``step`` and ``zo_shift`` (the running |d| moves on): what ``step`` applies after its two
        passes, and what a replay of the seed log repeats."""
        zo = self.zo_group()
        if zo is None:
            raise ValueError("apply_zo_update: the optimiser has no ZO part (bp_layers = all)")
        self._zo_update(zo, d)

    def step(self, closure: Closure) -> torch.Tensor:  # type: ignore[override]
        """One step; returns the integer loss summed over the batch (the mean of the two passes).

        All passes run before any update, so that data-parallel replicas can sum their integer
        losses and tail gradients in one reduction (``self.reduce``) before everyone updates alike.
        """
        if closure is None:
            raise ValueError("IntElasticZO.step needs a closure(backward: bool) that returns the integer loss")
        zo, bp = self._group("zo"), self._group("bp")
        if zo is None:
            losses = self._evaluate(closure, backward=True).reshape(1)
        else:
            with self._perturbed(zo, +1):
                loss_plus = self._evaluate(closure, backward=bp is not None)
            with self._perturbed(zo, -1):
                loss_minus = self._evaluate(closure, backward=False)
            losses = torch.stack([loss_plus, loss_minus])
        if self.reduce is not None:
            if any(layer.bias is not None for layer in self.bp_layers):
                raise ValueError("IntElasticZO: data-parallel reduction of integer bias gradients is not "
                                 "implemented; convert with drop_bias=True for a data-parallel run")
            losses = self.reduce(losses, self.bp_layers)
        if zo is None:
            loss = losses[0]
        else:
            with phase("update"):
                self._zo_update(zo, losses[0] - losses[1])
            zo["step"] += 1
            loss = (losses[0] + losses[1]) >> 1
        if bp is not None:
            with phase("update"):
                self._bp_update(bp)
            bp["step"] += 1
        return loss

    @staticmethod
    def _evaluate(closure: Closure, backward: bool) -> torch.Tensor:
        """A pass; grad mode tells the integer network whether to store for its backward."""
        with torch.set_grad_enabled(backward), phase("forward_backward" if backward else "forward"):
            return closure(backward)

    def _generator(self, zo: dict, index: int, device: torch.device | None = None) -> torch.Generator:
        """The generator of ZO tensor ``index``'s direction z at this step (z is regenerated, never stored)."""
        device = _tensors(self.zo_layers)[index][1].device if device is None else device
        return layer_generator(derive_seed(zo["seed"], zo["step"], 0, index), device)

    def _perturbed_weight(self, zo: dict, index: int, sign: int, tensor: torch.Tensor | None = None) -> torch.Tensor:
        """sat(W + sign eps z) of ZO tensor ``index`` (the weights, then the biases; ``tensor`` when
        the caller has it at hand); called per pass, or per chunk of a micro-batched pass."""
        tensor = _tensors(self.zo_layers)[index][1] if tensor is None else tensor
        with memory_tag("zo_noise"):
            return perturbed_weight(tensor, self._generator(zo, index, tensor.device), sign * zo["eps"])

    @contextmanager
    def _perturbed(self, zo: dict, sign: int) -> Iterator[None]:
        """Within the block, ZO tensor i computes as sat(T_i + sign * eps z_i), built when its layer runs."""
        for i, (layer, tensor) in enumerate(_tensors(self.zo_layers)):  # piece by piece: z never whole
            hook = lambda i=i, tensor=tensor: self._perturbed_weight(zo, i, sign, tensor)
            _set_hook(layer, "perturbation" if tensor is layer.weight else "bias_perturbation", hook)
        try:
            yield
        finally:
            for layer in self.zo_layers:
                _set_hook(layer, "perturbation", None)
                _set_hook(layer, "bias_perturbation", None)

    def _zo_update(self, zo: dict, d: torch.Tensor) -> None:
        """W <- sat(W - d z / 2**s), the fraction carried; s follows |d| (no host sync off the CPU)."""
        scale = self.state[self.zo_layers[0].weight]["d_scale"]
        self.last_projected_grads = d.reshape(1)
        if scale.device.type == "cpu":  # Python ints: the same integers without a dozen 0-dim tensor ops
            d = int(d)
            running, s = running_shift_int(int(scale), d, zo["zo_shift"])
            scale.fill_(running)
        else:
            running, s = running_shift(scale, d, zo["zo_shift"])
            scale.copy_(running)
        for i, (_, tensor) in enumerate(_tensors(self.zo_layers)):  # in place, z streamed: no copy, no whole z
            zo_update_(tensor, self._generator(zo, i, tensor.device), d, s, self.state[tensor]["carry"])

    def _bp_update(self, bp: dict) -> None:
        """NITI on every BP layer from the gradient its backward left, then drop the gradient."""
        for layer in self.bp_layers:
            if layer.grad_acc is None:
                raise RuntimeError("IntElasticZO: a BP layer has no gradient; the closure must call "
                                   "model.backward(grad) when backward=True (see loss_closure)")
            layer.weight.copy_(niti_update(layer.weight, layer.grad_acc, bp["mu"]))
            if layer.bias is not None:
                layer.bias.copy_(niti_update(layer.bias, layer.bias_grad, bp["mu"]))
            layer.grad_acc = layer.grad_exponent = layer.bias_grad = None


def running_shift(scale: torch.Tensor, d: torch.Tensor, zo_shift: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(D', s): the running |d| after this step's d, D' = D - D/16 + |d|/16 (shifts), and the step's
    shift s = clamp(bitlength(max(D', 1)) + zo_shift, 0, 62), as 0-dim int64 tensors (no host sync)."""
    running = scale - (scale >> EMA_SHIFT) + (d.abs() >> EMA_SHIFT)
    return running, (bitlength(running.clamp(min=1)) + zo_shift).clamp(0, 62)


def running_shift_int(scale: int, d: int, zo_shift: int) -> tuple[int, int]:
    """``running_shift`` in Python integers (the CPU path): the same two integers."""
    running = scale - (scale >> EMA_SHIFT) + (abs(d) >> EMA_SHIFT)
    return running, min(max(max(running, 1).bit_length() + zo_shift, 0), 62)


def _tensors(layers: list[_WeightLayer]) -> list[tuple[_WeightLayer, torch.Tensor]]:
    """(layer, tensor) of every trained int8 tensor: all the weights in order, then the biases."""
    return [(l, l.weight) for l in layers] + [(l, l.bias) for l in layers if l.bias is not None]


def _set_hook(layer: _WeightLayer, name: str, hook: Callable[[], torch.Tensor] | None) -> None:
    """``layer.<name> = hook`` without nn.Module.__setattr__'s parameter/buffer/module checks (a
    plain attribute; set 4 times per layer and step, the checks were a visible part of a step)."""
    vars(layer)[name] = hook
