"""Entry points into the integer engine: convert a float model, or build one from integers.

``convert(model)`` maps a float ``nn.Sequential`` of Conv2d / Linear / ReLU / MaxPool2d /
Flatten / GlobalMaxPool (LeNet-5, MLP, PointNet) to an ``IntSequential``; every weight gets its own power-of-two
exponent (``quantize``). NITI layers have no bias, so biases are handled explicitly:

* an all-zero bias (or ``bias=None``) is dropped silently: nothing changes;
* a nonzero bias raises ``ValueError`` unless ``drop_bias=True``, which drops it with a
  warning (fine-tuning then starts from a slightly different function; the first steps
  usually absorb it). Silently changing the function would be the worse default.

``int8_lenet5`` / ``int8_mlp`` / ``int8_pointnet`` build the same architectures directly in int8 (NITI trains from
scratch this way), with randomness from the generator passed in: no float model, no global RNG.
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
    IntSequential,
)
from elasticzo.int8.rounding import INT8_MAX
from elasticzo.models.pointnet import HEAD_WIDTHS, POINT_WIDTHS, GlobalMaxPool

INIT_EXPONENT = -7  # int8 init values are in units of 2**-7: value range [-1, 1)


def convert(model: nn.Module, drop_bias: bool = False) -> IntSequential:
    """Integer copy of a float sequential model (the float model is not modified)."""
    layers = [_convert_leaf(path, m, drop_bias) for path, m in _leaves(model)]
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


def _convert_leaf(path: str, m: nn.Module, drop_bias: bool) -> IntLayer:
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


def _check_bias(m: nn.Module, where: str, drop_bias: bool) -> None:
    if m.bias is None or not bool(m.bias.detach().ne(0).any()):
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


def _init_weight(shape: tuple[int, ...], fan_in: int, generator: torch.Generator) -> torch.Tensor:
    b = init_bound(fan_in)
    return torch.randint(-b, b + 1, shape, generator=generator, dtype=torch.int8, device=generator.device)


def int_linear(in_features: int, out_features: int, generator: torch.Generator) -> IntLinear:
    return IntLinear(_init_weight((out_features, in_features), in_features, generator), INIT_EXPONENT)


def int_conv2d(in_ch: int, out_ch: int, kernel: int, generator: torch.Generator, stride=1, padding=0) -> IntConv2d:
    w = _init_weight((out_ch, in_ch, kernel, kernel), in_ch * kernel * kernel, generator)
    return IntConv2d(w, INIT_EXPONENT, stride=stride, padding=padding)


def int8_lenet5(generator: torch.Generator, num_classes: int = 10, in_channels: int = 1) -> IntSequential:
    """LeNet-5 as ``elasticzo.models.LeNet5`` (input [B, in_channels, 28, 28]), in int8, no bias."""
    g = generator
    return IntSequential(
        int_conv2d(in_channels, 6, 5, g, padding=2), IntReLU(inplace=True), IntMaxPool2d(2),  # [B, 6, 14, 14]
        int_conv2d(6, 16, 5, g), IntReLU(inplace=True), IntMaxPool2d(2),  # [B, 16, 5, 5]
        IntFlatten(),  # [B, 400]
        int_linear(400, 120, g), IntReLU(inplace=True),
        int_linear(120, 84, g), IntReLU(inplace=True),
        int_linear(84, num_classes, g),  # [B, num_classes]
    )


def int8_mlp(
    generator: torch.Generator, in_features: int = 784, hidden: tuple[int, ...] = (256, 128), num_classes: int = 10
) -> IntSequential:
    """MLP as ``elasticzo.models.MLP``: Flatten - (Linear - ReLU) per hidden width - Linear."""
    widths = (in_features, *hidden)
    layers: list[IntLayer] = [IntFlatten()]
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [int_linear(a, b, generator), IntReLU(inplace=True)]
    layers.append(int_linear(widths[-1], num_classes, generator))
    return IntSequential(*layers)


def int8_pointnet(generator: torch.Generator, num_classes: int = 10, point_widths: tuple[int, ...] = POINT_WIDTHS,
                  head_widths: tuple[int, ...] = HEAD_WIDTHS, in_features: int = 3) -> IntSequential:
    """PointNet as ``elasticzo.models.PointNet`` (input [B, N, 3]), in int8, no bias."""
    layers: list[IntLayer] = []
    widths = (in_features, *point_widths)
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [int_linear(a, b, generator), IntReLU(inplace=True)]  # per point: [B, N, b]
    layers.append(IntGlobalMaxPool())  # [B, point_widths[-1]]
    widths = (point_widths[-1], *head_widths)
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [int_linear(a, b, generator), IntReLU(inplace=True)]
    layers.append(int_linear(widths[-1], num_classes, generator))  # [B, num_classes]
    return IntSequential(*layers)
