"""Integer layers with explicit forward and backward (autograd does not take integer tensors).

Every layer is an ``nn.Module`` mapping QTensor -> QTensor, so a network has ``.to()``,
``state_dict()``, ``load_state_dict()``, ``.eval()`` like a float one. ``forward(x, store=True)``
keeps what ``backward`` needs; ``store=False`` keeps nothing (the ZO part: forward only, the
memory of inference). Weight layers (``IntLinear``, ``IntConv2d``) hold the
int8 ``weight`` and its fixed exponent as buffers (``exponent``, an int64 scalar, mirrored in
the Python int ``weight_exponent`` that forward reads without a host sync); ``backward`` leaves
the integer weight gradient in ``grad_acc`` (int32, or int64 when the sum is too long for
int32) with value grad_acc * 2**grad_exponent, and returns the requantized int8 error for the
layer below. A weight layer may have an integer ``bias`` (int8 with its own fixed exponent
``bias_exponent``, added in the accumulator's scale: ``int8.bias``); its gradient goes to
``bias_grad`` (int64, the sum of the errors). While ``sum_grad`` is set (a micro-batched sweep,
``int8.microbatch``) backward adds both to what the earlier chunks left there instead.

A weight layer computes with another int8 weight of the same shape and exponent when given
``forward(x, weight=w)`` or while its ``perturbation`` callable is set (``IntElasticZO`` sets
it for the + and - passes): a perturbed copy built out of place, so ZO never writes
``layer.weight``. ``backprop = False`` marks a layer of the ZO part: ``IntSequential`` (int8.sequential) stores
nothing for it and its backward stops above it (the integer twin of ``requires_grad=False``).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from elasticzo.int8 import native, native_ops
from elasticzo.int8.bias import add_bias, bias_gradient, int32_bias
from elasticzo.int8.format import Exponent, QTensor, requantize_int32
from elasticzo.int8.microbatch import add_weight_grad
from elasticzo.int8.rounding import bitlength, shift_round_nearest
from elasticzo.int8.shiftplan import requantize_shift
from elasticzo.int8.conv import (
    int8_conv2d,
    int8_conv2d_grad_input,
    int8_conv2d_grad_input_requant,
    int8_conv2d_grad_weight,
    int8_conv2d_requant,
)
from elasticzo.int8.ops import int8_linear, int8_linear_grad_input, int8_linear_grad_weight
from elasticzo.int8.pool import int8_maxpool2d, int8_maxpool2d_backward


def requantize_tiled(acc_of: Callable[[int, int], torch.Tensor], batch: int, tile: int, exponent: Exponent) -> QTensor:
    """``requantize_int32`` of an accumulator computed ``tile`` rows at a time, never whole.

    The int32 accumulator of a conv is 4x its int8 result and would cap the memory saving of
    INT8 over FP32. Pass 1 takes the shift from every tile's largest entry; pass 2 recomputes
    each tile and narrows it at once into the int8 output. The result equals the untiled
    requantisation exactly (same shift, same rounding of every entry), for twice the products.
    Inside a micro-batched pass whose plan knows the shift already, pass 1 is skipped.
    """
    def top_bits() -> torch.Tensor:
        top = None
        for lo in range(0, batch, tile):
            bits = bitlength(acc_of(lo, lo + tile))
            top = bits if top is None else torch.maximum(top, bits)
        return top

    s = requantize_shift(top_bits)
    out = None
    for lo in range(0, batch, tile):
        part = shift_round_nearest(acc_of(lo, lo + tile), s).clamp_(-127, 127).to(torch.int8)  # saturate
        if out is None:
            out = torch.empty((batch, *part.shape[1:]), dtype=torch.int8, device=part.device)
        out[lo:lo + tile] = part
    return QTensor(out, exponent + s)


class IntLayer(nn.Module):
    """Base: no parameters, nothing stored."""

    has_weight = False

    def forward(self, x: QTensor, store: bool = True) -> QTensor:
        raise NotImplementedError

    def backward(self, grad: QTensor, input_grad: bool = True) -> QTensor | None:
        raise NotImplementedError

    def clear(self) -> None:
        """Drop stored activations (called after backward, or to abandon a step)."""


class _WeightLayer(IntLayer):
    """Shared state of IntLinear / IntConv2d: int8 weight, fixed exponent, integer gradient."""

    has_weight = True

    def __init__(self, weight: torch.Tensor, weight_exponent: int, bias: torch.Tensor | None = None,
                 bias_exponent: int = 0):
        super().__init__()
        for name, t in (("weight", weight), ("bias", bias)):
            if t is not None and t.dtype != torch.int8:
                raise TypeError(f"{type(self).__name__} {name} must be int8, got {t.dtype}")
        if bias is not None and bias.shape != weight.shape[:1]:
            raise ValueError(f"{type(self).__name__} bias must be [{weight.shape[0]}], got {tuple(bias.shape)}")
        self.register_buffer("weight", weight)
        self.register_buffer("exponent", torch.tensor(int(weight_exponent), dtype=torch.int64))
        self._exponent = int(weight_exponent)
        self.register_buffer("bias", bias)  # None: no bias, no state_dict entry (NITI's layout)
        if bias is not None:
            self.register_buffer("bias_exponent", torch.tensor(int(bias_exponent), dtype=torch.int64))
        self._bias_exponent = int(bias_exponent)
        self.bias_perturbation: Callable[[], torch.Tensor] | None = None  # the bias's twin of ``perturbation``
        self.bias_grad: torch.Tensor | None = None  # int64 [out], set by backward when there is a bias
        self.backprop = True  # False: a ZO layer (nothing stored for it, backward stops above it)
        self.perturbation: Callable[[], torch.Tensor] | None = None  # set by IntElasticZO for +-eps passes
        self.grad_acc: torch.Tensor | None = None  # int32/int64, set by backward
        self.grad_terms = 0  # products summed into each grad_acc entry (int32 holds MAX_INT32_TERMS)
        self.grad_exponent: Exponent | None = None
        self.sum_grad = False  # backward adds to grad_acc / bias_grad (set by int8.microbatch)
        self._input: QTensor | None = None

    @property
    def weight_exponent(self) -> int:
        """The weight's exponent as a Python int (the ``exponent`` buffer, read without a sync)."""
        return self._exponent

    @weight_exponent.setter
    def weight_exponent(self, value: int) -> None:
        self._exponent = int(value)
        self.exponent.fill_(self._exponent)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._exponent = int(self.exponent)  # once per load: keep the Python mirror in step
        if self.bias is not None:
            self._bias_exponent = int(self.bias_exponent)

    def _current_bias(self) -> torch.Tensor | None:
        """The bias this pass uses (perturbed while ``bias_perturbation`` is set); None without one."""
        if self.bias is None or self.bias_perturbation is None:
            return self.bias
        return self.bias_perturbation()

    def _biased(self, acc: torch.Tensor, exponent: Exponent, dim: int, bias: torch.Tensor | None = None) -> torch.Tensor:
        """The accumulator plus ``bias`` (default: ``_current_bias()``); unchanged without one."""
        bias = self._current_bias() if bias is None else bias
        if bias is None:
            return acc
        return add_bias(acc, bias, self._bias_exponent, exponent, self.weight[0].numel(), dim)

    def _keep_bias_grad(self, grad: torch.Tensor, dim: int) -> None:
        part = None if self.bias is None else bias_gradient(grad, dim)
        summing = self.sum_grad and part is not None and self.bias_grad is not None
        self.bias_grad = self.bias_grad.add_(part) if summing else part  # int64: exact in any order

    def _keep_weight_grad(self, rows_of: Callable[[int, int], torch.Tensor], terms: int, exponent: Exponent,
                          operands: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """This pass's weight gradient into ``grad_acc``; ``rows_of(lo, hi)``: its output rows lo:hi, from
        ``terms`` products each. Summing (``sum_grad``), it is added in place (``microbatch.add_weight_grad``;
        ``operands``: the matrices whose product it is): the sum is the only copy."""
        self.grad_exponent = exponent
        if self.sum_grad:
            add_weight_grad(self, rows_of, terms, operands)
        else:
            self.grad_acc, self.grad_terms = rows_of(0, self.weight.shape[0]), terms

    def _weight(self, weight: torch.Tensor | None) -> torch.Tensor:
        if weight is None:
            return self.weight if self.perturbation is None else self.perturbation()
        if weight.shape != self.weight.shape or weight.dtype != torch.int8:
            raise ValueError(f"weight override must be int8 {tuple(self.weight.shape)}, got {weight.dtype} {tuple(weight.shape)}")
        return weight

    def _saved_input(self) -> QTensor:
        if self._input is None:
            raise RuntimeError(f"{type(self).__name__}.backward needs forward(x, store=True) first")
        return self._input

    def clear(self) -> None:
        self._input = None


class IntLinear(_WeightLayer):
    """y = x @ W^T over the last dim, weight [out, in] int8: x is [B, in], or [B, N, in] per point.

    Per-point inputs (PointNet's shared MLP) have an int32 accumulator [B, N, out], 4x the int8
    output; ``tile`` > 0 computes it ``tile`` examples at a time (``requantize_tiled``: the same
    result exactly). 2-D inputs are never tiled: their accumulator is small.
    """

    def __init__(self, weight: torch.Tensor, weight_exponent: int, tile: int = 0, bias: torch.Tensor | None = None,
                 bias_exponent: int = 0):
        super().__init__(weight, weight_exponent, bias, bias_exponent)
        self.tile = tile  # examples per int32 accumulator tile of a per-point input (0: all at once)

    def forward(self, x: QTensor, store: bool = True, weight: torch.Tensor | None = None) -> QTensor:
        self._input = x if store else None
        w = self._weight(weight)
        exponent = x.exponent + self.weight_exponent
        if x.values.dim() == 2:
            return requantize_int32(self._biased(int8_linear(x.values, w), exponent, -1), exponent)  # [B, out]
        bias = self._current_bias()  # perturbed once per pass, not once per tile
        rows = lambda lo, hi: self._biased(_per_point_linear(x.values[lo:hi], w), exponent, -1, bias)  # [hi - lo, N, out]
        if self.tile and x.shape[0] > self.tile:
            return requantize_tiled(rows, x.shape[0], self.tile, exponent)
        return requantize_int32(rows(0, x.shape[0]), exponent)

    def backward(self, grad: QTensor, input_grad: bool = True) -> QTensor | None:
        x = self._saved_input()
        g2, x2 = grad.values.reshape(-1, grad.shape[-1]), x.values.reshape(-1, x.shape[-1])  # points as rows
        self._keep_weight_grad(lambda lo, hi: int8_linear_grad_weight(g2[:, lo:hi], x2), g2.shape[0],
                               grad.exponent + x.exponent, (g2.t(), x2))  # [out, in], one product per point
        self._keep_bias_grad(g2, -1)
        self.clear()
        if not input_grad:
            return None
        gx = int8_linear_grad_input(g2, self.weight).reshape(*x.shape[:-1], -1)
        return requantize_int32(gx, grad.exponent + self.weight_exponent)

    def extra_repr(self) -> str:
        return f"in={self.weight.shape[1]}, out={self.weight.shape[0]}, weight_exponent={self.weight_exponent}"


def _per_point_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """[B, N, in] int8 -> [B, N, out] integer accumulator: one matmul over all B*N points."""
    return int8_linear(x.reshape(-1, x.shape[-1]), w).reshape(*x.shape[:-1], w.shape[0])


class IntConv2d(_WeightLayer):
    """Cross-correlation as nn.Conv2d, weight [O, C, kh, kw] int8, optional int8 bias [O]."""

    def __init__(self, weight: torch.Tensor, weight_exponent: int, stride=1, padding=0, tile: int = 0,
                 bias: torch.Tensor | None = None, bias_exponent: int = 0):
        super().__init__(weight, weight_exponent, bias, bias_exponent)
        self.stride, self.padding = stride, padding
        self.tile = tile  # images per tile of the int32 accumulator (0: the whole batch at once)

    def forward(self, x: QTensor, store: bool = True, weight: torch.Tensor | None = None) -> QTensor:
        self._input = x if store else None
        w = self._weight(weight)
        exponent = x.exponent + self.weight_exponent
        bias = self._current_bias()  # once per pass: a perturbed bias is regenerated on each call
        fused = self._fused_forward(x.values, w, bias, exponent)
        if fused is not None:
            return fused
        conv = lambda lo, hi: self._biased(int8_conv2d(x.values[lo:hi], w, self.stride, self.padding), exponent, 1, bias)
        if self.tile and x.shape[0] > self.tile:
            return requantize_tiled(conv, x.shape[0], self.tile, exponent)
        acc = conv(0, x.shape[0])  # channels-last strides
        out = requantize_int32(acc, exponent)
        return QTensor(out.values.contiguous(), out.exponent)  # copy the int8 result, not the int32 one

    def _fused_forward(self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, exponent: Exponent):
        """The native fused conv (+ int32 bias) + requantisation, one image's int32 at a time; None where it does
        not run (not native, or a bias whose sum needs int64)."""
        b32 = None if bias is None else int32_bias(bias, self._bias_exponent, exponent, self.weight[0].numel())
        if bias is not None and b32 is None:
            return None
        fused = int8_conv2d_requant(x, w, self.stride, self.padding, bias=b32)
        return None if fused is None else QTensor(fused[0], exponent + fused[1])

    def backward(self, grad: QTensor, input_grad: bool = True) -> QTensor | None:
        x = self._saved_input()
        shape = self.weight.shape[1:]
        rows = lambda lo, hi: int8_conv2d_grad_weight(grad.values[:, lo:hi], x.values, (hi - lo, *shape), self.stride,
                                                      self.padding)
        self._keep_weight_grad(rows, grad.values.numel() // grad.shape[1], grad.exponent + x.exponent)  # B*OH*OW terms
        self._keep_bias_grad(grad.values, 1)
        self.clear()
        if not input_grad:
            return None
        exponent = grad.exponent + self.weight_exponent
        fused = int8_conv2d_grad_input_requant(grad.values, self.weight, x.shape, self.stride, self.padding)
        if fused is not None:  # native: requantised one image at a time
            return QTensor(fused[0], exponent + fused[1])
        if self.tile and x.shape[0] > self.tile:  # as in forward: never the whole int32 error at once
            def conv(lo, hi):
                g = grad.values[lo:hi]
                return int8_conv2d_grad_input(g, self.weight, (g.shape[0], *x.shape[1:]), self.stride, self.padding)
            return requantize_tiled(conv, x.shape[0], self.tile, exponent)
        gx = int8_conv2d_grad_input(grad.values, self.weight, x.shape, self.stride, self.padding)
        return requantize_int32(gx, exponent)

    def extra_repr(self) -> str:
        o, c, kh, kw = self.weight.shape
        return f"{c}, {o}, kernel=({kh}, {kw}), stride={self.stride}, padding={self.padding}, weight_exponent={self.weight_exponent}"


class IntReLU(IntLayer):
    """max(x, 0) on int8; backward passes the error where x > 0 (0 at x == 0, as PyTorch)."""

    def __init__(self, inplace: bool = False) -> None:
        super().__init__()
        self.inplace = inplace  # overwrite the input, as nn.ReLU(inplace=True): one int8 copy less
        self._mask: torch.Tensor | None = None

    def forward(self, x: QTensor, store: bool = True) -> QTensor:
        if store and not self.inplace and native.active(x.values):  # values and mask in one pass
            values, self._mask = native_ops.OPS.relu_forward(x.values)
            return QTensor(values, x.exponent)
        self._mask = x.values > 0 if store else None  # bool: 1 byte per element
        values = x.values.clamp_(min=0) if self.inplace else x.values.clamp(min=0)
        return QTensor(values, x.exponent)

    def backward(self, grad: QTensor, input_grad: bool = True) -> QTensor | None:
        if self._mask is None:
            raise RuntimeError("IntReLU.backward needs forward(x, store=True) first")
        if native.active(grad.values):
            out = native_ops.OPS.relu_backward(grad.values, self._mask)
        else:
            out = torch.where(self._mask, grad.values, torch.zeros_like(grad.values))
        self._mask = None
        return QTensor(out, grad.exponent)

    def clear(self) -> None:
        self._mask = None


class IntMaxPool2d(IntLayer):
    """Max-pool on int8 (no padding, no dilation); stores the argmax offsets (int8) for backward.

    Ties pick the first maximum in the window, the rule of float ``F.max_pool2d``.
    """

    def __init__(self, kernel_size, stride=None):
        super().__init__()
        self.kernel_size = kernel_size
        self.stride = kernel_size if stride is None else stride
        self._arg: torch.Tensor | None = None
        self._input_shape: torch.Size | None = None

    def forward(self, x: QTensor, store: bool = True) -> QTensor:
        out, arg = int8_maxpool2d(x.values, self.kernel_size, self.stride, with_argmax=store)
        self._arg, self._input_shape = (arg, x.shape) if store else (None, None)
        return QTensor(out, x.exponent)

    def backward(self, grad: QTensor, input_grad: bool = True) -> QTensor | None:
        if self._arg is None:
            raise RuntimeError("IntMaxPool2d.backward needs forward(x, store=True) first")
        out = int8_maxpool2d_backward(grad.values, self._arg, self._input_shape, self.kernel_size, self.stride)
        self.clear()
        if out.dtype == torch.int8:  # disjoint windows: the errors are only moved
            return QTensor(out, grad.exponent)
        return requantize_int32(out, grad.exponent)  # overlapping windows add up

    def clear(self) -> None:
        self._arg, self._input_shape = None, None

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}"


class IntGlobalMaxPool(IntLayer):
    """[B, N, C] -> [B, C]: max over the points on int8 (PointNet); backward sends each error to its arg max.

    The arg max comes from the same ``max(dim=1)`` as the float ``GlobalMaxPool``, so both pick the
    same point on ties. Forward-only passes (``store=False``) take ``amax`` and keep no indices.
    """

    def __init__(self) -> None:
        super().__init__()
        self._arg: torch.Tensor | None = None  # int64 [B, C]: which point won each channel
        self._points: int | None = None

    def forward(self, x: QTensor, store: bool = True) -> QTensor:
        if x.values.dim() != 3:
            raise ValueError(f"IntGlobalMaxPool takes [B, N, C], got shape {tuple(x.shape)}")
        if not store:
            self.clear()
            return QTensor(x.values.amax(dim=1), x.exponent)
        values, self._arg = x.values.max(dim=1)
        self._points = x.shape[1]
        return QTensor(values, x.exponent)

    def backward(self, grad: QTensor, input_grad: bool = True) -> QTensor | None:
        if self._arg is None:
            raise RuntimeError("IntGlobalMaxPool.backward needs forward(x, store=True) first")
        b, c = grad.shape
        out = torch.zeros((b, self._points, c), dtype=torch.int8, device=grad.values.device)
        out.scatter_(1, self._arg.unsqueeze(1), grad.values.unsqueeze(1))  # errors are only moved
        self.clear()
        return QTensor(out, grad.exponent)

    def clear(self) -> None:
        self._arg, self._points = None, None


class IntFlatten(IntLayer):
    """[B, ...] -> [B, prod(...)]; backward reshapes back (only the shape is stored)."""

    def __init__(self) -> None:
        super().__init__()
        self._shape: torch.Size | None = None

    def forward(self, x: QTensor, store: bool = True) -> QTensor:
        self._shape = x.shape if store else None
        return x.reshape(x.shape[0], -1)

    def backward(self, grad: QTensor, input_grad: bool = True) -> QTensor | None:
        if self._shape is None:
            raise RuntimeError("IntFlatten.backward needs forward(x, store=True) first")
        out, self._shape = grad.reshape(*self._shape), None
        return out


__all__ = ["IntLayer", "IntLinear", "IntConv2d", "IntReLU", "IntMaxPool2d", "IntGlobalMaxPool", "IntFlatten"]
