"""Integer products equal the float64 oracle on the dequantised values EXACTLY; fast == reference."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from elasticzo.int8 import native, ops
from elasticzo.int8.format import QTensor, dequantize
from elasticzo.int8.ops import (
    MAX_INT32_TERMS,
    int8_conv2d,
    int8_conv2d_grad_input,
    int8_conv2d_grad_weight,
    int8_linear,
    int8_linear_grad_input,
    int8_linear_grad_weight,
    int8_matmul,
    int8_maxpool2d,
    int8_maxpool2d_backward,
)

HAS_INT_MM = ops._int_mm_works("cpu")
IMPLS = ["reference", "auto"] + (["int_mm"] if HAS_INT_MM else [])
FAST = settings(max_examples=25, deadline=None)


def _int8(shape, gen, lo=-127, hi=127):
    return torch.randint(lo, hi + 1, shape, generator=gen, dtype=torch.int8)


def _scaled(values: torch.Tensor, exponent: int) -> torch.Tensor:
    """The accumulator's real value: float64 is exact (|acc| < 2**53, power-of-two scale)."""
    return torch.ldexp(values.to(torch.float64), torch.tensor(exponent))


# ---------------------------------------------------------------- linear


@FAST
@given(st.integers(1, 9), st.integers(1, 40), st.integers(1, 12), st.integers(-12, 4), st.integers(-12, 4), st.integers(0, 2**31))
def test_linear_forward_and_backward_equal_float64_oracle(b, n_in, n_out, ex, ew, seed):
    gen = torch.Generator().manual_seed(seed)
    x, w, g = QTensor(_int8((b, n_in), gen), ex), QTensor(_int8((n_out, n_in), gen), ew), _int8((b, n_out), gen)
    xd, wd = dequantize(x).requires_grad_(), dequantize(w).requires_grad_()
    y = xd @ wd.t()
    y.backward(dequantize(QTensor(g, 0)))
    for impl in IMPLS:
        assert torch.equal(_scaled(int8_linear(x.values, w.values, impl), ex + ew), y.detach())
        assert torch.equal(_scaled(int8_linear_grad_input(g, w.values, impl), ew), xd.grad)
        assert torch.equal(_scaled(int8_linear_grad_weight(g, x.values, impl), ex), wd.grad)


def test_matmul_extremes_and_dtype():
    a = torch.full((5, 64), -128, dtype=torch.int8)
    b = torch.full((64, 3), -128, dtype=torch.int8)
    for impl in IMPLS:
        out = int8_matmul(a, b, impl)
        assert out.dtype == torch.int32 and bool((out == 64 * 16384).all())
    with pytest.raises(TypeError):
        int8_matmul(a.to(torch.int32), b)


def test_matmul_long_sums_widen_to_int64_instead_of_wrapping():
    k = MAX_INT32_TERMS + 1  # (-128)**2 * k = 2**31 + 2**14: one more term would wrap int32
    a = torch.full((1, k), -128, dtype=torch.int8)
    b = torch.full((k, 2), -128, dtype=torch.int8)
    for impl in IMPLS:
        out = int8_matmul(a, b, impl)
        assert out.dtype == torch.int64 and out.tolist() == [[16384 * k] * 2]


def test_chunked_sum_equals_reference(monkeypatch):
    gen = torch.Generator().manual_seed(3)
    a, b = _int8((7, 50), gen), _int8((50, 6), gen)
    exact = a.to(torch.int64) @ b.to(torch.int64)
    monkeypatch.setattr(ops, "MAX_INT32_TERMS", 8)  # force several chunks on a small case
    for impl in IMPLS:
        assert torch.equal(int8_matmul(a, b, impl), exact)


@pytest.mark.skipif(not HAS_INT_MM, reason="torch._int_mm unavailable on this build")
@FAST
@given(st.integers(0, 70), st.integers(0, 70), st.integers(0, 70), st.integers(0, 2**31))
def test_fast_path_equals_reference(m, k, n, seed):
    gen = torch.Generator().manual_seed(seed)
    a, b = _int8((m, k), gen, -128), _int8((k, n), gen, -128)
    assert torch.equal(int8_matmul(a, b, "int_mm"), int8_matmul(a, b, "reference"))
    assert torch.equal(int8_matmul(b.t(), a.t(), "int_mm"), int8_matmul(b.t(), a.t(), "reference"))


def _strided(t: torch.Tensor, kind: int) -> torch.Tensor:
    """The same matrix in another memory layout: as is, column-major, or inside a wider buffer."""
    if kind == 1:
        return t.t().contiguous().t()
    if kind == 2:
        wide = torch.zeros(t.shape[0], t.shape[1] + 3, dtype=t.dtype)
        wide[:, 1 : 1 + t.shape[1]] = t
        return wide[:, 1 : 1 + t.shape[1]]
    return t


@pytest.mark.skipif(not HAS_INT_MM, reason="torch._int_mm unavailable on this build")
@FAST
@given(st.integers(1, 4), st.integers(1, 4), st.integers(1, 4), st.integers(0, 2), st.integers(0, 2), st.booleans())
def test_fast_path_handles_any_strides(m, k, n, ka, kb, transpose):
    """Size-1 dims and transposed views give degenerate strides that raw ``_int_mm`` gets wrong."""
    gen = torch.Generator().manual_seed(m * 100 + k * 10 + n)
    a, b = _int8((m, k), gen, -128), _int8((k, n), gen, -128)
    if transpose:  # views of stored transposes: the strides are swapped
        a, b = _strided(a.t().contiguous(), ka).t(), _strided(b.t().contiguous(), kb).t()
    else:
        a, b = _strided(a, ka), _strided(b, kb)
    assert torch.equal(int8_matmul(a, b, "int_mm"), a.to(torch.int64) @ b.to(torch.int64))


def test_set_matmul_impl_validates():
    with pytest.raises(ValueError):
        ops.set_matmul_impl("cuda-magic")
    with pytest.raises(ValueError):
        int8_matmul(torch.zeros(1, 1, dtype=torch.int8), torch.zeros(1, 1, dtype=torch.int8), "nope")


def test_matmul_impl_block_restores_the_previous_choice_even_after_an_error():
    ops.set_matmul_impl("int_mm")
    try:
        with pytest.raises(RuntimeError), ops.matmul_impl("reference"):
            assert ops._default_impl == "reference" and not native._enabled
            raise RuntimeError("inside the block")
        assert ops._default_impl == "int_mm" and native._enabled
    finally:
        ops.set_matmul_impl("auto")


# ---------------------------------------------------------------- conv2d

conv_cases = st.tuples(
    st.integers(1, 3),  # batch
    st.integers(1, 4),  # in channels
    st.integers(1, 5),  # out channels
    st.integers(1, 4), st.integers(1, 4),  # kernel
    st.integers(1, 3), st.integers(1, 3),  # stride
    st.integers(0, 4), st.integers(0, 3),  # padding
    st.integers(0, 6), st.integers(0, 6),  # extra input size beyond the kernel
    st.integers(0, 2**31),
)


@FAST
@given(conv_cases)
def test_conv2d_forward_and_backward_equal_float64_oracle(case):
    b, c, o, kh, kw, sh, sw, ph, pw, eh, ew_, seed = case
    gen = torch.Generator().manual_seed(seed)
    h, w = max(kh + eh - 2 * ph, 1), max(kw + ew_ - 2 * pw, 1)
    if h + 2 * ph < kh or w + 2 * pw < kw:
        return
    x, wt = QTensor(_int8((b, c, h, w), gen), -5), QTensor(_int8((o, c, kh, kw), gen), -7)
    xd, wd = dequantize(x).requires_grad_(), dequantize(wt).requires_grad_()
    y = F.conv2d(xd, wd, stride=(sh, sw), padding=(ph, pw))
    g = _int8(y.shape, gen)
    y.backward(g.to(torch.float64))
    for impl in IMPLS:
        acc = int8_conv2d(x.values, wt.values, (sh, sw), (ph, pw), impl)
        assert acc.dtype == torch.int32 and torch.equal(_scaled(acc, -12), y.detach())
        gx = int8_conv2d_grad_input(g, wt.values, x.shape, (sh, sw), (ph, pw), impl)
        assert gx.shape == x.shape and torch.equal(_scaled(gx, -7), xd.grad)
        gw = int8_conv2d_grad_weight(g, x.values, wt.shape, (sh, sw), (ph, pw), impl)
        assert torch.equal(_scaled(gw, -5), wd.grad)


def test_conv2d_lenet_shapes_fast_equals_reference():
    gen = torch.Generator().manual_seed(0)
    for shape, wshape, pad in [((8, 1, 28, 28), (6, 1, 5, 5), 2), ((8, 6, 14, 14), (16, 6, 5, 5), 0)]:
        x, w = _int8(shape, gen, -128), _int8(wshape, gen, -128)
        ref = int8_conv2d(x, w, 1, pad, "reference")
        assert torch.equal(int8_conv2d(x, w, 1, pad, "auto"), ref)
        g = _int8(ref.shape, gen, -128)
        assert torch.equal(
            int8_conv2d_grad_input(g, w, x.shape, 1, pad, "auto"), int8_conv2d_grad_input(g, w, x.shape, 1, pad, "reference")
        )
        assert torch.equal(
            int8_conv2d_grad_weight(g, x, w.shape, 1, pad, "auto"), int8_conv2d_grad_weight(g, x, w.shape, 1, pad, "reference")
        )


# ---------------------------------------------------------------- max-pool


@FAST
@given(st.integers(1, 3), st.integers(1, 3), st.integers(1, 3), st.integers(1, 3), st.integers(0, 5), st.integers(0, 2**31))
def test_maxpool_equals_float_oracle_with_ties(k, s, c, vals, extra, seed):
    gen = torch.Generator().manual_seed(seed)
    x = _int8((2, c, k + extra, k + extra + 1), gen, -vals, vals)  # tiny value range: many ties
    out, arg = int8_maxpool2d(x, k, s)
    xd = x.to(torch.float64).requires_grad_()
    ref = F.max_pool2d(xd, k, s)
    assert torch.equal(out.to(torch.float64), ref.detach()) and arg.dtype == torch.int8
    g = _int8(ref.shape, gen)
    ref.backward(g.to(torch.float64))
    gx = int8_maxpool2d_backward(g, arg, x.shape, k, s)
    assert gx.dtype == (torch.int8 if k <= s else torch.int32)
    assert torch.equal(gx.to(torch.float64), xd.grad)  # ties route to the same (first) entry
