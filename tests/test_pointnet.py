"""PointNet: float model and split, its integer twin (per-point linear, global max pool) against
float64 oracles, convert, and an integer-only ElasticZO-INT8 step on point clouds."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from elasticzo.int8 import IntGlobalMaxPool, IntLinear, IntReLU, QTensor, convert, dequantize, quantize, requantize_int32
from elasticzo.int8.audit import DtypeAudit
from elasticzo.int8.elastic import IntElasticZO
from elasticzo.int8.loss import loss_closure
from elasticzo.int8.inputs import POINT_EXPONENT, quantize_input, quantize_points
from elasticzo.models import GlobalMaxPool, PointNet, build_model, parametrised_layers, split_layers
from elasticzo.optim import ElasticZO

FAST = settings(max_examples=15, deadline=None)


def clouds(b=4, n=32, seed=0):
    return torch.rand(b, n, 3, generator=torch.Generator().manual_seed(seed)) * 2 - 1  # [-1, 1)


def _q(shape, e, gen, lo=-127, hi=127):
    return QTensor(torch.randint(lo, hi + 1, shape, generator=gen, dtype=torch.int8), e)


# ---------------------------------------------------------------- float model


def test_shapes_layer_order_and_split():
    torch.manual_seed(0)
    net = PointNet(num_classes=7)
    assert net(clouds()).shape == (4, 7)
    layers = parametrised_layers(net)
    assert [(m.in_features, m.out_features) for m in layers] == [(3, 64), (64, 64), (64, 128), (128, 128), (128, 7)]
    zo, bp = split_layers(net, 2)
    assert bp == layers[3:] and zo == layers[:3]  # k = 2: the head in BP, the per-point MLP in ZO
    assert build_model("pointnet", 40)(clouds()).shape == (4, 40)
    wide = PointNet(point_widths=(32, 256), head_widths=(64, 32))
    assert len(parametrised_layers(wide)) == 5 and wide(clouds()).shape == (4, 10)


def test_order_of_points_does_not_matter_and_the_layout_is_checked():
    torch.manual_seed(0)
    net, x = PointNet(), clouds(n=50)
    perm = torch.randperm(50)
    torch.testing.assert_close(net(x[:, perm]), net(x), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="transpose"):
        net(x.transpose(1, 2))  # [B, 3, N]
    with pytest.raises(ValueError, match=r"\[B, N, 3\]"):
        net(x[0])


def test_he_init_keeps_the_signal_and_biases_start_at_zero():
    torch.manual_seed(0)
    net = PointNet()
    assert all(float(m.bias.detach().abs().max()) == 0 for m in parametrised_layers(net))
    with torch.no_grad():
        assert 0.3 < float(net(clouds(b=64, n=256)).std()) < 10  # PyTorch's default init: about 0.07


def test_global_max_pool_sends_the_gradient_to_the_arg_max():
    x = torch.tensor([[[1.0, 5.0], [3.0, 2.0]]], requires_grad=True)  # [1, 2 points, 2 channels]
    GlobalMaxPool()(x).sum().backward()
    assert torch.equal(x.grad, torch.tensor([[[0.0, 1.0], [1.0, 0.0]]]))


@pytest.mark.parametrize("k", [0, 1, 2, 3, 5])
def test_elasticzo_step_works_for_every_split(k):
    torch.manual_seed(0)
    net, x, y = PointNet(), clouds(b=8), torch.randint(0, 10, (8,))
    before = [p.detach().clone() for p in net.parameters()]
    opt = ElasticZO.for_model(net, k, lr_zo=1e-3, lr_bp=0.02, seed=1)

    def closure(backward=True):
        loss = F.cross_entropy(net(x), y)
        if backward:
            loss.backward()
        return loss

    assert torch.isfinite(opt.step(closure))
    zo, bp = split_layers(net, k)
    assert all(not p.requires_grad for m in zo for p in m.parameters())
    assert all(not torch.equal(a, b) for a, b in zip(before, net.parameters()))  # every layer moved


# ---------------------------------------------------------------- integer twin vs float64


@FAST
@given(st.integers(0, 2**31), st.integers(1, 5), st.sampled_from([0, 1, 2, 8]))
def test_per_point_linear_matches_float64_and_tiling_is_exact(seed, batch, tile):
    gen = torch.Generator().manual_seed(seed)
    layer = IntLinear(_q((6, 5), 0, gen).values, -6, tile=tile)
    x = _q((batch, 9, 5), -3, gen)
    xd = dequantize(x).requires_grad_()
    wd = torch.ldexp(layer.weight.to(torch.float64), torch.tensor(-6)).requires_grad_()
    y_ref = xd @ wd.t()  # [B, N, 6]
    y = layer.forward(x)
    expected = requantize_int32(torch.ldexp(y_ref.detach(), torch.tensor(9)).to(torch.int64), -9)
    assert torch.equal(y.values, expected.values) and int(y.exponent) == int(expected.exponent)
    g = _q(tuple(y.shape), -4, gen)
    y_ref.backward(dequantize(g))
    gx = layer.backward(g)
    assert torch.equal(torch.ldexp(layer.grad_acc.to(torch.float64), torch.as_tensor(layer.grad_exponent)), wd.grad)
    gx_acc = torch.ldexp(xd.grad, torch.tensor(10)).to(torch.int64)
    assert gx.shape == x.shape and torch.equal(gx.values, requantize_int32(gx_acc, -10).values)


def test_global_max_pool_and_relu_match_the_float_oracle_with_ties():
    gen = torch.Generator().manual_seed(0)
    x = _q((3, 10, 4), -2, gen, -3, 3)  # small range: zeros and ties everywhere
    relu, pool = IntReLU(), IntGlobalMaxPool()
    y = pool.forward(relu.forward(x))
    xd = dequantize(x).requires_grad_()
    y_ref = GlobalMaxPool()(F.relu(xd))
    assert torch.equal(dequantize(y), y_ref.detach())
    g = _q(tuple(y.shape), -5, gen)
    y_ref.backward(dequantize(g))
    gx = relu.backward(pool.backward(g))
    assert torch.equal(dequantize(gx), xd.grad)
    assert torch.equal(pool.forward(x, store=False).values, x.values.amax(dim=1))
    assert pool._arg is None  # forward-only keeps no indices
    with pytest.raises(RuntimeError, match="store=True"):
        pool.backward(g)


def test_convert_pointnet_and_int8_init_have_the_same_structure():
    torch.manual_seed(0)
    model = PointNet(bias=False)
    net = convert(model)
    assert [type(m).__name__ for m in model] == [type(m).__name__.replace("Int", "") for m in net]
    for layer, m in zip(net.weight_layers(), parametrised_layers(model)):
        q = quantize(m.weight)
        assert torch.equal(layer.weight, q.values) and layer.weight_exponent == q.exponent
    x = clouds(b=16, n=64)
    logits = dequantize(net.forward(QTensor(quantize_points(x), POINT_EXPONENT), store=False))
    ref = model(x).double()
    assert torch.corrcoef(torch.stack([logits.flatten(), ref.flatten()]))[0, 1] > 0.95  # 7-bit activations
    scratch = convert(PointNet(7), init=torch.Generator().manual_seed(0))  # zero biases: ignored
    assert [type(m).__name__ for m in scratch] == [type(m).__name__ for m in net]
    assert scratch.forward(QTensor(quantize_points(x), POINT_EXPONENT), store=False).shape == (16, 7)


def test_points_are_quantised_once_to_a_fixed_exponent():
    x = torch.tensor([[[0.0, 0.5, -1.0], [0.999, -0.0039, 2.0]]])
    q = quantize_points(x)
    assert q.dtype == torch.int8 and q.tolist() == [[[0, 64, -127], [127, 0, 127]]]  # saturates, never wraps
    wrapped = quantize_input(q)
    assert wrapped.values is q and wrapped.exponent == POINT_EXPONENT
    with pytest.raises(TypeError, match="float"):
        quantize_points(q)


@pytest.mark.parametrize("bp_layers", [0, 2, 3, 5])
def test_a_pointnet_int8_training_step_is_integer_only(bp_layers):
    net = convert(PointNet(), init=torch.Generator().manual_seed(0), tile=4)  # tiled accumulators, as in training
    points = quantize_points(clouds(b=8, n=64))  # the one float step, at load time
    y = torch.randint(0, 10, (8,), generator=torch.Generator().manual_seed(1))
    before = [layer.weight.clone() for layer in net.weight_layers()]
    opt = IntElasticZO.for_model(net, bp_layers, seed=3)
    with DtypeAudit() as rec:
        for _ in range(2):  # the second step also exercises the running |d| scale
            opt.step(loss_closure(net, points, y))
    assert rec.count > 100 and rec.float_ops == []
    assert all(layer.weight.dtype == torch.int8 for layer in net.weight_layers())
    assert any(not torch.equal(a, layer.weight) for a, layer in zip(before, net.weight_layers()))


def test_plan_measures_every_pointnet_split_in_both_precisions():
    from elasticzo.bench.plan import measure_splits, random_batch

    x, _ = random_batch(4, "int8", 10, model="pointnet", num_points=16)
    assert x.shape == (4, 16, 3) and x.dtype == torch.int8
    fp32 = measure_splits("pointnet", 16, "fp32", num_points=64)
    int8 = measure_splits("pointnet", 16, "int8", num_points=64, int8_tile=1)
    assert [r.k for r in fp32] == list(range(6)) and [r.k for r in int8] == list(range(6))
    assert fp32[0].peak_bytes <= fp32[2].peak_bytes < fp32[5].peak_bytes  # more BP layers, more memory
    assert all(i.peak_bytes < f.peak_bytes for i, f in zip(int8, fp32))
