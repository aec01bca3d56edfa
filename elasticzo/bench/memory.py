"""Measured (not estimated) peak memory of a training step, by category.

A ``TorchDispatchMode`` sees the outputs of every aten op run while it is active, forward and
backward alike (autograd carries the mode into the backward pass). Each output's storage is counted
once, when it first appears; views share their base's storage and cost nothing. A weak reference
with a callback on the storage takes its bytes off when the last tensor using it is freed, so
the tracker never keeps a tensor alive. Tensors that exist before tracking starts (parameters,
gradients, optimizer state, the input batch) are registered up front so the peak includes them.

Each storage belongs to exactly one category, so the breakdown sums to the live total:

============================  ==================================================================
``parameters``                registered parameters (and buffers when a module is passed)
``gradients``                 ``.grad`` of registered parameters, whenever it was created
``optimizer_state``           tensors in ``optimizer.state`` (momentum buffers, Adam moments)
``inputs``                    the registered input batch
``zo_noise``                  allocations made inside ``memory_tag("zo_noise")``
``saved_for_backward``        transient tensors that autograd saved for the backward pass
``workspace``                 every other transient tensor (activations, accumulators, losses)
============================  ==================================================================

Library code tags allocations with ``memory_tag(name)``; outside a tracker it costs one global
read. Example::

    with track_memory(params=model, optimizer=opt, inputs=(x, y)) as mem:
        opt.step(closure)
    mem.peak_bytes, mem.breakdown_at_peak   # int, {category: bytes}
    print(mem.report())

What is measured is the bytes of live tensor storages (``storage.nbytes()``). Not included:
allocator rounding and caching (the CUDA caching allocator rounds to 512 B blocks; use
``cuda_peak_bytes`` for that view), scratch buffers inside kernels that never become tensors
(oneDNN / cuBLAS workspaces), and tensors created outside any aten op that were not registered.
Saved tensors are recognised through ``torch.autograd.graph.saved_tensors_hooks``; inside a
user's own hooks (activation checkpointing, CPU offload) those count as ``workspace``. Tags are
per thread/context: on CUDA the backward pass runs in autograd's device threads, where its
allocations count as ``workspace`` (or their role) whatever tag the caller had set.
"""
from __future__ import annotations

import gc
import threading
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from elasticzo.instrument import ACTIVE_TRACKERS as _active
from elasticzo.instrument import current_tag

PERSISTENT = ("parameters", "gradients", "optimizer_state", "inputs")
TRANSIENT = ("zo_noise", "saved_for_backward", "workspace")
CATEGORIES = PERSISTENT + TRANSIENT

# ---------------------------------------------------------------------------------------------
# Report


def _fmt_bytes(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


@dataclass(frozen=True)
class MemoryReport:
    """What one tracked region used. All sizes are bytes of live tensor storage."""

    peak_bytes: int  # max over the region of the live total (registered + allocated)
    breakdown_at_peak: dict[str, int]  # category -> bytes at the moment of the peak; sums to peak
    baseline_bytes: int  # registered tensors at the start
    end_bytes: int  # live at the end (registered that survive + allocations still alive)
    breakdown_at_end: dict[str, int]
    allocations: int  # storages allocated inside the region
    cuda_peak_bytes: int | None = None  # torch.cuda.max_memory_allocated during the region
    cuda_baseline_bytes: int | None = None  # torch.cuda.memory_allocated at its start

    def report(self) -> str:
        """Human-readable table of the breakdown at the peak."""
        lines = [f"peak live tensor memory: {_fmt_bytes(self.peak_bytes)} ({self.peak_bytes:,} B)"]
        for cat, n in self.breakdown_at_peak.items():
            share = 100.0 * n / self.peak_bytes if self.peak_bytes else 0.0
            lines.append(f"  {cat:<20} {_fmt_bytes(n):>12} {share:6.1f} %")
        lines.append(f"baseline (registered): {_fmt_bytes(self.baseline_bytes)}; "
                     f"live at end: {_fmt_bytes(self.end_bytes)}; allocations: {self.allocations}")
        if self.cuda_peak_bytes is not None:
            lines.append(f"cuda max_memory_allocated: {_fmt_bytes(self.cuda_peak_bytes)} "
                         f"(baseline {_fmt_bytes(self.cuda_baseline_bytes or 0)})")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


# ---------------------------------------------------------------------------------------------
# Tracker


class _Entry:
    """One tracked storage. ``born``/``seen`` are snapshot numbers, see ``MemoryTracker._retag``."""

    __slots__ = ("nbytes", "category", "ref", "born", "seen", "snap_category", "snap_nbytes")

    def __init__(self, nbytes: int, category: str, ref: weakref.ref, born: int):
        self.nbytes, self.category, self.ref, self.born = nbytes, category, ref, born
        self.seen = -1  # last snapshot for which snap_category / snap_nbytes were recorded
        self.snap_category, self.snap_nbytes = category, nbytes


def _tensors(tree: Any) -> list[torch.Tensor]:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


def _storage(t: torch.Tensor) -> torch.UntypedStorage | None:
    if t.device.type == "meta":
        return None
    try:
        return t.untyped_storage()
    except (RuntimeError, NotImplementedError):  # sparse and other storage-less layouts
        return None


_FRESH_INPUT_OPS = {torch.ops.aten.lift_fresh.default}  # torch.tensor(data): allocated before the op


class _Mode(TorchDispatchMode):
    def __init__(self, tracker: "MemoryTracker"):
        super().__init__()
        self.tracker = tracker

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.tracker._on_op(func, args, kwargs, out)
        return out


def _pack(t: torch.Tensor) -> torch.Tensor:
    for tracker in _active:
        tracker._on_saved(t)
    # detach: packing the tensor itself would make a saved output hold its own grad_fn, a
    # reference cycle that leaks the activation when a graph is dropped without backward
    return t.detach()


def _unpack(t: torch.Tensor) -> torch.Tensor:
    return t


class MemoryTracker:
    """Live-tensor accounting over a region; use through ``track_memory``.

    ``params`` may be a module (its parameters and buffers count as ``parameters``) or an
    iterable of tensors. Existing ``.grad`` of the parameters and every tensor in
    ``optimizer.state`` are registered too. ``extra`` registers more pre-existing tensors under
    categories of your choice.

    A storage is counted, over its whole life (the peak included), under the most specific role
    it takes while alive and tracked: a transient tensor that autograd saves becomes
    ``saved_for_backward``; one that becomes a ``.grad`` or optimizer state becomes
    ``gradients`` / ``optimizer_state``, even if the peak came while it was still in flight.
    """

    def __init__(self, params: nn.Module | Iterable[torch.Tensor] = (), optimizer: torch.optim.Optimizer | None = None,
                 inputs: Any = (), extra: dict[str, Any] | None = None, device: torch.device | str | None = None):
        if isinstance(params, nn.Module):
            tensors = list(params.parameters()) + list(params.buffers())
        else:
            tensors = list(params)
        if not tensors and optimizer is not None:
            tensors = [p for g in optimizer.param_groups for p in g["params"]]
        self._params = [weakref.ref(p) for p in tensors]
        self._optimizer = weakref.ref(optimizer) if optimizer is not None else None
        self._inputs = [weakref.ref(t) for t in _tensors(inputs)]
        self._extra = {cat: [weakref.ref(t) for t in _tensors(ts)] for cat, ts in (extra or {}).items()}
        self._device = torch.device(device) if device is not None else _first_cuda_device(tensors)
        self._lock = threading.RLock()  # frees may arrive from autograd threads or inside our own calls
        self._entries: dict[int, _Entry] = {}
        self._live = dict.fromkeys(CATEGORIES, 0)
        self._snapshots = 0  # how many times breakdown_at_peak was taken
        self.current_bytes = 0
        self.peak_bytes = 0
        self.breakdown_at_peak: dict[str, int] = dict(self._live)
        self.baseline_bytes = 0
        self.allocations = 0
        self.cuda_peak_bytes: int | None = None
        self.cuda_baseline_bytes: int | None = None
        self._result: MemoryReport | None = None

    # -- bookkeeping ---------------------------------------------------------------------------

    def _add(self, storage: torch.UntypedStorage, category: str) -> None:
        key = storage._cdata  # address of the C++ StorageImpl: unique while it is alive
        with self._lock:
            if key in self._entries:
                return
            nbytes = storage.nbytes()
            ref = weakref.ref(storage, lambda _, key=key: self._on_free(key))
            self._entries[key] = _Entry(nbytes, category, ref, born=self._snapshots)
            self._change(category, nbytes)

    def _change(self, category: str, delta: int) -> None:
        self._live[category] = self._live.get(category, 0) + delta
        self.current_bytes += delta
        if self.current_bytes > self.peak_bytes:
            self.peak_bytes = self.current_bytes
            self._snapshots += 1
            self.breakdown_at_peak = dict(self._live)

    def _on_free(self, key: int) -> None:
        # Runs inside the deallocation of a storage: touch no tensor here, only our counters.
        with self._lock:
            entry = self._entries.pop(key, None)
            if entry is not None:
                self._change(entry.category, -entry.nbytes)

    def _remember_snapshot(self, entry: _Entry) -> bool:
        """Record how ``entry`` was counted in the latest peak snapshot; False if it was not in it."""
        if entry.born >= self._snapshots:  # allocated after the latest snapshot
            return False
        if entry.seen != self._snapshots:  # first change since that snapshot: it counted as it is now
            entry.seen, entry.snap_category, entry.snap_nbytes = self._snapshots, entry.category, entry.nbytes
        return True

    def _retag(self, storage: torch.UntypedStorage, category: str, allowed_from: Iterable[str]) -> None:
        with self._lock:
            entry = self._entries.get(storage._cdata)
            if entry is None or entry.category == category or entry.category not in allowed_from:
                return
            if self._remember_snapshot(entry):  # alive at the peak: count it in its role there too
                peak = self.breakdown_at_peak
                peak[entry.snap_category] -= entry.snap_nbytes
                peak[category] = peak.get(category, 0) + entry.snap_nbytes
                entry.snap_category = category
            self._live[entry.category] -= entry.nbytes
            self._live[category] = self._live.get(category, 0) + entry.nbytes
            entry.category = category

    def _resize(self, entry: _Entry, nbytes: int) -> None:
        with self._lock:
            self._remember_snapshot(entry)
            delta, entry.nbytes = nbytes - entry.nbytes, nbytes
            self._change(entry.category, delta)

    def _transient(self) -> list[str]:
        return [c for c in self._live if c not in PERSISTENT]

    def _refresh_roles(self) -> None:
        """Find transient storages that became a .grad or optimizer state since the last look."""
        for ref in self._params:
            p = ref()
            if p is not None and p.grad is not None:
                self._mark_grad(p)
        for t in self._optimizer_state():
            if (s := _storage(t)) is not None:
                self._retag(s, "optimizer_state", self._transient())

    def _mark_grad(self, p: torch.Tensor) -> None:
        if p.grad is not None and (s := _storage(p.grad)) is not None:
            self._retag(s, "gradients", self._transient())

    def _optimizer_state(self) -> list[torch.Tensor]:
        opt = self._optimizer() if self._optimizer is not None else None
        return _tensors(list(opt.state.values())) if opt is not None else []

    # -- hooks ---------------------------------------------------------------------------------

    def _on_op(self, func, args, kwargs, out) -> None:
        outs = _tensors(out)
        input_keys = None
        for t in outs:
            s = _storage(t)
            if s is None:
                continue
            entry = self._entries.get(s._cdata)
            if entry is not None:
                if s.nbytes() != entry.nbytes:  # resize_ / out= grew or shrank the storage
                    self._resize(entry, s.nbytes())
                continue
            if input_keys is None:
                input_keys = {st._cdata for a in _tensors((args, kwargs)) if (st := _storage(a)) is not None}
            if s._cdata in input_keys and func not in _FRESH_INPUT_OPS:
                continue  # a view of / in-place op on an unregistered tensor that existed before
            self._add(s, current_tag() or "workspace")
            self.allocations += 1

    def _on_saved(self, t: torch.Tensor) -> None:
        s = _storage(t)
        if s is not None:
            self._retag(s, "saved_for_backward", ("workspace",))

    def _install_hooks(self) -> list:
        """.grad written by autograd, and .grad / state seen by the optimizer, get their role at once."""
        handles = []
        for ref in self._params:
            p = ref()
            if p is not None and p.requires_grad and p.is_leaf:
                handles.append(p.register_post_accumulate_grad_hook(self._mark_grad))
        opt = self._optimizer() if self._optimizer is not None else None
        if opt is not None:
            handles.append(opt.register_step_pre_hook(lambda *_: self._refresh_roles()))
            handles.append(opt.register_step_post_hook(lambda *_: self._refresh_roles()))
        return handles

    # -- region --------------------------------------------------------------------------------

    def _register(self, tensors: Iterable[torch.Tensor | None], category: str) -> None:
        for t in tensors:
            if t is not None and (s := _storage(t)) is not None:
                self._add(s, category)

    def _register_existing(self) -> None:
        params = [p for r in self._params if (p := r()) is not None]
        self._register(params, "parameters")
        self._register([p.grad for p in params], "gradients")
        self._register(self._optimizer_state(), "optimizer_state")
        self._register([r() for r in self._inputs], "inputs")
        for cat, refs in self._extra.items():
            self._register([r() for r in refs], cat)
        self.baseline_bytes = self.current_bytes

    @contextmanager
    def track(self) -> Iterator["MemoryTracker"]:
        if self._result is not None or self in _active:
            raise RuntimeError("a MemoryTracker measures one region; create a new one")
        cuda = self._device is not None and self._device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self._device)
            torch.cuda.reset_peak_memory_stats(self._device)
            self.cuda_baseline_bytes = torch.cuda.memory_allocated(self._device)
        self._register_existing()
        handles = self._install_hooks()
        _active.append(self)
        try:
            with _Mode(self), torch.autograd.graph.saved_tensors_hooks(_pack, _unpack):
                yield self
        finally:
            _active.remove(self)
            for h in handles:
                h.remove()
            if cuda:
                torch.cuda.synchronize(self._device)
                self.cuda_peak_bytes = torch.cuda.max_memory_allocated(self._device)
            self._finish()

    def _finish(self) -> None:
        with self._lock:
            self._refresh_roles()
            self._result = MemoryReport(self.peak_bytes, _nonzero(self.breakdown_at_peak), self.baseline_bytes,
                                        self.current_bytes, _nonzero(self._live), self.allocations,
                                        self.cuda_peak_bytes, self.cuda_baseline_bytes)
            self._entries.clear()  # drops the weak refs: no callbacks after the region

    # -- results -------------------------------------------------------------------------------

    def breakdown(self) -> dict[str, int]:
        """Live bytes per category now (inside the region) or at its end (after it)."""
        if self._result is not None:
            return dict(self._result.breakdown_at_end)
        with self._lock:
            self._refresh_roles()
            return _nonzero(self._live)

    def result(self) -> MemoryReport:
        """The frozen report; available once the region has ended."""
        if self._result is None:
            raise RuntimeError("the tracked region has not ended yet")
        return self._result

    def report(self) -> str:
        return self.result().report()


def _first_cuda_device(tensors: list[torch.Tensor]) -> torch.device | None:
    return next((t.device for t in tensors if t.device.type == "cuda"), None)


def _nonzero(breakdown: dict[str, int]) -> dict[str, int]:
    """The standard categories always (in order), custom tags only when they hold bytes."""
    return {k: v for k, v in breakdown.items() if v or k in CATEGORIES}


@contextmanager
def track_memory(params: nn.Module | Iterable[torch.Tensor] = (), optimizer: torch.optim.Optimizer | None = None,
                 inputs: Any = (), extra: dict[str, Any] | None = None,
                 device: torch.device | str | None = None) -> Iterator[MemoryTracker]:
    """Track live tensor memory inside the block; see ``MemoryTracker`` for the arguments."""
    tracker = MemoryTracker(params, optimizer, inputs, extra, device)
    with tracker.track():
        yield tracker


def measure_step_memory(step_fn: Callable[[], Any], *, params: nn.Module | Iterable[torch.Tensor],
                        optimizer: torch.optim.Optimizer | None = None, inputs: Any = (),
                        warmup: int = 1, extra: dict[str, Any] | None = None,
                        device: torch.device | str | None = None) -> MemoryReport:
    """Peak memory of one call of ``step_fn`` after ``warmup`` untracked calls.

    The warm-up lets lazily created state (momentum buffers, .grad tensors) exist before the
    measured step, as it does in every step of a real run but the first.
    """
    if warmup < 0:
        raise ValueError(f"warmup={warmup} must be >= 0")
    params = params if isinstance(params, nn.Module) else list(params)
    for _ in range(warmup):
        step_fn()
    gc.collect()  # garbage cycles left by the warm-up would otherwise be freed at a random point
    with track_memory(params, optimizer, inputs, extra, device) as mem:
        step_fn()
    return mem.result()
