"""Counter-based SPSA directions: z[i] = f(key, i), and the fused use y = x + a * z.

Why counter-based: ``torch.randn`` over the parameters, three times a step (the + pass, the -
pass, the update), cost more than a forward pass on a 1M-parameter MLP, and its stream can only
be read from the start. Here each entry is a hash of (key, element index): the native kernel
(``zo/kernels/ezo_noise.c``) forms theta + eps z or theta + coef z in one pass without ever
storing z, a slice of a layer is made alone, and the directions are the same bits on every
device and with or without the kernel.

    h(c)        = fmix32((c * 0x9E3779B9 + key_lo) ^ key_hi)          murmur3's finaliser, uint32
    gaussian:   z[i] = (sum of the four bytes of h(i) - 510) * GAUSS_SCALE
    rademacher: z[i] = +1 if bit (i % 32) of h(i // 32) is set, else -1

"gaussian" is thus a sum of four uniform bytes (Irwin-Hall n=4) scaled to mean 0 and variance
1: 1021 levels, |z| <= 3.45, kurtosis 2.7 (a normal's is 3). SPSA needs E[z] = 0 and
E[z z^T] = I, which it has exactly; a table of normal quantiles would need a gather per entry,
which measured 3x the cost of all the rest of the kernel on x86.

This module is the portable twin (int64 tensors holding uint32 values, masked after every
product so nothing overflows): the kernel is proved equal to it in ``tests/test_counter.py``.
"""
from __future__ import annotations

import ctypes
import math
from functools import lru_cache

import torch

from elasticzo.config import NOISE_KINDS

_M32 = 0xFFFFFFFF
GAUSS_SCALE = float(torch.tensor(1 / math.sqrt(4 * (256 ** 2 - 1) / 12), dtype=torch.float32))
MAX_ELEMENTS = 1 << 32  # the counter is 32 bits: a layer's parameters may hold up to 2^32 entries
CHUNK = 1 << 16  # entries made at once by the portable path (int64 temporaries of 512 KiB)


_KIND_CODES = {kind: code for code, kind in enumerate(NOISE_KINDS)}  # the kernel's numbers: 0 gaussian, 1 rademacher


def kind_code(kind: str) -> int:
    """The kernel's number for a noise kind."""
    code = _KIND_CODES.get(kind)
    if code is None:
        raise ValueError(f"unknown noise kind {kind!r}; choose one of {NOISE_KINDS}")
    return code


def _mul32(h: torch.Tensor, c: int) -> torch.Tensor:
    """(h * c) mod 2^32 for h < 2^32, in two 16-bit halves of c so that no int64 product overflows."""
    return (h * (c & 0xFFFF) + (((h * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def counter_hash(key: int, counters: torch.Tensor) -> torch.Tensor:
    """h(c) for int64 ``counters`` in [0, 2^32): the 32-bit hash of the kernel, as int64."""
    weyl = (_mul32(counters, 0x9E3779B9) + (key & _M32)) & _M32
    return _fmix32(weyl ^ ((key >> 32) & _M32))


def directions(key: int, offset: int, n: int, kind: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """z[offset : offset + n] of the direction ``key`` as float32 (materialised: tests, reference, chunks)."""
    code = kind_code(kind)
    _check_range(offset, n)
    i = torch.arange(offset, offset + n, dtype=torch.int64, device=device)
    if code == 0:
        h = counter_hash(key, i)
        s = (h & 255) + ((h >> 8) & 255) + ((h >> 16) & 255) + (h >> 24) - 510
        return s.to(torch.float32).mul_(GAUSS_SCALE)
    bits = (counter_hash(key, i >> 5) >> (i & 31)) & 1
    return bits.to(torch.float32).mul_(2).sub_(1)


def _check_range(offset: int, n: int) -> None:
    if offset < 0 or n < 0 or offset + n > MAX_ELEMENTS:
        raise ValueError(f"direction entries {offset}..{offset + n}: must lie in [0, 2^32) (a layer of at most "
                         f"{MAX_ELEMENTS} parameters)")


@lru_cache(maxsize=None)
def _native():
    """``zo.native``, imported on first use: its loader imports this module for its self-check."""
    from elasticzo.zo import native

    return native


def axpy(x: torch.Tensor, key: int, offset: int, kind: str, a, out: torch.Tensor | None = None) -> torch.Tensor:
    """x + a * z[offset : offset + x.numel()] shaped like ``x``, into ``out`` (may be ``x``: in place).

    The two roundings are those of ``z * a`` then ``x + that``; entries follow ``x``'s logical
    (row-major) order whatever its strides. ``a`` is a number or a 0-dim tensor (a tensor stays
    on its device: no host sync on the portable path). Float32 contiguous CPU tensors go through
    the native kernel when it loads; everything else (CUDA, other dtypes, ``ELASTICZO_NATIVE=0``)
    through ``directions``, a chunk at a time.
    """
    given, out = out is not None, _out_for(x, out)
    code, n = kind_code(kind), x.numel()
    _check_range(offset, n)
    kernel = _native().kernel_for(x, out)
    if kernel is not None:
        kernel(n, key, offset, code, x.data_ptr(), float(a), out.data_ptr())
        if given:  # written outside torch: bump its version as torch's in-place ops do
            torch.autograd.graph.increment_version(out)
        return out
    with torch.no_grad():  # a direction never takes part in autograd (x may be a parameter that requires grad)
        target = out if out.is_contiguous() else torch.empty_like(x, memory_format=torch.contiguous_format)
        flat_x, flat_out = x.reshape(-1), target.view(-1)
        for lo in range(0, n, CHUNK):
            hi = min(lo + CHUNK, n)
            z = directions(key, offset + lo, hi - lo, kind, x.device).to(x.dtype)
            torch.add(flat_x[lo:hi], z.mul_(a), out=flat_out[lo:hi])
        return target if target is out else out.copy_(target)


def _out_for(x: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """``out``, checked to match ``x`` (the kernel writes x.numel() entries into it), or a new tensor."""
    if out is None:
        return torch.empty_like(x, memory_format=torch.contiguous_format)
    if (out.shape, out.dtype, out.device) != (x.shape, x.dtype, x.device):
        raise ValueError(f"axpy: out is {tuple(out.shape)} {out.dtype} on {out.device}, x is {tuple(x.shape)} "
                         f"{x.dtype} on {x.device}; they must match (the kernel writes x.numel() entries into out)")
    return out


def axpy_layer(xs: list[torch.Tensor], key: int, kind: str, scales: list, outs: list | None = None) -> list[torch.Tensor]:
    """``[axpy(x_t, key, o_t, kind, a_t, out_t)]`` with o_t the entries before x_t: one layer's
    tensors as slices of one direction (its flat parameter vector), in one native call where the
    kernel serves them all (the numbers are those of one ``axpy`` per tensor)."""
    given, outs = outs is not None, [_out_for(x, None if outs is None else outs[t]) for t, x in enumerate(xs)]
    code, sizes = kind_code(kind), [x.numel() for x in xs]
    _check_range(0, sum(sizes))
    kernel = _native().layer_kernel_for(xs, outs)
    if kernel is None:
        offset = 0
        for x, a, out, n in zip(xs, scales, outs, sizes):
            axpy(x, key, offset, kind, a, out)
            offset += n
        return outs
    pointers = _native().pointers
    kernel(len(xs), (ctypes.c_int64 * len(xs))(*sizes), key, code, pointers([x.data_ptr() for x in xs]),
           (ctypes.c_float * len(xs))(*[float(a) for a in scales]), pointers([out.data_ptr() for out in outs]))
    if given:
        torch.autograd.graph.increment_version(outs)
    return outs


class LayerDirections:
    """``axpy_layer`` for one layer whose tensors stay the same (a ZO layer's parameters, perturbed
    and updated every step): the native call's checks, sizes and input pointers are made once and
    again when a tensor changes (storage, size, dtype or layout), so a pass pays the outputs'
    allocation and one foreign call (``axpy_layer``'s Python costs more than the kernel on a small layer)."""

    def __init__(self):
        self._seen: list[tuple] | None = None
        self._kernel = self._sizes = self._xs = None

    def __call__(self, xs: list[torch.Tensor], key: int, kind: str, scales: list, in_place: bool = False) -> list[torch.Tensor]:
        """``axpy_layer(xs, key, kind, scales, xs if in_place else None)``."""
        seen = [(x.data_ptr(), x.numel(), x.dtype, x.is_contiguous(), x.device) for x in xs]
        if seen != self._seen:
            self._prepare(xs, seen)
        if self._kernel is None:
            return axpy_layer(xs, key, kind, scales, xs if in_place else None)
        outs = xs if in_place else [torch.empty_like(x) for x in xs]
        out_ptrs = self._xs if in_place else _native().pointers([out.data_ptr() for out in outs])
        self._kernel(len(xs), self._sizes, key, kind_code(kind), self._xs, (ctypes.c_float * len(xs))(*scales), out_ptrs)
        if in_place:  # as torch's in-place ops do: a graph that saved xs must refuse backward, not use new values
            torch.autograd.graph.increment_version(xs)
        return outs

    def _prepare(self, xs: list[torch.Tensor], seen: list[tuple]) -> None:
        sizes = [x.numel() for x in xs]
        _check_range(0, sum(sizes))
        self._seen, self._kernel = seen, _native().layer_kernel_for(xs, xs)
        self._sizes, self._xs = (ctypes.c_int64 * len(xs))(*sizes), _native().pointers([x.data_ptr() for x in xs])
