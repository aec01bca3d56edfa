"""Micro-batched INT8 passes: the whole batch's integers, computed a chunk of examples at a time.

Everything in an integer pass is per example except two things, and both are made exact:

- the requantisation shifts, one per tensor of the whole batch: a ``ShiftPlan`` finds them
  (``int8.shiftplan``): usually one sweep over the chunks on the last step's shifts, verified;
- the sums over the batch (the loss, the weight gradients of the BP layers): integer sums are
  exact in any order, so the chunks' sums are added up.

So a micro-batched step equals the unchunked step bit for bit, for every chunk size; only the
peak memory (one chunk's activations and int32 accumulators) and the time (the recomputation
of the extra sweeps when the shifts changed since the last step) change.

Example::

    loss, shifts = run_chunked(lambda lo, hi: pass_of(x[lo:hi], y[lo:hi]), batch=64, micro_batch=8,
                               grad_layers=bp_layers, guess=last_shifts)
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from elasticzo.int8.ops import MAX_INT32_TERMS
from elasticzo.int8.shiftplan import ProbeDone, ShiftPlan, active


def chunk_bounds(batch: int, micro_batch: int) -> list[tuple[int, int]]:
    """[(lo, hi)] covering 0..batch in chunks of ``micro_batch`` (the last may be smaller)."""
    if micro_batch < 1:
        raise ValueError(f"micro_batch={micro_batch!r} must be >= 1")
    return [(lo, min(lo + micro_batch, batch)) for lo in range(0, batch, micro_batch)]


class _GradSum:
    """The weight gradients of ``layers`` summed over the chunks of a sweep, as one pass would give them."""

    def __init__(self, layers: Sequence) -> None:
        self.layers = list(layers)
        self.sums: list[torch.Tensor | None] = [None] * len(self.layers)
        self.terms = [0] * len(self.layers)
        self.exponents: list = [None] * len(self.layers)
        self.bias_sums: list[torch.Tensor | None] = [None] * len(self.layers)  # int64: exact in any order

    def take(self) -> None:
        """Add each layer's chunk gradient to its sum (widened to int64 when the unchunked product would be)."""
        for i, layer in enumerate(self.layers):
            part, layer.grad_acc = layer.grad_acc, None
            self.terms[i] += getattr(layer, "grad_terms", 0)
            total = self.sums[i]
            if total is None:
                self.sums[i] = part  # a fresh tensor of this chunk's pass: summed into in place
            elif total.dtype == torch.int32 and (self.terms[i] > MAX_INT32_TERMS or part.dtype == torch.int64):
                self.sums[i] = total.to(torch.int64).add_(part)  # as wide as the unchunked product would be
            else:
                total.add_(part)
            self.exponents[i] = layer.grad_exponent
            bias, layer.bias_grad = getattr(layer, "bias_grad", None), None
            if bias is not None:
                self.bias_sums[i] = bias if self.bias_sums[i] is None else self.bias_sums[i].add_(bias)

    def drop(self) -> None:
        for layer in self.layers:
            layer.grad_acc = layer.grad_exponent = layer.bias_grad = None
            layer.clear()

    def store(self) -> None:
        for layer, total, exponent, bias in zip(self.layers, self.sums, self.exponents, self.bias_sums):
            layer.grad_acc, layer.grad_exponent, layer.bias_grad = total, exponent, bias


def run_chunked(pass_fn: Callable[[int, int], torch.Tensor], batch: int, micro_batch: int,
                grad_layers: Sequence = (), clear: Callable[[], None] | None = None,
                guess: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Sum over the chunks of ``pass_fn(lo, hi)`` (an integer loss) with the whole batch's shifts.

    ``grad_layers``: layers whose ``grad_acc`` the pass fills; they end up holding the sum over
    all chunks. ``clear``: drops what an abandoned (probed) chunk pass left stored. ``guess``:
    the shifts to try first (the last step's); returns (sum, the shifts of this batch).
    """
    plan, bounds = ShiftPlan(guess), chunk_bounds(batch, micro_batch)
    while True:
        total, grads, probed = _sweep(plan, pass_fn, bounds, grad_layers)
        if plan.close_sweep() and not probed:
            grads.store()
            return total, plan.fixed
        if clear is not None:
            clear()


def _sweep(plan: ShiftPlan, pass_fn, bounds, grad_layers) -> tuple[torch.Tensor | None, _GradSum, bool]:
    """Every chunk once: (sum of the completed passes, their gradients, whether a site was probed)."""
    total, grads, probed = None, _GradSum(grad_layers), False
    for lo, hi in bounds:
        plan.start_chunk()
        try:
            with active(plan):
                out = pass_fn(lo, hi)
        except ProbeDone:  # every chunk stops at the same site: this sweep only finds its shift
            grads.drop()
            probed = True
            continue
        grads.take()
        total = out if total is None else total + out
    return total, grads, probed


def micro_batched_loss_closure(model, x, target: torch.Tensor, micro_batch: int = 0, guesses: dict | None = None):
    """``loss.loss_closure`` evaluated ``micro_batch`` examples at a time, bit-identical to it.

    ``x`` is a tensor the model quantises at its boundary, or a ``StreamedBatch`` read chunk by
    chunk. ``guesses`` (a dict kept across steps) holds each pass's last shifts, so the next
    step usually needs one sweep over the chunks per pass.
    """
    from elasticzo.data.stream import whole
    from elasticzo.int8.loss import cross_entropy, cross_entropy_loss, loss_closure

    batch = target.shape[0]
    if not micro_batch or micro_batch >= batch:
        return loss_closure(model, whole(x), target)
    guesses = {} if guesses is None else guesses
    calls = [0]

    def closure(backward: bool = True) -> torch.Tensor:
        def run(lo: int, hi: int) -> torch.Tensor:
            logits = model(x[lo:hi])
            if not backward:
                return cross_entropy_loss(logits, target[lo:hi])
            loss, grad = cross_entropy(logits, target[lo:hi])
            model.backward(grad)
            return loss

        key = (calls[0], backward)  # the + pass and the - pass keep their own guesses
        calls[0] += 1
        grad_layers = [layer for layer in model.weight_layers() if layer.backprop] if backward else []
        loss, guesses[key] = run_chunked(run, batch, micro_batch, grad_layers, model.clear, guesses.get(key))
        return loss

    return closure
