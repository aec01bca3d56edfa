"""Integer convolutions: int8 x int8 -> int32 cross-correlation, its input and weight gradients.

Conv2d is im2col + ``ops.int8_matmul`` on the portable path. Reference: ``im2col`` by
``Tensor.unfold`` (``F.unfold`` has no integer kernel on CPU), any stride; input gradient by
matmul + ``col2im`` (strided adds). Fast (stride 1): ``shifted_columns``, an im2col built from
kh*kw contiguous slab copies, and the input gradient as a forward convolution with the flipped
kernel. Native (CPU, chosen by the speed probe): the C kernels of ``int8.native``, which fold
im2col into the product and fuse the requantisation.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from elasticzo.int8 import native_ops, ops
from elasticzo.int8.ops import MAX_INT32_TERMS, _resolve, int8_matmul
from elasticzo.int8.shiftplan import planning


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
    return (ops._default_impl if impl is None else impl) != "reference" and _is_stride1(stride)


def _native_conv(impl: str | None, x: torch.Tensor) -> bool:
    """Whether this convolution runs in the native kernels (CPU, chosen or probed fastest)."""
    return x.device.type == "cpu" and _resolve(impl, x.device, "conv") == "native"


def int8_conv2d_requant(x: torch.Tensor, w: torch.Tensor, stride=1, padding=0, impl: str | None = None,
                        bias: torch.Tensor | None = None):
    """(int8 values, 0-dim int64 shift) of ``requantize_int32(int8_conv2d(...) + bias)`` in one fused native
    call that holds one image's int32 accumulator at a time; None where the native path is not used.
    ``bias``: int32 [O], aligned and saturated as ``int8.bias.int32_bias`` makes it.

    Not inside a micro-batched pass: the kernel takes the shift from the images it is given,
    there it must be the whole batch's (``int8.shiftplan``), so the unfused path runs instead."""
    if planning() or not _native_conv(impl, x):
        return None
    return native_ops.OPS.conv2d_requant(x, w, list(_pair(stride)), list(_pair(padding)), bias)


def int8_conv2d_grad_input_requant(g: torch.Tensor, w: torch.Tensor, input_shape, stride=1, padding=0,
                                   impl: str | None = None):
    """(int8 values, 0-dim int64 shift) of ``requantize_int32(int8_conv2d_grad_input(...))`` in one native call
    (stride 1: the adjoint's runs added straight into the padded input grid, one image's int32 at a time);
    None where the native path is not used, as ``int8_conv2d_requant``."""
    o, c, kh, kw = w.shape
    if planning() or not _native_conv(impl, g) or not _is_stride1(stride) or o * kh * kw > MAX_INT32_TERMS:
        return None
    return native_ops.OPS.conv2d_grad_input_requant(g, w, list(input_shape), list(_pair(padding)))


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
    if _native_conv(impl, x) and g.shape[2] * g.shape[3] <= MAX_INT32_TERMS:  # one image's sum fits int32
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
