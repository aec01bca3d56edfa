"""Integer bias: int8 values with their own fixed exponent, added in the accumulator's scale.

NITI layers have no bias; an ordinary model has one on every conv and linear, and folding a
BatchNorm (``int8.fold``) creates one. We define it the NITI way, as a weight:

* stored as int8 ``b`` with a fixed exponent ``e_b`` (value b * 2**e_b), so the ZO perturbation,
  the ZO carry update and NITI's update act on it exactly as on a weight tensor;
* added to the int32 accumulator of x @ W (exponent e_acc = e_x + e_W, which moves with the
  input) before the accumulator is requantised: b is aligned by a shift of e_b - e_acc (left:
  exact; right: rounded to nearest) and saturated to the room the accumulator leaves in int32,
  so the sum never overflows;
* its gradient is the sum of the output errors over every position that used it (batch,
  points, pixels): dL/db = sum g, an integer, which NITI's update normalises by its bit length.
"""
from __future__ import annotations

import torch

from elasticzo.int8.format import Exponent
from elasticzo.int8.rounding import shift_round_nearest

INT32_MAX = 2**31 - 1
MAX_LEFT_SHIFT = 54  # 127 * 2**54 < 2**61: room for an int64 sum of 2**40 products; a larger alignment saturates
PRODUCT_MAX = 128 * 128  # |int8 x int8| bound, also for a caller's -128


def accumulator_room(fan_in: int) -> int:
    """How far a bias may move an int32 accumulator of ``fan_in`` int8 products (0: widen to int64)."""
    return max(INT32_MAX - fan_in * PRODUCT_MAX, 0)


def align_bias(bias: torch.Tensor, bias_exponent: int, acc_exponent: Exponent) -> torch.Tensor:
    """int64 bias in units of 2**acc_exponent: b * 2**(e_b - e_acc), rounded to nearest when the shift is right.

    ``acc_exponent`` may be a 0-dim tensor on the device: no host sync.
    """
    d = torch.as_tensor(bias_exponent - acc_exponent, dtype=torch.int64, device=bias.device)
    b = bias.to(torch.int64) << d.clamp(0, MAX_LEFT_SHIFT)
    return shift_round_nearest(b, (-d).clamp(0, 62))


def add_bias(acc: torch.Tensor, bias: torch.Tensor, bias_exponent: int, acc_exponent: Exponent,
             fan_in: int, dim: int) -> torch.Tensor:
    """acc + aligned bias along ``dim`` (the output channel), in int32 when it cannot overflow.

    |acc| <= fan_in * 128**2, so a bias clamped to the rest of int32's range keeps the sum in
    int32 (saturating the bias, never wrapping the sum); past 2**17 products the sum is int64.
    """
    shape = [1] * acc.dim()
    shape[dim] = -1
    if acc.dtype == torch.int32 and accumulator_room(fan_in):
        return acc + int32_bias(bias, bias_exponent, acc_exponent, fan_in).view(shape)
    return acc.to(torch.int64) + align_bias(bias, bias_exponent, acc_exponent).view(shape)


def int32_bias(bias: torch.Tensor, bias_exponent: int, acc_exponent: Exponent, fan_in: int) -> torch.Tensor | None:
    """The aligned bias saturated to the int32 accumulator's room, as ``add_bias`` adds it (and the fused
    native conv, which adds it before its requantisation); None where the sum must be int64."""
    room = accumulator_room(fan_in)
    if not room:
        return None
    return align_bias(bias, bias_exponent, acc_exponent).clamp_(-room, room).to(torch.int32)


def bias_gradient(grad: torch.Tensor, dim: int) -> torch.Tensor:
    """dL/db: the int8 errors summed over every dimension but the channel ``dim`` (int64, exact)."""
    dims = [d for d in range(grad.dim()) if d != dim % grad.dim()]
    return grad.sum(dim=dims, dtype=torch.int64)
