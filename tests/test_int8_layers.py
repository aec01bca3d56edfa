"""Integer layers, updates and convert: float64 oracles, exact restore, integer-only steps."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from elasticzo.int8 import (
    IntConv2d,
    IntLinear,
    IntMaxPool2d,
    IntReLU,
    IntSequential,
    QTensor,
    convert,
    cross_entropy,
    cross_entropy_loss,
    dequantize,
    int8_noise,
    niti_update,
    perturb_weight,
    quantize,
    requantize_int32,
    zo_update,
)
from elasticzo.int8.audit import DtypeAudit
from elasticzo.int8.convert import init_bound
from elasticzo.int8.rounding import shift_round_pseudo_stochastic
from elasticzo.models import MLP, LeNet5

FAST = settings(max_examples=20, deadline=None)


def _q(shape, e, gen, lo=-127, hi=127):
    return QTensor(torch.randint(lo, hi + 1, shape, generator=gen, dtype=torch.int8), e)


def _exact(acc: torch.Tensor, e) -> torch.Tensor:
    return torch.ldexp(acc.to(torch.float64), torch.as_tensor(e))


# ---------------------------------------------------------------- single layers vs float64


@FAST
@given(st.booleans(), st.integers(0, 2**31))
def test_weight_layers_match_float64_autograd(conv, seed):
    gen = torch.Generator().manual_seed(seed)
    if conv:
        layer = IntConv2d(_q((4, 3, 3, 3), 0, gen).values, -6, stride=1, padding=1)
        x, fn = _q((2, 3, 6, 5), -3, gen), lambda a, w: F.conv2d(a, w, padding=1)
    else:
        layer = IntLinear(_q((5, 7), 0, gen).values, -6)
        x, fn = _q((3, 7), -3, gen), lambda a, w: a @ w.t()
    xd = dequantize(x).requires_grad_()
    wd = torch.ldexp(layer.weight.to(torch.float64), torch.tensor(-6)).requires_grad_()
    y_ref = fn(xd, wd)
    y = layer.forward(x)
    # the output is the float64 result requantized: same shift, same rounding, exactly
    acc = torch.ldexp(y_ref.detach(), torch.tensor(9)).to(torch.int64)  # exact: exponent -3 + -6
    expected = requantize_int32(acc, -9)
    assert torch.equal(y.values, expected.values) and int(y.exponent) == int(expected.exponent)
    g = _q(tuple(y.shape), -4, gen)
    y_ref.backward(dequantize(g))
    gx = layer.backward(g)
    assert torch.equal(_exact(layer.grad_acc, layer.grad_exponent), wd.grad)  # weight grad: exact
    gx_acc = torch.ldexp(xd.grad, torch.tensor(10)).to(torch.int64)  # exponent -4 + -6
    assert torch.equal(gx.values, requantize_int32(gx_acc, -10).values)


def test_relu_and_maxpool_backward_match_float_oracle():
    gen = torch.Generator().manual_seed(0)
    x = _q((2, 3, 6, 6), -2, gen, -3, 3)  # small range: zeros and ties
    relu, pool = IntReLU(), IntMaxPool2d(2)
    y = pool.forward(relu.forward(x))
    xd = dequantize(x).requires_grad_()
    y_ref = F.max_pool2d(F.relu(xd), 2)
    assert torch.equal(dequantize(y), y_ref.detach())
    g = _q(tuple(y.shape), -5, gen)
    y_ref.backward(dequantize(g))
    gx = relu.backward(pool.backward(g))
    assert torch.equal(dequantize(gx), xd.grad)


def int8_lenet5(gen):
    return convert(LeNet5(), init=gen)


def int8_mlp(gen, **kw):
    return convert(MLP(**kw), init=gen)


STORED = ("_input", "_mask", "_arg", "_shape", "_input_shape", "_points")


def stored(layer):
    """The names of what a layer keeps for its backward (activations, masks, arg max, shapes)."""
    return [k for k in STORED if getattr(layer, k, None) is not None]


def niti_step(layers, mu):
    for layer in layers:
        layer.weight = niti_update(layer.weight, layer.grad_acc, mu)
        layer.grad_acc = layer.grad_exponent = None


def test_store_false_keeps_nothing_and_backward_needs_store():
    gen = torch.Generator().manual_seed(0)
    net = int8_lenet5(gen)
    x = quantize(torch.rand(2, 1, 28, 28, generator=gen))
    net.forward(x, store=False)
    for layer in net:
        assert stored(layer) == [], layer
    with pytest.raises(RuntimeError):
        net.backward(QTensor(torch.zeros(2, 10, dtype=torch.int8), -7))


def test_sequential_backward_fills_every_weight_gradient_and_clears():
    gen = torch.Generator().manual_seed(1)
    net = int8_lenet5(gen)
    x, y = quantize(torch.rand(4, 1, 28, 28, generator=gen)), torch.tensor([0, 1, 2, 3])
    _, grad = cross_entropy(net.forward(x), y)
    assert net.backward(grad) is None  # no error wrt the input by default
    assert all(layer.grad_acc is not None and layer.grad_acc.dtype == torch.int32 for layer in net.weight_layers())
    assert all(stored(layer) == [] for layer in net)
    assert net[:3].forward(x).shape == (4, 6, 14, 14)


# ---------------------------------------------------------------- ZO primitives


def test_perturb_is_out_of_place_and_restores_exactly():
    gen = torch.Generator().manual_seed(0)
    net = int8_mlp(gen, in_features=12, hidden=(8,), num_classes=3)
    x = _q((5, 12), -2, gen)
    before = [layer.weight.clone() for layer in net.weight_layers()]
    clean = net.forward(x, store=False)
    zs = [int8_noise(w.shape, torch.Generator().manual_seed(i)) for i, w in enumerate(before)]
    for eps in (3, -3):
        plus = [perturb_weight(layer.weight, z, eps) for layer, z in zip(net.weight_layers(), zs)]
        assert all(bool((p.to(torch.int32) - w.to(torch.int32)).abs().le(3).all()) for p, w in zip(plus, before))
        swapped = IntSequential(*[IntLinear(p, layer.weight_exponent) if layer.has_weight else layer for layer, p in
                                  zip(net.layers, [None] + [plus[0], None, plus[1]])])
        assert torch.equal(net.forward(x, store=False, weights=plus).values, swapped.forward(x, store=False).values)
    assert all(torch.equal(layer.weight, w) for layer, w in zip(net.weight_layers(), before))  # untouched
    assert torch.equal(net.forward(x, store=False).values, clean.values)
    w = torch.tensor([127, -127, 0], dtype=torch.int8)
    assert perturb_weight(w, torch.ones(3, dtype=torch.int8), 5).tolist() == [127, -122, 5]  # saturates


def test_int8_noise_is_seeded_and_balanced():
    a = int8_noise((1000,), torch.Generator().manual_seed(7))
    assert a.dtype == torch.int8 and set(a.unique().tolist()) == {-1, 1}
    assert torch.equal(a, int8_noise((1000,), torch.Generator().manual_seed(7)))
    assert abs(a.to(torch.int64).sum().item()) < 200  # 6+ sigma


@settings(max_examples=20, deadline=None)
@given(st.integers(-(2**30), 2**30), st.integers(0, 40), st.integers(0, 2**31))
def test_zo_update_determinism_and_direction(d, s, seed):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randint(-127, 128, (200,), generator=gen, dtype=torch.int8)
    z = int8_noise(w.shape, gen)
    half = lambda: torch.full(w.shape, 128, dtype=torch.uint8)
    carry, carry_again = half(), half()
    new = zo_update(w, z, torch.tensor(d), s, carry=carry)
    again = zo_update(w, z, torch.tensor(d), s, carry=carry_again)
    assert new.dtype == torch.int8 and torch.equal(new, again) and torch.equal(carry, carry_again)
    step = w.to(torch.int64) - new.to(torch.int64)
    assert bool((step * z.to(torch.int64) * (1 if d >= 0 else -1) >= 0).all())  # moves against d * z
    assert step.abs().max().item() <= (abs(d) >> s) + 1  # never more than the rounded-up step


def test_zo_update_rejects_a_carry_of_the_wrong_shape():
    w = torch.zeros(4, dtype=torch.int8)
    with pytest.raises(ValueError, match="carry must be uint8"):
        zo_update(w, torch.ones_like(w), torch.tensor(1), 0, carry=torch.zeros(3, dtype=torch.uint8))


def test_niti_update_rule():
    grad = torch.tensor([1000, -1000, 37, -5, 0], dtype=torch.int32)  # 10 bits
    w = torch.tensor([0, 0, 10, 126, -127], dtype=torch.int8)
    new = niti_update(w, grad, mu=3)  # shift by 10 - 3 = 7
    dw = shift_round_pseudo_stochastic(grad, 7)
    assert new.tolist() == [max(-127, min(127, a - b)) for a, b in zip(w.tolist(), dw.tolist())]
    assert dw.abs().max().item() <= 2**3
    with pytest.raises(ValueError):
        niti_update(w, grad, mu=0)


# ---------------------------------------------------------------- convert and int8 init


def test_convert_lenet_and_mlp():
    torch.manual_seed(0)
    for model in (LeNet5(), MLP(in_features=784)):
        for m in model.modules():
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        net = convert(model)
        assert [type(m).__name__ for m in model] == [type(m).__name__.replace("Int", "") for m in net]
        for layer, m in zip(net.weight_layers(), [m for m in model if hasattr(m, "weight")]):
            q = quantize(m.weight)
            assert torch.equal(layer.weight, q.values) and layer.weight_exponent == q.exponent
        x = quantize(torch.rand(3, 1, 28, 28))
        assert net.forward(x, store=False).shape == (3, 10)


def test_convert_bias_policy_and_unsupported_modules():
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2, bias=False))
    assert convert(model)[0].bias is not None  # a nonzero bias is converted (int8.bias)
    with pytest.warns(UserWarning, match="dropping"):
        net = convert(model, drop_bias=True)
    assert len(net) == 3 and net[0].bias is None
    with pytest.raises(ValueError, match="Tanh"):
        convert(nn.Sequential(nn.Linear(4, 3, bias=False), nn.Tanh()))
    with pytest.raises(ValueError, match="padding"):
        convert(nn.Sequential(nn.MaxPool2d(2, padding=1)))
    assert convert(nn.Linear(2, 2)).weight_layers()[0].bias is not None  # not a Sequential: traced (int8.graph)


def test_int8_init_is_seeded_and_leaves_global_rng_alone():
    models = [LeNet5() for _ in range(3)]  # the float init draws from the global RNG; convert(init=) must not
    state = torch.random.get_rng_state()
    a, b = convert(models[0], init=torch.Generator().manual_seed(3)), convert(models[1], init=torch.Generator().manual_seed(3))
    c = convert(models[2], init=torch.Generator().manual_seed(4))
    assert torch.equal(state, torch.random.get_rng_state())
    fan_ins = [25, 150, 400, 120, 84]
    for layer, fan_in in zip(a.weight_layers(), fan_ins):  # He-uniform bound sqrt(6 / fan_in) in units of 2**-7
        assert layer.weight_exponent == -7 and layer.weight.abs().max().item() == init_bound(fan_in)
    assert all(torch.equal(p.weight, q.weight) for p, q in zip(a.weight_layers(), b.weight_layers()))
    assert not torch.equal(a.weight_layers()[0].weight, c.weight_layers()[0].weight)
    assert all(layer.weight.abs().max().item() < 127 for layer in a.weight_layers())  # headroom to grow


# ---------------------------------------------------------------- integer only, end to end


def test_hybrid_step_uses_integer_dtypes_only():
    """ZO forward at +-eps z, integer loss, ZO update, then NITI BP on the last layers."""
    gen = torch.Generator().manual_seed(0)
    net = int8_lenet5(gen)
    x, y = quantize(torch.rand(8, 1, 28, 28, generator=gen)), torch.randint(0, 10, (8,), generator=gen)
    zo_part, bp_part = net[:7], net[7:]
    with DtypeAudit() as rec:
        zs = [int8_noise(layer.weight.shape, torch.Generator().manual_seed(i)) for i, layer in enumerate(zo_part.weight_layers())]
        losses = []
        for eps in (1, -1):
            h = zo_part.forward(x, store=False, weights=[perturb_weight(lay.weight, z, eps) for lay, z in zip(zo_part.weight_layers(), zs)])
            loss, grad = cross_entropy(bp_part.forward(h), y)
            bp_part.backward(grad)
            losses.append(loss)
        d = losses[0] - losses[1]
        for layer, z in zip(zo_part.weight_layers(), zs):
            carry = torch.full(layer.weight.shape, 128, dtype=torch.uint8)
            layer.weight = zo_update(layer.weight, z, d, 12, carry=carry)
        niti_step(bp_part.weight_layers(), mu=2)
    assert rec.count > 100 and rec.float_ops == []
    with DtypeAudit() as control:  # the recorder does see floats: quantize is the float boundary
        quantize(torch.rand(2, 3))
    assert control.float_ops


def test_niti_training_reduces_integer_loss():
    gen = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 16, generator=gen) * 2
    y = torch.randint(0, 4, (256,), generator=gen)
    xq = quantize(centers[y] + 0.5 * torch.randn(256, 16, generator=gen))  # separable blobs
    net = int8_mlp(torch.Generator().manual_seed(1), in_features=16, hidden=(32,), num_classes=4)
    before = cross_entropy_loss(net.forward(xq, store=False), y).item()
    for step in range(100):
        idx = torch.arange(step * 32, step * 32 + 32) % 256
        _, grad = cross_entropy(net.forward(QTensor(xq.values[idx], xq.exponent)), y[idx])
        net.backward(grad)
        niti_step(net.weight_layers(), mu=2)
    out = net.forward(xq, store=False)
    assert cross_entropy_loss(out, y).item() < 0.1 * before
    assert (out.values.argmax(1) == y).double().mean().item() > 0.95


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), batch=st.integers(1, 9), tile=st.integers(1, 4), padding=st.integers(0, 2))
def test_tiled_conv_equals_untiled_exactly(seed, batch, tile, padding):
    """Accumulating in tiles and narrowing each at once changes no value and no exponent."""
    gen = torch.Generator().manual_seed(seed)
    x = QTensor(torch.randint(-127, 128, (batch, 3, 9, 9), generator=gen).to(torch.int8), -7)
    w = torch.randint(-127, 128, (4, 3, 3, 3), generator=gen).to(torch.int8)
    whole = IntConv2d(w, -7, padding=padding).forward(x, store=False)
    tiled = IntConv2d(w, -7, padding=padding, tile=tile).forward(x, store=False)
    assert torch.equal(whole.values, tiled.values)
    assert int(whole.exponent) == int(tiled.exponent)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), batch=st.integers(2, 7), tile=st.integers(1, 3), padding=st.integers(0, 2))
def test_tiled_conv_backward_equals_untiled_exactly(seed, batch, tile, padding):
    gen = torch.Generator().manual_seed(seed)
    x = QTensor(torch.randint(-127, 128, (batch, 3, 8, 8), generator=gen).to(torch.int8), -7)
    w = torch.randint(-127, 128, (4, 3, 3, 3), generator=gen).to(torch.int8)
    outs = []
    for t in (0, tile):
        layer = IntConv2d(w, -7, padding=padding, tile=t)
        y = layer.forward(x)
        g = QTensor(torch.randint(-127, 128, y.shape, generator=torch.Generator().manual_seed(seed)).to(torch.int8), -7)
        gx = layer.backward(g)
        outs.append((gx.values, int(gx.exponent), layer.grad_acc))
    assert torch.equal(outs[0][0], outs[1][0]) and outs[0][1] == outs[1][1] and torch.equal(outs[0][2], outs[1][2])
