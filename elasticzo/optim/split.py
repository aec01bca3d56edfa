"""The ZO/BP split of any ``nn.Module``, in the order its layers run.

"The last k layers" means the last k *layers the forward pass runs*, not the last k registered:
a model that registers its head first still gets its head in the BP part. One traced forward
(module pre-hooks, plus one autograd pass to see which parameters reach the output) gives:

- **units**: a module that runs, with the parameters read while it runs. These are its own
  parameters, plus those of descendants whose own forward never runs but which still reach the
  output (``nn.MultiheadAttention.out_proj`` is read by ``F.multi_head_attention_forward``).
  Such parameters are perturbed by their running ancestor's hooks, so SPSA sees their effect.
  Parameters that never reach the output belong to neither part (``requires_grad=False``).
- **layers**, what k counts: a unit with a weight of two or more dimensions that is not a
  container of other running modules. Every other unit (a norm layer, a bias-only module, a
  model-level ``nn.Parameter`` such as a positional embedding) goes with the layer that runs
  just before it (the first layer if none does): a conv's BatchNorm follows the conv. Name the
  BP part explicitly (``bp=``) to put norms or any parameter elsewhere.

Without a sample input the split falls back to registration order, and the first training step
checks that the forward agrees (:func:`check_order`), with a message if it does not. Tied
weights (one Parameter read by two modules) are not supported in the ZO part.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Union

import torch
from torch import nn

from elasticzo.optim.closure import frozen_statistics

BPSpec = Union[nn.Module, str, Callable[[str, nn.Parameter], bool], Iterable[Union[nn.Module, str]]]


@dataclass
class Unit:
    """A module that runs, and the parameters (owner module, attribute name) read while it runs."""
    name: str
    module: nn.Module
    entries: list[tuple[nn.Module, str]] = field(default_factory=list)

    def params(self) -> list[nn.Parameter]:
        return [owner._parameters[attr] for owner, attr in self.entries]

    def is_layer(self, containers: set[int]) -> bool:
        return id(self.module) not in containers and any(p.dim() >= 2 for p in self.params())


@dataclass
class Split:
    """ZO units and BP units in forward order; ``unused`` names parameters in neither part."""
    zo: list[Unit]
    bp: list[Unit]
    unused: list[str]
    units: list[Unit]  # every unit, in forward (or registration) order
    layers: list[list[Unit]]  # what k counts: each layer with the units attached to it
    traced: bool  # True: forward order from a traced pass; False: registration order, checked at step 1


def _param_names(model: nn.Module) -> dict[int, str]:
    return {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}


@contextmanager
def _untouched(model: nn.Module) -> Iterator[None]:
    """A traced pass leaves no trace: buffers (BatchNorm statistics), RNG and requires_grad restored."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    tensors = [p for p, _ in flags] + list(model.buffers())
    devices = sorted({t.device.index or 0 for t in tensors if t.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices), frozen_statistics(list(model.modules()), frozen=True):
        try:
            yield
        finally:
            for p, flag in flags:
                p.requires_grad_(flag)


@contextmanager
def run_order(model: nn.Module) -> Iterator[list[nn.Module]]:
    """Within the block, the yielded list fills with modules in the order their forward first starts."""
    order: dict[int, nn.Module] = {}
    hook = lambda module, args: order.setdefault(id(module), module) and None
    handles = [m.register_forward_pre_hook(hook) for m in model.modules()]
    ran: list[nn.Module] = []
    try:
        yield ran
    finally:
        for h in handles:
            h.remove()
        ran.extend(order.values())


def _output_tensors(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _output_tensors(o)]
    return []


def trace_units(model: nn.Module, example_input) -> tuple[list[Unit], list[str]]:
    """Units in forward order and the names of parameters that do not reach the output."""
    args = example_input if isinstance(example_input, tuple) else (example_input,)
    params = dict(model.named_parameters())
    with _untouched(model), torch.enable_grad():
        for p in params.values():
            p.requires_grad_(True)
        with run_order(model) as ran:
            out = model(*args)
        outs = [t for t in _output_tensors(out) if t.is_floating_point() and t.requires_grad]
        if not outs:
            raise ValueError(f"{type(model).__name__}: no output of the traced forward depends on a parameter")
        total = sum(t.float().sum() for t in outs)
        grads = torch.autograd.grad(total, list(params.values()), allow_unused=True)
    reached = {id(p) for p, g in zip(params.values(), grads) if g is not None}
    return _units(model, ran, reached), [n for n, p in params.items() if id(p) not in reached]


def _units(model: nn.Module, ran: list[nn.Module], reached: set[int]) -> list[Unit]:
    """Group each reached parameter under its owner if the owner ran, else its nearest running ancestor."""
    names = {id(m): n for n, m in model.named_modules()}
    position = {id(m): i for i, m in enumerate(ran)}
    units = {id(m): Unit(names.get(id(m), ""), m) for m in ran}
    seen: set[int] = set()
    for name, owner in model.named_modules():
        for attr, p in owner._parameters.items():
            if p is None or id(p) not in reached or id(p) in seen:
                continue
            seen.add(id(p))
            runner = owner if id(owner) in position else _running_ancestor(model, name, position)
            units[id(runner)].entries.append((owner, attr))
    return sorted((u for u in units.values() if u.entries), key=lambda u: position[id(u.module)])


def _running_ancestor(model: nn.Module, name: str, position: dict[int, int]) -> nn.Module:
    parts = name.split(".")
    for cut in range(len(parts) - 1, -1, -1):
        ancestor = model.get_submodule(".".join(parts[:cut]))
        if id(ancestor) in position:
            return ancestor
    return model


def registration_units(model: nn.Module) -> list[Unit]:
    """The fallback without a sample input: every module with direct parameters, in registration order."""
    units, seen = [], set()
    for name, m in model.named_modules():
        entries = [(m, a) for a, p in m._parameters.items() if p is not None and id(p) not in seen]
        seen.update(id(m._parameters[a]) for _, a in entries)
        if entries:
            units.append(Unit(name, m, entries))
    return units


def _containers(model: nn.Module, units: list[Unit]) -> set[int]:
    """Ids of unit modules that contain another unit's module (a model-level Parameter's owner)."""
    inside = {id(u.module) for u in units}
    return {id(u.module) for u in units if any(id(c) in inside for c in u.module.modules() if c is not u.module)}


def group_layers(model: nn.Module, units: list[Unit]) -> list[list[Unit]]:
    """Layers (what k counts), each a weight unit with the non-layer units that follow it."""
    containers = _containers(model, units)
    layers: list[list[Unit]] = []
    leading: list[Unit] = []  # non-layer units before the first layer join the first layer
    for unit in units:
        if unit.is_layer(containers):
            layers.append(leading + [unit])
            leading = []
        elif layers:
            layers[-1].append(unit)
        else:
            leading.append(unit)
    if leading:
        layers.append(leading) if not layers else layers[-1].extend(leading)
    return layers


def split_model(model: nn.Module, bp_layers: int | None = None, bp: BPSpec | None = None,
                example_input=None) -> Split:
    """The ZO/BP split: the last ``bp_layers`` layers in forward order, or the parameters ``bp`` names."""
    if (bp_layers is None) == (bp is None):
        raise ValueError("give exactly one of bp_layers (the last k layers train with BP) and bp "
                         f"(the BP part by modules, parameter names or a predicate); got bp_layers={bp_layers!r}, bp={bp!r}")
    if example_input is not None:
        units, unused = trace_units(model, example_input)
    else:
        units, unused = registration_units(model), []
    layers = group_layers(model, units)
    if bp is not None:
        chosen = resolve_bp(model, bp)
    else:
        if not isinstance(bp_layers, int) or not 0 <= bp_layers <= len(layers):
            raise ValueError(f"bp_layers={bp_layers!r} is out of range: {type(model).__name__} has {len(layers)} "
                             f"parametrised layers, so bp_layers must be in 0..{len(layers)}")
        tail = layers[len(layers) - bp_layers:] if bp_layers else []
        chosen = {id(p) for layer in tail for u in layer for p in u.params()}
    zo = [Unit(u.name, u.module, [e for e, p in zip(u.entries, u.params()) if id(p) not in chosen]) for u in units]
    bp_units = [Unit(u.name, u.module, [e for e, p in zip(u.entries, u.params()) if id(p) in chosen]) for u in units]
    return Split([u for u in zo if u.entries], [u for u in bp_units if u.entries], unused, units, layers,
                 example_input is not None)


def resolve_bp(model: nn.Module, bp: BPSpec) -> set[int]:
    """Ids of the parameters ``bp`` names: a module, a parameter or module name, a list of those,
    or a predicate ``(name, parameter) -> bool`` over ``model.named_parameters()``."""
    named = dict(model.named_parameters())
    if callable(bp) and not isinstance(bp, nn.Module):
        return {id(p) for n, p in named.items() if bp(n, p)}
    chosen: set[int] = set()
    for item in [bp] if isinstance(bp, (nn.Module, str)) else list(bp):
        if isinstance(item, nn.Module):
            if not any(item is m for m in model.modules()):
                raise ValueError(f"bp: {type(item).__name__} is not a submodule of {type(model).__name__}")
            chosen |= {id(p) for p in item.parameters()}
        elif isinstance(item, str):
            hits = {id(p) for n, p in named.items() if n == item or n.startswith(item + ".") or not item}
            if not hits:
                raise ValueError(f"bp: {item!r} names no parameter or module of {type(model).__name__}; "
                                 f"parameters are {sorted(named)[:8]}...")
            chosen |= hits
        else:
            raise TypeError(f"bp: expected modules, names or a predicate, got {type(item).__name__}")
    return chosen


def check_order(split: Split, ran: list[nn.Module]) -> None:
    """At the first step of an untraced split: the forward must run the units in registration order."""
    position = {id(m): i for i, m in enumerate(ran)}
    hint = "pass example_input=<a batch> to ElasticZO.for_model so that the split is traced from a forward pass"
    missing = [u.name or "<model>" for u in split.units if id(u.module) not in position]
    if missing:
        raise ValueError(f"ElasticZO: the forward pass never runs {missing}, which own parameters (they may be read "
                         f"by another module's forward, as MultiheadAttention.out_proj is); {hint}")
    registered = [u.name for u in split.units]
    order = [u.name for u in sorted(split.units, key=lambda u: position[id(u.module)])]
    if order != registered:
        raise ValueError(f"ElasticZO: the forward runs the layers in the order {order}, not in registration "
                         f"order {registered}, so 'the last k layers' would be the wrong ones; {hint}")


def _kib(n_bytes: int) -> str:
    return f"{n_bytes / 1024:.1f} KiB"


def _unit_line(unit: Unit, names: dict[int, str]) -> str:
    """One module of a part: its name, type, the parameters it trains (by full name if another module owns them)."""
    own = names.get(id(unit.module), "")
    params = ", ".join(attr if owner is unit.module else f"{names.get(id(owner), '?')}.{attr}" for owner, attr in unit.entries)
    return f"      {own or '<model>'} ({type(unit.module).__name__}): {params} [{sum(p.numel() for p in unit.params()):,}]"


def describe(model: nn.Module, split: Split, bp_state_per_weight: int = 1) -> str:
    """The two parts, their parameter counts and memory (ZO: weights only; BP: weights, gradients
    and ``bp_state_per_weight`` optimiser-state tensors per weight, e.g. 1 for SGD momentum, 2 for Adam)."""
    how = "forward order, traced" if split.traced else "registration order, checked at the first step"
    names = {id(m): n for n, m in model.named_modules()}
    lines = [f"ElasticZO split of {type(model).__name__} ({len(split.layers)} layers, {how}):"]
    for part, units in (("ZO", split.zo), ("BP", split.bp)):
        params = [p for u in units for p in u.params()]
        n, size = sum(p.numel() for p in params), sum(p.numel() * p.element_size() for p in params)
        cost = (f"{_kib(size)} (weights only: no gradients, no stored activations)" if part == "ZO" else
                f"{_kib(size * (2 + bp_state_per_weight))} (weights {_kib(size)} + gradients {_kib(size)} + "
                f"optimiser state {_kib(size * bp_state_per_weight)}, plus the BP part's activations)")
        lines.append(f"  {part}  {len(units)} module(s), {n:,} parameters, {cost}")
        lines += [_unit_line(u, names) for u in units]
    if split.unused:
        lines.append(f"  neither part (never reach the output, requires_grad=False): {', '.join(split.unused)}")
    return "\n".join(lines)
