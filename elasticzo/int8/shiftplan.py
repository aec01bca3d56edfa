"""Requantisation shifts that do not depend on how a batch is cut into micro-batches.

NITI requantises every int32 accumulator with ONE shift per tensor, taken from the largest entry
of the whole batch. A micro-batched pass (``int8.microbatch``) sees one chunk at a time, so it
cannot read that maximum off one chunk. A ``ShiftPlan`` makes it exact: the requantisation sites
of a pass (every call of ``requantize_shift``, in program order: conv1, conv2, ..., then the
errors of the backward pass) are numbered, and

- a site whose shift is already known (``fixed``) uses it, whatever the chunk;
- the first unknown site is *probed*: the chunk's bit length there is recorded and the chunk's
  pass stops (``ProbeDone``), since nothing after it can be computed yet.

Running every chunk once per site fills ``fixed`` with the shifts of the whole batch, so the
last sweep computes exactly the unchunked integers, chunk by chunk. That triangle of
recomputation (site i is reached i + 1 times) is avoided by *speculation*: shifts change little
from one step to the next, so a sweep may run on ``guess`` (the last step's shifts) while it
records the true maximum at every site. If every guess equals what the maxima give (checked in
order: site i's maximum is the whole batch's once sites 0..i-1 were right), the sweep was exact
and its results stand; otherwise the sites up to the first wrong guess are now known, and the
sweep is run again. Usually one sweep, at most one more per site; never an inexact result.
Outside a plan ``requantize_shift`` is NITI's rule, so the unchunked path is unchanged.
"""
from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Callable, Iterator

import torch

ACC_BITS = 7  # requantize keeps |q| below 2**7, the int8 range


class ProbeDone(Exception):
    """Raised at the probed site: the chunk's pass has delivered what this sweep needs."""

    def __init__(self, bits: torch.Tensor):
        super().__init__("requantisation site probed")
        self.bits = bits  # 0-dim int64: bit length of the chunk's largest |accumulator| there (or ACC_BITS if less)


class ShiftPlan:
    """The shifts known so far, the guesses for the next sites, and the maxima a sweep has seen."""

    def __init__(self, guess: list[torch.Tensor] | None = None) -> None:
        self.fixed: list[torch.Tensor] = []  # 0-dim int64 shifts of the whole batch, site by site
        self.guess: list[torch.Tensor] = list(guess or [])  # for sites len(fixed), len(fixed) + 1, ...
        self.seen: list[torch.Tensor | None] = []  # per guessed site: max bit length over the sweep
        self.top: torch.Tensor | None = None  # the probed site's max bit length over the sweep
        self.site = 0  # next site of the running chunk pass

    def start_chunk(self) -> None:
        self.site = 0

    def shift(self, top_bits: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The shift of the next site: fixed, else guessed (its maximum recorded), else probed (raises)."""
        site, self.site = self.site, self.site + 1
        if site < len(self.fixed):
            return self.fixed[site]
        bits, g = top_bits(), site - len(self.fixed)
        if g < len(self.guess):
            if g == len(self.seen):
                self.seen.append(bits)
            else:
                self.seen[g] = torch.maximum(self.seen[g], bits)
            return self.guess[g]
        self.top = bits if self.top is None else torch.maximum(self.top, bits)
        raise ProbeDone(bits)

    def close_sweep(self) -> bool:
        """After every chunk ran once: True if the sweep used the whole batch's shifts everywhere.

        Otherwise learn from it (the verified guesses, and the first wrong guess or the probed
        site, become fixed) and return False: the sweep must run again.
        """
        truths = [(bits - ACC_BITS).clamp(min=0) for bits in self.seen]
        if truths:
            right = (torch.stack(truths) == torch.stack(self.guess[: len(truths)])).tolist()  # one host sync
            wrong = right.index(False) if False in right else len(truths)
            self.fixed += truths[: wrong + 1]  # the first wrong guess's maximum is still the true one
            self.guess = self.guess[wrong + 1:] if wrong < len(truths) else []
        else:
            wrong = 0
        exact = wrong == len(truths) and self.top is None
        if self.top is not None and wrong == len(truths):
            self.fixed.append((self.top - ACC_BITS).clamp(min=0))
        self.seen, self.top = [], None
        return exact


_plan: ContextVar[ShiftPlan | None] = ContextVar("elasticzo_shift_plan", default=None)


@contextmanager
def active(plan: ShiftPlan) -> Iterator[ShiftPlan]:
    """Route every ``requantize_shift`` inside the block through ``plan``."""
    token = _plan.set(plan)
    try:
        yield plan
    finally:
        _plan.reset(token)


@contextmanager
def suspended() -> Iterator[None]:
    """No plan inside the block: work that is not part of the pass (a one-time speed probe) uses NITI's rule."""
    token = _plan.set(None)
    try:
        yield
    finally:
        _plan.reset(token)


def requantize_shift(top_bits: Callable[[], torch.Tensor]) -> torch.Tensor:
    """The right shift of one requantisation: max(bitlength - 7, 0), or the active plan's.

    ``top_bits`` computes the bit length of the largest |entry|; it is only called when needed,
    so a site with a fixed shift skips the pass over the accumulator that finds its maximum. Only
    max(bits - 7, 0) is ever read, so it may return max(bits, 7) (the native requantisation's
    shift + 7, ``format.requantize_int32``).
    """
    plan = _plan.get()
    if plan is None:
        return (top_bits() - ACC_BITS).clamp(min=0)
    return plan.shift(top_bits)


def planning() -> bool:
    """Whether a micro-batched pass is running (fused kernels that pick their own shift must step aside)."""
    return _plan.get() is not None
