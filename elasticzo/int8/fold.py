"""BatchNorm folding, at conversion time: conv/linear followed by BatchNorm -> one layer with a bias.

The integer engine has no BatchNorm (a per-channel float scale has no place in int8 x int8
products). A trained BatchNorm in eval mode is an affine map per channel,

    y = (x - mean) * gamma / sqrt(var + eps) + beta,

so the layer before it absorbs it exactly (in float64, before quantisation):

    W' = W * gamma / sqrt(var + eps)   (per output channel),   b' = (b - mean) * gamma / sqrt(var + eps) + beta.

The running statistics are used (eval-mode semantics), whatever mode the float model is in:
INT8 training fine-tunes the folded layer and has no batch statistics, as NITI. A BatchNorm
that does not directly follow a conv or linear (or has no running statistics) cannot be folded
and is refused by name.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def foldable(m: nn.Module) -> bool:
    return isinstance(m, (nn.Conv2d, nn.Linear))


def check_batchnorm(bn: _BatchNorm, layer: nn.Module | None, where: str) -> None:
    """Raise unless ``bn`` can be folded into ``layer`` (the module whose output it normalises)."""
    if layer is None or not foldable(layer):
        raise ValueError(f"convert: {where} does not directly follow a Conv2d or Linear, so it cannot be folded "
                         "into one; move it right after a conv/linear, or remove it")
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(f"convert: {where} has no running statistics (track_running_stats=False), so it cannot "
                         "be folded; build it with track_running_stats=True and train it first")
    out = layer.weight.shape[0]
    if bn.num_features != out:
        raise ValueError(f"convert: {where} normalises {bn.num_features} channels but the layer before it has "
                         f"{out} outputs")


def folded(layer: nn.Module, bn: _BatchNorm | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, bias) of ``layer`` with ``bn`` folded in, float64; bias None when neither has one."""
    weight = layer.weight.detach().to(torch.float64)
    bias = None if layer.bias is None else layer.bias.detach().to(torch.float64)
    if bn is None:
        return weight, bias
    scale = torch.rsqrt(bn.running_var.detach().to(torch.float64) + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.detach().to(torch.float64)
    shift = -bn.running_mean.detach().to(torch.float64) * scale
    if bn.bias is not None:
        shift = shift + bn.bias.detach().to(torch.float64)
    if bias is not None:
        shift = shift + bias * scale
    return weight * scale.reshape(-1, *[1] * (weight.dim() - 1)), shift
