"""Integer products: int8 x int8 -> int32, the one dispatch, and the linear layer's three products.

Everything funnels into ONE dispatch function, ``int8_matmul``, with three implementations:

* ``"reference"``: portable and obviously exact: widen to int64, ``torch.matmul``, narrow.
* ``"int_mm"``: ``torch._int_mm``. On CUDA and on CPUs with AVX512-VNNI/AMX a real int8 kernel;
  on other CPUs a reference loop, slower than the float GEMM (pytorch issues 136942, 166846).
* ``"native"``: elasticzo's own C kernels (``int8.native``, CPU only), which also fold im2col
  into the convolution and fuse its requantisation.

``"auto"`` (the default) picks, per device and per kind of product (matmul, conv), the fastest
exact implementation by a one-time speed probe (``choose_impl``); on CUDA only the shapes
``_int_mm`` accepts go to it.

Convolutions (``int8.conv``) and max-pool (``int8.pool``) build on this module; their names are
still importable from here.

Accumulator width: a sum of K products of int8 values is bounded by K * 2**14, so it fits int32
while K <= ``MAX_INT32_TERMS``. Beyond that (e.g. a conv weight gradient over a large batch),
``int8_matmul`` sums int32 partial products over chunks of K in int64 and returns int64: still
exact, never wrapped. Callers (requantize, updates) accept either width.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from functools import lru_cache
from typing import Iterator

import torch

from elasticzo.int8 import native, native_ops
from elasticzo.int8.shiftplan import suspended

IMPLS = ("auto", "native", "int_mm", "reference")
_INT32_MAX = torch.iinfo(torch.int32).max
MAX_INT32_TERMS = _INT32_MAX // (128 * 128)  # 131071 products of int8 values always fit int32

_default_impl = "auto"


def set_matmul_impl(impl: str) -> None:
    """Choose the implementation used by every integer product ("auto", "int_mm", "reference")."""
    global _default_impl
    if impl not in IMPLS:
        raise ValueError(f"unknown int8 matmul impl {impl!r}; choose one of {IMPLS}")
    _default_impl = impl
    native._enabled = impl != "reference"  # "reference": the portable path for the elementwise kernels too


@contextmanager
def matmul_impl(impl: str) -> Iterator[None]:
    """Within the block every integer product uses ``impl`` (e.g. "reference" to check a native
    result against the portable path); the previous choice is restored afterwards."""
    previous = _default_impl
    set_matmul_impl(impl)
    try:
        yield
    finally:
        set_matmul_impl(previous)


# ---------------------------------------------------------------- the one dispatch function


def int8_matmul(a: torch.Tensor, b: torch.Tensor, impl: str | None = None) -> torch.Tensor:
    """Exact a @ b for int8 ``a`` [M, K] and ``b`` [K, N]: int32 [M, N] (int64 if K > MAX_INT32_TERMS)."""
    if a.dtype != torch.int8 or b.dtype != torch.int8:
        raise TypeError(f"int8_matmul expects int8 operands, got {a.dtype} and {b.dtype}")
    impl = _default_impl if impl is None else impl
    if impl not in IMPLS:
        raise ValueError(f"unknown int8 matmul impl {impl!r}; choose one of {IMPLS}")
    impl = _resolve(impl, a.device, "matmul")
    if impl == "int_mm" and not _int_mm_usable(a, b):
        impl = "reference"
    kernel = {"int_mm": _int_mm, "native": _native_mm}.get(impl, _reference_mm)
    k = a.shape[1]
    if k <= MAX_INT32_TERMS:
        return kernel(a, b)
    acc = torch.zeros(a.shape[0], b.shape[1], dtype=torch.int64, device=a.device)
    for lo in range(0, k, MAX_INT32_TERMS):  # each chunk fits int32; the total is summed in int64
        acc += kernel(a[:, lo : lo + MAX_INT32_TERMS], b[lo : lo + MAX_INT32_TERMS])
    return acc


def _resolve(impl: str | None, device: torch.device, kind: str) -> str:
    """The concrete implementation for ``impl`` (None: the default) on ``device``; "auto" asks the probe."""
    impl = _default_impl if impl is None else impl
    if impl not in IMPLS:
        raise ValueError(f"unknown int8 matmul impl {impl!r}; choose one of {IMPLS}")
    if impl == "auto":
        return choose_impl(device.type)[kind]
    if impl == "native" and (device.type != "cpu" or native.load() is None):
        return "reference" if device.type == "cpu" else "int_mm"  # native is CPU-only; said once by load()
    return impl


_probed: dict[str, str] | None = None  # the CPU probe's answer, once it ran


def choose_impl(device_type: str) -> dict[str, str]:
    """{"matmul": impl, "conv": impl} for ``"auto"`` on this device type (probed once, then cached:
    each product of a step asks, and entering ``suspended`` each time cost more than the lookup)."""
    global _probed
    if device_type != "cpu":
        return {"matmul": "int_mm", "conv": "int_mm"}  # _int_mm_usable() still checks each shape
    if _probed is None:
        from elasticzo.int8.speed_probe import probe  # the probe times this module's functions

        with suspended():  # first reached inside a micro-batched pass: the probe's requantisations are not its sites
            _probed = probe()
    return _probed


def _native_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return native_ops.OPS.gemm_nt(a, b.t())  # b^T rows are K-contiguous: free when b is a transposed weight


def _reference_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Portable path: int64 matmul cannot overflow for K <= MAX_INT32_TERMS; then narrow."""
    return torch.matmul(a.to(torch.int64), b.to(torch.int64)).to(torch.int32)


def _int_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if a.shape[0] == 0 or a.shape[1] == 0 or b.shape[1] == 0:  # empty products: nothing to call
        return torch.zeros(a.shape[0], b.shape[1], dtype=torch.int32, device=a.device)
    return torch._int_mm(_dense(a), _dense(b))


def _dense(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself if its strides are safe for ``_int_mm``, else a row-major copy.

    torch 2.13's CPU ``_int_mm`` returns wrong values for some legal strides: any operand with a
    size-1 dim whose strides are not exactly row-major (e.g. a [1, 2] view with strides (1, 1),
    the transpose of a [2, 1] tensor; ``is_contiguous()`` ignores size-1 dims, so it cannot
    tell). Safe, found by exhaustive search on small shapes and kept by a test: exactly
    row-major (C, 1), or exactly column-major (1, R) when both dims exceed 1.
    """
    rows, cols = t.shape
    safe = t.stride() == (cols, 1) or (rows > 1 and cols > 1 and t.stride() == (1, rows))
    return t if safe else t.clone(memory_format=torch.contiguous_format)


def _int_mm_usable(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``torch._int_mm`` exists, works on this device, and accepts these shapes."""
    if not _int_mm_works(a.device.type):
        return False
    if a.device.type == "cuda":  # cuBLASLt int8 GEMM: M > 16, K and N multiples of 8
        m, k = a.shape
        return m > 16 and k % 8 == 0 and b.shape[1] % 8 == 0 and k > 0
    return True


@lru_cache(maxsize=None)
def _int_mm_works(device_type: str) -> bool:
    """Probe once per device type: present, runs, and equals the reference on a small case."""
    if not hasattr(torch, "_int_mm"):
        return False
    try:
        gen = torch.Generator().manual_seed(0)
        a = torch.randint(-127, 128, (32, 24), generator=gen, dtype=torch.int8).to(device_type)
        b = torch.randint(-127, 128, (24, 16), generator=gen, dtype=torch.int8).to(device_type)
        return bool(torch.equal(torch._int_mm(a, b), _reference_mm(a, b)))
    except (RuntimeError, NotImplementedError):
        return False


# ---------------------------------------------------------------- linear: y = x @ W^T


def int8_linear(x: torch.Tensor, w: torch.Tensor, impl: str | None = None) -> torch.Tensor:
    """x [B, in] int8, w [out, in] int8 -> x @ w^T [B, out], integer accumulator."""
    return int8_matmul(x, w.t(), impl)


def int8_linear_grad_input(g: torch.Tensor, w: torch.Tensor, impl: str | None = None) -> torch.Tensor:
    """dL/dx = g @ w: g [B, out], w [out, in] -> [B, in]."""
    return int8_matmul(g, w, impl)


def int8_linear_grad_weight(g: torch.Tensor, x: torch.Tensor, impl: str | None = None) -> torch.Tensor:
    """dL/dW = g^T @ x: g [B, out], x [B, in] -> [out, in] (K = B terms)."""
    return int8_matmul(g.t(), x, impl)


_MOVED = {"conv": ("conv_output_size", "im2col", "col2im", "shifted_columns", "int8_conv2d", "int8_conv2d_requant",
                   "int8_conv2d_grad_input", "int8_conv2d_grad_weight", "_pair", "_is_stride1"),
          "pool": ("int8_maxpool2d", "int8_maxpool2d_backward")}


def __getattr__(name: str):
    """``from elasticzo.int8.ops import int8_conv2d`` keeps working: the name lives in int8.conv / int8.pool."""
    for module, names in _MOVED.items():
        if name in names:
            import importlib

            return getattr(importlib.import_module(f"elasticzo.int8.{module}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---------------------------------------------------------------- measuring the two paths


def bench_int8_matmul(shapes=((64, 400, 120), (50176, 25, 6)), repeats: int = 20) -> dict[str, float]:
    """Milliseconds per call of each implementation on int8 [M, K] @ [K, N] (CPU)."""
    gen = torch.Generator().manual_seed(0)
    out: dict[str, float] = {}
    for m, k, n in shapes:
        a = torch.randint(-127, 128, (m, k), generator=gen, dtype=torch.int8)
        b = torch.randint(-127, 128, (k, n), generator=gen, dtype=torch.int8)
        for impl in ("reference", "int_mm", "native"):
            int8_matmul(a, b, impl)
            t0 = time.perf_counter()
            for _ in range(repeats):
                int8_matmul(a, b, impl)
            out[f"{impl} {m}x{k}x{n}"] = (time.perf_counter() - t0) / repeats * 1e3
    return out
