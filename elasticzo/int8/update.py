"""Integer weight updates: NITI's BP update and the ZO primitives (noise, perturb, update).

Weights are int8 with a fixed exponent, so an update is an integer number of weight units,
chosen by a shift (the learning rate is a bit width or a shift, never a float) and applied
with saturation: W <- clamp(W - dW, -127, 127). All functions are out of place.
"""
from __future__ import annotations

import torch

from elasticzo.int8 import native, native_ops
from elasticzo.zo.noise import random_bit_rounds, random_bits, random_word_rounds

from elasticzo.int8.rounding import (
    INT8_MAX,
    bitlength,
    saturate_int8,
    shift_round_nearest,
    shift_round_pseudo_stochastic,
)

CARRY_BITS = 8  # fractional bits of the ZO carry: one uint8 per weight


# ---------------------------------------------------------------- NITI back-propagation update


UPDATE_CHUNK = 8192  # weights updated per round: int64 temporaries of 64 KiB, not 8x the layer


def _chunked(weight: torch.Tensor, step_of) -> torch.Tensor:
    """saturate(W - step_of(lo, hi)) chunk by chunk of the flattened weight, into a new int8 tensor."""
    old, new = weight.reshape(-1), torch.empty_like(weight)
    flat = new.view(-1)
    for lo in range(0, old.numel(), UPDATE_CHUNK):
        hi = lo + UPDATE_CHUNK
        step = step_of(lo, hi)
        flat[lo:hi] = saturate_int8(old[lo:hi].to(step.dtype) - step)
    return new


def niti_update(weight: torch.Tensor, grad_acc: torch.Tensor, mu: int) -> torch.Tensor:
    """W - dW, saturated, with dW = grad_acc shifted so its largest entry has about ``mu`` bits.

    The gradient's scale (its exponent) is ignored on purpose: NITI's learning rate is the bit
    width ``mu`` of the largest step, so every step moves the most-affected weight by about
    2**(mu-1)..2**mu units whatever the loss scale. The shift s = max(bitlength - mu, 0) uses
    pseudo-stochastic rounding (no random numbers needed, symmetric in sign); it is applied
    chunk by chunk, so the temporaries are those of one chunk.
    """
    if not 1 <= mu <= 8:
        raise ValueError(f"mu={mu} must be in 1..8 bits (an int8 weight spans 8 bits)")
    if native.active(weight):
        return native_ops.OPS.niti_update(weight, grad_acc, mu)  # two passes, no int64 temporaries
    s = (bitlength(grad_acc) - mu).clamp(min=0)
    grad = grad_acc.reshape(-1)
    return _chunked(weight, lambda lo, hi: shift_round_pseudo_stochastic(grad[lo:hi], s))


# ---------------------------------------------------------------- zeroth order


def int8_noise(shape, generator: torch.Generator) -> torch.Tensor:
    """int8 Rademacher direction z (+-1) regenerated from ``generator``, on its device.

    One random bit per entry (32 per random word), so regenerating z is cheap.
    """
    shape = torch.Size(shape)
    bits = random_bits(shape.numel(), generator, generator.device).view(torch.int8)  # [n] of 0/1, n bytes
    return bits.mul_(2).sub_(1).reshape(shape)


def perturb_weight(weight: torch.Tensor, z: torch.Tensor, eps: int) -> torch.Tensor:
    """saturate(W + eps * z), out of place: ``weight`` itself is never written, so it restores exactly.

    ``eps`` is a signed integer number of weight units (pass -eps for the minus side).
    """
    if not 0 < abs(eps) <= INT8_MAX:
        raise ValueError(f"eps={eps} must be a nonzero integer with |eps| <= {INT8_MAX}")
    if weight.dtype != torch.int8 or z.dtype != torch.int8:
        raise TypeError(f"perturb expects int8 weight and z, got {weight.dtype} and {z.dtype}")
    if native.active(weight):
        return native_ops.OPS.perturb(weight, z, eps)
    return saturate_int8(weight.to(torch.int16) + z.to(torch.int16) * eps)  # |.| <= 127 + 127*127


def zo_update(weight: torch.Tensor, z: torch.Tensor, d: torch.Tensor, s: torch.Tensor | int,
              carry: torch.Tensor) -> torch.Tensor:
    """Integer SPSA step: saturate(W - d * z / 2**s), d = L+ - L- in integer loss units.

    The float rule is W - lr * (L+ - L-) / (2 eps) * z; here lr / (2 eps) and the loss scale are
    one power of two 2**-s. The fraction of a weight unit is not rounded away: ``carry`` (uint8,
    shaped like W, updated in place) holds it in F = 8 fractional bits,
    T = carry + d z * 2**(F - s) (rounded to nearest when s > F); W loses T >> F whole units and
    carry keeps T mod 2**F. For s <= F nothing is lost: over any sequence of steps W moves by
    their sum, rounded once; for s > F each step is first rounded to 2**-F units. (Stochastic
    rounding, the other unbiased choice, adds a variance of about 2**s / |d z| units^2 per step:
    far above the step itself when steps are small.)
    """
    if carry.dtype != torch.uint8 or carry.shape != weight.shape:
        raise ValueError(f"carry must be uint8 {tuple(weight.shape)}, got {carry.dtype} {tuple(carry.shape)}")
    if native.active(weight) and carry.is_contiguous():
        return native_ops.OPS.zo_update_carry(weight, z, int(d), int(s), carry)  # one pass, no int64 temporaries
    dz = d.to(torch.int64) * z.reshape(-1).to(torch.int64)  # [n], |d z| < 2**62
    flat = carry.view(-1)
    return _chunked(weight, lambda lo, hi: _carried(dz[lo:hi], s, flat[lo:hi]))


def _carried(dz: torch.Tensor, s: torch.Tensor | int, carry: torch.Tensor) -> torch.Tensor:
    """Whole weight units of carry + dz / 2**(s - F); the fraction left stays in ``carry`` (in place).

    s >= F: dz / 2**(s - F) rounded to nearest. s < F: dz * 2**(F - s) exactly, saturated at
    2**62 (a step of 2**54 units, far past any int8 weight), so the rule d z / 2**s holds for
    every shift and nothing wraps.
    """
    s = torch.as_tensor(s, dtype=torch.int64, device=dz.device)
    up = (CARRY_BITS - s).clamp(min=0, max=CARRY_BITS)  # > 0 only when s < F
    bound = (torch.ones_like(up) << 62) >> up
    scaled = torch.where(up > 0, dz.clamp(-bound, bound) << up,
                         shift_round_nearest(dz, (s - CARRY_BITS).clamp(min=0)))  # in 2**-F units
    total = carry.to(torch.int64) + scaled
    carry.copy_(total & ((1 << CARRY_BITS) - 1))
    return total >> CARRY_BITS


# ---------------------------------------------------------------- streamed: z never whole


PIECE = 2048  # weights per piece of a streamed perturbation / update: int64 temporaries of 16 KiB


def rademacher_pieces(n: int, generator: torch.Generator, device: torch.device):
    """Yield (lo, hi, z[lo:hi]) of ``int8_noise((n,), generator)`` (Rademacher), PIECE entries at a time."""
    for lo, hi, bits in random_bit_rounds(n, generator, device):
        for a in range(0, hi - lo, PIECE):
            b = min(a + PIECE, hi - lo)
            yield lo + a, lo + b, bits[a:b].view(torch.int8).mul(2).sub_(1)


def _part(flat: torch.Tensor, lo: int, hi: int, n: int) -> torch.Tensor:
    """``flat[lo:hi]``, or ``flat`` itself when that is all n of it (most layers are one round: no view made)."""
    return flat if hi - lo == n else flat[lo:hi]


def perturbed_weight(weight: torch.Tensor, generator: torch.Generator, eps: int) -> torch.Tensor:
    """``perturb_weight(weight, int8_noise(weight.shape, generator), eps)`` without the whole z or its int16 copies.

    The full-size temporaries of the direct form (z, and three int16 tensors twice the layer)
    would be the peak of a micro-batched INT8 step; here they are those of one piece.
    """
    out = torch.empty_like(weight)
    flat, w = out.view(-1), weight.reshape(-1)
    if native.active(weight) and weight.is_contiguous():  # z expanded inside the kernel, from the same words
        if not 0 < abs(eps) <= INT8_MAX:
            raise ValueError(f"eps={eps} must be a nonzero integer with |eps| <= {INT8_MAX}")
        n = w.numel()
        for lo, hi, words in random_word_rounds(n, generator, weight.device):
            native_ops.OPS.perturb_words(_part(w, lo, hi, n), words, eps, _part(flat, lo, hi, n))
        return out
    for lo, hi, z in rademacher_pieces(w.numel(), generator, weight.device):
        flat[lo:hi] = perturb_weight(w[lo:hi], z, eps)
    return out


def zo_update_(weight: torch.Tensor, generator: torch.Generator, d: torch.Tensor | int, s: torch.Tensor | int,
               carry: torch.Tensor) -> torch.Tensor:
    """``zo_update(weight, z, d, s, carry=carry)`` in place, z regenerated from ``generator`` piece by piece.

    Equal bit for bit (the carried step is exact, so cutting it into pieces changes nothing);
    the peak is the weight, its carry and one piece, not 8 bytes per weight of int64 d z.
    """
    w, flat_carry = weight.view(-1), carry.view(-1)
    if native.active(weight) and carry.is_contiguous():  # one kernel per round of random words
        di, si, n = int(d), int(s), w.numel()
        for lo, hi, words in random_word_rounds(n, generator, weight.device):
            native_ops.OPS.zo_update_words(_part(w, lo, hi, n), words, di, si, _part(flat_carry, lo, hi, n))
        return weight
    d64 = torch.as_tensor(d, dtype=torch.int64, device=weight.device)
    for lo, hi, z in rademacher_pieces(w.numel(), generator, weight.device):
        step = _carried(d64 * z.to(torch.int64), s, flat_carry[lo:hi])
        w[lo:hi] = saturate_int8(w[lo:hi].to(torch.int64) - step)
    return weight
