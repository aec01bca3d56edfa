"""convert for ordinary models: bias, BatchNorm folding, residual adds, average pooling, fx graphs, errors."""
import importlib.util
import io
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from elasticzo.int8 import IntElasticZO, QTensor, convert, dequantize, loss_closure, quantize
from elasticzo.int8.audit import DtypeAudit
from elasticzo.int8.bias import MAX_LEFT_SHIFT, accumulator_room, add_bias
from elasticzo.int8.blocks import IntGlobalAvgPool2d, add_aligned
from elasticzo.int8.fold import folded
from elasticzo.int8.graph import IntGraph
from elasticzo.int8.inputs import quantize_once
from elasticzo.int8.microbatch import micro_batched_loss_closure
from elasticzo.int8.reference import ReferenceIntElasticZO
from elasticzo.int8.sequential import IntSequential
from elasticzo.models.small import SMALL_MODELS, TinyResNet

pytest.importorskip("sklearn")
from elasticzo.data.digits import load_digits_split  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
CONVERTIBLE = ["cnn", "bn-dropout-mlp", "resnet"]


@pytest.fixture(scope="module")
def digits():
    return load_digits_split(0)


def _trained_float(name, digits, steps=150):
    """A float model trained briefly with Adam (BatchNorm statistics move away from 0 and 1)."""
    x, y, _, _ = digits
    torch.manual_seed(0)
    model = SMALL_MODELS[name]()
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, len(y), (64,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    return model.eval()


@pytest.mark.parametrize("name", CONVERTIBLE)
def test_conversion_keeps_the_function_of_a_trained_float_model(name, digits):
    _, _, x_test, y_test = digits
    model = _trained_float(name, digits)
    net = convert(model).eval()
    assert any(layer.bias is not None for layer in net.weight_layers())  # biases (or folded BatchNorm) kept
    with torch.no_grad():
        want = model(x_test).argmax(1)
        got = dequantize(net(x_test)).argmax(1)
    assert float((got == want).float().mean()) >= 0.97
    if name == "cnn":  # the biases matter: dropping them changes the function more
        with pytest.warns(UserWarning, match="dropping"):
            dropped = convert(model, drop_bias=True).eval()
        with torch.no_grad():
            assert float((dequantize(dropped(x_test)).argmax(1) == want).float().mean()) < float((got == want).float().mean())


@pytest.mark.parametrize("dims", [1, 2])
def test_batchnorm_folds_exactly_in_float64(dims):
    torch.manual_seed(1)
    layer = nn.Linear(5, 4) if dims == 1 else nn.Conv2d(3, 4, 3, padding=1)
    bn = nn.BatchNorm1d(4) if dims == 1 else nn.BatchNorm2d(4)
    bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2), bn.weight.data.uniform_(0.5, 2), bn.bias.data.uniform_(-1, 1)
    x = torch.randn(6, 5, dtype=torch.float64) if dims == 1 else torch.randn(2, 3, 6, 6, dtype=torch.float64)
    want = bn.double().eval()(layer.double()(x))
    w, b = folded(layer, bn)
    got = F.linear(x, w, b) if dims == 1 else F.conv2d(x, w, b, padding=1)
    assert torch.allclose(got, want, atol=1e-12)


int8s = st.lists(st.integers(-127, 127), min_size=1, max_size=16)


@settings(max_examples=200, deadline=None)
@given(a=int8s, b=int8s, ea=st.integers(-60, 60), eb=st.integers(-60, 60), extreme=st.booleans())
def test_residual_add_aligns_exponents_and_never_overflows(a, b, ea, eb, extreme):
    n = min(len(a), len(b))
    a, b = (a[:n], b[:n]) if not extreme else ([127] * n, [127 if i % 2 else -127 for i in range(n)])
    qa, qb = QTensor(torch.tensor(a, dtype=torch.int8), ea), QTensor(torch.tensor(b, dtype=torch.int8), eb)
    out = add_aligned(qa, qb)
    assert out.values.dtype == torch.int8 and int(out.values.abs().max()) <= 127
    exact = dequantize(qa) + dequantize(qb)  # float64: exact for these magnitudes
    unit = 2.0 ** int(out.exponent)
    assert float((dequantize(out) - exact).abs().max()) <= 1.5 * unit  # half a unit of each rounding, saturation
    if abs(ea - eb) <= 23 and float(exact.abs().max()) <= 127 * 2.0 ** min(ea, eb):  # fits unshifted: exact
        assert torch.equal(dequantize(out), exact)


@settings(max_examples=200, deadline=None)
@given(acc=st.lists(st.integers(-(2**24), 2**24), min_size=3, max_size=3), bias=st.lists(st.integers(-127, 127), min_size=3, max_size=3),
       eb=st.integers(-70, 70), ea=st.integers(-70, 70), fan_in=st.sampled_from([1, 9, 1024, 2**17 + 1]))
def test_bias_is_added_in_the_accumulator_scale_and_saturates(acc, bias, eb, ea, fan_in):
    top = fan_in * 128 * 128  # the largest |accumulator| of fan_in int8 products
    acc = [max(-top, min(top, a)) for a in acc]
    got = add_bias(torch.tensor([acc], dtype=torch.int32), torch.tensor(bias, dtype=torch.int8), eb, ea, fan_in, -1)
    room = accumulator_room(fan_in)
    for g, a, b in zip(got[0].tolist(), acc, bias):  # Python ints: the rule written out
        d = eb - ea
        aligned = b * 2 ** min(d, MAX_LEFT_SHIFT) if d >= 0 else (b + 2 ** (-d - 1)) >> -d  # round half up
        assert g == a + (max(-room, min(room, aligned)) if room else aligned)
    assert got.dtype == (torch.int32 if room else torch.int64)


def test_a_bias_far_above_an_int64_accumulator_keeps_its_scale():
    """Past 2**17 products the sum is int64 and nothing clamps: the alignment itself must be exact
    (it was capped at 2**40, so a bias 2**50 units up came out 2**10 times too small)."""
    got = add_bias(torch.zeros(1, 2, dtype=torch.int64), torch.tensor([1, -1], dtype=torch.int8), 50, 0, 200_000, -1)
    assert got.tolist() == [[2**50, -(2**50)]]


class _ResidualSequential(nn.Sequential):
    def forward(self, x):
        return x + super().forward(x)


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 16)

    def forward(self, x):
        return x + torch.relu(self.fc(x))


class _PointPool(nn.Module):
    def __init__(self):
        super().__init__()
        from elasticzo.models.pointnet import GlobalMaxPool
        self.fc1, self.pool, self.fc2 = nn.Linear(3, 8), GlobalMaxPool(), nn.Linear(8, 4)

    def forward(self, x):
        return self.fc2(self.pool(torch.relu(self.fc1(x))))


@pytest.mark.parametrize("model,adds", [
    (nn.Sequential(nn.Flatten(), nn.Linear(16, 16), _ResidualSequential(nn.Linear(16, 16), nn.ReLU()), nn.Linear(16, 4)), 1),
    (nn.Sequential(nn.Flatten(), nn.Linear(16, 16), _Block(), nn.Linear(16, 4)), 1),
    (_PointPool(), 0),
])
def test_a_sequential_with_its_own_forward_or_block_is_traced_not_flattened(model, adds):
    """A Sequential subclass's forward (a residual) or a custom block inside a Sequential is
    traced, not flattened away; the engine's own GlobalMaxPool stays one node in a trace."""
    torch.manual_seed(0)
    net = convert(model)
    assert isinstance(net, IntGraph) == (adds > 0 or not isinstance(model, nn.Sequential))
    assert sum(type(layer).__name__ == "IntAdd" for layer in net.layers) == adds
    x = torch.randn(32, 1, 4, 4) if isinstance(model, nn.Sequential) else torch.randn(32, 16, 3)
    with torch.no_grad():
        want = model(x)
    got = dequantize(net(quantize(x)))
    assert (got - want).norm() / want.norm() < 0.1  # quantisation error only, not a dropped residual


def test_global_average_pool_rounds_to_nearest():
    x = QTensor(torch.tensor([[[[1, 2], [3, 5]]], [[[-1, -2], [-3, -5]]]], dtype=torch.int8), 0)  # sums 11 and -11
    out = IntGlobalAvgPool2d()(x)
    assert out.values.shape == (2, 1, 1, 1)
    assert dequantize(out).flatten().tolist() == [2.75, -2.75]  # 11 / 4, exact: 4 is a power of two
    gen = torch.Generator().manual_seed(0)
    v = torch.randint(-127, 128, (3, 4, 3, 3), dtype=torch.int8, generator=gen)  # 9 pixels: not a power of two
    out = IntGlobalAvgPool2d()(QTensor(v, -3))
    mean = v.double().mean(dim=(2, 3), keepdim=True) * 2.0 ** -3
    assert float((dequantize(out) - mean).abs().max()) <= 2.0 ** int(out.exponent) * (0.5 + 2 ** -8)


def test_graph_of_a_sequential_equals_the_sequential_path_bit_for_bit(digits):
    x, y, _, _ = digits
    seq = _trained_float("cnn", digits)

    class Wrapped(nn.Module):  # the same layers, reached through a forward instead of a chain
        def __init__(self):
            super().__init__()
            self.body = seq

        def forward(self, x):
            return self.body(x)

    a, b = convert(seq), convert(Wrapped())
    assert isinstance(a, IntSequential) and isinstance(b, IntGraph)
    xq = quantize(x[:32])
    results = []
    for net in (a, b):
        net.train()
        logits = net(xq)
        loss = loss_closure(net, xq, y[:32])(True)
        results.append((logits, loss, [(l.grad_acc, l.bias_grad) for l in net.weight_layers()]))
    (la, sa, ga), (lb, sb, gb) = results
    assert torch.equal(la.values, lb.values) and int(la.exponent) == int(lb.exponent) and int(sa) == int(sb)
    assert all(torch.equal(p, q) and torch.equal(r, s) for (p, r), (q, s) in zip(ga, gb))


def test_residual_graph_gradients_follow_the_float_gradients(digits):
    x, y, _, _ = digits
    torch.manual_seed(0)
    model = TinyResNet().eval()
    net = convert(model).train()
    for layer in net.weight_layers():
        layer.backprop = True
    xq = quantize(x[:64])
    loss_closure(net, xq, y[:64])(True)
    F.cross_entropy(model(dequantize(xq).float()), y[:64], reduction="sum").backward()
    floats = [model.stem[0].weight, model.conv1.weight, model.conv2.weight, model.fc.weight]  # forward order
    for layer, p in zip(net.weight_layers(), floats):
        cos = F.cosine_similarity(layer.grad_acc.double().flatten(), p.grad.double().flatten(), dim=0)
        assert float(cos) > 0.95


@pytest.mark.parametrize("name,k,shift", [("cnn", 0, -3), ("cnn", 1, 2), ("bn-dropout-mlp", 2, 0), ("resnet", 1, -1), ("resnet", 2, 4)])
def test_optimiser_equals_its_reference_twin_with_biases_and_graphs(name, k, shift, digits):
    x, y, _, _ = digits
    nets = [convert(_trained_float(name, digits, steps=20)) for _ in range(2)]
    opt = IntElasticZO.for_model(nets[0], k, seed=3, zo_shift=shift)  # below 0: steps of several units
    ref = ReferenceIntElasticZO(nets[1], k, seed=3, zo_shift=shift)
    xq, = quantize_once(x[:96])
    for lo in (0, 32, 64):
        batch = QTensor(xq.values[lo:lo + 32], xq.exponent)
        opt.step(loss_closure(nets[0], batch, y[lo:lo + 32]))
        ref.step(batch, y[lo:lo + 32])
    for a, b in zip(nets[0].state_dict().values(), nets[1].state_dict().values()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", CONVERTIBLE)
def test_a_step_on_new_layers_is_integer_only_and_micro_batches_exactly(name, digits):
    x, y, _, _ = digits
    xq, = quantize_once(x[:64])
    nets = [convert(_trained_float(name, digits, steps=5)).train() for _ in range(2)]
    opts = [IntElasticZO.for_model(net, 1, seed=0) for net in nets]
    for _ in range(2):  # the first step warms up the ops dispatch (its speed probe times in float)
        opts[0].step(loss_closure(nets[0], xq, y[:64]))
        opts[1].step(micro_batched_loss_closure(nets[1], xq, y[:64], micro_batch=16))
    with DtypeAudit() as audit:
        opts[0].step(loss_closure(nets[0], xq, y[:64]))
    assert audit.count > 0 and audit.float_ops == []
    opts[1].step(micro_batched_loss_closure(nets[1], xq, y[:64], micro_batch=16))
    for a, b in zip(nets[0].state_dict().values(), nets[1].state_dict().values()):
        assert torch.equal(a, b)


class _Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: fx cannot trace it
            return self.fc(x.flatten(1))
        return -self.fc(x.flatten(1))


class _Positional(nn.Module):
    def __init__(self):
        super().__init__()
        self.pos = nn.Parameter(torch.zeros(64))
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        return self.fc(x.flatten(1) + self.pos)


class _Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 64)

    def forward(self, x):
        return self.fc(torch.relu(self.fc(x.flatten(1))))


@pytest.mark.parametrize("model,words", [
    (SMALL_MODELS["transformer"](), ["encoder", "TransformerEncoderLayer", "keep that part", "float"]),
    (_Branchy(), ["_Branchy", "torch.fx cannot trace", "control flow"]),
    (_Positional(), ["pos", "outside a module", "float"]),
    (nn.Sequential(nn.Flatten(), nn.BatchNorm1d(64), nn.Linear(64, 10)), ["module 1", "BatchNorm1d", "directly follow"]),
    (_Shared(), ["module fc", "more than once", "one module per call"]),
    (nn.Sequential(nn.Flatten(), nn.Linear(64, 10), nn.LayerNorm(10)), ["module 2", "LayerNorm", "no integer form"]),
    (nn.Sequential(nn.Conv2d(1, 2, 3), nn.AdaptiveAvgPool2d(2)), ["module 1", "AdaptiveAvgPool2d", "output_size=1"]),
])
def test_what_cannot_be_converted_is_named_with_what_to_do(model, words):
    with pytest.raises(ValueError) as err:
        convert(model)
    for word in words:
        assert word in str(err.value)


def test_the_finetuning_example_converts_a_bn_dropout_model_and_improves_it(tmp_path):
    """examples/finetune_int8.py with fast settings, so that it cannot rot."""
    path = Path(__file__).resolve().parent.parent / "examples" / "finetune_int8.py"
    spec = importlib.util.spec_from_file_location("finetune_int8", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    checkpoint = str(tmp_path / "float.pt")
    first = example.main(["--float-epochs", "1", "--int8-epochs", "3", "--checkpoint", checkpoint])
    assert abs(first["int8 converted"] - first["float"]) <= 3.0  # conversion keeps the function
    assert first["int8 fine-tuned"] > first["int8 converted"]  # integer fine-tuning improves it
    again = example.main(["--float-epochs", "0", "--int8-epochs", "0", "--checkpoint", checkpoint])
    assert again["float"] == first["float"] and again["int8 converted"] == first["int8 converted"]  # loaded


def test_biases_and_their_exponents_round_trip_through_state_dict(digits):
    x, _, _, _ = digits
    a, b = convert(_trained_float("cnn", digits, steps=5)), convert(SMALL_MODELS["cnn"]())
    assert {k for k in a.state_dict() if "bias" in k} == {"0.bias", "0.bias_exponent", "3.bias", "3.bias_exponent",
                                                          "7.bias", "7.bias_exponent"}
    b.load_state_dict(a.state_dict())
    xq = quantize(x[:16])
    assert torch.equal(a.eval()(xq).values, b.eval()(xq).values)  # the Python exponent mirror is reloaded too


def test_data_parallel_reduction_refuses_biases_by_name():
    net = convert(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)))
    opt = IntElasticZO.for_model(net, 1)
    opt.reduce = lambda losses, layers: losses
    xq, = quantize_once(torch.randn(8, 1, 8, 8))
    with pytest.raises(ValueError, match="bias"):
        opt.step(loss_closure(net, xq, torch.zeros(8, dtype=torch.long)))


class _FunctionalCNN(nn.Module):
    """DigitsCNN written the pytorch/examples way: modules for weights, functions for the rest."""

    def __init__(self, seq):
        super().__init__()
        self.conv1, self.conv2, self.fc = seq[0], seq[3], seq[7]

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(torch.relu(self.conv2(x)), kernel_size=2)
        return self.fc(x.view(x.size(0), -1))


def test_functional_calls_convert_as_their_modules_bit_for_bit(digits):
    x, _, _, _ = digits
    seq = _trained_float("cnn", digits, steps=20)
    a, b = convert(seq).eval(), convert(_FunctionalCNN(seq)).eval()
    assert [type(l).__name__ for l in b.layers] == [type(l).__name__ for l in a.layers]
    xq = quantize(x[:64])
    assert torch.equal(a(xq).values, b(xq).values)
    with pytest.raises(ValueError, match="padding"):  # the module's own checks apply to the function
        convert(type("P", (nn.Module,), {"forward": lambda self, x: F.max_pool2d(x, 2, padding=1)})())


@pytest.mark.parametrize("name,k", [("cnn", 1), ("resnet", 2)])
def test_a_saved_and_loaded_run_with_biases_continues_bit_for_bit(name, k, digits):
    x, y, _, _ = digits
    xq, = quantize_once(x[:128])
    batches = [(xq[lo:lo + 32], y[lo:lo + 32]) for lo in range(0, 128, 32)]
    nets = [convert(_trained_float(name, digits, steps=5)) for _ in range(2)]
    opts = [IntElasticZO.for_model(net, k, seed=1, zo_shift=0) for net in nets]
    for xb, yb in batches[:2]:
        opts[0].step(loss_closure(nets[0], xb, yb))
    saved = io.BytesIO()
    torch.save({"model": nets[0].state_dict(), "optim": opts[0].state_dict()}, saved)
    saved.seek(0)
    loaded = torch.load(saved)
    nets[1].load_state_dict(loaded["model"])
    opts[1].load_state_dict(loaded["optim"])  # carries of the weights and biases, running |d|, steps
    for xb, yb in batches[2:]:
        for net, opt in zip(nets, opts):
            opt.step(loss_closure(net, xb, yb))
    for a, b in zip(nets[0].state_dict().values(), nets[1].state_dict().values()):
        assert torch.equal(a, b)


def test_tiled_accumulators_add_the_bias_exactly_as_untiled(digits):
    x, _, _, _ = digits
    model = _trained_float("cnn", digits, steps=5)
    whole, tiled = convert(model).eval(), convert(model, tile=3).eval()
    xq = quantize(x[:16])
    assert torch.equal(whole(xq).values, tiled(xq).values)
