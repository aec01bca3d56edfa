"""The fused direction kernel ``kernels/ezo_noise.c``: built, cached and loaded like the int8 kernels.

``int8.native`` holds the one builder (system ``cc``, cache keyed by source, compiler, flags and
CPU; ``ELASTICZO_NATIVE=0``, ``ELASTICZO_CC``, ``ELASTICZO_MARCH``); this module adds
``-ffp-contract=off`` (the kernel must round a * z and x + a * z apart, as torch does), binds the
one entry point, and proves it equal to the portable twin of ``zo.counter`` before first use.
Where that fails, one log line says so and the portable path runs.
"""
from __future__ import annotations

import ctypes
import logging
import os
from functools import lru_cache
from pathlib import Path

import torch

from elasticzo.int8 import native as builder

log = logging.getLogger("elasticzo.zo")
SOURCE = Path(__file__).with_name("kernels") / "ezo_noise.c"
ABI_VERSION = 2
_I64 = ctypes.c_int64
_PTR = ctypes.c_void_p


@lru_cache(maxsize=None)
def load() -> ctypes.CDLL | None:
    """The kernel library, or None (after one log line saying why) where it cannot be used."""
    if os.environ.get("ELASTICZO_NATIVE", "1") == "0":
        log.info("elasticzo.zo: native direction kernel off (ELASTICZO_NATIVE=0); portable PyTorch path")
        return None
    cc = builder._compiler()
    if cc is None:
        log.warning("elasticzo.zo: no C compiler (set ELASTICZO_CC); portable PyTorch path")
        return None
    try:
        lib = ctypes.CDLL(str(builder.build(cc, builder.compile_flags() + ["-ffp-contract=off"], SOURCE)))
        lib.ezo_noise_abi_version.restype = ctypes.c_int
        if lib.ezo_noise_abi_version() != ABI_VERSION:
            raise RuntimeError(f"ABI version {lib.ezo_noise_abi_version()} != {ABI_VERSION}")
        fn = lib.ezo_noise_axpy
        fn.argtypes = [_I64, ctypes.c_uint64, _I64, ctypes.c_int32, _PTR, ctypes.c_float, _PTR]
        fn.restype = None
        layer = lib.ezo_noise_axpy_layer
        layer.argtypes = [ctypes.c_int32, _PTR, ctypes.c_uint64, ctypes.c_int32, _PTR, _PTR, _PTR]
        layer.restype = None
        self_check(fn, layer)
    except Exception as err:  # noqa: BLE001 - any failure means: use the portable path
        log.warning("elasticzo.zo: native direction kernel unusable (%s: %s); portable PyTorch path",
                    type(err).__name__, err)
        return None
    return lib


def kernel_for(x: torch.Tensor, out: torch.Tensor):
    """``ezo_noise_axpy`` if it serves ``out = x + a z`` (float32, contiguous, CPU, the kernel
    loaded), else None."""
    if not (x.dtype == out.dtype == torch.float32 and x.is_cpu and x.is_contiguous() and out.is_contiguous()):
        return None
    lib = load()
    return None if lib is None else lib.ezo_noise_axpy


def layer_kernel_for(xs: list[torch.Tensor], outs: list[torch.Tensor]):
    """``ezo_noise_axpy_layer`` if ``kernel_for`` serves every (x, out) pair of a layer, else None."""
    if not all(kernel_for(x, out) is not None for x, out in zip(xs, outs)):
        return None
    return load().ezo_noise_axpy_layer


def pointers(values) -> ctypes.Array:
    """A C array of ``void *``: the data pointers of tensors (or plain addresses)."""
    return (_PTR * len(values))(*values)


def self_check(fn, layer) -> None:
    """Raise unless the kernels equal ``zo.counter.directions`` on both kinds, odd offsets and
    lengths, and the layer entry point equals one call per tensor at the running offsets."""
    from elasticzo.zo.counter import directions

    for code, kind in enumerate(("gaussian", "rademacher")):
        for key, offset, n in ((0, 0, 1000), ((1 << 63) - 1, 37, 515), (0x1234_5678_9ABC_DEF0, (1 << 32) - 70, 70)):
            x, a = torch.linspace(-1, 1, n), 0.37
            out = torch.empty(n)
            fn(n, key, offset, code, x.data_ptr(), a, out.data_ptr())
            want = x + directions(key, offset, n, kind) * a
            if not torch.equal(out, want):
                raise RuntimeError(f"ezo_noise_axpy differs from the portable twin ({kind}, key {key}, offset {offset})")
        xs, outs, scales = [torch.linspace(-1, 1, 37), torch.linspace(0, 2, 70)], [torch.empty(37), torch.empty(70)], (0.5, -3.0)
        layer(2, (_I64 * 2)(37, 70), 99, code, pointers([x.data_ptr() for x in xs]), (ctypes.c_float * 2)(*scales),
              pointers([o.data_ptr() for o in outs]))
        if not (torch.equal(outs[0], xs[0] + directions(99, 0, 37, kind) * 0.5)
                and torch.equal(outs[1], xs[1] + directions(99, 37, 70, kind) * -3.0)):
            raise RuntimeError(f"ezo_noise_axpy_layer differs from the portable twin ({kind})")
