"""The number format: int8 values sharing one power-of-two exponent (value = q * 2**exponent).

NITI's format. One exponent per tensor keeps every product an integer product; a power of two
keeps every rescale a shift. Weights keep the exponent they were created with; activations and
errors get a fresh one from ``requantize_int32`` after each integer matmul / conv.

``quantize`` and ``dequantize`` are the only functions that touch floats: ``quantize`` is the
boundary where a float input batch (or a float weight, at convert time) enters the engine,
``dequantize`` is for oracles, tests and reporting.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from elasticzo.int8 import native, native_ops
from elasticzo.int8.rounding import INT8_MAX, bitlength, shift_round_nearest
from elasticzo.int8.shiftplan import ACC_BITS, planning, requantize_shift  # noqa: F401 (ACC_BITS: re-exported)

Exponent = int | torch.Tensor  # a Python int, or a 0-dim int64 tensor (stays on the device)


@dataclass
class QTensor:
    """int8 ``values`` and a shared ``exponent``: the real tensor is values * 2**exponent."""

    values: torch.Tensor
    exponent: Exponent

    def __post_init__(self) -> None:
        if self.values.dtype != torch.int8:
            raise TypeError(f"QTensor values must be int8, got {self.values.dtype}")
        if isinstance(self.exponent, torch.Tensor) and self.exponent.dim() != 0:
            raise ValueError(f"QTensor exponent must be 0-dim, got shape {tuple(self.exponent.shape)}")

    @property
    def shape(self) -> torch.Size:
        return self.values.shape

    def __getitem__(self, index) -> "QTensor":
        """Rows of the batch (a slice or index tensor), with the shared exponent."""
        return QTensor(self.values[index], self.exponent)

    def reshape(self, *shape: int) -> "QTensor":
        return QTensor(self.values.reshape(*shape), self.exponent)


def quantize(x: torch.Tensor) -> QTensor:
    """Round a float tensor to int8 with the smallest exponent e such that max|x| <= 127 * 2**e.

    The smallest such e keeps the most precision; scaling by 2**-e is exact in float64, and
    round-half-to-even then cannot leave [-127, 127] because |x| * 2**-e <= 127.
    """
    if not x.dtype.is_floating_point:
        raise TypeError(f"quantize expects a floating tensor, got {x.dtype}")
    x = x.detach().to(torch.float64)
    top = x.abs().max().item() if x.numel() else 0.0
    if not math.isfinite(top):
        raise ValueError("quantize: tensor contains inf or nan")
    e = _smallest_exponent(top)
    q = torch.round(torch.ldexp(x, torch.tensor(-e, dtype=torch.int64)))
    return QTensor(q.to(torch.int8), e)


def _smallest_exponent(top: float) -> int:
    """Smallest integer e with top <= 127 * 2**e (0 for an all-zero tensor)."""
    if top == 0.0:
        return 0
    _, e = math.frexp(top / INT8_MAX)  # top / 127 = m * 2**e with 0.5 <= m < 1, so top/127 <= 2**e
    while top <= INT8_MAX * math.ldexp(1.0, e - 1):  # guard against rounding in the division
        e -= 1
    while top > INT8_MAX * math.ldexp(1.0, e):
        e += 1
    return e


def dequantize(q: QTensor) -> torch.Tensor:
    """The exact real value as float64 (exact: int8 times a power of two). For oracles only."""
    e = q.exponent if isinstance(q.exponent, torch.Tensor) else torch.tensor(q.exponent)
    return torch.ldexp(q.values.to(torch.float64), e.to(device=q.values.device, dtype=torch.int64))


def requantize_int32(acc: torch.Tensor, exponent: Exponent) -> QTensor:
    """Bring an integer accumulator (value acc * 2**exponent) back to int8.

    Shift right by s = max(bitlength(max|acc|) - 7, 0) with round-to-nearest, so the largest
    entry lands on 7 bits, and add s to the exponent. Rounding can carry 127.5 up to 128, so the
    result is saturated (never wrapped) to [-127, 127]. ``acc`` may be int32 or int64. Inside a
    micro-batched pass the shift is the whole batch's (``int8.shiftplan``).
    """
    if acc.dtype == torch.int32 and native.active(acc):  # one pass for the shift, one to narrow
        if not planning():
            values, s = native_ops.OPS.requantize(acc)
            return QTensor(values, exponent + s)
        s = requantize_shift(lambda: native_ops.OPS.requant_shift(acc) + ACC_BITS)  # the plan reads max(bits - 7, 0)
        if 0 <= int(s) < 31:
            return QTensor(native_ops.OPS.requantize_at(acc, int(s)), exponent + s)
    else:
        s = requantize_shift(lambda: bitlength(acc))  # 0-dim int64, on the device
    values = shift_round_nearest(acc, s).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)  # saturate, in place
    return QTensor(values, exponent + s)
