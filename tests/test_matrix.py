"""The own-model matrix: every FP32 optimiser (vanilla ZO, ElasticZO k=1, k=2) on every small model
(dropout, BatchNorm, residual, attention) trained on the real sklearn digits, and every INT8 one
(vanilla ZO, k=1, k=2, NITI-BP) on every model ``int8.convert`` takes (all but the transformer).

Per cell: the training loss decreases over a few hundred steps, a second run replays the first
bit for bit, and (FP32) BatchNorm statistics count exactly one batch per step.
"""
import pytest
import torch
import torch.nn.functional as F

from elasticzo.data import BatchLoader
from elasticzo.int8 import IntElasticZO, QTensor, convert, cross_entropy_loss, loss_closure
from elasticzo.int8.inputs import quantize_once
from elasticzo.int8.loss import LOSS_FRAC_BITS
from elasticzo.models.small import SMALL_MODELS
from elasticzo.optim import ElasticZO

pytest.importorskip("sklearn")
from elasticzo.data.digits import load_digits_split  # noqa: E402

STEPS = {0: 200, 1: 100, 2: 100}  # vanilla ZO moves slowest
LR_ZO = {0: 3e-3, 1: 1e-3, 2: 1e-3}


@pytest.fixture(scope="module")
def digits():
    return load_digits_split(0)


def train(name, k, digits, steps, seed=0):
    x, y, _, _ = digits
    torch.manual_seed(seed)
    model = SMALL_MODELS[name]()
    opt = ElasticZO.for_model(model, k, example_input=x[:2], lr_zo=LR_ZO[k], seed=seed)
    batches = BatchLoader(x, y, 64, seed=seed)
    done = 0
    while done < steps:
        model.train()
        for xb, yb in batches.epoch_batches(done // len(batches)):
            opt.step(lambda: F.cross_entropy(model(xb), yb))
            done += 1
            if done == steps:
                break
    return model


def train_loss(model, digits):
    x, y, _, _ = digits
    model.eval()
    with torch.no_grad():
        return float(F.cross_entropy(model(x[:512]), y[:512]))


@pytest.mark.parametrize("k", [0, 1, 2])
@pytest.mark.parametrize("name", list(SMALL_MODELS))
def test_loss_decreases_and_batchnorm_counts_one_batch_per_step(name, k, digits, one_thread):
    torch.manual_seed(0)
    before = train_loss(SMALL_MODELS[name](), digits)
    model = train(name, k, digits, STEPS[k])
    after = train_loss(model, digits)
    assert after < before - (0.02 if k == 0 else 0.05), (before, after)
    for bn in (m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)):
        assert int(bn.num_batches_tracked) == STEPS[k]


@pytest.mark.parametrize("k", [0, 1, 2])
@pytest.mark.parametrize("name", list(SMALL_MODELS))
def test_same_seed_replays_bit_for_bit(name, k, digits, one_thread):
    runs = [train(name, k, digits, 15) for _ in range(2)]
    for a, b in zip(runs[0].state_dict().values(), runs[1].state_dict().values()):
        assert torch.equal(a, b)


INT8_MODELS = ["cnn", "bn-dropout-mlp", "resnet"]
INT8_STEPS = {0: 200, 1: 100, 2: 100, "all": 100}
INT8_ZO_SHIFT = -2  # steps of a few weight units: what these small models need (docs/digits.md)


def train_int8(name, k, digits, steps, seed=0):
    x, y, _, _ = digits
    torch.manual_seed(seed)
    net = convert(SMALL_MODELS[name]())
    opt = IntElasticZO.for_model(net, len(net.weight_layers()) if k == "all" else k, zo_shift=INT8_ZO_SHIFT, seed=seed)
    xq, = quantize_once(x)
    batches, done = BatchLoader(xq.values, y, 64, seed=seed), 0
    net.train()
    while done < steps:
        for xb, yb in batches.epoch_batches(done // len(batches)):
            opt.step(loss_closure(net, QTensor(xb, xq.exponent), yb))
            done += 1
            if done == steps:
                break
    return net, opt


def int8_train_loss(net, digits):
    """Mean cross-entropy in nats of the first 512 training images (the integer loss, rescaled)."""
    x, y, _, _ = digits
    xq, = quantize_once(x)
    net.eval()
    with torch.no_grad():
        total = int(cross_entropy_loss(net(xq[:512]), y[:512]))
    return total * 0.6931471805599453 / 2**LOSS_FRAC_BITS / 512


@pytest.mark.parametrize("k", [0, 1, 2, "all"])
@pytest.mark.parametrize("name", INT8_MODELS)
def test_int8_loss_decreases(name, k, digits, one_thread):
    torch.manual_seed(0)
    before = int8_train_loss(convert(SMALL_MODELS[name]()), digits)
    after = int8_train_loss(train_int8(name, k, digits, INT8_STEPS[k])[0], digits)
    assert after < before - (0.02 if k == 0 else 0.05), (before, after)


@pytest.mark.parametrize("k", [0, 1, 2, "all"])
@pytest.mark.parametrize("name", INT8_MODELS)
def test_int8_same_seed_replays_bit_for_bit(name, k, digits, one_thread):
    (a, opt_a), (b, opt_b) = (train_int8(name, k, digits, 15) for _ in range(2))
    for u, v in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.equal(u, v)
    for u, v in zip(opt_a.state.values(), opt_b.state.values()):
        assert all(torch.equal(u[key], v[key]) for key in u)
