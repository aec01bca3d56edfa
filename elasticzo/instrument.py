"""The only measurement hooks the core imports: ``phase(name)`` and ``memory_tag(name)``.

Library code marks its parts (``with phase("forward"):``, ``with memory_tag("zo_noise"):``).
Outside a measurement each mark costs one context-variable read (or one list check) and does
nothing. The measuring side lives in ``elasticzo.bench``: ``bench.timing.StepTimer`` sets
``ACTIVE_TIMER`` for the step it times, ``bench.memory.MemoryTracker`` registers itself in
``ACTIVE_TRACKERS`` and reads ``current_tag()``. The dependency points one way: the core never
imports the bench (nanoGPT's rule: ``bench.py`` imports the model, never the reverse).
"""
from __future__ import annotations

from contextvars import ContextVar
from typing import Any

# The StepTimer filling the current step (set by bench.timing.StepTimer.step), or None.
ACTIVE_TIMER: ContextVar[Any] = ContextVar("elasticzo_step_timer", default=None)
# MemoryTrackers inside their `with` block, innermost last (bench.memory.MemoryTracker.track).
ACTIVE_TRACKERS: list[Any] = []
_tag: ContextVar[str | None] = ContextVar("elasticzo_memory_tag", default=None)


class _Nothing:
    """The context manager of a mark made while nothing is measured."""

    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc) -> None:
        return None


_NOTHING = _Nothing()


class _Phase:
    __slots__ = ("timer", "name")

    def __init__(self, timer: Any, name: str):
        self.timer, self.name = timer, name

    def __enter__(self) -> None:
        self.timer._enter(self.name)

    def __exit__(self, *exc) -> None:
        self.timer._exit(self.name)


def phase(name: str) -> _Phase | _Nothing:
    """Charge the wall time of the block to phase ``name`` of the step being timed, if any."""
    timer = ACTIVE_TIMER.get()
    return _NOTHING if timer is None else _Phase(timer, name)


class _Tag:
    __slots__ = ("name", "token")

    def __init__(self, name: str):
        self.name = name

    def __enter__(self) -> None:
        self.token = _tag.set(self.name)

    def __exit__(self, *exc) -> None:
        _tag.reset(self.token)


def memory_tag(name: str) -> _Tag | _Nothing:
    """Attribute tensors allocated inside the block to category ``name`` (e.g. ``"zo_noise"``).

    Takes effect only while a memory tracker is active, in the current thread / context.
    """
    return _Tag(name) if ACTIVE_TRACKERS else _NOTHING


def current_tag() -> str | None:
    """The innermost open ``memory_tag`` of this context (None outside every tag)."""
    return _tag.get()
