"""The integer layers that ordinary models add to NITI's: the residual add and global average pooling.

Both keep NITI's rules: int8 in, int8 out, every rescale a shift (or one integer multiply),
results saturated, never wrapped.

* ``add_aligned`` (``IntAdd``): a + b with exponents e_a, e_b. Both are brought to the finer
  exponent by left shifts (at most ``ALIGN_BITS``: 127 * 2**23 < 2**30, so the int32 sum of two
  never overflows); an input more than ``ALIGN_BITS`` finer than the other is rounded to it
  instead (its contribution is below 2**-16 of the other's range). The int32 sum is
  requantised to int8 as a matmul accumulator is. The backward of a residual add sends the
  error to both inputs unchanged; a graph node read twice adds its two errors with the same
  ``add_aligned``.
* ``IntGlobalAvgPool2d``: [B, C, H, W] -> [B, C, 1, 1], the integer sum over the H*W pixels
  times M = round(2**16 / (H*W)), requantised, exponent e - 16: an exact mean (sum, then shift
  and round to nearest) when H*W is a power of two, within 2**-16 relative of it otherwise.
  Backward spreads the error times M over the pixels the same way.
"""
from __future__ import annotations

import torch

from elasticzo.int8.format import QTensor, requantize_int32
from elasticzo.int8.layers import IntLayer
from elasticzo.int8.rounding import shift_round_nearest

ALIGN_BITS = 23  # largest left shift of an int8 value that keeps the int32 sum of two below 2**31
MEAN_BITS = 16  # fixed-point bits of the 1 / (H*W) multiplier


def _exponent(q: QTensor) -> torch.Tensor:
    return torch.as_tensor(q.exponent, dtype=torch.int64, device=q.values.device)


def add_aligned(a: QTensor, b: QTensor) -> QTensor:
    """a + b as int8 at a common exponent (requantised, saturated): never overflows, whatever the exponents."""
    if a.shape != b.shape:
        raise ValueError(f"integer add needs equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
    ea, eb = _exponent(a), _exponent(b)
    common = torch.maximum(torch.minimum(ea, eb), torch.maximum(ea, eb) - ALIGN_BITS)

    def at_common(q: QTensor, e: torch.Tensor) -> torch.Tensor:
        d = e - common  # <= ALIGN_BITS: a left shift that fits; < 0: round to the common exponent
        return shift_round_nearest(q.values.to(torch.int32) << d.clamp(min=0), (-d).clamp(0, 62))

    return requantize_int32(at_common(a, ea) + at_common(b, eb), common)


class IntAdd(IntLayer):
    """Residual add of two int8 tensors (``add_aligned``); backward gives both inputs the error."""

    arity = 2

    def forward(self, a: QTensor, b: QTensor, store: bool = True) -> QTensor:
        return add_aligned(a, b)

    def backward(self, grad: QTensor, input_grad: bool = True) -> tuple[QTensor, QTensor]:
        return grad, grad


def _mean_multiplier(n: int) -> int:
    return max(1, (2 * (1 << MEAN_BITS) + n) // (2 * n))  # round(2**16 / n), integer only


class IntGlobalAvgPool2d(IntLayer):
    """Mean over H and W in integers: [B, C, H, W] -> [B, C, 1, 1], as ``nn.AdaptiveAvgPool2d(1)``."""

    def __init__(self) -> None:
        super().__init__()
        self._shape: torch.Size | None = None

    def forward(self, x: QTensor, store: bool = True) -> QTensor:
        if x.values.dim() != 4:
            raise ValueError(f"IntGlobalAvgPool2d takes [B, C, H, W], got shape {tuple(x.shape)}")
        self._shape = x.shape if store else None
        n = x.shape[2] * x.shape[3]
        total = x.values.sum(dim=(2, 3), keepdim=True, dtype=torch.int32)  # |.| <= 127 n
        return requantize_int32(total * _mean_multiplier(n), x.exponent - MEAN_BITS)

    def backward(self, grad: QTensor, input_grad: bool = True) -> QTensor | None:
        if self._shape is None:
            raise RuntimeError("IntGlobalAvgPool2d.backward needs forward(x, store=True) first")
        shape, self._shape = self._shape, None
        if not input_grad:
            return None
        spread = requantize_int32(grad.values.to(torch.int32) * _mean_multiplier(shape[2] * shape[3]),
                                  grad.exponent - MEAN_BITS)
        return QTensor(spread.values.expand(shape).contiguous(), spread.exponent)

    def clear(self) -> None:
        self._shape = None


__all__ = ["IntAdd", "IntGlobalAvgPool2d", "add_aligned", "ALIGN_BITS", "MEAN_BITS"]
