"""Integer products: int8 x int8 -> int32 for linear and conv2d, forward and backward.

Everything funnels into ONE dispatch function, ``int8_matmul``, with three implementations:

* ``"reference"``: portable and obviously exact: widen to int64, ``torch.matmul``, narrow.
* ``"int_mm"``: ``torch._int_mm``. On CUDA and on CPUs with AVX512-VNNI/AMX a real int8 kernel;
  on other CPUs a reference loop, slower than the float GEMM (pytorch issues 136942, 166846).
* ``"native"``: elasticzo's own C kernels (``int8.native``, CPU only), which also fold im2col
  into the convolution and fuse its requantisation.

``"auto"`` (the default) picks, per device and per kind of product (matmul, conv), the fastest
exact implementation by a one-time speed probe (``choose_impl``); on CUDA only the shapes
``_int_mm`` accepts go to it.

Conv2d is im2col + matmul. Reference: ``im2col`` by ``Tensor.unfold`` (``F.unfold`` has no
integer kernel on CPU), any stride; input gradient by matmul + ``col2im`` (strided adds).
Fast (stride 1): ``shifted_columns``, an im2col built from kh*kw contiguous slab copies, and
the input gradient as a forward convolution with the flipped kernel.

Accumulator width: a sum of K products of int8 values is bounded by K * 2**14, so it fits int32
while K <= ``MAX_INT32_TERMS``. Beyond that (e.g. a conv weight gradient over a large batch),
``int8_matmul`` sums int32 partial products over chunks of K in int64 and returns int64: still
exact, never wrapped. Callers (requantize, updates) accept either width.
"""
from __future__ import annotations

import time
from functools import lru_cache

import torch
import torch.nn.functional as F

from elasticzo.int8 import native, native_ops
from elasticzo.int8.shiftplan import planning, suspended

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


def choose_impl(device_type: str) -> dict[str, str]:
    """{"matmul": impl, "conv": impl} for ``"auto"`` on this device type (probed once, then cached)."""
    if device_type != "cpu":
        return {"matmul": "int_mm", "conv": "int_mm"}  # _int_mm_usable() still checks each shape
    from elasticzo.int8.speed_probe import probe  # the probe times this module's functions

    with suspended():  # first reached inside a micro-batched pass: the probe's requantisations are not its sites
        return probe()


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


# ---------------------------------------------------------------- conv2d via im2col


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def conv_output_size(h: int, w: int, kernel: tuple[int, int], stride, padding) -> tuple[int, int]:
    (kh, kw), (sh, sw), (ph, pw) = kernel, _pair(stride), _pair(padding)
    return (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1


def im2col(x: torch.Tensor, kernel: tuple[int, int], stride, padding) -> torch.Tensor:
    """x [B, C, H, W] -> columns [B*OH*OW, C*kh*kw], rows in (b, oh, ow) order, cols in (c, i, j).

    Works on any dtype (``F.unfold`` has no integer kernel on CPU). Copies: B*OH*OW*C*kh*kw
    int8 values, the usual im2col cost.
    """
    (kh, kw), (sh, sw), (ph, pw) = kernel, _pair(stride), _pair(padding)
    if ph or pw:
        x = F.pad(x, (pw, pw, ph, ph))  # zeros: exact for integers
    patches = x.unfold(2, kh, sh).unfold(3, kw, sw)  # [B, C, OH, OW, kh, kw] (a view)
    b, c, oh, ow = patches.shape[:4]
    return patches.permute(0, 2, 3, 1, 4, 5).reshape(b * oh * ow, c * kh * kw)


def col2im(cols: torch.Tensor, shape: torch.Size, kernel: tuple[int, int], stride, padding) -> torch.Tensor:
    """Adjoint of ``im2col``: scatter-add columns [B*OH*OW, C*kh*kw] back into [B, C, H, W].

    A loop over the kh*kw kernel offsets, each a strided add of a [B, C, OH, OW] slab: integer
    adds only (``F.fold`` has no integer kernel). Accumulates in the dtype of ``cols``.
    """
    (kh, kw), (sh, sw), (ph, pw) = kernel, _pair(stride), _pair(padding)
    b, c, h, w = shape
    oh, ow = conv_output_size(h, w, kernel, stride, padding)
    slabs = cols.reshape(b, oh, ow, c, kh, kw).permute(0, 3, 4, 5, 1, 2)  # [B, C, kh, kw, OH, OW]
    out = torch.zeros(b, c, h + 2 * ph, w + 2 * pw, dtype=cols.dtype, device=cols.device)
    for i in range(kh):
        for j in range(kw):
            out[:, :, i : i + sh * (oh - 1) + 1 : sh, j : j + sw * (ow - 1) + 1 : sw] += slabs[:, :, i, j]
    return out[:, :, ph : ph + h, pw : pw + w]


def _is_stride1(stride) -> bool:
    return _pair(stride) == (1, 1)


def _use_shifted(impl: str | None, stride) -> bool:
    """The fast conv layout: stride 1 and any implementation but the reference."""
    return (_default_impl if impl is None else impl) != "reference" and _is_stride1(stride)


def _native_conv(impl: str | None, x: torch.Tensor) -> bool:
    """Whether this convolution runs in the native kernels (CPU, chosen or probed fastest)."""
    return x.device.type == "cpu" and _resolve(impl, x.device, "conv") == "native"


def int8_conv2d_requant(x: torch.Tensor, w: torch.Tensor, stride=1, padding=0, impl: str | None = None):
    """(int8 values, 0-dim int64 shift) of ``requantize_int32(int8_conv2d(...))`` in one fused native
    call that holds one image's int32 accumulator at a time; None where the native path is not used.

    Not inside a micro-batched pass: the kernel takes the shift from the images it is given,
    there it must be the whole batch's (``int8.shiftplan``), so the unfused path runs instead."""
    if planning() or not _native_conv(impl, x):
        return None
    return native_ops.OPS.conv2d_requant(x, w, list(_pair(stride)), list(_pair(padding)))


def shifted_columns(x: torch.Tensor, kernel: tuple[int, int], padding) -> tuple[torch.Tensor, int, int]:
    """Stride-1 im2col made of contiguous copies: columns [C*kh*kw, B*OH*Wp], plus (OH, Wp).

    Flatten each padded image to one row of Hp*Wp values: the input under kernel offset (i, j)
    for every output position (oh, ow) is then the contiguous run starting at i*Wp + j, if the
    output grid is computed Wp wide instead of OW wide. The Wp - OW extra columns per row are
    garbage the callers crop (forward) or meet with zeros (backward). kh*kw slab copies instead
    of a per-element gather: about 20x faster than ``im2col`` for LeNet-5.
    """
    (kh, kw), (ph, pw) = kernel, _pair(padding)
    b, c, h, w = x.shape
    hp, wp = h + 2 * ph, w + 2 * pw
    oh, run = hp - kh + 1, (hp - kh + 1) * wp
    flat = F.pad(x, (pw, pw, ph, ph)).transpose(0, 1).reshape(c, b, hp * wp)  # [C, B, Hp*Wp]
    flat = F.pad(flat, (0, kw - 1))  # the last garbage columns read up to kw-1 past the end
    slabs = [flat[:, :, i * wp + j : i * wp + j + run] for i in range(kh) for j in range(kw)]
    return torch.stack(slabs, dim=1).reshape(c * kh * kw, b * run), oh, wp  # rows in (c, i, j)


def int8_conv2d(x: torch.Tensor, w: torch.Tensor, stride=1, padding=0, impl: str | None = None) -> torch.Tensor:
    """Cross-correlation as ``F.conv2d`` (no bias): x [B, C, H, W], w [O, C, kh, kw] -> [B, O, OH, OW].

    The result may be a non-contiguous view of the accumulator (integer values are exact either way).
    """
    if _native_conv(impl, x):
        return native_ops.OPS.conv2d(x, w, list(_pair(stride)), list(_pair(padding)))
    o, kernel = w.shape[0], tuple(w.shape[2:])
    oh, ow = conv_output_size(x.shape[2], x.shape[3], kernel, stride, padding)
    if _use_shifted(impl, stride):
        cols, oh, wp = shifted_columns(x, kernel, padding)  # [K, B*OH*Wp]
        acc = int8_matmul(w.reshape(o, -1), cols, impl)  # [O, B*OH*Wp]
        return acc.reshape(o, x.shape[0], oh, wp)[..., :ow].permute(1, 0, 2, 3)
    cols = im2col(x, kernel, stride, padding)  # [B*OH*OW, C*kh*kw]
    acc = int8_matmul(cols, w.reshape(o, -1).t(), impl)  # [B*OH*OW, O]
    return acc.reshape(x.shape[0], oh, ow, o).permute(0, 3, 1, 2)


def int8_conv2d_grad_input(
    g: torch.Tensor, w: torch.Tensor, input_shape, stride=1, padding=0, impl: str | None = None
) -> torch.Tensor:
    """dL/dx for ``int8_conv2d``: g [B, O, OH, OW], w [O, C, kh, kw] -> [B, C, H, W].

    Stride 1 (fast path): the adjoint of a convolution is the full convolution with the
    flipped, channel-transposed kernel, padding k-1-p, so the forward fast path does the work.
    Otherwise: matmul, then col2im; each input pixel sums at most O*kh*kw products (widened to
    int64 if that could overflow int32).
    """
    o, c, kh, kw = w.shape
    ph, pw = _pair(padding)
    if _use_shifted(impl, stride) and ph < kh and pw < kw:
        w_adj = w.flip(2, 3).transpose(0, 1)  # [C, O, kh, kw]
        return int8_conv2d(g, w_adj, 1, (kh - 1 - ph, kw - 1 - pw), impl)
    gm = g.permute(0, 2, 3, 1).reshape(-1, o)  # [B*OH*OW, O]
    dcols = int8_matmul(gm, w.reshape(o, -1), impl)  # [B*OH*OW, C*kh*kw]
    if o * kh * kw > MAX_INT32_TERMS:
        dcols = dcols.to(torch.int64)
    return col2im(dcols, torch.Size(input_shape), (kh, kw), stride, padding)


def int8_conv2d_grad_weight(
    g: torch.Tensor, x: torch.Tensor, weight_shape, stride=1, padding=0, impl: str | None = None
) -> torch.Tensor:
    """dL/dW for ``int8_conv2d``: g [B, O, OH, OW], x [B, C, H, W] -> [O, C, kh, kw] (K = B*OH*OW).

    The columns are recomputed from x (what layers keep), not stored.
    """
    o, kernel = weight_shape[0], tuple(weight_shape[2:])
    if _native_conv(impl, x):
        dw = native_ops.OPS.conv2d_grad_weight(g, x, list(weight_shape), list(_pair(stride)), list(_pair(padding)))
        terms = g.shape[0] * g.shape[2] * g.shape[3]
        return dw.to(torch.int32) if terms <= MAX_INT32_TERMS else dw  # the width the other paths return
    if _use_shifted(impl, stride):
        cols, oh, wp = shifted_columns(x, kernel, padding)  # [K, B*OH*Wp]
        gp = g.new_zeros(o, g.shape[0], oh, wp)  # zeros meet the garbage columns
        gp[..., : g.shape[3]] = g.transpose(0, 1)
        return int8_matmul(gp.reshape(o, -1), cols.t(), impl).reshape(weight_shape)
    cols = im2col(x, kernel, stride, padding)  # [B*OH*OW, C*kh*kw]
    gm = g.permute(1, 0, 2, 3).reshape(o, -1)  # [O, B*OH*OW]
    return int8_matmul(gm, cols, impl).reshape(weight_shape)


# ---------------------------------------------------------------- max-pool by window offsets


def _window(v: torch.Tensor, i: int, j: int, out_hw: tuple[int, int], stride: tuple[int, int]) -> torch.Tensor:
    """The entries at offset (i, j) of every pooling window: a strided view [B, C, OH, OW]."""
    (oh, ow), (sh, sw) = out_hw, stride
    return v[:, :, i : i + sh * (oh - 1) + 1 : sh, j : j + sw * (ow - 1) + 1 : sw]


def int8_maxpool2d(x: torch.Tensor, kernel, stride=None, with_argmax: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Max-pool (no padding) -> (max [B, C, OH, OW], argmax offset in the window, int8 row-major).

    A running max over the kh*kw window offsets: elementwise ops on strided views, several
    times faster than ``F.max_pool2d`` on int8 (CPU), and the window offset fits int8 where
    ``F.max_pool2d`` stores int64 flat indices (8x the memory). Ties keep the first maximum in
    row-major window order, the rule of ``F.max_pool2d``.
    """
    (kh, kw) = _pair(kernel)
    st = _pair(kernel if stride is None else stride)
    if kh * kw > 127:
        raise ValueError(f"pooling window {kh}x{kw} has more than 127 offsets")
    if native.active(x) and x.dim() == 4:
        out, arg = native_ops.OPS.maxpool2d(x, [kh, kw], list(st), with_argmax)
        return out, (arg if with_argmax else None)
    out_hw = conv_output_size(x.shape[2], x.shape[3], (kh, kw), st, 0)
    best = _window(x, 0, 0, out_hw, st)
    arg = torch.zeros(best.shape, dtype=torch.int8, device=x.device) if with_argmax else None
    for o in range(1, kh * kw):
        cand = _window(x, o // kw, o % kw, out_hw, st)
        if with_argmax:  # forward-only passes (the ZO part) skip the argmax bookkeeping
            arg = arg.masked_fill(cand > best, o)  # strict: an equal later entry does not win
        best = torch.maximum(best, cand)
    return best.contiguous(), arg


def int8_maxpool2d_backward(g: torch.Tensor, arg: torch.Tensor, input_shape, kernel, stride=None) -> torch.Tensor:
    """Route each error to its window's argmax: int8 when windows do not overlap, else int32 sums."""
    (kh, kw) = _pair(kernel)
    st = _pair(kernel if stride is None else stride)
    overlap = kh > st[0] or kw > st[1]
    out = torch.zeros(tuple(input_shape), dtype=torch.int32 if overlap else g.dtype, device=g.device)
    zero = torch.zeros((), dtype=g.dtype, device=g.device)
    for o in range(kh * kw):
        routed = torch.where(arg == o, g, zero)
        view = _window(out, o // kw, o % kw, tuple(g.shape[2:]), st)
        if overlap:
            view += routed
        else:
            view.copy_(routed)  # disjoint windows: each input receives at most one error
    return out


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
