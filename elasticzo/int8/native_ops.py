"""The native kernels as torch ops (``torch.ops.elasticzo_int8.*``, CPU), and their exactness probe.

Each op checks its operands, allocates its output and workspace as torch tensors (so memory
measurements see them) and calls the C function of ``native`` on the data pointers. The ops are
only reached through ``int8.ops`` / ``int8.format`` after ``native.load()`` succeeded, as
``OPS.name``: that runs the Python implementation directly unless a ``TorchDispatchMode`` (the
integer-only audit, the memory tracker) or ``torch.compile`` is watching, which then see the
registered op as before. The dispatcher's round trip costs a few microseconds a call, and an INT8
ZO step at batch 64 makes 37 native-op calls; the results are the same function's either way.
"""
from __future__ import annotations

import torch

from elasticzo.int8 import native

NAMESPACE = "elasticzo_int8"
_LIBRARY = torch.library.Library(NAMESPACE, "DEF")


_IMPLS: dict = {}


def _register(schema: str, fn) -> None:
    name = schema.split("(")[0]
    _LIBRARY.define(schema)
    _LIBRARY.impl(name, fn, "CPU")
    _IMPLS[name] = fn


def _cpu(*tensors: torch.Tensor) -> None:
    """Raise unless every operand is on the CPU (the dispatcher no longer says so when called directly)."""
    for t in tensors:
        if not t.is_cpu:
            raise TypeError(f"native int8 kernels take CPU tensors, got one on {t.device}")


def _need(t: torch.Tensor, dtype: torch.dtype, dims: int, name: str) -> torch.Tensor:
    if t.dtype != dtype or t.dim() != dims or not t.is_cpu:
        raise TypeError(f"{name} must be a {dims}-d {dtype} CPU tensor, got {t.dim()}-d {t.dtype} on {t.device}")
    return t.contiguous()


def _workspace(nbytes: int) -> torch.Tensor:
    return torch.empty(max(int(nbytes), 1), dtype=torch.uint8)


def _conv_shape(x: torch.Tensor, w: torch.Tensor, stride, padding):
    """The C shape array {C, H, W, O, kh, kw, sh, sw, ph, pw} and the output size (OH, OW)."""
    _, c, h, wd = x.shape
    o, cw, kh, kw = w.shape
    if cw != c:
        raise ValueError(f"conv weight has {cw} input channels, input has {c}")
    (sh, sw), (ph, pw) = stride, padding
    oh, ow = (h + 2 * ph - kh) // sh + 1, (wd + 2 * pw - kw) // sw + 1
    if oh <= 0 or ow <= 0:
        raise ValueError(f"conv output would be {oh}x{ow} for input {h}x{wd}, kernel {kh}x{kw}, padding {padding}")
    return native.shape_array([c, h, wd, o, kh, kw, sh, sw, ph, pw]), oh, ow


def _gemm_nt(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [M, K] int8, b [N, K] int8 -> a @ b^T [M, N] int32 (K <= MAX_INT32_TERMS: the caller's rule)."""
    a, b = _need(a, torch.int8, 2, "a"), _need(b, torch.int8, 2, "b")
    (m, k), n = a.shape, b.shape[0]
    if b.shape[1] != k:
        raise ValueError(f"gemm_nt: a is {tuple(a.shape)}, b is {tuple(b.shape)}; inner sizes differ")
    out = torch.empty(m, n, dtype=torch.int32)
    lib = native.lib()
    work = _workspace(lib.ezo_gemm_workspace(m, n, k))
    p = native.ptr
    lib.ezo_gemm_nt(m, n, k, p(a), k, p(b), k, p(out), n, p(work))
    return out


def _conv2d(x: torch.Tensor, w: torch.Tensor, stride: list[int], padding: list[int]) -> torch.Tensor:
    """int32 [B, O, OH, OW] cross-correlation (as ``F.conv2d``, no bias)."""
    x, w = _need(x, torch.int8, 4, "x"), _need(w, torch.int8, 4, "w")
    shape, oh, ow = _conv_shape(x, w, stride, padding)
    out = torch.empty(x.shape[0], w.shape[0], oh, ow, dtype=torch.int32)
    lib = native.lib()
    work, p = _workspace(lib.ezo_conv2d_workspace(shape)), native.ptr
    lib.ezo_conv2d(x.shape[0], shape, p(x), p(w), p(out), p(work))
    return out


def _conv2d_requant(x: torch.Tensor, w: torch.Tensor, stride: list[int], padding: list[int],
                    bias: torch.Tensor | None = None):
    """(int8 [B, O, OH, OW], int64 shift): the conv requantised, one image's int32 accumulator at a time.

    ``bias``: optional int32 [O] added to the accumulator before the requantisation, already aligned
    and clamped to the accumulator's room by the caller (``int8.bias.int32_bias``)."""
    x, w = _need(x, torch.int8, 4, "x"), _need(w, torch.int8, 4, "w")
    if bias is not None:
        bias = _need(bias, torch.int32, 1, "bias")
        if bias.shape[0] != w.shape[0]:
            raise ValueError(f"conv bias has {bias.shape[0]} entries, weight has {w.shape[0]} output channels")
    shape, oh, ow = _conv_shape(x, w, stride, padding)
    out = torch.empty(x.shape[0], w.shape[0], oh, ow, dtype=torch.int8)
    n, lib = w.shape[0] * oh * ow, native.lib()
    scratch = torch.empty(n, dtype=torch.int32)  # one image's accumulator
    bits = _workspace(lib.ezo_requant_bits_bytes(x.shape[0], n))  # one rounding bit per output
    shifts = torch.empty(x.shape[0], dtype=torch.int64)
    work, p = _workspace(lib.ezo_conv2d_workspace(shape)), native.ptr
    b = None if bias is None else p(bias)
    s = lib.ezo_conv2d_requant(x.shape[0], shape, p(x), p(w), b, p(out), p(scratch), p(bits), p(shifts), p(work))
    return out, torch.scalar_tensor(s, dtype=torch.int64)


def _conv2d_grad_weight(g: torch.Tensor, x: torch.Tensor, weight_shape: list[int], stride: list[int],
                        padding: list[int]) -> torch.Tensor:
    """int64 [O, C, kh, kw]: the sum over images and pixels of g (x) patches, int32 per chunk of pixels.

    The caller keeps one image's OH*OW <= MAX_INT32_TERMS (a chunk never splits an image)."""
    g, x = _need(g, torch.int8, 4, "g"), _need(x, torch.int8, 4, "x")
    w = torch.empty(weight_shape, dtype=torch.int8)  # only its shape is read
    shape, oh, ow = _conv_shape(x, w, stride, padding)
    if tuple(g.shape) != (x.shape[0], weight_shape[0], oh, ow):
        raise ValueError(f"conv grad: g is {tuple(g.shape)}, expected {(x.shape[0], weight_shape[0], oh, ow)}")
    dw = torch.empty(weight_shape, dtype=torch.int64)
    lib = native.lib()
    work, p = _workspace(lib.ezo_conv2d_grad_weight_workspace(x.shape[0], shape)), native.ptr
    lib.ezo_conv2d_grad_weight(x.shape[0], shape, p(g), p(x), p(dw), p(work))
    return dw


def _conv2d_grad_input_requant(g: torch.Tensor, w: torch.Tensor, input_shape: list[int], padding: list[int]):
    """(int8 [B, C, H, W], int64 shift): dL/dx of a stride-1 conv requantised, one image's int32 dX at a time."""
    g, w = _need(g, torch.int8, 4, "g"), _need(w, torch.int8, 4, "w")
    x = torch.empty(0, *input_shape[1:], dtype=torch.int8)  # only its shape is read
    shape, oh, ow = _conv_shape(x, w, [1, 1], padding)
    if tuple(g.shape) != (input_shape[0], w.shape[0], oh, ow):
        raise ValueError(f"conv input grad: g is {tuple(g.shape)}, expected {(input_shape[0], w.shape[0], oh, ow)}")
    out = torch.empty(input_shape, dtype=torch.int8)
    n, lib = out[0].numel(), native.lib()
    scratch = torch.empty(n, dtype=torch.int32)  # one image's dX
    bits = _workspace(lib.ezo_requant_bits_bytes(g.shape[0], n))
    shifts = torch.empty(g.shape[0], dtype=torch.int64)
    work, p = _workspace(lib.ezo_conv2d_grad_input_workspace(shape)), native.ptr
    s = lib.ezo_conv2d_grad_input_requant(g.shape[0], shape, p(g), p(w), p(out), p(scratch), p(bits), p(shifts), p(work))
    return out, torch.scalar_tensor(s, dtype=torch.int64)


def _requantize(acc: torch.Tensor):
    """(int8 values, int64 shift) of an int32 accumulator: ``format.requantize_int32`` in one pass each."""
    if acc.dtype != torch.int32 or acc.device.type != "cpu":
        raise TypeError(f"requantize expects an int32 CPU tensor, got {acc.dtype} on {acc.device}")
    acc = acc.contiguous()
    lib, p = native.lib(), native.ptr
    s = lib.ezo_requant_shift(acc.numel(), p(acc))
    out = torch.empty_like(acc, dtype=torch.int8)  # contiguous, as acc
    lib.ezo_requant(acc.numel(), p(acc), s, p(out))
    return out, torch.scalar_tensor(s, dtype=torch.int64)


def _requant_shift(acc: torch.Tensor) -> torch.Tensor:
    """0-dim int64 max(bitlength(max|acc|) - 7, 0): the shift ``_requantize`` would take."""
    acc = _need(acc, torch.int32, acc.dim(), "acc")
    return torch.scalar_tensor(native.lib().ezo_requant_shift(acc.numel(), native.ptr(acc)), dtype=torch.int64)


def _requantize_at(acc: torch.Tensor, s: int) -> torch.Tensor:
    """int8 saturate(round_half_up(acc / 2**s)) with a given shift 0 <= s < 31 (a micro-batch's plan)."""
    acc = _need(acc, torch.int32, acc.dim(), "acc")
    if not 0 <= s < 31:
        raise ValueError(f"requantize_at: shift s={s} must be in 0..30")
    out = torch.empty_like(acc, dtype=torch.int8)
    native.lib().ezo_requant(acc.numel(), native.ptr(acc), s, native.ptr(out))
    return out


def _maxpool2d(x: torch.Tensor, kernel: list[int], stride: list[int], with_argmax: bool):
    """(max [B, C, OH, OW], first-argmax offset int8 or an empty tensor), no padding."""
    x = _need(x, torch.int8, 4, "x")
    (b, c, h, w), (kh, kw), (sh, sw) = x.shape, kernel, stride
    oh, ow = (h - kh) // sh + 1, (w - kw) // sw + 1
    out = torch.empty(b, c, oh, ow, dtype=torch.int8)
    arg = torch.empty(b, c, oh, ow, dtype=torch.int8) if with_argmax else torch.empty(0, dtype=torch.int8)
    p = native.ptr
    native.lib().ezo_maxpool2d(b * c, h, w, kh, kw, sh, sw, p(x), p(out), p(arg) if with_argmax else None)
    return out, arg


def _maxpool2d_backward(g: torch.Tensor, arg: torch.Tensor, input_shape: list[int], kernel: list[int],
                        stride: list[int]) -> torch.Tensor:
    """int8 [B, C, H, W]: each error at its window's arg max, zeros elsewhere (windows must not overlap)."""
    g, arg = _need(g, torch.int8, 4, "g"), _need(arg, torch.int8, 4, "arg")
    (b, c, h, w), (kh, kw), (sh, sw) = input_shape, kernel, stride
    if kh > sh or kw > sw or g.shape != arg.shape or tuple(g.shape) != (b, c, (h - kh) // sh + 1, (w - kw) // sw + 1):
        raise ValueError(f"maxpool2d_backward: g {tuple(g.shape)}, arg {tuple(arg.shape)} do not fit input "
                         f"{tuple(input_shape)} with disjoint windows {kernel} stride {stride}")
    out, p = torch.empty(input_shape, dtype=torch.int8), native.ptr
    native.lib().ezo_maxpool2d_backward(b * c, h, w, kh, kw, sh, sw, p(g), p(arg), p(out))
    return out


def _relu_forward(x: torch.Tensor):
    """(max(x, 0), x > 0) of an int8 tensor in one pass: the values and the mask the backward keeps."""
    if x.dtype != torch.int8:
        raise TypeError(f"relu_forward expects int8, got {x.dtype}")
    _cpu(x)
    x = x.contiguous()
    out, mask, p = torch.empty_like(x), torch.empty_like(x, dtype=torch.bool), native.ptr
    native.lib().ezo_relu_forward(x.numel(), p(x), p(out), p(mask))
    return out, mask


def _relu_backward(g: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """mask ? g : 0 for an int8 error and the bool mask of the forward (x > 0)."""
    if g.dtype != torch.int8 or mask.dtype != torch.bool or g.shape != mask.shape:
        raise TypeError(f"relu_backward: int8 g and bool mask of one shape, got {g.dtype} {tuple(g.shape)}, "
                        f"{mask.dtype} {tuple(mask.shape)}")
    _cpu(g, mask)
    g, mask = g.contiguous(), mask.contiguous()
    out, p = torch.empty_like(g), native.ptr
    native.lib().ezo_relu_backward(g.numel(), p(g), p(mask), p(out))
    return out


def _niti_update(w: torch.Tensor, grad: torch.Tensor, mu: int) -> torch.Tensor:
    """sat(W - round_ps(grad / 2**s)), s = max(bitlength(grad) - mu, 0): ``update.niti_update`` in two passes."""
    if w.dtype != torch.int8 or grad.dtype not in (torch.int32, torch.int64) or w.numel() != grad.numel():
        raise TypeError(f"niti_update: int8 weight and an int32/int64 gradient of as many entries, got "
                        f"{w.dtype} {tuple(w.shape)}, {grad.dtype} {tuple(grad.shape)}")
    _cpu(w, grad)
    w, grad = w.contiguous(), grad.contiguous()
    out, p, lib = torch.empty_like(w), native.ptr, native.lib()
    update = lib.ezo_niti_update32 if grad.dtype == torch.int32 else lib.ezo_niti_update64
    update(w.numel(), p(w), p(grad), mu, p(out))
    return out


def _zo_update_carry(w: torch.Tensor, z: torch.Tensor, d: int, s: int, carry: torch.Tensor) -> torch.Tensor:
    """sat(W - whole units of carry + d z / 2**(s - 8)); the fraction stays in ``carry`` (written in place)."""
    if not (carry.dtype == torch.uint8 and carry.is_contiguous() and carry.numel() == w.numel() == z.numel()):
        raise ValueError(f"zo_update: carry must be a contiguous uint8 tensor of {w.numel()} entries")
    _cpu(w, z, carry)
    w, z = w.contiguous(), z.contiguous()
    out, p = torch.empty_like(w), native.ptr
    native.lib().ezo_zo_update_carry(w.numel(), p(w), p(z), d, s, p(carry), p(out))
    return out


def _words(words: torch.Tensor, n: int) -> torch.Tensor:
    if words.dtype != torch.int32 or words.numel() * 32 < n or not words.is_cpu:
        raise ValueError(f"need {(n + 31) // 32} int32 random words on the CPU for {n} weights, got "
                         f"{words.numel()} {words.dtype} on {words.device}")
    return words.contiguous()


def _perturb_words(w: torch.Tensor, words: torch.Tensor, eps: int, out: torch.Tensor) -> None:
    """out = sat(W + eps z), z the Rademacher signs of ``words`` (zo.noise.random_bits' order); out contiguous."""
    if not (w.is_contiguous() and out.is_contiguous() and out.dtype == w.dtype == torch.int8 and out.numel() == w.numel()):
        raise ValueError("perturb_words: w and out must be contiguous int8 tensors of one size")
    _cpu(w, out)
    words, p = _words(words, w.numel()), native.ptr
    native.lib().ezo_perturb_words(w.numel(), p(w), p(words), eps, p(out))


def _zo_update_words(w: torch.Tensor, words: torch.Tensor, d: int, s: int, carry: torch.Tensor) -> None:
    """W and carry updated in place by the carried ZO step, z the Rademacher signs of ``words``."""
    if not (w.is_contiguous() and carry.is_contiguous() and w.dtype == torch.int8 and carry.dtype == torch.uint8
            and carry.numel() == w.numel()):
        raise ValueError("zo_update_words: w (int8) and carry (uint8) must be contiguous and of one size")
    _cpu(w, carry)
    words, p = _words(words, w.numel()), native.ptr
    native.lib().ezo_zo_update_words(w.numel(), p(w), p(words), d, s, p(carry))


def _perturb(w: torch.Tensor, z: torch.Tensor, eps: int) -> torch.Tensor:
    _cpu(w, z)
    w, z = w.contiguous(), z.contiguous()
    out, p = torch.empty_like(w), native.ptr
    native.lib().ezo_perturb(w.numel(), p(w), p(z), eps, p(out))
    return out


def _cross_entropy(q: torch.Tensor, exponent: int, target: torch.Tensor, pow_hi: torch.Tensor, pow_lo: torch.Tensor,
                   log_frac: torch.Tensor, with_grad: bool):
    """(loss per example int64 [B], int8 error [B, C] or an empty tensor), as ``loss.cross_entropy``."""
    _cpu(target, pow_hi, pow_lo, log_frac)
    q, target = _need(q, torch.int8, 2, "logits"), target.to(torch.int64).contiguous()
    b, c = q.shape
    loss = torch.empty(b, dtype=torch.int64)
    grad = torch.empty(b, c, dtype=torch.int8) if with_grad else torch.empty(0, dtype=torch.int8)
    p = native.ptr
    native.lib().ezo_cross_entropy(b, c, p(q), exponent, p(target), p(pow_hi), p(pow_lo), p(log_frac), p(loss),
                                   p(grad) if with_grad else None)
    return loss, grad


_register("gemm_nt(Tensor a, Tensor b) -> Tensor", _gemm_nt)
_register("conv2d(Tensor x, Tensor w, int[] stride, int[] padding) -> Tensor", _conv2d)
_register("conv2d_requant(Tensor x, Tensor w, int[] stride, int[] padding, Tensor? bias=None) -> (Tensor, Tensor)",
          _conv2d_requant)
_register("conv2d_grad_weight(Tensor g, Tensor x, int[] weight_shape, int[] stride, int[] padding) -> Tensor",
          _conv2d_grad_weight)
_register("conv2d_grad_input_requant(Tensor g, Tensor w, int[] input_shape, int[] padding) -> (Tensor, Tensor)",
          _conv2d_grad_input_requant)
_register("requantize(Tensor acc) -> (Tensor, Tensor)", _requantize)
_register("requant_shift(Tensor acc) -> Tensor", _requant_shift)
_register("requantize_at(Tensor acc, int s) -> Tensor", _requantize_at)
_register("maxpool2d(Tensor x, int[] kernel, int[] stride, bool with_argmax) -> (Tensor, Tensor)", _maxpool2d)
_register("maxpool2d_backward(Tensor g, Tensor arg, int[] input_shape, int[] kernel, int[] stride) -> Tensor",
          _maxpool2d_backward)
_register("relu_forward(Tensor x) -> (Tensor, Tensor)", _relu_forward)
_register("relu_backward(Tensor g, Tensor mask) -> Tensor", _relu_backward)
_register("niti_update(Tensor w, Tensor grad, int mu) -> Tensor", _niti_update)
_register("zo_update_carry(Tensor w, Tensor z, int d, int s, Tensor(a!) carry) -> Tensor", _zo_update_carry)
_register("perturb(Tensor w, Tensor z, int eps) -> Tensor", _perturb)
_register("perturb_words(Tensor w, Tensor words, int eps, Tensor(a!) out) -> ()", _perturb_words)
_register("zo_update_words(Tensor(a!) w, Tensor words, int d, int s, Tensor(b!) carry) -> ()", _zo_update_words)
_register("cross_entropy(Tensor q, int exponent, Tensor target, Tensor pow_hi, Tensor pow_lo, Tensor log_frac, "
          "bool with_grad) -> (Tensor, Tensor)", _cross_entropy)


def _watched() -> bool:
    """Whether a dispatch mode or torch.compile must see the op (then it goes through the dispatcher)."""
    return torch._C._len_torch_dispatch_stack() > 0 or torch.compiler.is_compiling()


def _direct(op, impl):
    def call(*args, **kwargs):
        return op(*args, **kwargs) if _watched() else impl(*args, **kwargs)

    call.__name__ = call.__qualname__ = impl.__name__.lstrip("_")
    call.__doc__ = impl.__doc__
    return call


class _Ops:
    """``OPS.name(...)``: the op ``name``, without the dispatcher's round trip when nothing watches."""

    def __init__(self, registered):
        for name, impl in _IMPLS.items():
            setattr(self, name, _direct(getattr(registered, name), impl))


TORCH_OPS = getattr(torch.ops, NAMESPACE)  # the registered ops, always through the dispatcher
OPS = _Ops(TORCH_OPS)


def self_check() -> None:
    """Raise unless every op equals a widened int64 computation on random and extreme operands."""
    from elasticzo.int8 import conv  # the portable reference; imported here, conv imports this module
    gen = torch.Generator().manual_seed(0)
    for lo, hi in ((-128, 128), (127, 128), (-128, -127)):  # random, all +127, all -128
        a = torch.randint(lo, hi, (37, 53), generator=gen, dtype=torch.int8)
        b = torch.randint(lo, hi, (21, 53), generator=gen, dtype=torch.int8)
        want = (a.long() @ b.long().t()).int()
        if not torch.equal(OPS.gemm_nt(a, b), want):
            raise RuntimeError(f"gemm_nt differs from int64 matmul on values in [{lo}, {hi})")
        x = torch.randint(lo, hi, (3, 2, 9, 11), generator=gen, dtype=torch.int8)
        w = torch.randint(lo, hi, (5, 2, 3, 4), generator=gen, dtype=torch.int8)
        want = conv.int8_conv2d(x, w, (2, 1), (1, 2), "reference")  # integers only: this may run inside an audit
        if not torch.equal(OPS.conv2d(x, w, [2, 1], [1, 2]), want):
            raise RuntimeError(f"conv2d differs from the reference conv2d on values in [{lo}, {hi})")
