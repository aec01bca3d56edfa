"""Integer max-pool by window offsets: int8 in, int8 out, the argmax kept as an int8 offset."""
from __future__ import annotations

import torch

from elasticzo.int8 import native, native_ops
from elasticzo.int8.conv import _pair, conv_output_size


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
    if not overlap and native.active(g) and g.dim() == 4:
        return native_ops.OPS.maxpool2d_backward(g, arg, list(input_shape), [kh, kw], list(st))
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
