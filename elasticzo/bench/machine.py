"""The machine a timing was taken on: CPU model, SIMD flags, core count and load.

Every timing the bench writes carries this record: a step time means little without the CPU
(AVX2 without VNNI runs the integer kernels several times slower than a VNNI core) and the load
of a shared machine at the time.
"""
from __future__ import annotations

import os
import platform
from pathlib import Path

SIMD_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8",
              "asimd", "asimddp", "sve")  # x86 and Arm flags that decide the speed of small float/int8 kernels


def cpu_info(cpuinfo: str | Path = "/proc/cpuinfo") -> dict:
    """{"model", "simd" (the SIMD_FLAGS present), "cores", "torch_capability", "load_avg"}; best effort off Linux."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path(cpuinfo).read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip().lower()
            if key in ("model name", "hardware", "cpu model") and value.strip():
                model = value.strip()
            elif key in ("flags", "features") and not flags:
                flags = set(value.split())
    except OSError:
        pass
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    return {"model": model, "simd": [f for f in SIMD_FLAGS if f in flags], "cores": os.cpu_count(),
            "torch_capability": _torch_capability(), "load_avg": load}


def _torch_capability() -> str | None:
    """The SIMD level torch's CPU kernels dispatch to (e.g. AVX2, AVX512), None if unknown."""
    try:
        import torch

        return torch.backends.cpu.get_cpu_capability()
    except (ImportError, AttributeError):
        return None


def describe(info: dict) -> str:
    """One line for reports: 'AMD EPYC 7B13, 2 cores, SIMD avx2 fma, load 3.1'."""
    load = f", load {info['load_avg'][0]}" if info.get("load_avg") else ""
    torch_level = f" (torch: {info['torch_capability']})" if info.get("torch_capability") else ""
    return f"{info['model']}, {info['cores']} cores, SIMD {' '.join(info['simd']) or 'none found'}{torch_level}{load}"
