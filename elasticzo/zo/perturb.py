"""Forward passes at theta + scale * z without ever writing to theta.

MeZO perturbs parameters in place (+eps z, -2 eps z, +eps z); in floating point that does not
return theta bit for bit, and the drift accumulates over a run. Here each ZO layer has a forward
pre-hook that builds its perturbed weights out of place just before the layer runs and swaps them
in, and a forward hook that swaps the original Parameters back right after. The parameters are
never modified, and only one layer's perturbed copy is alive at a time (memory of inference).

The hooks are installed once per layer, on first use, and stay: outside a ``perturbed`` block
they return at once (one context-variable read), so evaluation and user code see the plain
layer. Installing them once instead of per pass takes about 20 handle creations and removals off
every step. A layer must run once per forward (no weight sharing inside the ZO part).

A layer is an ``nn.Module`` (its own parameters are perturbed) or a unit of
``optim.split`` (a module and the parameters, possibly of never-running descendants such as
``MultiheadAttention.out_proj``, that its forward reads): the hooks of the module swap them all.
"""
from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Callable, ContextManager

import torch
from torch import nn

from elasticzo.instrument import memory_tag
from elasticzo.zo.counter import LayerDirections


@dataclass
class _Perturbation:
    """What the hooks do while a ``perturbed`` block is active; the block's context manager."""
    index: dict[int, tuple]  # id(module) -> (position in the ZO part, (owner, name) entries, LayerDirections)
    layer_seeds: Callable[[int], int]
    scale: float
    kind: str
    source: Callable[[torch.Tensor], torch.Tensor] | None = None  # parameter -> what to perturb (a float32 master)
    swapped: dict = field(default_factory=dict)  # (module, name) -> original Parameter
    token: object = None

    def __enter__(self) -> None:
        self.token = _active.set(self)

    def __exit__(self, *exc) -> None:
        _active.reset(self.token)
        _restore(self.swapped)  # a forward that raised half-way must not leave perturbed weights behind


_active: ContextVar[_Perturbation | None] = ContextVar("elasticzo_perturbation", default=None)
_HOOKED = "_elasticzo_perturb_hooks"


def hooked_index(layers: list) -> dict[int, tuple[int, list, LayerDirections]]:
    """id(module) -> (position, (owner, name) entries, its ``LayerDirections``) of ``layers``, their
    hooks installed: what a ``perturbed`` block needs, built once by a caller that perturbs the
    same layers every pass (and updates them through the same ``LayerDirections``)."""
    index = {}
    for i, layer in enumerate(layers):
        module, entries = layer_entries(layer)
        if not hasattr(module, _HOOKED):
            setattr(module, _HOOKED, (module.register_forward_pre_hook(_swap_in), module.register_forward_hook(_swap_out)))
        index[id(module)] = (i, entries, LayerDirections())
    return index


def perturbed(layers: list[nn.Module], layer_seeds: Callable[[int], int], scale: float, kind: str,
              source: Callable[[torch.Tensor], torch.Tensor] | None = None,
              index: dict[int, tuple] | None = None) -> ContextManager[None]:
    """Within the block, layer i computes with its parameters + scale * z_i, z_i from layer_seeds(i).

    ``source(p)`` is the tensor perturbed in place of ``p`` (a float32 master copy of a float16 /
    bfloat16 parameter): theta + scale z is formed in its precision, then cast to ``p``'s dtype.
    ``index``: ``hooked_index(layers)``, if the caller keeps it (the optimiser: one per run)."""
    return _Perturbation(hooked_index(layers) if index is None else index, layer_seeds, scale, kind, source)


def layer_entries(layer) -> tuple[nn.Module, list[tuple[nn.Module, str]]]:
    """(module whose hooks act, [(owner, parameter name)]) of a module or an ``optim.split.Unit``."""
    if isinstance(layer, nn.Module):
        return layer, [(layer, n) for n, p in layer._parameters.items() if p is not None]
    return layer.module, list(layer.entries)


def _swap_in(module: nn.Module, args) -> None:
    spec = _active.get()
    found = None if spec is None else spec.index.get(id(module))
    if found is None:
        return
    index, entries, directions = found
    params = [owner._parameters[name] for owner, name in entries]
    sources = params if spec.source is None else [spec.source(p) for p in params]
    with memory_tag("zo_noise"):
        noisy = directions(sources, spec.layer_seeds(index), spec.kind, [spec.scale] * len(sources))
    if spec.source is not None:
        noisy = [v if v.dtype == p.dtype else v.to(p.dtype) for v, p in zip(noisy, params)]
    swapped = spec.swapped
    for (owner, name), param, value in zip(entries, params, noisy):
        swapped[(owner, name)] = param
        owner._parameters[name] = value  # plain tensor: read by the forward via getattr


def _swap_out(module: nn.Module, args, output) -> None:
    spec = _active.get()
    found = None if spec is None else spec.index.get(id(module))
    if found is None:
        return
    swapped = spec.swapped
    for key in found[1]:
        param = swapped.pop(key, None)
        if param is not None:
            key[0]._parameters[key[1]] = param


def _restore(swapped: dict) -> None:
    for (module, name), param in swapped.items():
        module._parameters[name] = param
    swapped.clear()
