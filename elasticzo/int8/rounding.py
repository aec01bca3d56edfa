"""Rounding primitives: integer right shifts that round, and saturation to int8.

Bottom layer of the integer engine. Every function here takes and returns integer tensors only
(int32 / int64 in; int8, int32 or int64 out) so that a training step built on them never
touches a floating dtype. A shift ``s`` is a Python int or a 0-dim integer tensor (a per-tensor
shift that stays on the device: no host sync to choose it), with ``0 <= s <= 62``.

Three roundings of ``x / 2**s``, all exact integer arithmetic:

* ``shift_round_nearest``: round half up (ties go toward +inf), as NITI's ``RoundShift``.
  Half-up needs no absolute value, so it never overflows, even at INT32_MIN.
* ``shift_round_stochastic``: floor plus a Bernoulli carry, unbiased: E[result] = x / 2**s.
* ``shift_round_pseudo_stochastic``: NITI's cheap stand-in for stochastic rounding; the random
  number is taken from the discarded bits themselves. Sign/magnitude, so f(-x) == -f(x).
"""
from __future__ import annotations

import torch

Shift = int | torch.Tensor
INT8_MAX = 127  # symmetric range: -128 is never produced, so negation can never wrap
_MAX_SHIFT = 62


def _check_integer(x: torch.Tensor, name: str = "x") -> None:
    if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
        raise TypeError(f"{name} must have an integer dtype, got {x.dtype}")


def _as_shift(s: Shift, device: torch.device) -> torch.Tensor:
    """The shift as an int64 tensor on ``device`` (Python ints validated here, tensors trusted)."""
    if isinstance(s, torch.Tensor):
        _check_integer(s, "s")
        return s.to(device=device, dtype=torch.int64)
    if not 0 <= s <= _MAX_SHIFT:
        raise ValueError(f"shift s={s} is out of range 0..{_MAX_SHIFT}")
    return torch.tensor(s, dtype=torch.int64, device=device)


def _low_mask(s: torch.Tensor) -> torch.Tensor:
    """2**s - 1: the bits that a right shift by s discards."""
    return (torch.ones_like(s) << s) - 1


def shift_round_nearest(x: torch.Tensor, s: Shift) -> torch.Tensor:
    """Round ``x / 2**s`` to nearest, ties toward +inf; same dtype as ``x``.

    With y = floor(x / 2**(s-1)), the result is floor(y / 2) + (y & 1): the last discarded bit
    (weight 1/2) is the carry. No addition before a shift, so no intermediate can overflow.
    s == 0 goes through the same ops with b = 0 (y = x, result x): no branch on the shift value.
    """
    _check_integer(x)
    s = _as_shift(s, x.device)
    b = (s > 0).to(torch.int64)  # 1, or 0 when there is nothing to round
    y = x >> (s - b)  # a fresh tensor: the rest works in place on it (two temporaries, not four)
    carry = y & b
    return y.__irshift__(b).add_(carry)


def shift_round_stochastic(x: torch.Tensor, s: Shift, generator: torch.Generator) -> torch.Tensor:
    """Round ``x / 2**s`` up with probability equal to the discarded fraction: E[result] = x / 2**s.

    With two's complement, x = (x >> s) * 2**s + (x & (2**s - 1)) for negative x as well, so
    floor + Bernoulli(frac) is unbiased on both signs. The random integers come from
    ``generator`` (uniform on [0, 2**62): their low s bits are uniform on [0, 2**s)).
    """
    _check_integer(x)
    s = _as_shift(s, x.device)
    mask = _low_mask(s)
    r = torch.randint(0, 1 << _MAX_SHIFT, x.shape, generator=generator, dtype=torch.int64, device=x.device)
    carry = (r & mask) < (x & mask)
    return (x >> s) + carry.to(x.dtype)


def shift_round_pseudo_stochastic(x: torch.Tensor, s: Shift) -> torch.Tensor:
    """NITI's pseudo-stochastic rounding of ``x / 2**s``, symmetric: f(-x) == -f(x).

    On the magnitude |x|, the s discarded bits are split: the upper ceil(s/2) bits are the
    rounding probability, the lower floor(s/2) bits (doubled when s is odd, to align the two
    scales) are the "random" number; round the magnitude up when probability > random. NITI
    divides with truncation toward zero, hence sign/magnitude rather than floor on x.
    INT32_MIN (never an int8 x int8 accumulator) is first clamped to -INT32_MAX so |x| fits.
    """
    _check_integer(x)
    s = _as_shift(s, x.device)
    if x.dtype == torch.int32:
        x = x.clamp(min=-torch.iinfo(torch.int32).max)
    mag = x.abs()
    low = mag & _low_mask(s)
    half = s >> 1  # bits of the random part
    prob = low >> half  # upper part: s - half bits
    rand = (low & _low_mask(half)) << (s & 1)  # lower part, scaled to prob's width
    mag = (mag >> s) + (prob > rand).to(x.dtype)
    return torch.where(x < 0, -mag, mag)


def saturate_int8(x: torch.Tensor) -> torch.Tensor:
    """Clamp to [-127, 127] then cast to int8: out-of-range values saturate, never wrap."""
    _check_integer(x)
    return x.clamp(-INT8_MAX, INT8_MAX).to(torch.int8)


def bitlength(x: torch.Tensor) -> torch.Tensor:
    """Bits needed for max|x| (0 for all-zero x): the smallest b with max|x| < 2**b.

    A 0-dim int64 tensor, computed on the device by comparing against the powers of two (no
    float log2, no host sync). The extremes are widened to int64, so |INT32_MIN| is representable.
    """
    _check_integer(x)
    if x.numel() == 0:
        return torch.zeros((), dtype=torch.int64, device=x.device)
    lo, hi = torch.aminmax(x)  # one pass, no |x| copy of the whole tensor
    top = torch.maximum(hi.to(torch.int64), -lo.to(torch.int64))
    return bitlength_each(top)


def bitlength_each(x: torch.Tensor) -> torch.Tensor:
    """Elementwise bit length of non-negative int64 ``x`` (values below 2**62)."""
    powers = torch.ones(_MAX_SHIFT + 1, dtype=torch.int64, device=x.device) << torch.arange(
        _MAX_SHIFT + 1, device=x.device
    )  # [63]: 1, 2, 4, ..., 2**62
    return (x.unsqueeze(-1) >= powers).sum(-1)
