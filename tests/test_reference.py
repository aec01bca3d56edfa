"""Both optimisers against their Reference twins, bit for bit, over every hyper-parameter; and the
proof that this comparison catches a changed update rule (each mutation below must fail it)."""
import copy

import pytest
import torch
import torch.nn.functional as F

import elasticzo.int8.elastic as int8_elastic
import elasticzo.int8.native as int8_native
import elasticzo.int8.update as int8_update
import elasticzo.optim.elastic as float_elastic
from elasticzo.int8 import IntElasticZO, convert, loss_closure
from elasticzo.int8.reference import ReferenceIntElasticZO
from elasticzo.models import MLP, LeNet5
from elasticzo.optim import ElasticZO, ReferenceElasticZO

# Every hyper-parameter of ElasticZO moved off its default at least once (the defaults are the base).
FLOAT_CASES = {
    "defaults": dict(),
    "vanilla_zo": dict(bp=0, lr_zo=0.02, eps=1e-2, queries=3, noise="rademacher", grad_clip=None, seed=7),
    "zo_safeguards": dict(bp=1, normalize=True, grad_clip=0.5, zo_weight_decay=0.1, lr_zo=0.05, seed=3),
    "bp_momentum": dict(bp=2, momentum=0.9, weight_decay=1e-3, dampening=0.1, lr_bp=0.1, queries=2),
    "bp_nesterov_plus": dict(bp=1, momentum=0.8, nesterov=True, bp_grad="plus", queries=2, normalize=True),
    "sgd_only": dict(bp=3, momentum=0.9, weight_decay=5e-4, nesterov=True, lr_bp=0.02),
}
INT8_CASES = {
    "defaults": dict(),
    "vanilla_zo": dict(bp=0, eps=3, zo_shift=1, seed=5),
    "hybrid": dict(bp=2, eps=2, zo_shift=0, mu=5, seed=9),
    "niti_only": dict(bp=5, mu=2),
}


def float_batch(step, n=16):
    g = torch.Generator().manual_seed(step)
    return torch.randn(n, 12, generator=g), torch.randint(0, 4, (n,), generator=g)


def int8_batch(step, n=8):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randint(0, 256, (n, 1, 28, 28), generator=g, dtype=torch.uint8), torch.randint(0, 10, (n,), generator=g)


def float_twins_agree(case: dict, steps: int = 4) -> bool:
    options = dict(case)
    k = options.pop("bp", 1)
    torch.manual_seed(0)
    model = MLP(in_features=12, hidden=(10, 8), num_classes=4)
    twin = copy.deepcopy(model)
    opt, ref = ElasticZO.for_model(model, k, **options), ReferenceElasticZO(twin, k, **options)
    for step in range(steps):
        x, y = float_batch(step)

        def closure(backward=True):
            loss = F.cross_entropy(model(x), y)
            if backward:
                loss.backward()
            return loss

        opt.step(closure)
        ref.step(x, lambda out: F.cross_entropy(out, y))
    return all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))


def int8_twins_agree(case: dict, steps: int = 4) -> bool:
    options = dict(case)
    k = options.pop("bp", 1)
    net = convert(LeNet5(), init=torch.Generator().manual_seed(1))
    twin = copy.deepcopy(net)
    opt, ref = IntElasticZO.for_model(net, k, **options), ReferenceIntElasticZO(twin, k, **options)
    for step in range(steps):
        x, y = int8_batch(step)
        opt.step(loss_closure(net, x, y))
        ref.step(x, y)
    return all(torch.equal(a.weight, b.weight) for a, b in zip(net.weight_layers(), twin.weight_layers()))


@pytest.mark.parametrize("case", FLOAT_CASES)
def test_elasticzo_equals_its_reference_twin(case):
    assert float_twins_agree(FLOAT_CASES[case])


@pytest.mark.parametrize("case", INT8_CASES)
def test_int_elasticzo_equals_its_reference_twin(case):
    assert int8_twins_agree(INT8_CASES[case])


def test_the_float_cases_cover_every_hyper_parameter():
    import inspect
    structure = ("self", "params", "model", "bp_layers", "bp", "example_input", "bp_optimizer", "nonfinite")
    names = {n for n in inspect.signature(ElasticZO.__init__).parameters if n not in structure}
    assert names <= {k for case in FLOAT_CASES.values() for k in case}
    names = {n for n in inspect.signature(IntElasticZO.__init__).parameters if n not in ("self", "zo_layers", "bp_layers")}
    assert names <= {k for case in INT8_CASES.values() for k in case}


def _mutate_sgd(monkeypatch):  # the BP part's SGD with a slightly different momentum
    original = torch.optim.SGD
    monkeypatch.setattr(float_elastic.torch.optim, "SGD",
                        lambda groups, **kw: original(groups, **{**kw, "momentum": kw["momentum"] * 0.99}))


FLOAT_MUTATIONS = {  # name -> (how to change the rule, a case that uses that rule)
    "rms_decay_0.5": (lambda mp: mp.setattr(float_elastic, "RMS_DECAY", 0.5), "zo_safeguards"),
    "decay_1_minus_wd": (lambda mp: mp.setattr(float_elastic, "zo_decay_factor", lambda lr, wd: 1 - wd), "zo_safeguards"),
    "sgd_momentum": (_mutate_sgd, "bp_momentum"),
}


def _mutate_niti(monkeypatch):  # one bit more learning rate
    original = int8_elastic.niti_update
    monkeypatch.setattr(int8_elastic, "niti_update", lambda w, g, mu: original(w, g, min(mu + 1, 8)))


INT8_MUTATIONS = {
    "ema_shift_3": (lambda mp: mp.setattr(int8_elastic, "EMA_SHIFT", 3), "vanilla_zo"),
    "carry_bits_7": (lambda mp: mp.setattr(int8_update, "CARRY_BITS", 7), "hybrid"),
    "niti_mu_plus_1": (_mutate_niti, "niti_only"),
}


@pytest.mark.parametrize("mutation", FLOAT_MUTATIONS)
def test_a_changed_float_update_rule_fails_the_twin_comparison(mutation, monkeypatch):
    change, case = FLOAT_MUTATIONS[mutation]
    change(monkeypatch)
    assert not float_twins_agree(FLOAT_CASES[case])


@pytest.mark.parametrize("mutation", INT8_MUTATIONS)
def test_a_changed_int8_update_rule_fails_the_twin_comparison(mutation, monkeypatch):
    monkeypatch.setattr(int8_native, "_enabled", False)  # the portable rule (the native kernels are proved equal to it)
    change, case = INT8_MUTATIONS[mutation]
    change(monkeypatch)
    assert not int8_twins_agree(INT8_CASES[case])
