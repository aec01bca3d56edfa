"""Native int8 kernels: build ``kernels/ezo_int8.c`` on first use, load it, register torch ops.

Why this shape: the C core has no torch dependency, so it compiles with a plain ``cc`` in about a
second (a ``torch.utils.cpp_extension`` build of the same code takes a minute: torch's headers),
the same source cross-compiles for aarch64 (``scripts/aarch64_exactness.sh``), and it is called
through ``ctypes`` on tensor data pointers. Each entry point is a ``torch.library`` op
(``elasticzo::...``), so a ``TorchDispatchMode`` (the integer-only audit) still sees every call
with its int8/int32 dtypes. Workspaces are torch tensors, so measured memory includes them.

The build is cached in ``$ELASTICZO_CACHE`` (default ``~/.cache/elasticzo``) under a key of the
source, the compiler's version, the flags and this CPU's feature flags: ``-march=native`` code is
never reused on another CPU. Where no compiler exists, the build fails or the exactness probe
fails, ``load()`` returns None after ONE log line and the portable PyTorch path is used.
``ELASTICZO_NATIVE=0`` turns the native path off; ``ELASTICZO_MARCH`` (default ``native``) sets the
target, e.g. ``x86-64-v3`` to build and measure the AVX2-only code on a newer CPU.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

import torch

log = logging.getLogger("elasticzo.int8")
SOURCE = Path(__file__).with_name("kernels") / "ezo_int8.c"
ABI_VERSION = 6
_I64, _P = ctypes.c_int64, ctypes.c_void_p


def compile_flags(machine: str | None = None) -> list[str]:
    """Flags for this CPU: its own vector unit (AVX2 intrinsics on x86-64, sdot on aarch64)."""
    machine = machine or platform.machine()
    flags = ["-O3", "-shared", "-fPIC", "-fvisibility=hidden", "-std=c11"]
    target = os.environ.get("ELASTICZO_MARCH", "native")  # e.g. x86-64-v3: AVX2 only, as an older CPU
    if machine in ("x86_64", "AMD64"):
        return flags + [f"-march={target}"]
    if machine in ("aarch64", "arm64"):
        return flags + ["-mcpu=native" if target == "native" else f"-march={target}"]
    return flags


def _cpu_flags() -> str:
    """The CPU's feature flags (the part of the cache key that -march=native depends on)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _compiler() -> str | None:
    return os.environ.get("ELASTICZO_CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def _cache_dir() -> Path:
    return Path(os.environ.get("ELASTICZO_CACHE", Path.home() / ".cache" / "elasticzo"))


def build(cc: str, flags: list[str], source: Path = SOURCE) -> Path:
    """Compile ``source`` into a library (or reuse the cached build with the same key); returns its path."""
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, check=True).stdout
    sources = [p.read_text() for p in sorted(source.parent.glob("*.c"))]  # a kernel file may include its siblings
    key = hashlib.sha256("\0".join([*sources, version, *flags, _cpu_flags()]).encode()).hexdigest()[:16]
    target = _cache_dir() / f"{source.stem}-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        res = subprocess.run([cc, *flags, str(source), "-o", str(out)], capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"{cc} failed: {res.stderr.strip()[-500:]}")
        os.replace(out, target)  # atomic: a concurrent builder never sees half a file
    return target


def _bind(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    sigs = {
        "ezo_abi_version": ([], ctypes.c_int),
        "ezo_gemm_workspace": ([_I64, _I64, _I64], _I64),
        "ezo_gemm_nt": ([_I64, _I64, _I64, _P, _I64, _P, _I64, _P, _I64, _P], None),
        "ezo_conv2d_workspace": ([_P], _I64),
        "ezo_conv2d": ([_I64, _P, _P, _P, _P, _P], None),
        "ezo_conv2d_requant": ([_I64, _P, _P, _P, _P, _P, _P, _P, _P, _P], _I64),
        "ezo_requant_bits_bytes": ([_I64, _I64], _I64),
        "ezo_conv2d_grad_weight_workspace": ([_I64, _P], _I64),
        "ezo_conv2d_grad_weight": ([_I64, _P, _P, _P, _P, _P], None),
        "ezo_requant_shift": ([_I64, _P], _I64),
        "ezo_requant": ([_I64, _P, _I64, _P], None),
        "ezo_maxpool2d": ([_I64] * 7 + [_P, _P, _P], None),
        "ezo_conv2d_grad_input_workspace": ([_P], _I64),
        "ezo_conv2d_grad_input_requant": ([_I64, _P, _P, _P, _P, _P, _P, _P, _P], _I64),
        "ezo_maxpool2d_backward": ([_I64] * 7 + [_P, _P, _P], None),
        "ezo_relu_forward": ([_I64, _P, _P, _P], None),
        "ezo_relu_backward": ([_I64, _P, _P, _P], None),
        "ezo_niti_update32": ([_I64, _P, _P, _I64, _P], None),
        "ezo_niti_update64": ([_I64, _P, _P, _I64, _P], None),
        "ezo_zo_update_carry": ([_I64, _P, _P, _I64, _I64, _P, _P], None),
        "ezo_perturb": ([_I64, _P, _P, _I64, _P], None),
        "ezo_perturb_words": ([_I64, _P, _P, _I64, _P], None),
        "ezo_zo_update_words": ([_I64, _P, _P, _I64, _I64, _P], None),
        "ezo_cross_entropy": ([_I64, _I64, _P, _I64, _P, _P, _P, _P, _P, _P], None),
    }
    for name, (args, res) in sigs.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, res
    if lib.ezo_abi_version() != ABI_VERSION:
        raise RuntimeError(f"ABI version {lib.ezo_abi_version()} != {ABI_VERSION}")
    return lib


_lib: ctypes.CDLL | None = None


@lru_cache(maxsize=None)
def load() -> ctypes.CDLL | None:
    """The native library, or None (after one log line saying why) where it cannot be used."""
    global _lib
    if os.environ.get("ELASTICZO_NATIVE", "1") == "0":
        log.info("elasticzo.int8: native kernels off (ELASTICZO_NATIVE=0); portable PyTorch path")
        return None
    cc = _compiler()
    if cc is None:
        log.warning("elasticzo.int8: no C compiler (set ELASTICZO_CC); portable PyTorch path")
        return None
    try:
        _lib = _bind(build(cc, compile_flags()))
        from elasticzo.int8 import native_ops  # registers the torch ops, then proves them exact

        native_ops.self_check()
    except Exception as err:  # noqa: BLE001 - any failure means: use the portable path
        _lib = None
        log.warning("elasticzo.int8: native kernels unusable (%s: %s); portable PyTorch path", type(err).__name__, err)
        return None
    return _lib


_enabled = True  # False while ops.set_matmul_impl("reference") asks for the portable path everywhere


def active(t: torch.Tensor) -> bool:
    """Whether the elementwise native kernels (requantise, pool, loss, ZO update) serve ``t``."""
    return _enabled and t.device.type == "cpu" and load() is not None


def lib() -> ctypes.CDLL:
    if _lib is None:
        raise RuntimeError("elasticzo native kernels are not loaded (call native.load() first)")
    return _lib


def ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


def shape_array(values) -> ctypes.Array:
    return (ctypes.c_int64 * len(values))(*[int(v) for v in values])
