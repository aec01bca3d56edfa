"""The integer engine's input boundary: a batch becomes an int8 ``QTensor`` here, once.

Images arrive as raw uint8 pixels; ``quantize_pixels`` turns them into int8 with exponent -7
(pixel / 256, by one shift), so from the input on every operation of a step is integer.

Point clouds are float coordinates in about [-1, 1]. They are quantised ONCE, when the dataset
is loaded (``quantize_points``: int8 with the fixed exponent -7, value q / 128), so batches arrive
as int8 and the training step stays integer-only: ``quantize_input`` only wraps them.
"""
from __future__ import annotations

import torch

from elasticzo.int8.format import QTensor, quantize

PIXEL_EXPONENT = -8  # int8 pixel p >> 1 stands for (p >> 1) * 2**-7 = about p / 256
POINT_EXPONENT = -7  # int8 coordinate q stands for q / 128: [-1, 1) in steps of 1/128


def quantize_pixels(x: torch.Tensor) -> QTensor:
    """uint8 pixels [B, 1, 28, 28] -> int8 QTensor (0..127, exponent -7): one integer shift."""
    if x.dtype != torch.uint8:
        raise TypeError(f"the INT8 engine takes raw uint8 pixels, got {x.dtype} (load with normalise=False)")
    return QTensor((x >> 1).to(torch.int8), PIXEL_EXPONENT + 1)


def quantize_points(x: torch.Tensor) -> torch.Tensor:
    """float clouds -> int8 round(x * 128), saturated to [-127, 127]: once, at load time (not in a step)."""
    if not x.is_floating_point():
        raise TypeError(f"quantize_points takes float coordinates, got {x.dtype}")
    return torch.round(x * (2.0 ** -POINT_EXPONENT)).clamp_(-127, 127).to(torch.int8)


def quantize_input(x: torch.Tensor | QTensor) -> QTensor:
    """A batch as the engine's input QTensor, by dtype:

    * uint8: raw pixels, one shift (``quantize_pixels``);
    * int8: points from ``quantize_points``, wrapped with their fixed exponent;
    * floating: ``quantize`` with the tensor's own power-of-two exponent (the float boundary:
      fine for inference and conversion checks; training data is quantised once at load time).
    """
    if isinstance(x, QTensor):
        return x  # already the engine's input (e.g. a batch of a dataset quantised once)
    if x.dtype == torch.uint8:
        return quantize_pixels(x)
    if x.dtype == torch.int8:
        return QTensor(x, POINT_EXPONENT)
    if x.is_floating_point():
        return quantize(x)
    raise TypeError(f"the integer model takes raw uint8 pixels, int8 points (quantize_points), a float batch "
                    f"or a QTensor; got a {x.dtype} tensor")


def quantize_once(*splits: torch.Tensor) -> list[QTensor]:
    """Float datasets (e.g. standardised images) as int8 QTensors sharing one exponent, quantised once
    at load time, so that a batch ``QTensor(q.values[idx], q.exponent)`` keeps the step integer-only."""
    q = quantize(torch.cat([s.reshape(s.shape[0], -1) for s in splits]))
    out, lo = [], 0
    for s in splits:
        out.append(QTensor(q.values[lo:lo + s.shape[0]].reshape(s.shape), q.exponent))
        lo += s.shape[0]
    return out
