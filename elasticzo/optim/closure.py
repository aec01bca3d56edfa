"""One pass of the user's closure inside an ElasticZO step, and the mistakes it can make.

A step evaluates the closure 2q times (the + and - pass of each query). Each pass:

- sees the same randomness in its + and - pass (dropout masks): the global RNG (CPU and the
  model's CUDA devices) is seeded from (run seed, step, query) before each, so the two losses
  differ only by the perturbation and a run replays exactly; the caller's RNG state is saved
  once per step and given back after the last pass (``pass_rng``);
- updates BatchNorm running statistics only in the first pass of the step (the + pass of query
  0): the other passes run with the statistics saved and restored, so a step counts as one
  batch, as in plain training;
- gets the BP part's gradient of this pass alone: gradients are collected by the optimiser,
  so a closure that calls ``zero_grad()`` or ``backward()`` itself, or neither, gives the same
  update. If the closure did not backpropagate, the optimiser calls ``loss.backward()``.

A closure may take a ``backward`` flag (``closure(backward)``: backpropagate when it is True) or
no argument (``closure()``, the ``torch.optim`` convention).
"""
from __future__ import annotations

import inspect
import types
from contextlib import contextmanager, nullcontext
from typing import Callable, ContextManager, Iterator

import torch
from torch import nn

DROPOUT_STREAM = 1 << 20  # the "layer" index of derive_seed reserved for the forward's own randomness


def takes_backward(closure: Callable) -> bool:
    """True if ``closure`` accepts one positional argument (the backward flag)."""
    code = getattr(closure, "__code__", None)
    if type(closure) is types.FunctionType and not hasattr(closure, "__wrapped__"):  # a plain function or
        # lambda (a new one every step): its code object says it without inspect.signature (~25 us)
        return code.co_argcount > 0 or bool(code.co_flags & inspect.CO_VARARGS)
    try:
        params = list(inspect.signature(closure).parameters.values())
    except (TypeError, ValueError):
        return True  # a builtin or C callable: assume the documented closure(backward) form
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)]
    return bool(positional)


@contextmanager
def pass_rng(devices: list[int]) -> Iterator[Callable[[int], None]]:
    """Yield ``seed(s)``, which seeds the global generators of the CPU and the CUDA ``devices``;
    their states from before the block are restored after it.

    The generators' own ``get_state``/``manual_seed``: ``torch.random.fork_rng`` and
    ``torch.manual_seed`` cost about 1 ms a pass (a dynamo guard and every CUDA device)."""
    if devices:
        torch.cuda.init()  # fills torch.cuda.default_generators
    generators = [torch.default_generator, *(torch.cuda.default_generators[d] for d in devices)]
    states = [g.get_state() for g in generators]

    def seed(value: int) -> None:
        for g in generators:
            g.manual_seed(value)

    try:
        yield seed
    finally:
        for g, state in zip(generators, states):
            g.set_state(state)


def frozen_statistics(modules: list[nn.Module], frozen: bool) -> ContextManager[None]:
    """If ``frozen``: the buffers of ``modules`` (BatchNorm running statistics) are the same after the block."""
    if not (frozen and modules):
        return nullcontext()  # every pass of a model without running statistics: no generator frame
    return _restoring([(b, b.clone()) for m in modules for b in m.buffers(recurse=False)])


@contextmanager
def _restoring(saved: list[tuple[torch.Tensor, torch.Tensor]]) -> Iterator[None]:
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


def statistic_modules(model: nn.Module | None) -> list[nn.Module]:
    """The modules whose running statistics a forward pass in training mode updates."""
    if model is None:
        return []
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats]


def as_loss(value, needs_grad: bool) -> torch.Tensor:
    """The closure's return value as a 0-dim loss, or an error that says what to change."""
    if isinstance(value, (int, float)) and not needs_grad:
        return torch.tensor(float(value))
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"ElasticZO: the closure returned {type(value).__name__} {value!r}; it must return the loss "
                        "tensor (return loss, not loss.item())" + (", so that the BP part can backpropagate" if needs_grad else ""))
    if value.numel() != 1:
        raise ValueError(f"ElasticZO: the closure returned a loss of shape {tuple(value.shape)}; "
                         "return one number (reduce it, e.g. loss.mean())")
    return value if value.dim() == 0 else value.reshape(())


def pass_caller(closure: Callable) -> Callable[[bool], object]:
    """``call(backward)`` for the closure's form (``closure(backward)`` or ``closure()``), decided
    once per step (``inspect.signature`` costs more than a small layer's forward)."""
    if takes_backward(closure):
        return closure
    return lambda backward: _call_plain(closure, backward)


def _call_plain(closure: Callable, backward: bool):
    try:
        return closure()
    except RuntimeError as error:
        if "does not require grad" not in str(error) or backward:
            raise
        raise RuntimeError("ElasticZO: the closure called backward() on a loss with no graph: nothing in this pass "
                           "trains with BP (vanilla ZO). Drop loss.backward() from the closure, or write "
                           "closure(backward) and call loss.backward() only when backward is True") from error


def collect_pass(call: Callable[[bool], object], backward: bool, bp_params: list[torch.Tensor],
                 grads: list[torch.Tensor | None]) -> torch.Tensor:
    """Run one pass (``call``: from ``pass_caller``); add this pass's BP gradients into ``grads``
    (if ``backward``); return the loss."""
    for p in bp_params:
        p.grad = None
    with torch.enable_grad():
        value = call(backward)
        loss = as_loss(value, needs_grad=backward)
        if backward and all(p.grad is None for p in bp_params):
            if not loss.requires_grad:
                raise RuntimeError(
                    "ElasticZO: the closure's loss does not require grad, so the BP part cannot learn: compute the "
                    "loss with autograd on (not under torch.no_grad()) and return it, not loss.detach() or loss.item()")
            loss.backward()
    if backward:
        for i, p in enumerate(bp_params):
            if p.grad is not None:
                grads[i] = p.grad if grads[i] is None else grads[i].add_(p.grad)
    for p in bp_params:
        p.grad = None
    return loss.detach() if loss.requires_grad else loss  # a ZO-only pass built no graph: nothing to cut
