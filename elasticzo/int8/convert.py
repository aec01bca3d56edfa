"""The one entry point into the integer engine: ``convert(model)``, float model -> integer model.

``convert`` maps a float ``nn.Sequential`` of Conv2d / Linear / ReLU / MaxPool2d / Flatten /
GlobalMaxPool (LeNet-5, MLP, PointNet: the models of ``elasticzo.models``, nothing redefined)
to an ``IntSequential``, an ``nn.Module`` whose int8 weights and exponents are buffers. The
architecture is defined once, in float; there are no hand-written integer twins.

The weights come from one of two places:

* by default, the float weights, each quantised with its own power-of-two exponent
  (``quantize``): a trained float model continues in integers;
* with ``init=generator``, a fresh integer He-uniform init in units of 2**-7 (``init_bound``),
  drawn layer by layer from the generator, in integer arithmetic: NITI trains from scratch
  this way, with no float weights and no global RNG.

NITI layers have no bias, so biases are handled explicitly when the float weights are kept:

* an all-zero bias (or ``bias=None``) is dropped silently: nothing changes;
* a nonzero bias raises ``ValueError`` unless ``drop_bias=True``, which drops it with a
  warning (fine-tuning then starts from a slightly different function; the first steps
  usually absorb it). Silently changing the function would be the worse default.
"""
from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from elasticzo.int8.format import quantize
from elasticzo.int8.layers import (
    IntConv2d,
    IntFlatten,
    IntGlobalMaxPool,
    IntLayer,
    IntLinear,
    IntMaxPool2d,
    IntReLU,
)
from elasticzo.int8.sequential import IntSequential
from elasticzo.int8.rounding import INT8_MAX
from elasticzo.models.pointnet import GlobalMaxPool

INIT_EXPONENT = -7  # int8 init values are in units of 2**-7: value range [-1, 1)


def convert(model: nn.Module, drop_bias: bool = False, *, init: torch.Generator | None = None,
            tile: int = 0) -> IntSequential:
    """Integer copy of a float sequential model (the float model is not modified).

    Args:
        drop_bias: drop nonzero biases with a warning instead of raising.
        init: draw fresh integer weights from this generator instead of quantising the float ones.
        tile: examples per int32 accumulator tile of the convolutions and per-point linears
            (0: the whole batch at once; faster, more memory).

    Example::

        net = convert(LeNet5(), init=torch.Generator().manual_seed(0))
        logits = net(pixels)   # uint8 [B, 1, 28, 28] -> QTensor [B, 10]
    """
    if tile < 0:
        raise ValueError(f"tile={tile} must be >= 0 (0: no tiling)")
    bias_rule = None if init is not None else drop_bias  # a fresh init ignores the float biases
    layers = [_convert_leaf(path, m, bias_rule) for path, m in _leaves(model)]
    for layer in layers:
        if layer.has_weight:
            layer.tile = tile
            if init is not None:
                layer.weight = _init_weight(layer.weight.shape, init).to(layer.weight.device)
                layer.weight_exponent = INIT_EXPONENT
    return IntSequential(*layers)


def _leaves(model: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module]]:
    """(path, module) of the leaf modules in order, looking through nested nn.Sequential."""
    if not isinstance(model, nn.Sequential):
        raise TypeError(
            f"convert expects an nn.Sequential (e.g. LeNet5, MLP), got {type(model).__name__}: "
            "the forward order of other modules is not known from their structure"
        )
    out = []
    for name, child in model.named_children():
        path = f"{prefix}{name}"
        out += _leaves(child, path + ".") if isinstance(child, nn.Sequential) else [(path, child)]
    return out


def _convert_leaf(path: str, m: nn.Module, drop_bias: bool | None) -> IntLayer:
    where = f"module {path} ({m!r})"
    if isinstance(m, nn.Linear):
        _check_bias(m, where, drop_bias)
        q = quantize(m.weight)
        return IntLinear(q.values, q.exponent)
    if isinstance(m, nn.Conv2d):
        _check_conv(m, where)
        _check_bias(m, where, drop_bias)
        q = quantize(m.weight)
        return IntConv2d(q.values, q.exponent, stride=tuple(m.stride), padding=tuple(m.padding))
    if isinstance(m, nn.ReLU):
        return IntReLU(inplace=m.inplace)
    if isinstance(m, nn.MaxPool2d):
        _require(m.padding in (0, (0, 0)) and m.dilation in (1, (1, 1)), where, "padding=0 and dilation=1")
        _require(not m.ceil_mode and not m.return_indices, where, "ceil_mode=False, return_indices=False")
        return IntMaxPool2d(m.kernel_size, m.stride)
    if isinstance(m, GlobalMaxPool):
        return IntGlobalMaxPool()
    if isinstance(m, nn.Flatten):
        _require(m.start_dim == 1 and m.end_dim == -1, where, "start_dim=1, end_dim=-1")
        return IntFlatten()
    raise TypeError(
        f"convert: unsupported {where}; the integer engine supports Conv2d, Linear, ReLU, "
        "MaxPool2d, Flatten and GlobalMaxPool"
    )


def _require(ok: bool, where: str, what: str) -> None:
    if not ok:
        raise ValueError(f"convert: {where} is not supported by the integer engine: it needs {what}")


def _check_conv(m: nn.Conv2d, where: str) -> None:
    _require(m.groups == 1 and tuple(m.dilation) == (1, 1), where, "groups=1 and dilation=1")
    _require(m.padding_mode == "zeros", where, "padding_mode='zeros'")
    _require(not isinstance(m.padding, str), where, "an integer padding (not 'same'/'valid')")


def _check_bias(m: nn.Module, where: str, drop_bias: bool | None) -> None:
    """Raise for a nonzero bias unless dropping is allowed (``None``: a fresh init, silent)."""
    if drop_bias is None or m.bias is None or not bool(m.bias.detach().ne(0).any()):
        return
    if not drop_bias:
        raise ValueError(
            f"convert: {where} has a nonzero bias, which integer (NITI) layers do not have; "
            "build the float model with bias=False, or pass drop_bias=True to drop it"
        )
    warnings.warn(f"convert: dropping the nonzero bias of {where}", stacklevel=4)


# ---------------------------------------------------------------- float-free int8 init


def init_bound(fan_in: int) -> int:
    """Kaiming-uniform bound sqrt(6 / fan_in) in units of 2**-7, in integer arithmetic.

    isqrt(6 * 2**14 // fan_in) ~= 2**7 * sqrt(6 / fan_in); at least 1, at most 127. Leaves
    headroom below 127 for the weights to grow (the exponent is fixed for the whole run).
    """
    return max(1, min(INT8_MAX, math.isqrt((6 << 14) // fan_in)))


def _init_weight(shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
    """Uniform int8 in [-b, b], b = ``init_bound(fan_in)``, fan_in = every dim but the first."""
    b = init_bound(shape[1:].numel())
    return torch.randint(-b, b + 1, shape, generator=generator, dtype=torch.int8, device=generator.device)
