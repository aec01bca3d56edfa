"""Integer cross-entropy: its value (for ZO) and its gradient (NITI, for BP) from int8 logits.

Both start from the same base-2 view of softmax. For logits z = q * 2**e and class j,

    softmax_j = 2**u_j / sum_k 2**u_k,   u_j = (q_j - q_max) * 2**e * log2(e)   (u_j <= 0)

computed with integer ops only:

1. ``u`` in fixed point with ``_W`` = 20 fractional bits: (q_j - q_max) times the integer
   constant ``LOG2E`` = round(log2(e) * 2**30), shifted by e - 30 + 20 (rounded).
2. ``2**u`` in fixed point with ``_P`` = 30 fractional bits: integer part by a right shift,
   fractional part by two 1024-entry tables of 2**(-i/2**10) and 2**(-i/2**20), multiplied.
3. The loss in bits, log2(sum_k 2**u_k) - u_target: log2 of the sum by its bit length (the
   integer part) and a 1024-entry table of log2(1 + i/2**10) plus a first-order correction
   (integer division, times ``LOG2E``) for the fractional part.

Loss value: int64, fixed point in BITS with ``LOSS_FRAC_BITS`` = 16 fractional bits,

    cross-entropy in nats  =  loss * ln(2) / 2**16.

Each example is within ``loss_tolerance_units(logits)`` units of the exact value (about 0.65
units of rounding, bounded by 1, plus the error of the log2(e) constant, negligible for logits
below ~1e4). Summed over the batch the loss is an integer; its scale does not matter to ZO,
which only uses differences L+ - L-.

Range: any exponent. A loss above ``LOSS_MAX`` = 2**62 units (a logit gap of about 2**37
units, i.e. exponents e > ~30 with int8 logits) saturates at ``LOSS_MAX``, per example and in
the batch sum alike, so L+ - L- stays within int64 and nothing ever wraps. For exponents
e >= 14 the target's gap is computed in loss units directly (an exact left shift), so the
fixed-point intermediates never overflow either.

Gradient (NITI): about 128 * (softmax - onehot) as int8 with exponent -7, i.e. the gradient
of the SUMMED cross-entropy (nats) wrt the logits. NITI forms the softmax numerators with
integer-part shifts only; we reuse the table values of step 2, which costs nothing extra and
makes the int8 gradient the correctly rounded 128 * softmax (within one unit).
"""
from __future__ import annotations

import math
from functools import lru_cache

import torch

from elasticzo.int8 import native, native_ops
from elasticzo.int8.format import QTensor
from elasticzo.int8.inputs import quantize_input
from elasticzo.int8.rounding import bitlength_each, saturate_int8, shift_round_nearest

LOG2E_BITS = 30
LOG2E = round(math.log2(math.e) * 2**LOG2E_BITS)  # 1549082005
LOSS_FRAC_BITS = 16  # loss unit: 2**-16 bits = ln(2) * 2**-16 nats
GRAD_EXPONENT = -7  # the int8 gradient is 128 * (softmax - onehot)
_W = 20  # fractional bits of u and of the unrounded loss
_P = 30  # fractional bits of 2**u and of table values
_T = 10  # index bits of each table
_SAT = 62  # shifts are clamped here: 2**u underflows to 0 long before
LOSS_MAX = 1 << 62  # saturation of the loss, per example and summed: |L+ - L-| <= 2**62


@lru_cache(maxsize=None)
def _tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Constant int64 tables (built once from Python floats; data, not training-path ops).

    pow_hi[i] = 2**P * 2**(-i / 2**10), pow_lo[i] = 2**P * 2**(-i / 2**20),
    log_frac[i] = 2**P * log2(1 + i / 2**10), each rounded to nearest, i < 1024.
    """
    n = 1 << _T
    pow_hi = [round(2.0**_P * 2.0 ** (-i / n)) for i in range(n)]
    pow_lo = [round(2.0**_P * 2.0 ** (-i / n**2)) for i in range(n)]
    log_frac = [round(2.0**_P * math.log2(1 + i / n)) for i in range(n)]
    as_tensor = lambda v: torch.tensor(v, dtype=torch.int64, device=device)  # noqa: E731
    return as_tensor(pow_hi), as_tensor(pow_lo), as_tensor(log_frac)


def base2_logits(logits: QTensor) -> torch.Tensor:
    """u_j = (z_j - z_max) * log2(e) in fixed point with _W fractional bits: int64 [B, C], <= 0."""
    q = logits.values.to(torch.int64)
    d = q - q.amax(dim=1, keepdim=True)  # [B, C], in -254..0
    prod = d * LOG2E  # |prod| < 2**39
    sh = logits.exponent - LOG2E_BITS + _W  # scale of prod is 2**(e - 30); we want 2**-20
    sh = torch.as_tensor(sh, dtype=torch.int64, device=q.device)
    left = sh.clamp(min=0, max=_SAT)
    # a left shift could overflow only for absurd logits (e > ~30): saturate instead of wrap
    floor = -((torch.ones_like(left) << _SAT) >> left)
    up = prod.clamp(min=floor) << left
    down = shift_round_nearest(prod, (-sh).clamp(min=0, max=_SAT))
    return torch.where(sh >= 0, up, down)


def pow2_fixed(u: torch.Tensor) -> torch.Tensor:
    """2**(u / 2**_W) for int64 u <= 0, in fixed point with _P fractional bits (<= 2**_P)."""
    pow_hi, pow_lo, _ = _tables(u.device)
    v = -u
    k = (v >> _W).clamp(max=_SAT)  # integer part: a right shift
    r = v & ((1 << _W) - 1)  # fractional part, _W = 2 * _T bits
    frac = shift_round_nearest(pow_hi[r >> _T] * pow_lo[r & ((1 << _T) - 1)], _P)  # < 2**60 before
    return shift_round_nearest(frac, k)


def log2_fixed(s: torch.Tensor) -> torch.Tensor:
    """log2(s / 2**_P) for int64 s >= 2**_P, in fixed point with _W fractional bits."""
    _, _, log_frac = _tables(s.device)
    top = bitlength_each(s) - 1  # >= _P
    m = s >> (top - _P)  # mantissa in [2**P, 2**(P+1)), truncation error < 2**-P relative
    frac = m - (1 << _P)
    idx = frac >> (_P - _T)
    rem = frac & ((1 << (_P - _T)) - 1)  # m = base * (1 + rem / base), rem / base < 2**-_T
    base = (idx << (_P - _T)) + (1 << _P)
    ratio = torch.div(rem << _P, base, rounding_mode="floor")  # rem / base with _P bits, < 2**20
    corr = ratio * LOG2E  # log2(1 + x) ~ x * log2(e), error < 0.73 * 2**-20 bits; < 2**51
    frac_log = log_frac[idx] + shift_round_nearest(corr, LOG2E_BITS)  # _P fractional bits
    return ((top - _P) << _W) + shift_round_nearest(frac_log, _P - _W)


def _softmax_parts(logits: QTensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(u [B, C] with _W bits, 2**u [B, C] with _P bits, their row sums [B, 1])."""
    if logits.values.dim() != 2:
        raise ValueError(f"logits must be [B, C], got shape {tuple(logits.shape)}")
    u = base2_logits(logits)
    e = pow2_fixed(u)  # the row maximum contributes exactly 2**_P
    return u, e, e.sum(dim=1, keepdim=True)


def _loss_from_parts(logits: QTensor, u: torch.Tensor, total: torch.Tensor, target: torch.Tensor,
                     reduction: str) -> torch.Tensor:
    """Per-example loss log2(sum 2**u) - u_target in loss units, saturated at LOSS_MAX; summed or not."""
    if reduction not in ("sum", "none"):
        raise ValueError(f"reduction must be 'sum' or 'none', got {reduction!r}")
    lse = log2_fixed(total.squeeze(1))  # [B], _W fractional bits, in [0, log2 C]
    small = shift_round_nearest(lse - u.gather(1, target.unsqueeze(1)).squeeze(1), _W - LOSS_FRAC_BITS)
    q = logits.values.to(torch.int64)
    gap = (q.amax(dim=1) - q.gather(1, target.unsqueeze(1)).squeeze(1)) * LOG2E  # [B], >= 0, < 2**39
    up = torch.as_tensor(logits.exponent, dtype=torch.int64, device=q.device) - LOG2E_BITS + LOSS_FRAC_BITS
    big = _add_saturating(shift_round_nearest(lse, _W - LOSS_FRAC_BITS), _shl_saturating(gap, up.clamp(0, _SAT)))
    loss = torch.where(up >= 0, big, small.clamp(max=LOSS_MAX))  # up >= 0: -u_target is a whole number of units
    return loss if reduction == "none" else saturating_sum(loss)


def _shl_saturating(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """min(x * 2**k, LOSS_MAX) for int64 x >= 0 and 0 <= k <= 62, without overflow."""
    return torch.where(x > (LOSS_MAX >> k), LOSS_MAX, x << k)


def _add_saturating(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """min(a + b, LOSS_MAX) for 0 <= a, b <= LOSS_MAX (the sum is below 2**63: no overflow)."""
    return (a + b).clamp(max=LOSS_MAX)


def saturating_sum(loss: torch.Tensor) -> torch.Tensor:
    """min(sum of ``loss``, LOSS_MAX) for int64 entries in 0..LOSS_MAX, exact, never wrapping.

    On the CPU a batch's losses are summed as Python integers (exact at any size, and cheaper
    than the dozen 0-dim tensor ops of ``_saturating_sum_on_device``, which a device keeps: no
    host sync)."""
    if loss.is_cpu and loss.numel() <= 4096:
        return torch.scalar_tensor(min(sum(loss.tolist()), LOSS_MAX), dtype=torch.int64)
    return _saturating_sum_on_device(loss)


def _saturating_sum_on_device(loss: torch.Tensor) -> torch.Tensor:
    """``saturating_sum`` in two 32-bit halves (each half-sum fits int64 for up to 2**31 entries),
    recombined with saturation: integer tensor ops only."""
    hi = (loss >> 32).sum()
    lo = (loss & 0xFFFFFFFF).sum()
    hi = hi + (lo >> 32)  # < 2**62
    over = hi >= (LOSS_MAX >> 32)
    return torch.where(over, LOSS_MAX, (hi.clamp(max=LOSS_MAX >> 32) << 32) + (lo & 0xFFFFFFFF)).clamp(max=LOSS_MAX)


def _grad_from_parts(e: torch.Tensor, total: torch.Tensor, target: torch.Tensor) -> QTensor:
    prob128 = torch.div((e << 8) + total, total << 1, rounding_mode="floor")  # round(128 e / S)
    onehot = torch.arange(e.shape[1], device=e.device) == target.unsqueeze(1)  # [B, C] bool
    return QTensor(saturate_int8(prob128 - (onehot.to(torch.int64) << 7)), GRAD_EXPONENT)


def _native(logits: QTensor, target: torch.Tensor, with_grad: bool):
    """(per-example loss, int8 error) from the native kernel, or None where it does not serve."""
    q = logits.values
    if not (native.active(q) and q.dim() == 2 and q.shape[1] <= 256 and q.shape[0] > 0):
        return None
    loss, grad = native_ops.OPS.cross_entropy(q, int(logits.exponent), target, *_tables(q.device), with_grad)
    return loss, (QTensor(grad, GRAD_EXPONENT) if with_grad else None)


def _reduce(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction not in ("sum", "none"):
        raise ValueError(f"reduction must be 'sum' or 'none', got {reduction!r}")
    return loss if reduction == "none" else saturating_sum(loss)


def cross_entropy_loss(logits: QTensor, target: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """Integer cross-entropy (int64, 2**-16 bits per unit, saturating at LOSS_MAX), batch sum or per example."""
    fast = _native(logits, target, with_grad=False)
    if fast is not None:
        return _reduce(fast[0], reduction)
    u, _, total = _softmax_parts(logits)
    return _loss_from_parts(logits, u, total, target, reduction)


def cross_entropy_grad(logits: QTensor, target: torch.Tensor) -> QTensor:
    """NITI's int8 error at the logits: 128 * (softmax - onehot), exponent -7 (summed loss)."""
    _, e, total = _softmax_parts(logits)
    return _grad_from_parts(e, total, target)


def cross_entropy(logits: QTensor, target: torch.Tensor, reduction: str = "sum") -> tuple[torch.Tensor, QTensor]:
    """Loss value and gradient together, sharing the softmax numerators."""
    fast = _native(logits, target, with_grad=True)
    if fast is not None:
        return _reduce(fast[0], reduction), fast[1]
    u, e, total = _softmax_parts(logits)
    return _loss_from_parts(logits, u, total, target, reduction), _grad_from_parts(e, total, target)


def loss_tolerance_units(logits: QTensor) -> float:
    """Documented bound on |integer loss - exact loss| per example, in loss units (2**-16 bits).

    1 unit for rounding (analysis: < 0.65 units; measured max 0.63) plus the error of LOG2E:
    |LOG2E / 2**30 - log2 e| <= 2**-31 on u_j for logit differences up to 254 * 2**e, entering
    once through the log-sum-exp and once through the target logit.
    """
    e = int(logits.exponent.item()) if isinstance(logits.exponent, torch.Tensor) else int(logits.exponent)
    return 1.0 + 2 * 254 * 2.0 ** (e - 31 + LOSS_FRAC_BITS)


def loss_to_nats(loss: torch.Tensor) -> torch.Tensor:
    """For reports only (float): the integer loss in nats."""
    return loss.to(torch.float64) * (math.log(2) / 2**LOSS_FRAC_BITS)


def loss_closure(model, x: torch.Tensor, target: torch.Tensor):
    """The closure an ``IntElasticZO`` step calls: ``closure(backward) -> integer loss`` of ``model(x)``.

    With ``backward`` it also runs the integer backward (NITI gradients in the BP layers), as
    a float closure calls ``loss.backward()``. ``x`` is a QTensor or a batch the model
    quantises at its boundary (uint8 pixels, int8 points).
    """
    x = quantize_input(x)  # once, not in every pass

    def closure(backward: bool = True) -> torch.Tensor:
        logits = model(x)
        if not backward:
            return cross_entropy_loss(logits, target)
        loss, grad = cross_entropy(logits, target)
        model.backward(grad)
        return loss

    return closure
