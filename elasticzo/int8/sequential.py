"""The integer network: layers in order, one forward and one backward, as an ``nn.Module``.

``IntSequential`` is what ``convert`` returns. It quantises a plain batch at its boundary, decides
what each layer stores (only the BP part, only when training with grad mode on) and runs the
backward of the BP part; ``IntElasticZO`` only marks layers (``backprop``, ``perturbation``).
"""
from __future__ import annotations

from typing import Iterator, Sequence

import torch
from torch import nn

from elasticzo.int8.format import QTensor
from elasticzo.int8.inputs import quantize_input
from elasticzo.int8.layers import IntLayer, _WeightLayer


def first_backprop(layers: list[IntLayer]) -> int:
    """Index of the first weight layer trained by backprop (len(layers) when there is none)."""
    return next((i for i, layer in enumerate(layers) if layer.has_weight and layer.backprop), len(layers))


def storing(net: nn.Module, layers: list[IntLayer], store: bool | None) -> tuple[int, bool]:
    """(first layer that stores, whether to store): by default the BP part stores when training
    with grad mode on; an explicit ``store`` applies to every layer."""
    if store is not None:
        return 0, store
    return first_backprop(layers), net.training and torch.is_grad_enabled()


class IntSequential(nn.Module):
    """Layers run in order; backward runs them in reverse.

    ``forward(x)`` takes a ``QTensor`` or a plain batch, quantised at the boundary
    (``int8.inputs.quantize_input``: raw uint8 pixels, int8 points, or float values). It stores
    what backward needs when training with grad mode on (``torch.no_grad()`` or ``.eval()``:
    inference, nothing stored), and never for the layers before the first weight layer with
    ``backprop`` set (the ZO part). ``store`` overrides that choice for every layer; ``weights``
    optionally overrides the weight of each weight layer (one entry per ``weight_layers()``,
    None keeps the layer's own). ``backward(grad)`` fills the ``grad_acc`` of every BP weight
    layer and, by default, stops there: the error wrt the network input is never needed.
    """

    def __init__(self, *layers: IntLayer):
        super().__init__()
        for i, layer in enumerate(layers):
            self.add_module(str(i), layer)  # state_dict keys "<i>.weight", as the float nn.Sequential

    @property
    def layers(self) -> list[IntLayer]:
        return list(self.children())

    def forward(self, x: QTensor | torch.Tensor, store: bool | None = None,
                weights: Sequence[torch.Tensor | None] | None = None) -> QTensor:
        x = x if isinstance(x, QTensor) else quantize_input(x)
        layers = self.layers
        first, store = storing(self, layers, store)
        overrides = iter(weights) if weights is not None else None
        for i, layer in enumerate(layers):
            keep = store and i >= first
            if layer.has_weight and overrides is not None:
                x = layer(x, keep, weight=next(overrides))
            else:
                x = layer(x, keep)
        return x

    def backward(self, grad: QTensor, input_grad: bool = False) -> QTensor | None:
        layers = self.layers
        first = first_backprop(layers)
        if first == len(layers):
            return None  # no layer in BP
        for i in range(len(layers) - 1, first - 1, -1):
            need = input_grad or i > first
            grad = layers[i].backward(grad, input_grad=need)
            if not need:
                return None
        return grad

    def weight_layers(self) -> list[_WeightLayer]:
        return [layer for layer in self.children() if layer.has_weight]

    def clear(self) -> None:
        for layer in self.children():
            layer.clear()

    def __getitem__(self, idx):
        layers = self.layers
        return IntSequential(*layers[idx]) if isinstance(idx, slice) else layers[idx]

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self) -> Iterator[IntLayer]:
        return iter(self.children())
