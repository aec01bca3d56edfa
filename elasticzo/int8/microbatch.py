"""Micro-batched INT8 passes: the whole batch's integers, computed a chunk of examples at a time.

Everything in an integer pass is per example except two things, and both are made exact:

- the requantisation shifts, one per tensor of the whole batch: a ``ShiftPlan`` finds them
  (``int8.shiftplan``): usually one sweep over the chunks on the last step's shifts, verified;
- the sums over the batch (the loss, the weight gradients of the BP layers): integer sums are
  exact in any order, so the chunks' sums are added up; a BP layer's backward adds its chunk's
  weight gradient straight into the batch's int32 sum (``add_weight_grad``): the only copy.

So a micro-batched step equals the unchunked step bit for bit, for every chunk size; only the
peak memory (one chunk's activations and int32 accumulators, the BP layers' gradient sums) and
the time (the recomputation of the extra sweeps when the shifts changed since the last step)
change.

Example::

    loss, shifts = run_chunked(lambda lo, hi: pass_of(x[lo:hi], y[lo:hi]), batch=64, micro_batch=8,
                               grad_layers=bp_layers, guess=last_shifts)
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import torch

from elasticzo.int8.ops import MAX_INT32_TERMS
from elasticzo.int8.shiftplan import ProbeDone, ShiftPlan, active


def chunk_bounds(batch: int, micro_batch: int) -> list[tuple[int, int]]:
    """[(lo, hi)] covering 0..batch in chunks of ``micro_batch`` (the last may be smaller)."""
    if micro_batch < 1:
        raise ValueError(f"micro_batch={micro_batch!r} must be >= 1")
    return [(lo, min(lo + micro_batch, batch)) for lo in range(0, batch, micro_batch)]


GRAD_TILE_BYTES = 64 << 10  # int32 gradient rows computed at a time when a chunk's product is summed in place
ADDMM_TERMS = 8  # up to this many products per entry a CPU chunk is added by one integer addmm, no tiles


def add_weight_grad(layer, rows_of: Callable[[int, int], torch.Tensor], terms: int,
                    operands: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    """Add a chunk's weight gradient to ``layer.grad_acc``, the sum of the sweep's earlier chunks.

    ``rows_of(lo, hi)`` gives output rows lo:hi of the chunk's product, ``terms`` products per entry.
    It is computed GRAD_TILE_BYTES of int32 at a time, so the peak holds the sum and one tile, not
    the sum and the chunk's whole product (twice the BP layers' int32 gradients). ``operands`` (a, b)
    with product a @ b (a linear layer's g^T and x): on CPU, up to ADDMM_TERMS terms, one in-place
    integer ``addmm_`` instead (exact: every partial sum fits; a tile's dispatch costs more than
    that small product). The sum widens to int64 once the summed terms could pass int32, as wide
    as the unchunked product would be.
    """
    total, done = layer.grad_acc, layer.grad_terms if layer.grad_acc is not None else 0
    dtype = torch.int64 if done + terms > MAX_INT32_TERMS else torch.int32
    if total is None:
        total = torch.zeros(layer.weight.shape, dtype=dtype, device=layer.weight.device)
    elif total.dtype != dtype:
        total = total.to(dtype)
    if operands is not None and terms <= ADDMM_TERMS and total.device.type == "cpu":
        a, b = operands
        total.view(a.shape[0], b.shape[1]).addmm_(a.to(dtype), b.to(dtype))
    else:
        rows = layer.weight.shape[0]
        step = max(1, GRAD_TILE_BYTES // (4 * max(layer.weight[0].numel(), 1)))
        for lo in range(0, rows, step):
            hi = min(lo + step, rows)
            total[lo:hi].add_(rows_of(lo, hi).to(dtype))  # exact: each entry of the sum fits ``dtype``
    layer.grad_acc, layer.grad_terms = total, done + terms


@contextmanager
def summed_gradients(layers: Sequence) -> Iterator[None]:
    """Within the block the backward of ``layers`` adds each pass's gradients to what is there."""
    for layer in layers:
        layer.sum_grad = True
    try:
        yield
    finally:
        for layer in layers:
            layer.sum_grad = False


def _drop_gradients(layers: Sequence) -> None:
    for layer in layers:
        layer.grad_acc = layer.grad_exponent = layer.bias_grad = None
        layer.grad_terms = 0


def run_chunked(pass_fn: Callable[[int, int], torch.Tensor], batch: int, micro_batch: int,
                grad_layers: Sequence = (), clear: Callable[[], None] | None = None,
                guess: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Sum over the chunks of ``pass_fn(lo, hi)`` (an integer loss) with the whole batch's shifts.

    ``grad_layers``: layers whose ``grad_acc`` the pass fills; they end up holding the sum over
    all chunks. ``clear``: drops what an abandoned (probed) chunk pass left stored. ``guess``:
    the shifts to try first (the last step's); returns (sum, the shifts of this batch).
    """
    plan, bounds = ShiftPlan(guess), chunk_bounds(batch, micro_batch)
    with summed_gradients(grad_layers):
        while True:
            _drop_gradients(grad_layers)  # a sweep starts from nothing: an abandoned sweep's sums go first
            total, probed = _sweep(plan, pass_fn, bounds, grad_layers)
            if plan.close_sweep() and not probed:
                return total, plan.fixed
            if clear is not None:
                clear()


def _sweep(plan: ShiftPlan, pass_fn, bounds, grad_layers) -> tuple[torch.Tensor | None, bool]:
    """Every chunk once: (sum of the completed passes, whether a site was probed); the gradients are
    summed in the layers."""
    total, probed = None, False
    for lo, hi in bounds:
        plan.start_chunk()
        try:
            with active(plan):
                out = pass_fn(lo, hi)
        except ProbeDone:  # every chunk stops at the same site: this sweep only finds its shift
            for layer in grad_layers:
                layer.clear()
            probed = True
            continue
        total = out if total is None else total + out
    return total, probed


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
