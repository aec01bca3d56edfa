"""Prove integer-only training: record the dtypes of every aten op that runs in a block.

    with DtypeAudit() as audit:
        optimizer.step(loss_closure(net, pixels, y))
    assert audit.float_ops == []     # names of the ops that touched a floating dtype

A ``TorchDispatchMode`` sees every aten op below Python, including those that library code
calls internally, so a float that sneaks into a step (an ``.float()``, an op that upcasts) is
caught whatever layer it comes from.
"""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode


def _tensors(values) -> list[torch.Tensor]:
    flat = []
    for value in values:
        if isinstance(value, (tuple, list)):
            flat += _tensors(value)
        elif isinstance(value, torch.Tensor):
            flat.append(value)
    return flat


class DtypeAudit(TorchDispatchMode):
    """Every aten op run inside the block, with the dtypes of its tensor inputs and outputs."""

    def __init__(self):
        super().__init__()
        self.ops: list[tuple[str, frozenset]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tensors = _tensors([*args, *(kwargs or {}).values(), out])
        self.ops.append((str(func), frozenset(t.dtype for t in tensors)))
        return out

    @property
    def count(self) -> int:
        return len(self.ops)

    @property
    def float_ops(self) -> list[str]:
        """The ops that read or wrote a floating-point tensor."""
        return [name for name, dtypes in self.ops if any(d.is_floating_point for d in dtypes)]
