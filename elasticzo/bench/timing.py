"""Per-step wall time, split into the phases library code marks with ``phase(name)``.

Library code (through ``elasticzo.instrument``) wraps its parts (``"forward"``, ``"noise"``, ``"backward"``, ``"update"``) in
``with phase(name):``; outside a timed step that is one ContextVar read. A ``StepTimer`` opens a
step with ``with timer.step():`` and collects, per step, the wall time of the whole step and of
each phase.

Phases may nest, and time goes to the innermost open phase only (self time): noise generated
inside a forward pass counts as ``"noise"`` and not also as ``"forward"``. So per step the phase
times sum to at most the step time; the rest is reported as ``"other"`` (unmarked code).

Example::

    report = time_steps(lambda: opt.step(closure), steps=50, warmup=5)
    report.median_step_s, report.median_phase_s["forward"]
    print(report.report())

On CUDA the timer synchronises the device at every step and phase boundary, so that kernels
are charged to the phase that launched them. That removes the overlap of host and device work,
so phase timings on CUDA describe where the time goes, not the fastest possible step.
"""
from __future__ import annotations

import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from elasticzo.instrument import ACTIVE_TIMER

OTHER = "other"  # step time outside every phase
# The phases the library marks, in the order reports and plots list them.
PHASE_ORDER = ("forward", "forward_backward", "noise", "perturb", "update", OTHER)


@dataclass(frozen=True)
class StepRecord:
    """One timed step: its wall time, and self time and entry count per phase (seconds)."""

    total_s: float
    phase_s: dict[str, float]
    counts: dict[str, int]

    @property
    def other_s(self) -> float:
        return self.total_s - sum(self.phase_s.values())


def _resolve_sync(sync: bool | Callable[[], None] | None) -> Callable[[], None] | None:
    if callable(sync):
        return sync
    if sync is False:
        return None
    import torch  # only here: phase() must stay importable and cheap

    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    if sync is None and not cuda:
        return None
    return torch.cuda.synchronize


class StepTimer:
    """Accumulates per-step and per-phase wall time.

    Args:
        clock: seconds as a float, monotonic (``time.perf_counter``); tests pass a fake one.
        sync: called before every clock reading. ``None`` (default) synchronises CUDA when it is
            in use, ``False`` never, ``True`` always, or pass your own callable.
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter,
                 sync: bool | Callable[[], None] | None = None):
        self.clock = clock
        self._sync = _resolve_sync(sync)
        self.records: list[StepRecord] = []
        self._stack: list[str] | None = None  # open phases, innermost last; None outside a step

    def _now(self) -> float:
        if self._sync is not None:
            self._sync()
        return self.clock()

    def _charge(self, now: float) -> None:
        """Give the time since the last boundary to the innermost open phase."""
        if self._stack:
            top = self._stack[-1]
            self._phase_s[top] = self._phase_s.get(top, 0.0) + (now - self._mark)
        self._mark = now

    def _enter(self, name: str) -> None:
        self._charge(self._now())
        self._stack.append(name)
        self._counts[name] = self._counts.get(name, 0) + 1

    def _exit(self, name: str) -> None:
        self._charge(self._now())
        top = self._stack.pop()
        if top != name:
            raise RuntimeError(f"phase {name!r} closed while {top!r} was the innermost open phase")

    @contextmanager
    def step(self) -> Iterator["StepTimer"]:
        """Time one step; ``phase`` blocks inside it (in this thread/context) are charged to it."""
        if self._stack is not None:
            raise RuntimeError("StepTimer.step() blocks do not nest")
        self._stack, self._phase_s, self._counts = [], {}, {}
        start = self._mark = self._now()
        token = ACTIVE_TIMER.set(self)
        try:
            yield self
        finally:
            ACTIVE_TIMER.reset(token)
            end = self._now()
            self._charge(end)  # phases left open by an exception end with the step
            self.records.append(StepRecord(end - start, self._phase_s, self._counts))
            self._stack = None

    def report(self, skip: int = 0) -> "TimingReport":
        """Summary of the recorded steps after the first ``skip``."""
        return TimingReport.from_records(self.records[skip:])


@dataclass(frozen=True)
class TimingReport:
    """Per-step series and their medians. Phase series hold 0.0 for steps without that phase."""

    step_s: tuple[float, ...]
    phase_s: dict[str, tuple[float, ...]]  # phase -> self time per step; includes OTHER
    counts: dict[str, tuple[int, ...]]  # phase -> entries per step

    @classmethod
    def from_records(cls, records: list[StepRecord]) -> "TimingReport":
        names: list[str] = []
        for r in records:
            names += [n for n in r.phase_s if n not in names]
        phase_s = {n: tuple(r.phase_s.get(n, 0.0) for r in records) for n in names}
        phase_s[OTHER] = tuple(r.other_s for r in records)
        counts = {n: tuple(r.counts.get(n, 0) for r in records) for n in names}
        return cls(tuple(r.total_s for r in records), phase_s, counts)

    @property
    def steps(self) -> int:
        return len(self.step_s)

    @property
    def median_step_s(self) -> float:
        return statistics.median(self.step_s) if self.step_s else float("nan")

    @property
    def median_phase_s(self) -> dict[str, float]:
        """Median over steps of each phase's time. Medians do not add up to the step median."""
        return {n: statistics.median(v) if v else float("nan") for n, v in self.phase_s.items()}

    @property
    def mean_phase_s(self) -> dict[str, float]:
        """Mean over steps of each phase's time; these do add up to the mean step time."""
        return {n: statistics.fmean(v) if v else float("nan") for n, v in self.phase_s.items()}

    def report(self) -> str:
        lines = [f"{self.steps} steps, median {self.median_step_s * 1e3:.3f} ms/step"]
        mean_total = statistics.fmean(self.step_s) if self.step_s else 0.0
        medians, means = self.median_phase_s, self.mean_phase_s
        for name in self.phase_s:
            share = 100.0 * means[name] / mean_total if mean_total else 0.0
            lines.append(f"  {name:<12} median {medians[name] * 1e3:9.3f} ms   mean share {share:5.1f} %")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "median_step_s": self.median_step_s,
                "median_phase_s": self.median_phase_s, "mean_phase_s": self.mean_phase_s}


def time_steps(step_fn: Callable[[], Any], steps: int, warmup: int = 1, *,
               clock: Callable[[], float] = time.perf_counter,
               sync: bool | Callable[[], None] | None = None) -> TimingReport:
    """Run ``warmup`` untimed calls of ``step_fn``, then time ``steps`` calls, phase by phase."""
    if steps < 1:
        raise ValueError(f"steps={steps} must be >= 1")
    if warmup < 0:
        raise ValueError(f"warmup={warmup} must be >= 0")
    for _ in range(warmup):
        step_fn()
    timer = StepTimer(clock, sync)
    for _ in range(steps):
        with timer.step():
            step_fn()
    return timer.report()
