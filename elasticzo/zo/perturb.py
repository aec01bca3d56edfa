"""Forward passes at theta + scale * z without ever writing to theta.

MeZO perturbs parameters in place (+eps z, -2 eps z, +eps z); in floating point that does not
return theta bit for bit, and the drift accumulates over a run. Here each ZO layer gets a forward
pre-hook that builds its perturbed weights out of place just before the layer runs and swaps them
in; a forward hook swaps the original Parameters back right after. The parameters are never
modified, and only one layer's perturbed copy is alive at a time (memory of inference).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn

from elasticzo.bench.memory import memory_tag
from elasticzo.zo.noise import layer_noise


def perturb(params: list[torch.Tensor], noise: list[torch.Tensor], scale: float) -> list[torch.Tensor]:
    """theta + scale * z for each parameter, written over z in one pass (the one definition of a
    perturbed weight: the Reference twin and the tests call this too)."""
    with torch.no_grad():  # a ZO parameter never takes part in autograd
        return [torch.add(p, z, alpha=scale, out=z) for p, z in zip(params, noise)]


@contextmanager
def perturbed(layers: list[nn.Module], layer_seeds: Callable[[int], int], scale: float, kind: str) -> Iterator[None]:
    """Within the block, layer i computes with its parameters + scale * z_i, z_i from layer_seeds(i)."""
    swapped: dict[tuple[nn.Module, str], nn.Parameter] = {}
    handles = []
    for index, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(_swap_in(index, layer_seeds, scale, kind, swapped)))
        handles.append(layer.register_forward_hook(_swap_out(swapped)))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        _restore(swapped)  # a forward that raised half-way must not leave perturbed weights behind


def _swap_in(index: int, layer_seeds: Callable[[int], int], scale: float, kind: str, swapped: dict):
    def hook(module: nn.Module, args):
        names = [n for n, p in module._parameters.items() if p is not None]
        params = [module._parameters[n] for n in names]
        with memory_tag("zo_noise"):
            noisy = perturb(params, layer_noise(params, layer_seeds(index), kind), scale)
        for name, param, value in zip(names, params, noisy):
            swapped[(module, name)] = param
            module._parameters[name] = value  # plain tensor: read by the layer's forward via getattr
    return hook


def _swap_out(swapped: dict):
    def hook(module: nn.Module, args, output):
        for key in [k for k in swapped if k[0] is module]:
            module._parameters[key[1]] = swapped.pop(key)
    return hook


def _restore(swapped: dict) -> None:
    for (module, name), param in swapped.items():
        module._parameters[name] = param
    swapped.clear()
