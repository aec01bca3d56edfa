"""Integer networks that are not a chain: a float ``nn.Module`` traced by ``torch.fx`` into an ``IntGraph``.

A residual block is not an ``nn.Sequential``: its forward reads one tensor twice and adds two.
``convert_graph`` traces the float model's forward once (``torch.fx``, convertible modules kept whole), maps
every node to an integer layer (modules through ``convert.convert_leaf``, ``+`` of two tensors
to ``IntAdd``), folds each BatchNorm into the
conv or linear whose only reader it is, and drops Dropout/Identity. The result runs its nodes in
the traced (forward) order, so ``weight_layers()`` is the forward order the float split uses.

Functional calls (``F.relu``, ``F.max_pool2d``, ``torch.flatten``, ``x.view(x.size(0), -1)``...)
are converted as the module that computes them, with that module's checks.

``IntGraph`` has ``IntSequential``'s interface (forward with ``store``, backward, weight_layers,
clear; no per-call ``weights`` overrides: the optimiser's ``perturbation`` hooks do that job),
so ``IntElasticZO`` and ``loss_closure`` take either. Backward runs the nodes in reverse
from the output down to the first BP weight layer; a node read by several nodes adds their
errors (``blocks.add_aligned``). Every node before the first BP weight layer is forward-only
and stores nothing (the ZO part).
"""
from __future__ import annotations

import operator
from typing import Callable

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from elasticzo.int8.blocks import IntAdd, add_aligned
from elasticzo.int8.convert import CONVERTIBLE, PASSTHROUGH, describe, unsupported
from elasticzo.int8.fold import check_batchnorm
from elasticzo.int8.format import QTensor
from elasticzo.int8.inputs import quantize_input
from elasticzo.int8.layers import IntFlatten, IntLayer, _WeightLayer
from elasticzo.int8.sequential import first_backprop, storing

_ADD = {operator.add, torch.add}
LeafFn = Callable[..., IntLayer]  # (path, module, batchnorm=None) -> integer layer


class IntGraph(nn.Module):
    """Integer layers run in traced order; ``inputs[i]`` are the node indices layer i reads (0: the input).

    Node j >= 1 is the output of layer j - 1; ``output`` is the node returned.
    """

    def __init__(self, names: list[str], layers: list[IntLayer], inputs: list[tuple[int, ...]], output: int):
        super().__init__()
        self.nodes = nn.ModuleDict(zip(names, layers))  # state_dict keys "nodes.<fx node name>.weight"
        self.inputs, self.output = [tuple(i) for i in inputs], output
        self._last_use = {j: i for i, ins in enumerate(self.inputs) for j in ins}  # free a value after it

    @property
    def layers(self) -> list[IntLayer]:
        return list(self.nodes.values())

    def weight_layers(self) -> list[_WeightLayer]:
        return [layer for layer in self.layers if layer.has_weight]

    def forward(self, x: QTensor | torch.Tensor, store: bool | None = None) -> QTensor:
        values: dict[int, QTensor] = {0: x if isinstance(x, QTensor) else quantize_input(x)}
        layers = self.layers
        first, store = storing(self, layers, store)
        for i, (layer, ins) in enumerate(zip(layers, self.inputs)):
            values[i + 1] = layer(*[values[j] for j in ins], store=store and i >= first)
            for j in set(ins):
                if self._last_use[j] == i and j != self.output:
                    del values[j]  # the last reader ran: its memory goes
        return values[self.output]

    def backward(self, grad: QTensor, input_grad: bool = False) -> QTensor | None:
        layers = self.layers
        first = first_backprop(layers)
        errors: dict[int, QTensor] = {self.output: grad}
        for i in range(len(layers) - 1, first - 1, -1):
            error = errors.pop(i + 1, None)
            if error is None:
                layers[i].clear()
                continue  # no path from this node to the output
            wanted = [j for j in self.inputs[i] if j - 1 >= first or (j == 0 and input_grad)]
            out = layers[i].backward(error, input_grad=bool(wanted))
            outs = out if isinstance(out, tuple) else (out,)
            for j, e in zip(self.inputs[i], outs):
                if j in wanted:
                    errors[j] = e if j not in errors else add_aligned(errors[j], e)
        return errors.get(0) if input_grad else None

    def clear(self) -> None:
        for layer in self.layers:
            layer.clear()


def convert_graph(model: nn.Module, leaf: LeafFn) -> IntGraph:
    """Trace ``model`` and convert it node by node; ``leaf(path, module, bn=None)`` converts a module."""
    try:
        traced = fx.GraphModule(model, _Tracer().trace(model))
    except Exception as err:  # fx raises several types for data-dependent control flow
        raise ValueError(
            f"convert: torch.fx cannot trace {type(model).__name__}.forward ({type(err).__name__}: {err}); "
            "write the model as an nn.Sequential, or remove the data-dependent control flow from its forward "
            "(an input check can move to a forward pre-hook, which tracing does not run)"
        ) from err
    return _Builder(traced, leaf).build()


class _Tracer(fx.Tracer):
    """fx's tracer, but the modules ``convert_leaf`` maps stay one node (fx would trace into a
    custom one such as ``GlobalMaxPool`` and meet operations with no integer form)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, CONVERTIBLE) or super().is_leaf_module(m, qualname)


class _Builder:
    """Walks the traced graph once: node -> index of the integer value it stands for."""

    def __init__(self, traced: fx.GraphModule, leaf: LeafFn):
        self.traced, self.leaf = traced, leaf
        self.index: dict[fx.Node, int] = {}
        self.names: list[str] = []
        self.layers: list[IntLayer] = []
        self.inputs: list[tuple[int, ...]] = []
        self.folded: dict[fx.Node, nn.Module] = {}  # conv/linear node -> the BatchNorm folded into it

    def build(self) -> IntGraph:
        self._find_batchnorms()
        output = None
        for node in self.traced.graph.nodes:
            if node.op == "placeholder":
                if self.index:
                    raise ValueError(f"convert: {type(self.traced).__name__} takes several inputs "
                                     f"({node.name}); the integer engine takes one batch")
                self.index[node] = 0
            elif node.op == "output":
                output = self._arg(node.args[0], node)
            else:
                self._convert(node)
        return IntGraph(self.names, self.layers, self.inputs, output)

    def _module(self, node: fx.Node) -> nn.Module:
        return self.traced.get_submodule(node.target)

    def _find_batchnorms(self) -> None:
        """Refuse any module without an integer form first (the clearest message), then pair each
        BatchNorm with the conv/linear node it reads, refusing what cannot fold."""
        calls: dict[str, int] = {}
        for node in self.traced.graph.nodes:
            if node.op == "call_module" and not isinstance(self._module(node), CONVERTIBLE):
                raise unsupported(self._where(node))
            if node.op == "call_module" and next(self._module(node).parameters(), None) is not None:
                calls[node.target] = calls.get(node.target, 0) + 1
                if calls[node.target] == 2:
                    raise ValueError(f"convert: {self._where(node)} is called more than once in forward (shared "
                                     "weights); the integer engine would train one copy per call: use one module "
                                     "per call")
        for node in self.traced.graph.nodes:
            if node.op == "call_module" and isinstance(self._module(node), _BatchNorm):
                src = node.args[0]
                layer = self._module(src) if isinstance(src, fx.Node) and src.op == "call_module" else None
                if layer is not None and len(src.users) != 1:
                    layer = None  # its unnormalised output is read elsewhere too
                check_batchnorm(self._module(node), layer, self._where(node))
                self.folded[src] = self._module(node)

    def _where(self, node: fx.Node) -> str:
        if node.op == "call_module":
            return describe(node.target, self._module(node))
        what = getattr(node.target, "__name__", str(node.target))
        return f"operation {node.name} ({node.op} {what})"

    def _arg(self, arg, node: fx.Node) -> int:
        if not isinstance(arg, fx.Node) or arg not in self.index:
            raise ValueError(f"convert: {self._where(node)} returns or reads a non-tensor {arg!r}; "
                             "the integer engine follows tensors only")
        return self.index[arg]

    def _add(self, node: fx.Node, layer: IntLayer, args) -> None:
        self.names.append(node.name)
        self.layers.append(layer)
        self.inputs.append(tuple(self._arg(a, node) for a in args))
        self.index[node] = len(self.layers)

    def _convert(self, node: fx.Node) -> None:
        if node.op == "call_module":
            m = self._module(node)
            if isinstance(m, _BatchNorm) or isinstance(m, PASSTHROUGH):
                self.index[node] = self._arg(node.args[0], node)  # folded, or nothing to compute
                return
            self._add(node, self.leaf(node.target, m, self.folded.get(node)), node.args[:1])
        elif node.op == "call_method" and node.target == "size":
            return  # an int, read by a view/reshape that flattens (else refused where it is read)
        elif node.op in ("call_function", "call_method"):
            self._add(node, *self._operation(node))
        else:  # get_attr: a parameter or buffer read outside any module
            raise ValueError(f"convert: {self._where(node)} reads the tensor {node.target} outside a module (e.g. a "
                             "positional nn.Parameter added in forward); the integer engine has no such tensor: move "
                             "it into a module the engine converts, or keep that part of the model in float")

    def _operation(self, node: fx.Node) -> tuple[IntLayer, tuple]:
        """The integer layer of a function or method call, and the tensors it reads."""
        target, args, kwargs = node.target, node.args, node.kwargs
        if target in _ADD and len(args) == 2 and not kwargs and all(isinstance(a, fx.Node) for a in args):
            return IntAdd(), args
        if target in ("view", "reshape") and _flattens(args):
            return IntFlatten(), args[:1]
        module = _FUNCTIONAL.get(target)
        if module is not None and not any(isinstance(a, fx.Node) for a in (*args[1:], *kwargs.values())):
            return self.leaf(node.name, module(args[1:], kwargs)), args[:1]  # the module's checks and layer
        raise ValueError(
            f"convert: {self._where(node)} has no integer form; the integer engine converts relu, max_pool2d, "
            "adaptive_avg_pool2d(x, 1), flatten, x.view(x.size(0), -1) and a residual add of two tensors between "
            "modules. Replace it with a module the engine has (see convert), or keep that part of the model in float"
        )


def _flatten(args, kwargs) -> nn.Module:
    dims = {"start_dim": 0, **dict(zip(("start_dim", "end_dim"), args)), **kwargs}  # torch.flatten starts at 0
    return nn.Flatten(**dims)


# function (or method name) -> the module that computes it, from the call's other arguments
_FUNCTIONAL: dict = {
    torch.relu: lambda a, kw: nn.ReLU(), F.relu: lambda a, kw: nn.ReLU(*a, **kw), "relu": lambda a, kw: nn.ReLU(),
    F.max_pool2d: lambda a, kw: nn.MaxPool2d(*a, **kw),
    F.adaptive_avg_pool2d: lambda a, kw: nn.AdaptiveAvgPool2d(*a, **kw),
    torch.flatten: _flatten, "flatten": _flatten,
}


def _flattens(args) -> bool:
    """x.view(x.size(0), -1) / x.reshape(x.size(0), -1): the batch dim kept, the rest flattened."""
    if len(args) != 3 or args[2] != -1 or not isinstance(args[1], fx.Node):
        return False
    size = args[1]
    return size.op == "call_method" and size.target == "size" and size.args == (args[0], 0)
