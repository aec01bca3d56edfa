"""A step's peak memory seen from outside the tensor tracker: the allocator and the process.

``bench.memory`` counts live tensor storages. Two things it cannot see are real on a device:
scratch buffers that kernels allocate without making tensors (oneDNN's convolution workspace,
im2col buffers), and what the C allocator and the OS keep around them. So beside the tracked
peak we measure, for the same step:

- **allocator peak**: the highest running total of bytes allocated through PyTorch's CPU
  allocator during the step (``torch.profiler`` memory events), above what was allocated when
  the step began; plus the tracker's baseline (the tensors resident before the step) it is the
  peak the allocator served;
- **resident high water**: the process's VmHWM after a reset (``/proc/self/clear_refs``, Linux),
  minus its resident size at the reset, after giving free heap back to the OS (``malloc_trim``).
  Pages, not bytes: it rounds up to 4 KiB pages and includes allocator fragmentation; it cannot
  go below what the step newly touches.

Example::

    peaks = step_peaks(lambda: learner.train_step(x, y))
    peaks["allocator_step_bytes"], peaks["rss_step_bytes"]
"""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
from pathlib import Path
from typing import Callable

import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kib(field: str) -> int | None:
    for line in _STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return None


def _malloc_trim() -> None:
    """Give the C heap's free pages back to the OS (glibc), so the step's own pages show in VmHWM."""
    name = ctypes.util.find_library("c")
    if name:
        libc = ctypes.CDLL(name)
        if hasattr(libc, "malloc_trim"):
            libc.malloc_trim(0)


def rss_step_bytes(step_fn: Callable[[], object]) -> int | None:
    """How far the step raises the resident high water (VmHWM) above the resident size before it; None off Linux."""
    if not (_STATUS.exists() and _CLEAR_REFS.exists()):
        return None
    gc.collect()
    _malloc_trim()
    try:
        _CLEAR_REFS.write_text("5")  # resets VmHWM to the current VmRSS
    except OSError:
        return None
    before = _status_kib("VmRSS")
    step_fn()
    high = _status_kib("VmHWM")
    return None if before is None or high is None else (high - before) * 1024


def allocator_step_bytes(step_fn: Callable[[], object]) -> int:
    """Peak of the bytes PyTorch's CPU allocator has out during the step, above its level at the start."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step_fn()
    sizes = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == torch._C._profiler._EventType.Allocation:
            sizes.append((node.start_time_ns, node.extra_fields.alloc_size))  # negative: a free
        stack.extend(node.children)
    level = peak = 0
    for _, size in sorted(sizes):
        level += size
        peak = max(peak, level)
    return peak


def step_peaks(step_fn: Callable[[], object], warmup: int = 1) -> dict[str, int | None]:
    """Both outside views of one step (after ``warmup`` steps): bytes above what existed before it."""
    for _ in range(warmup):
        step_fn()
    return {"allocator_step_bytes": allocator_step_bytes(step_fn), "rss_step_bytes": rss_step_bytes(step_fn)}
