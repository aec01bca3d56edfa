"""Structural view of a model: its parametrised layers in forward order.

"The last k layers" is defined by structure (the order modules run in), never by parameter
names, so the ZO/BP split works for any ``nn.Module`` whose leaf modules run in registration
order (every ``nn.Sequential`` and the models in this package).
"""
from __future__ import annotations

import torch
from torch import nn


def parametrised_layers(model: nn.Module) -> list[nn.Module]:
    """Leaf modules that own parameters directly, in registration (= forward) order."""
    return [m for m in model.modules() if any(True for _ in m.parameters(recurse=False))]


def split_layers(model: nn.Module, bp_layers: int) -> tuple[list[nn.Module], list[nn.Module]]:
    """Split into (ZO layers, BP layers): the last ``bp_layers`` parametrised layers train with BP.

    ``bp_layers=0`` is vanilla ZO; ``bp_layers=len(parametrised_layers(model))`` is plain BP.
    """
    layers = parametrised_layers(model)
    if not 0 <= bp_layers <= len(layers):
        raise ValueError(
            f"bp_layers={bp_layers} is out of range: {type(model).__name__} has "
            f"{len(layers)} parametrised layers, so bp_layers must be in 0..{len(layers)}"
        )
    cut = len(layers) - bp_layers
    return layers[:cut], layers[cut:]


def layer_params(layers: list[nn.Module]) -> list[torch.nn.Parameter]:
    """The parameters owned directly by ``layers``, in order."""
    return [p for m in layers for p in m.parameters(recurse=False)]
