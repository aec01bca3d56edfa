"""PointNet for classification (Qi et al., CVPR 2017), edge-sized and without batch-norm.

A shared per-point MLP lifts every point to a feature vector, a global max pool over the points
makes the result independent of their order, and a small fully connected head classifies:

    [B, N, 3] -> per-point Linear-ReLU (64, 64, 128) -> max over N -> [B, 128]
             -> Linear-ReLU 128 -> Linear -> [B, classes]

(PointNet's own widths are 64, 64, 64, 128, 1024 with a 512-256 head: 12x the per-point compute, before its T-Nets.)

Design decisions (ours; the paper's body is not available):

* Input layout [B, N, 3], the layout of the PointNet HDF5 release (``data`` is [N, 2048, 3]).
  The per-point MLP is ``nn.Linear`` acting on the last dimension, which is exactly a
  ``Conv1d(kernel_size=1)`` over [B, 3, N] without the two transposes.
* No batch-norm. ZO runs two perturbed forward passes per step: in train mode a BN layer would
  update its running statistics with perturbed weights (twice per step), and its batch
  statistics couple the examples of a batch; the integer engine (NITI) has no BN either.
  Without BN, PyTorch's default Linear init (gain 1/3) shrinks the signal layer after layer and
  SGD stalls for the first few hundred steps; He init (uniform, ReLU gain, zero bias) keeps the
  activations at unit scale, as the integer twin's init does (``int8.convert.init_bound``).
  No T-Net (input alignment) either: the edge-sized model does without.
* No dropout: the + and - passes of SPSA must see the same function.

Five parametrised layers by default (3 per-point, 2 head), in forward order, so
``--bp-layers 2`` trains the head with BP and the per-point MLP with ZO, as for LeNet-5.
"""
from __future__ import annotations

import torch
from torch import nn

POINT_WIDTHS = (64, 64, 128)  # the last one is the global feature (edge-sized: <= 256)
HEAD_WIDTHS = (128,)


class GlobalMaxPool(nn.Module):
    """[B, N, C] -> [B, C]: the max over the points; the gradient goes to the arg max (the first on ties)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.max(dim=1).values


def _check_points(net: "PointNet", args: tuple) -> None:
    """PointNet takes [B, N, in_features]; a [B, 3, N] batch gets a hint to transpose it."""
    x = args[0]
    if x.dim() != 3 or x.shape[-1] != net.in_features:
        raise ValueError(f"PointNet takes point clouds [B, N, {net.in_features}], got shape {tuple(x.shape)}"
                         + (" (transpose a [B, 3, N] batch with x.transpose(1, 2))"
                            if x.dim() == 3 and x.shape[1] == net.in_features else ""))


class PointNet(nn.Sequential):
    """Shared per-point MLP - global max pool - FC head. Input [B, N, in_features] (N may vary).

    Args:
        num_classes: outputs of the last layer.
        point_widths: widths of the per-point layers; the last is the global feature size.
        head_widths: hidden widths of the head (each Linear-ReLU); then Linear to classes.
        in_features: coordinates per point (3).
        bias: Linear biases (False gives the integer engine's layout, see ``int8.convert``).

    Example::

        net = PointNet(num_classes=10)
        logits = net(torch.randn(8, 256, 3))  # [8, 10]
    """

    def __init__(self, num_classes: int = 10, point_widths: tuple[int, ...] = POINT_WIDTHS,
                 head_widths: tuple[int, ...] = HEAD_WIDTHS, in_features: int = 3, bias: bool = True):
        if not point_widths:
            raise ValueError("point_widths must name at least one per-point layer")
        self.in_features = in_features
        layers: list[nn.Module] = []
        widths = (in_features, *point_widths)
        for a, b in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(a, b, bias=bias), nn.ReLU(inplace=True)]  # [B, N, b]
        layers.append(GlobalMaxPool())  # [B, point_widths[-1]]
        widths = (point_widths[-1], *head_widths)
        for a, b in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(a, b, bias=bias), nn.ReLU(inplace=True)]  # [B, b]
        layers.append(nn.Linear(widths[-1], num_classes, bias=bias))  # [B, num_classes]
        super().__init__(*layers)
        self.register_forward_pre_hook(_check_points)  # a hook, not a forward: the model stays a plain chain for int8.convert
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """He-uniform weights (bound sqrt(6 / fan_in)) and zero biases; draws from the global RNG."""
        for m in self:
            if isinstance(m, nn.Linear):
                nn.init.kaiming_uniform_(m.weight, nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
