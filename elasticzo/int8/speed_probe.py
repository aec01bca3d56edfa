"""Pick the fastest exact integer product on this CPU, by measuring, once per process.

``torch._int_mm`` is a oneDNN kernel on CPUs with AVX512-VNNI or AMX and a slow reference loop
elsewhere; the native kernels may not build. So ``"auto"`` cannot pick by availability: each
candidate runs LeNet-5-sized products, is checked against the reference result, and the
fastest exact one wins, separately for plain products (linear layers) and convolutions.
One log line records the choice and the timings.
"""
from __future__ import annotations

import logging
import time
from functools import lru_cache

import torch

from elasticzo.int8 import conv, native, ops
from elasticzo.int8.layers import requantize_tiled

log = logging.getLogger("elasticzo.int8")
REPEATS = 5


def _cases(gen: torch.Generator) -> dict[str, list]:
    """LeNet-5 at batch 64: its fc1 forward and weight gradient; its two convolutions."""
    r = lambda *shape, lo=-127: torch.randint(lo, 128, shape, generator=gen, dtype=torch.int8)
    return {
        "matmul": [lambda impl, a=r(64, 400), w=r(120, 400): ops.int8_linear(a, w, impl),
                   lambda impl, g=r(120, 64), x=r(64, 400): ops.int8_matmul(g, x, impl)],
        "conv": [lambda impl, x=r(64, 1, 28, 28, lo=0), w=r(6, 1, 5, 5): conv_layer(x, w, 2, impl),
                 lambda impl, x=r(64, 6, 14, 14, lo=0), w=r(16, 6, 5, 5): conv_layer(x, w, 0, impl)],
    }


def conv_layer(x: torch.Tensor, w: torch.Tensor, padding: int, impl: str, tile: int = 8) -> torch.Tensor:
    """What ``IntConv2d.forward`` does with ``impl``: the fused native call, or conv + tiled requantisation."""
    fused = conv.int8_conv2d_requant(x, w, 1, padding, impl)
    if fused is not None:
        return fused[0]
    tile_conv = lambda lo, hi: conv.int8_conv2d(x[lo:hi], w, 1, padding, impl)
    return requantize_tiled(tile_conv, x.shape[0], tile, 0).values


def _seconds(fn, impl: str) -> float:
    best = float("inf")
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        fn(impl)
        best = min(best, time.perf_counter() - t0)
    return best


def candidates() -> list[str]:
    out = ["reference"]
    if ops._int_mm_works("cpu"):
        out.append("int_mm")
    if native.load() is not None:
        out.append("native")
    return out


@lru_cache(maxsize=None)
def probe() -> dict[str, str]:
    """{"matmul": impl, "conv": impl}: the fastest implementation whose results equal the reference."""
    gen = torch.Generator().manual_seed(0)
    choice, report = {}, []
    for kind, fns in _cases(gen).items():
        times, fast = {}, [c for c in candidates() if c != "reference"] or ["reference"]
        for impl in fast:  # the reference is the oracle here, and timed only when it is the only one
            if all(torch.equal(fn(impl), fn("reference")) for fn in fns):  # also the warm-up
                times[impl] = sum(_seconds(fn, impl) for fn in fns)
        times = times or {"reference": 0.0}
        choice[kind] = min(times, key=times.get)
        report.append(f"{kind}={choice[kind]} (" + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in times.items()) + ")")
    log.info("elasticzo.int8: auto picks %s", "; ".join(report))
    return choice
