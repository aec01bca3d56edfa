"""The native backward kernels of a NITI step (weight and input gradients, pool routing, ReLU mask, NITI update)
equal the portable PyTorch path bit for bit, over shapes and the extreme fills."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from elasticzo.int8 import conv, native, ops, pool
from elasticzo.int8.format import QTensor, requantize_int32
from elasticzo.int8.layers import IntReLU
from elasticzo.int8.native_ops import TORCH_OPS
from elasticzo.int8.update import niti_update

pytestmark = pytest.mark.skipif(native.load() is None, reason="native kernels do not build here (see the log line)")
FAST = settings(max_examples=40, deadline=None)
FILLS = ("random", "all+127", "all-127", "all-128", "relu", "ties")


def _fill(shape, fill: str, gen: torch.Generator) -> torch.Tensor:
    if fill == "random":
        return torch.randint(-128, 128, shape, generator=gen, dtype=torch.int8)
    if fill == "relu":  # NITI activations after ReLU: 0..127
        return torch.randint(0, 128, shape, generator=gen, dtype=torch.int8)
    if fill == "ties":  # few distinct values: many equal maxima in a window
        return torch.randint(-1, 2, shape, generator=gen, dtype=torch.int8)
    return torch.full(shape, int(fill[3:]), dtype=torch.int8)


def _portable(fn):
    """fn() with the portable PyTorch path everywhere."""
    with ops.matmul_impl("reference"):
        return fn()


@pytest.mark.parametrize("batch", [1, 64, 171])  # 171 x 784 pixels > MAX_INT32_TERMS: the int64 result
@pytest.mark.parametrize("fill", ["all+127", "all-128", "random"])
@pytest.mark.parametrize("layer", ["conv1", "conv2"])
def test_weight_gradient_on_lenet_shapes_equals_reference(batch, fill, layer):
    """LeNet-5's two weight gradients: one image per chunk (conv1) and several (conv2), the extremes."""
    gen = torch.Generator().manual_seed(batch)
    (c, h, o, pad) = (1, 28, 6, 2) if layer == "conv1" else (6, 14, 16, 0)
    x = _fill((batch, c, h, h), fill, gen)
    g = _fill((batch, o, h + 2 * pad - 4, h + 2 * pad - 4), fill, gen)
    want = conv.int8_conv2d_grad_weight(g, x, (o, c, 5, 5), 1, pad, "reference")
    got = conv.int8_conv2d_grad_weight(g, x, (o, c, 5, 5), 1, pad, "native")
    assert got.dtype == want.dtype and torch.equal(got, want)


@FAST
@given(st.integers(1, 4), st.integers(1, 4), st.integers(1, 17), st.integers(1, 5), st.integers(1, 5),
       st.integers(0, 9), st.integers(0, 12), st.integers(0, 6), st.integers(0, 6), st.sampled_from(FILLS),
       st.sampled_from(FILLS), st.integers(0, 3), st.integers(0, 2**31))
def test_input_gradient_requantised_equals_reference(b, c, o, kh, kw, eh, ew, ph, pw, fill_g, fill_w, quiet, seed):
    """The adjoint of a stride-1 conv (any padding, also wider than the kernel), requantised over the batch."""
    gen = torch.Generator().manual_seed(seed)
    shape = (b, c, max(kh + eh - 2 * ph, 1), max(kw + ew - 2 * pw, 1))
    oh, ow = shape[2] + 2 * ph - kh + 1, shape[3] + 2 * pw - kw + 1
    if oh < 1 or ow < 1:
        return
    g, w = _fill((b, o, oh, ow), fill_g, gen), _fill((o, c, kh, kw), fill_w, gen)
    g[: min(quiet, b - 1)] >>= 5  # images whose own shift is below the batch's
    want = requantize_int32(conv.int8_conv2d_grad_input(g, w, shape, 1, (ph, pw), "reference"), 0)
    values, shift = conv.int8_conv2d_grad_input_requant(g, w, shape, 1, (ph, pw), "native")
    assert torch.equal(values, want.values) and int(shift) == int(want.exponent)


@FAST
@given(st.integers(1, 3), st.integers(1, 3), st.integers(1, 3), st.integers(1, 3), st.integers(0, 2),
       st.integers(0, 2), st.integers(1, 30), st.integers(1, 30), st.sampled_from(FILLS), st.sampled_from(FILLS),
       st.integers(0, 2**31))
def test_maxpool_forward_and_backward_native_equal_portable(b, c, kh, kw, dh, dw, h, w, fill_x, fill_g, seed):
    """Disjoint windows (stride >= kernel, 2x2 / stride 2 included): the arg max, then the routed error."""
    gen = torch.Generator().manual_seed(seed)
    stride = (kh + dh, kw + dw)
    x = _fill((b, c, kh + h, kw + w), fill_x, gen)
    out, arg = _portable(lambda: pool.int8_maxpool2d(x, (kh, kw), stride))
    got_out, got_arg = pool.int8_maxpool2d(x, (kh, kw), stride)
    assert torch.equal(got_out, out) and torch.equal(got_arg, arg)
    g = _fill(out.shape, fill_g, gen)
    want = _portable(lambda: pool.int8_maxpool2d_backward(g, arg, x.shape, (kh, kw), stride))
    got = pool.int8_maxpool2d_backward(g, arg, x.shape, (kh, kw), stride)
    assert got.dtype == want.dtype == torch.int8 and torch.equal(got, want)


@FAST
@given(st.integers(1, 5000), st.sampled_from(FILLS), st.sampled_from(FILLS), st.integers(0, 2**31))
def test_relu_forward_and_backward_native_equal_portable(n, fill_x, fill_g, seed):
    gen = torch.Generator().manual_seed(seed)
    x, g = QTensor(_fill((n,), fill_x, gen), -3), QTensor(_fill((n,), fill_g, gen), -5)

    def run():
        relu = IntReLU()
        out = relu.forward(x, store=True)
        return out.values, relu.backward(g).values

    (out, back), (want_out, want_back) = run(), _portable(run)
    assert torch.equal(out, want_out) and torch.equal(back, want_back)


GRADS = st.sampled_from(["random", "int32-extremes", "small", "zeros", "int64-wide"])


def _gradient(kind: str, n: int, gen: torch.Generator) -> torch.Tensor:
    if kind == "int32-extremes":  # INT32_MIN is clamped to -INT32_MAX first, as the portable path does
        return torch.tensor([-(2**31), 2**31 - 1, -1, 0, 1], dtype=torch.int32).repeat(n)[:n]
    if kind == "small":  # bit length <= mu: s = 0, the gradient is the step itself
        return torch.randint(-3, 4, (n,), generator=gen, dtype=torch.int32)
    if kind == "zeros":
        return torch.zeros(n, dtype=torch.int32)
    if kind == "int64-wide":  # a conv weight gradient over a large batch
        return torch.randint(-(2**45), 2**45, (n,), generator=gen, dtype=torch.int64)
    return torch.randint(-(2**31) + 1, 2**31, (n,), generator=gen, dtype=torch.int32)


@FAST
@given(st.integers(1, 20000), GRADS, st.sampled_from(FILLS[:5]), st.integers(1, 8), st.integers(0, 2**31))
def test_niti_update_native_equals_portable(n, kind, fill, mu, seed):
    gen = torch.Generator().manual_seed(seed)
    w = _fill((n,), fill, gen).clamp(min=-127)
    grad = _gradient(kind, n, gen)
    want = _portable(lambda: niti_update(w, grad, mu))
    got = niti_update(w, grad, mu)
    assert got.dtype == torch.int8 and torch.equal(got, want)


def test_conv_weight_gradient_workspace_is_sized_by_the_call_not_by_ten_images():
    """A micro-batch of one image must not hold scratch for the kernel's whole chunk of images (LeNet
    conv2: 330,624 B before, for ten images), and the gradient is the same whatever the chunking."""
    shape = native.shape_array([6, 12, 12, 16, 5, 5, 1, 1, 0, 0])
    lib = native.lib()
    one, many = lib.ezo_conv2d_grad_weight_workspace(1, shape), lib.ezo_conv2d_grad_weight_workspace(64, shape)
    assert one * 5 < many
    g = torch.randint(-127, 128, (3, 16, 8, 8), dtype=torch.int8)
    x = torch.randint(0, 128, (3, 6, 12, 12), dtype=torch.int8)
    whole = _grad_weight(g, x)
    assert torch.equal(whole, sum(_grad_weight(g[b:b + 1], x[b:b + 1]) for b in range(3)))
    want = conv.int8_conv2d_grad_weight(g, x, (16, 6, 5, 5), (1, 1), (0, 0), impl="reference")
    assert torch.equal(whole, want.to(whole.dtype))


def _grad_weight(g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return TORCH_OPS.conv2d_grad_weight(g, x, [16, 6, 5, 5], [1, 1], [0, 0])
