"""Integer cross-entropy against the float64 cross-entropy of the dequantised logits."""
from __future__ import annotations

import math
from fractions import Fraction

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from elasticzo.int8.format import QTensor, dequantize
from elasticzo.int8.loss import (
    GRAD_EXPONENT,
    LOSS_FRAC_BITS,
    LOSS_MAX,
    cross_entropy,
    cross_entropy_grad,
    cross_entropy_loss,
    loss_to_nats,
    loss_tolerance_units,
)

UNIT_NATS = math.log(2) / 2**LOSS_FRAC_BITS  # one loss unit in nats
FAST = settings(max_examples=40, deadline=None)


def _logits(b, c, e, seed, lo=-127, hi=127):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(lo, hi + 1, (b, c), generator=gen, dtype=torch.int8)
    return QTensor(q, e), torch.randint(0, c, (b,), generator=gen)


def _float_ce(logits: QTensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(dequantize(logits), target, reduction="none")  # nats, float64


@FAST
@given(st.integers(1, 40), st.integers(2, 20), st.integers(-12, 6), st.integers(0, 2**31), st.integers(1, 127))
def test_loss_value_within_documented_tolerance(b, c, e, seed, spread):
    logits, target = _logits(b, c, e, seed, -spread, spread)
    loss = cross_entropy_loss(logits, target, reduction="none")
    assert loss.dtype == torch.int64
    err_units = (loss.to(torch.float64) - _float_ce(logits, target) / UNIT_NATS).abs()
    assert err_units.max().item() <= loss_tolerance_units(logits)
    assert cross_entropy_loss(logits, target).item() == loss.sum().item()  # "sum" is the integer sum


@FAST
@given(st.integers(-10, 4), st.integers(0, 2**31))
def test_loss_preserves_ordering_beyond_tolerance(e, seed):
    logits, target = _logits(60, 10, e, seed)
    loss = cross_entropy_loss(logits, target, reduction="none").tolist()
    ref = (_float_ce(logits, target) / UNIT_NATS).tolist()
    tol = loss_tolerance_units(logits)
    for i in range(len(loss)):
        for j in range(len(loss)):
            if ref[i] > ref[j] + 2 * tol:
                assert loss[i] > loss[j]


def test_loss_special_values():
    uniform = QTensor(torch.zeros(3, 8, dtype=torch.int8), -4)  # all equal: log(C) exactly
    loss = cross_entropy_loss(uniform, torch.tensor([0, 3, 7]), reduction="none")
    assert loss.tolist() == [3 * 2**LOSS_FRAC_BITS] * 3  # log2(8) = 3 bits
    confident = QTensor(torch.tensor([[127, -127]], dtype=torch.int8), 5)  # 8128 nats apart
    assert cross_entropy_loss(confident, torch.tensor([0])).item() == 0
    wrong = cross_entropy_loss(confident, torch.tensor([1])).item()
    assert abs(wrong * UNIT_NATS - 254 * 32) < 1e-3
    absurd = QTensor(torch.tensor([[127, -127]], dtype=torch.int8), 60)  # saturates, never wraps
    assert cross_entropy_loss(absurd, torch.tensor([1])).item() > 0
    assert abs(loss_to_nats(loss).sum().item() - 3 * math.log(8)) < 1e-9


@FAST
@given(st.integers(1, 30), st.integers(2, 20), st.integers(-12, 6), st.integers(0, 2**31))
def test_gradient_is_128_softmax_minus_onehot(b, c, e, seed):
    logits, target = _logits(b, c, e, seed)
    grad = cross_entropy_grad(logits, target)
    assert grad.values.dtype == torch.int8 and grad.exponent == GRAD_EXPONENT
    p = torch.softmax(dequantize(logits), dim=1)
    ideal = (128 * (p - F.one_hot(target, c).to(torch.float64))).clamp(-127, 127)
    assert (grad.values.to(torch.float64) - ideal).abs().max().item() <= 0.5 + 1e-6  # correctly rounded
    loss2, grad2 = cross_entropy(logits, target)
    assert torch.equal(grad2.values, grad.values) and loss2.item() == cross_entropy_loss(logits, target).item()


def test_gradient_matches_autograd_scale():
    """exponent -7: the int8 error is d(sum of CE in nats)/d(logits), up to rounding.

    -1 (a confidently wrong target) saturates to -127/128: int8 is kept symmetric.
    """
    logits, target = _logits(16, 10, -3, 0)
    z = dequantize(logits).requires_grad_()
    F.cross_entropy(z, target, reduction="sum").backward()
    ideal = z.grad.clamp(-127 / 128, 127 / 128)
    err = (dequantize(cross_entropy_grad(logits, target)) - ideal).abs().max().item()
    assert err <= 2.0**GRAD_EXPONENT / 2 + 1e-9


# log2(e) to 58 digits: the oracle's constant is exact far beyond the engine's 30 bits
LOG2E_EXACT = Fraction("1.442695040888963407359924681001892137426645954152985934135")


def _oracle_units(q: list[int], target: int, e: int) -> Fraction:
    """Exact cross-entropy in loss units (2**-16 bits), as a Python rational: no overflow at any e.

    loss = (q_max - q_t) 2**e log2(e) + log2(sum_k 2**((q_k - q_max) 2**e log2 e)); the first term
    exactly, the second (in [0, log2 C]) in float64, whose error is far below one unit.
    """
    top = max(q)
    gap = Fraction(top - q[target]) * Fraction(2) ** e * LOG2E_EXACT
    lse = math.log2(sum(2.0 ** float((qk - top) * Fraction(2) ** e * LOG2E_EXACT) for qk in q))
    return (gap + Fraction(lse)) * 2**LOSS_FRAC_BITS


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 12), st.integers(2, 12), st.integers(-80, 80), st.integers(0, 2**31), st.integers(1, 127))
def test_loss_matches_python_int_oracle_over_every_exponent(b, c, e, seed, spread):
    """Within tolerance of the exact value below LOSS_MAX, LOSS_MAX above; the sum saturates, never wraps."""
    logits, target = _logits(b, c, e, seed, -spread, spread)
    loss = cross_entropy_loss(logits, target, reduction="none").tolist()
    tol = loss_tolerance_units(logits)
    for row, t, got in zip(logits.values.tolist(), target.tolist(), loss):
        exact = _oracle_units(row, t, e)
        assert 0 <= got <= LOSS_MAX
        assert abs(got - min(exact, LOSS_MAX)) <= tol, (row, t, e, got, float(exact))
    assert cross_entropy_loss(logits, target).item() == min(sum(loss), LOSS_MAX)  # Python-int sum oracle


def test_batch_sum_saturates_instead_of_wrapping():
    """e = 40, C = 2: each loss is above 2**63 in truth; the int64 sum used to wrap negative."""
    logits = QTensor(torch.tensor([[127, -127]] * 64, dtype=torch.int8), 40)
    per_example = cross_entropy_loss(logits, torch.ones(64, dtype=torch.int64), reduction="none")
    assert per_example.tolist() == [LOSS_MAX] * 64
    assert cross_entropy_loss(logits, torch.ones(64, dtype=torch.int64)).item() == LOSS_MAX
    near = QTensor(torch.tensor([[127, -127]] * 64, dtype=torch.int8), 32)  # each below LOSS_MAX, the sum above
    each = cross_entropy_loss(near, torch.ones(64, dtype=torch.int64), reduction="none")
    assert 0 < each.max().item() < LOSS_MAX and 64 * each[0].item() > LOSS_MAX
    assert cross_entropy_loss(near, torch.ones(64, dtype=torch.int64)).item() == LOSS_MAX


@settings(max_examples=60, deadline=None)
@given(st.lists(st.one_of(st.integers(0, 1 << 62), st.sampled_from([0, 1, (1 << 62) - 1, 1 << 62, (1 << 32) - 1, 1 << 32])),
                min_size=0, max_size=70))
def test_saturating_sum_cpu_ints_equal_the_tensor_halves(entries):
    """The CPU's Python-integer sum and the device path's 32-bit halves both give min(sum, 2**62)."""
    from elasticzo.int8.loss import LOSS_MAX, _saturating_sum_on_device, saturating_sum

    loss = torch.tensor(entries, dtype=torch.int64)
    got, device = saturating_sum(loss), _saturating_sum_on_device(loss)
    assert got.dtype == device.dtype == torch.int64 and got.dim() == device.dim() == 0
    assert int(got) == int(device) == min(sum(entries), LOSS_MAX)
