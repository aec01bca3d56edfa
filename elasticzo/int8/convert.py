"""The one entry point into the integer engine: ``convert(model)``, float model -> integer model.

``convert`` maps an ordinary float model to an integer ``nn.Module`` whose int8 weights and
exponents are buffers; the architecture is defined once, in float, with no hand-written twins:

* an ``nn.Sequential`` (LeNet-5, MLP, PointNet, a user's CNN) becomes an ``IntSequential``;
* any other ``nn.Module`` is traced with ``torch.fx.symbolic_trace`` into an ``IntGraph``
  (``int8.graph``): residual adds and any wiring a forward can express without data-dependent
  control flow.

Modules: Conv2d and Linear (with their biases: ``int8.bias``), BatchNorm folded into the conv or
linear before it (``int8.fold``: running statistics), ReLU, MaxPool2d, AdaptiveAvgPool2d(1)
(``int8.blocks``), Flatten, GlobalMaxPool. Dropout and Identity become nothing: INT8 training
has no dropout (no integer dropout is implemented; the ZO passes then need no shared mask). What
has no integer form (attention, softmax, LayerNorm, other activations) raises a ``ValueError``
naming the module, its type, and what to do.

The weights come from one of two places:

* by default, the float weights (BatchNorm folded in), each quantised with its own power-of-two
  exponent (``quantize``): a trained float model continues in integers. A nonzero bias becomes
  an int8 bias with its own exponent; an all-zero bias (or ``bias=None``) is dropped: nothing
  changes. ``drop_bias=True`` drops nonzero biases too, with a warning (NITI's layout, which
  the built-in models' INT8 runs use);
* with ``init=generator``, a fresh integer He-uniform init in units of 2**-7 (``init_bound``),
  drawn layer by layer from the generator, in integer arithmetic, with no biases: NITI trains
  from scratch this way, with no float weights and no global RNG.
"""
from __future__ import annotations

import math
import warnings

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from elasticzo.int8.blocks import IntGlobalAvgPool2d
from elasticzo.int8.fold import check_batchnorm, folded
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
PASSTHROUGH = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Identity)  # nothing to compute in INT8 training
CONVERTIBLE = (nn.Linear, nn.Conv2d, nn.ReLU, nn.MaxPool2d, nn.AdaptiveAvgPool2d, GlobalMaxPool, nn.Flatten, _BatchNorm,
               *PASSTHROUGH)  # the modules convert_leaf maps (BatchNorm: folded)
NO_INTEGER_FORM = "attention, softmax, LayerNorm and smooth activations need per-example exponentials or divisions"


def convert(model: nn.Module, drop_bias: bool = False, *, init: torch.Generator | None = None,
            tile: int = 0) -> nn.Module:
    """Integer copy of a float model (the float model is not modified).

    Args:
        drop_bias: drop nonzero biases with a warning instead of converting them.
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
    leaf = lambda path, m, bn=None: convert_leaf(path, m, bias_rule, bn)
    if isinstance(model, CONVERTIBLE):
        model = nn.Sequential(model)  # one layer: a chain of one
    if _is_chain(model):
        net = IntSequential(*[leaf(*entry) for entry in _folded_chain(_leaves(model))])
    else:
        from elasticzo.int8.graph import convert_graph  # fx is imported only for non-Sequential models

        net = convert_graph(model, leaf)
    for layer in net.weight_layers():
        layer.tile = tile
        if init is not None:
            layer.weight = _init_weight(layer.weight.shape, init).to(layer.weight.device)
            layer.weight_exponent = INIT_EXPONENT
    return net


def _is_chain(model: nn.Module) -> bool:
    """True if ``model`` computes a plain chain of convertible layers: nested ``nn.Sequential``s
    that keep ``Sequential.forward`` (a subclass with its own forward, e.g. a residual, or a
    custom block inside is not a chain: ``convert_graph`` traces its forward instead)."""
    if not isinstance(model, nn.Sequential) or type(model).forward is not nn.Sequential.forward:
        return False
    return all(_is_chain(child) if isinstance(child, nn.Sequential) else isinstance(child, CONVERTIBLE)
               for child in model.children())


def _leaves(model: nn.Sequential, prefix: str = "") -> list[tuple[str, nn.Module]]:
    """(path, module) of the leaf modules in order, looking through nested nn.Sequential."""
    out = []
    for name, child in model.named_children():
        path = f"{prefix}{name}"
        out += _leaves(child, path + ".") if isinstance(child, nn.Sequential) else [(path, child)]
    return out


def _folded_chain(leaves: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module, _BatchNorm | None]]:
    """(path, module, BatchNorm folded into it) in order, Dropout/Identity left out."""
    out: list[tuple[str, nn.Module, _BatchNorm | None]] = []
    for path, m in leaves:
        if isinstance(m, _BatchNorm):
            prev = out[-1] if out and out[-1][2] is None else (None, None, None)
            check_batchnorm(m, prev[1], describe(path, m))
            out[-1] = (prev[0], prev[1], m)
        elif not isinstance(m, PASSTHROUGH):
            out.append((path, m, None))
    return out


def convert_leaf(path: str, m: nn.Module, drop_bias: bool | None, bn: _BatchNorm | None = None) -> IntLayer:
    """The integer layer of float module ``m`` (at ``path``), with ``bn`` folded into it."""
    where = describe(path, m)
    if isinstance(m, (nn.Linear, nn.Conv2d)):
        return _weight_layer(m, bn, where, drop_bias)
    if isinstance(m, nn.ReLU):
        return IntReLU(inplace=m.inplace)
    if isinstance(m, nn.MaxPool2d):
        _require(m.padding in (0, (0, 0)) and m.dilation in (1, (1, 1)), where, "padding=0 and dilation=1")
        _require(not m.ceil_mode and not m.return_indices, where, "ceil_mode=False, return_indices=False")
        return IntMaxPool2d(m.kernel_size, m.stride)
    if isinstance(m, nn.AdaptiveAvgPool2d):
        _require(m.output_size in (1, (1, 1)), where, "output_size=1 (global average pooling)")
        return IntGlobalAvgPool2d()
    if isinstance(m, GlobalMaxPool):
        return IntGlobalMaxPool()
    if isinstance(m, nn.Flatten):
        _require(m.start_dim == 1 and m.end_dim == -1, where, "start_dim=1, end_dim=-1")
        return IntFlatten()
    raise unsupported(where)


def describe(path: str, m: nn.Module) -> str:
    """'module <path> (<repr>)', the type alone when the repr spans lines (a container)."""
    text = repr(m)
    return f"module {path} ({type(m).__name__ if chr(10) in text else text})"


def unsupported(where: str) -> ValueError:
    return ValueError(
        f"convert: {where} has no integer form ({NO_INTEGER_FORM}); the integer engine has Conv2d, Linear, "
        "BatchNorm after a conv/linear (folded), ReLU, MaxPool2d, AdaptiveAvgPool2d(1), Flatten, GlobalMaxPool, "
        "Dropout (dropped) and residual adds. Replace the module with those, or keep that part of the model "
        "in float and convert the rest as its own model"
    )


def _weight_layer(m: nn.Module, bn: _BatchNorm | None, where: str, drop_bias: bool | None) -> IntLayer:
    if isinstance(m, nn.Conv2d):
        _check_conv(m, where)
    weight, bias = folded(m, bn)
    q = quantize(weight)
    bias = _kept_bias(bias, where, drop_bias)
    qb = quantize(bias) if bias is not None else None
    extra = dict(bias=qb.values, bias_exponent=qb.exponent) if qb is not None else {}
    if isinstance(m, nn.Linear):
        return IntLinear(q.values, q.exponent, **extra)
    return IntConv2d(q.values, q.exponent, stride=tuple(m.stride), padding=tuple(m.padding), **extra)


def _require(ok: bool, where: str, what: str) -> None:
    if not ok:
        raise ValueError(f"convert: {where} is not supported by the integer engine: it needs {what}")


def _check_conv(m: nn.Conv2d, where: str) -> None:
    _require(m.groups == 1 and tuple(m.dilation) == (1, 1), where, "groups=1 and dilation=1")
    _require(m.padding_mode == "zeros", where, "padding_mode='zeros'")
    _require(not isinstance(m.padding, str), where, "an integer padding (not 'same'/'valid')")


def _kept_bias(bias: torch.Tensor | None, where: str, drop_bias: bool | None) -> torch.Tensor | None:
    """The bias to convert: None when absent, all zero, or dropped (``None``: a fresh init, silent)."""
    if drop_bias is None or bias is None or not bool(bias.ne(0).any()):
        return None
    if drop_bias:
        warnings.warn(f"convert: dropping the nonzero bias of {where}", stacklevel=5)
        return None
    return bias


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
