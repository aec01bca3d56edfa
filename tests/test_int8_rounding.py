"""Rounding primitives and the number format against exact Python-integer arithmetic."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from elasticzo.int8.format import QTensor, dequantize, quantize, requantize_int32
from elasticzo.int8.rounding import (
    bitlength,
    saturate_int8,
    shift_round_nearest,
    shift_round_pseudo_stochastic,
    shift_round_stochastic,
)

I32 = torch.iinfo(torch.int32)
I64 = torch.iinfo(torch.int64)
int32s = st.lists(st.integers(I32.min, I32.max), min_size=1, max_size=40)
int64s = st.lists(st.integers(-(2**62), 2**62), min_size=1, max_size=40)
FAST = settings(max_examples=60, deadline=None)


def _nearest_py(x: int, s: int) -> int:
    """round(x / 2**s), ties toward +inf, in exact integers (Python >> floors)."""
    return x if s == 0 else (x + (1 << (s - 1))) >> s


def _pseudo_py(x: int, s: int) -> int:
    """NITI's rule on the magnitude, written independently with divmod."""
    mag = abs(x)
    q, low = divmod(mag, 1 << s)
    prob, rand = divmod(low, 1 << (s // 2))
    rand <<= s % 2
    mag = q + (1 if prob > rand else 0)
    return -mag if x < 0 else mag


# ---------------------------------------------------------------- round to nearest


@FAST
@given(int32s, st.integers(0, 31))
def test_nearest_int32_equals_exact(xs, s):
    x = torch.tensor(xs, dtype=torch.int32)
    out = shift_round_nearest(x, s)
    assert out.dtype == torch.int32
    assert out.tolist() == [_nearest_py(v, s) for v in xs]


@FAST
@given(int64s, st.integers(0, 62))
def test_nearest_int64_equals_exact_and_tensor_shift_agrees(xs, s):
    x = torch.tensor(xs, dtype=torch.int64)
    out = shift_round_nearest(x, s)
    assert out.tolist() == [_nearest_py(v, s) for v in xs]
    assert torch.equal(out, shift_round_nearest(x, torch.tensor(s)))


def test_nearest_elementwise_shift_and_extremes():
    x = torch.tensor([I32.min, I32.max, -1, 1, 3, -3], dtype=torch.int32)
    s = torch.tensor([1, 1, 1, 1, 0, 2])
    assert shift_round_nearest(x, s).tolist() == [_nearest_py(v, k) for v, k in zip(x.tolist(), s.tolist())]


def test_rounding_rejects_floats_and_bad_shifts():
    with pytest.raises(TypeError):
        shift_round_nearest(torch.ones(3), 1)
    with pytest.raises(ValueError):
        shift_round_nearest(torch.ones(3, dtype=torch.int32), 63)


# ---------------------------------------------------------------- stochastic


@settings(max_examples=15, deadline=None)
@given(st.integers(-(2**40), 2**40), st.integers(1, 20), st.integers(0, 2**31))
def test_stochastic_is_unbiased(x, s, seed):
    n = 20_000
    gen = torch.Generator().manual_seed(seed)
    out = shift_round_stochastic(torch.full((n,), x, dtype=torch.int64), s, gen)
    lo = x >> s
    assert set(out.unique().tolist()) <= {lo, lo + 1}  # floor or floor + 1, never anything else
    frac = (x - (lo << s)) / 2**s  # P(round up); the mean is lo + frac = x / 2**s exactly
    mean_excess = (out - lo).double().mean().item()
    assert abs(mean_excess - frac) <= 6 * 0.5 / math.sqrt(n)  # 6 sigma of a Bernoulli mean


def test_stochastic_exact_multiples_and_seeds():
    x = torch.arange(-64, 64, 4, dtype=torch.int32)
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(shift_round_stochastic(x, 2, gen), x >> 2)  # nothing discarded: no randomness
    y = torch.randint(-(2**30), 2**30, (1000,), dtype=torch.int32, generator=gen)
    a = shift_round_stochastic(y, 7, torch.Generator().manual_seed(5))
    b = shift_round_stochastic(y, torch.tensor(7), torch.Generator().manual_seed(5))
    assert a.dtype == torch.int32 and torch.equal(a, b)  # same seed -> identical
    state = torch.random.get_rng_state()
    shift_round_stochastic(y, 7, torch.Generator().manual_seed(5))
    assert torch.equal(state, torch.random.get_rng_state())  # the global RNG is untouched


# ---------------------------------------------------------------- pseudo-stochastic


@FAST
@given(int32s, st.integers(0, 31))
def test_pseudo_stochastic_matches_rule_and_is_symmetric(xs, s):
    xs = [max(v, -I32.max) for v in xs]  # INT32_MIN is documented to clamp
    x = torch.tensor(xs, dtype=torch.int32)
    out = shift_round_pseudo_stochastic(x, s)
    assert out.dtype == torch.int32
    assert out.tolist() == [_pseudo_py(v, s) for v in xs]
    assert torch.equal(shift_round_pseudo_stochastic(-x, s), -out)  # f(-x) == -f(x)
    trunc = torch.tensor([int(v / 2**s) if abs(v) < 2**52 else (abs(v) >> s) * (1 if v >= 0 else -1) for v in xs])
    step = out.to(torch.int64) - trunc
    assert bool(((step == 0) | (step == torch.sign(x.to(torch.int64)))).all())  # toward zero, or one away


def test_pseudo_stochastic_int64_and_int32_min():
    x = torch.tensor([-(2**61) - 12345, 2**61 + 999], dtype=torch.int64)
    assert shift_round_pseudo_stochastic(x, 33).tolist() == [_pseudo_py(v, 33) for v in x.tolist()]
    out = shift_round_pseudo_stochastic(torch.tensor([I32.min], dtype=torch.int32), 4)
    assert out.tolist() == [_pseudo_py(-I32.max, 4)]


# ---------------------------------------------------------------- saturation, bit length


@FAST
@given(st.lists(st.integers(I64.min, I64.max), min_size=1, max_size=40))
def test_saturate_never_wraps_int64(xs):
    out = saturate_int8(torch.tensor(xs, dtype=torch.int64))
    assert out.dtype == torch.int8
    assert out.tolist() == [max(-127, min(127, v)) for v in xs]


def test_saturate_int32_far_out_of_range():
    x = torch.tensor([I32.min, -129, -128, -127, 0, 127, 128, 255, 256, I32.max], dtype=torch.int32)
    assert saturate_int8(x).tolist() == [-127, -127, -127, -127, 0, 127, 127, 127, 127, 127]


@FAST
@given(st.lists(st.integers(I32.min, I32.max), min_size=1, max_size=40))
def test_bitlength_equals_python(xs):
    assert bitlength(torch.tensor(xs, dtype=torch.int32)).item() == max(abs(v) for v in xs).bit_length()


def test_bitlength_edge_cases():
    assert bitlength(torch.zeros(5, dtype=torch.int32)).item() == 0
    assert bitlength(torch.zeros(0, dtype=torch.int32)).item() == 0
    assert bitlength(torch.tensor([-128], dtype=torch.int8)).item() == 8


# ---------------------------------------------------------------- format


@FAST
@given(int32s, st.integers(-20, 20))
def test_requantize_never_overflows_and_rounds(xs, e):
    acc = torch.tensor(xs, dtype=torch.int32)
    q = requantize_int32(acc, e)
    s = max(max(abs(v) for v in xs).bit_length() - 7, 0)
    assert q.values.dtype == torch.int8 and int(q.exponent) == e + s
    assert q.values.abs().max().item() <= 127
    expected = [max(-127, min(127, _nearest_py(v, s))) for v in xs]
    assert q.values.tolist() == expected  # round to nearest, saturated only at +-127.5


def test_requantize_int64_accumulator():
    acc = torch.tensor([2**40 + 3, -(2**40)], dtype=torch.int64)
    q = requantize_int32(acc, torch.tensor(-3))
    assert q.values.tolist() == [64, -64] and int(q.exponent) == -3 + 41 - 7  # 2**40 has 41 bits


@FAST
@given(st.lists(st.floats(-1e6, 1e6, allow_nan=False, allow_subnormal=False), min_size=1, max_size=30))
def test_quantize_smallest_exponent_and_round_to_nearest(xs):
    x = torch.tensor(xs, dtype=torch.float64)
    q = quantize(x)
    top = x.abs().max().item()
    assert q.values.dtype == torch.int8 and q.values.abs().max().item() <= 127
    if top > 0:
        assert math.ldexp(127, q.exponent - 1) < top <= math.ldexp(127, q.exponent)  # smallest e
    e = torch.tensor(q.exponent)
    assert torch.equal(dequantize(q), torch.ldexp(torch.round(torch.ldexp(x, -e)), e))


def test_dequantize_is_exact_and_qtensor_checks():
    q = QTensor(torch.tensor([-127, 0, 5, 127], dtype=torch.int8), torch.tensor(-9))
    assert dequantize(q).tolist() == [v * 2.0**-9 for v in (-127, 0, 5, 127)]
    with pytest.raises(TypeError):
        QTensor(torch.zeros(3, dtype=torch.int32), 0)
    with pytest.raises(TypeError):
        quantize(torch.zeros(3, dtype=torch.int32))
