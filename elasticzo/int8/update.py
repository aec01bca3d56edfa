"""Integer weight updates: NITI's BP update and the ZO primitives (noise, perturb, update).

Weights are int8 with a fixed exponent, so an update is an integer number of weight units,
chosen by a shift (the learning rate is a bit width or a shift, never a float) and applied
with saturation: W <- clamp(W - dW, -127, 127). All functions are out of place.
"""
from __future__ import annotations

import torch

from elasticzo.zo.noise import random_bits

from elasticzo.int8.rounding import (
    INT8_MAX,
    bitlength,
    saturate_int8,
    shift_round_pseudo_stochastic,
    shift_round_stochastic,
)

NOISE_KINDS = ("rademacher", "ternary")


# ---------------------------------------------------------------- NITI back-propagation update


def niti_update(weight: torch.Tensor, grad_acc: torch.Tensor, mu: int) -> torch.Tensor:
    """W - dW, saturated, with dW = grad_acc shifted so its largest entry has about ``mu`` bits.

    The gradient's scale (its exponent) is ignored on purpose: NITI's learning rate is the bit
    width ``mu`` of the largest step, so every step moves the most-affected weight by about
    2**(mu-1)..2**mu units whatever the loss scale. The shift s = max(bitlength - mu, 0) uses
    pseudo-stochastic rounding (no random numbers needed, symmetric in sign).
    """
    if not 1 <= mu <= 8:
        raise ValueError(f"mu={mu} must be in 1..8 bits (an int8 weight spans 8 bits)")
    s = (bitlength(grad_acc) - mu).clamp(min=0)
    dw = shift_round_pseudo_stochastic(grad_acc, s)
    return saturate_int8(weight.to(dw.dtype) - dw)


def apply_niti_update(layers, mu: int) -> None:
    """``niti_update`` every weight layer that has a gradient, then drop the gradient."""
    for layer in layers:
        if getattr(layer, "grad_acc", None) is not None:
            layer.weight = niti_update(layer.weight, layer.grad_acc, mu)
            layer.grad_acc, layer.grad_exponent = None, None


# ---------------------------------------------------------------- zeroth order


def int8_noise(shape, generator: torch.Generator, kind: str = "rademacher", device=None) -> torch.Tensor:
    """int8 direction z regenerated from ``generator``: Rademacher +-1 or ternary {-1, 0, +1}.

    Rademacher uses one random bit per entry (8 per random byte), so regenerating z is cheap.
    """
    shape = torch.Size(shape)
    device = generator.device if device is None else device
    n = shape.numel()
    if kind == "rademacher":
        bits = random_bits(n, generator, device).view(torch.int8)  # [n] of 0/1, n bytes
        return bits.mul_(2).sub_(1).reshape(shape)
    if kind == "ternary":
        return (torch.randint(0, 3, shape, generator=generator, device=device, dtype=torch.int8) - 1)
    raise ValueError(f"unknown int8 noise kind {kind!r}; choose one of {NOISE_KINDS}")


def perturb(weight: torch.Tensor, z: torch.Tensor, eps: int) -> torch.Tensor:
    """saturate(W + eps * z), out of place: ``weight`` itself is never written, so it restores exactly.

    ``eps`` is a signed integer number of weight units (pass -eps for the minus side).
    """
    if not 0 < abs(eps) <= INT8_MAX:
        raise ValueError(f"eps={eps} must be a nonzero integer with |eps| <= {INT8_MAX}")
    if weight.dtype != torch.int8 or z.dtype != torch.int8:
        raise TypeError(f"perturb expects int8 weight and z, got {weight.dtype} and {z.dtype}")
    return saturate_int8(weight.to(torch.int16) + z.to(torch.int16) * eps)  # |.| <= 127 + 127*127


def zo_update(
    weight: torch.Tensor,
    z: torch.Tensor,
    d: torch.Tensor,
    generator: torch.Generator,
    lr_shift: int,
    max_bits: int | None = 2,
) -> torch.Tensor:
    """Integer SPSA step: W - SR(d * z / 2**s), saturated, with d = L+ - L- (integer loss units).

    The float rule is W - lr * (L+ - L-) / (2 eps) * z; here lr / (2 eps) and the loss scale are
    one power of two 2**-lr_shift, and the shift is

        s = max(lr_shift, bitlength(max|d * z|) - max_bits)

    so the step is linear in d (an unbiased SGD step: stochastic rounding from ``generator``)
    while |d| is small, and is clipped to at most 2**max_bits units per weight when |d| is large
    (NITI-style normalisation: one noisy batch cannot wreck the int8 weights). ``max_bits=None``
    disables the clip.
    """
    if not 0 <= lr_shift <= 62:
        raise ValueError(f"lr_shift={lr_shift} must be in 0..62")
    if max_bits is not None and not 0 <= max_bits <= 8:
        raise ValueError(f"max_bits={max_bits} must be in 0..8 or None")
    g = torch.as_tensor(d, dtype=torch.int64, device=z.device) * z.to(torch.int64)  # |d*z| < 2**62
    s = torch.tensor(lr_shift, dtype=torch.int64, device=z.device)
    if max_bits is not None:
        s = torch.maximum(s, bitlength(g) - max_bits)
    step = shift_round_stochastic(g, s.clamp(max=62), generator)
    return saturate_int8(weight.to(torch.int64) - step)
