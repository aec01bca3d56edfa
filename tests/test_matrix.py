"""The own-model matrix: every FP32 optimiser (vanilla ZO, ElasticZO k=1, k=2) on every small model
(dropout, BatchNorm, residual, attention) trained on the real sklearn digits.

Per cell: the training loss decreases over a few hundred steps, a second run replays the first
bit for bit, and BatchNorm statistics count exactly one batch per step.
"""
import pytest
import torch
import torch.nn.functional as F

from elasticzo.data import BatchLoader
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
