"""ElasticZO optimiser: exactness against its Reference twin, SGD and autograd."""
import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch import nn

from elasticzo.models import MLP, LeNet5, parametrised_layers, split_layers
from elasticzo.optim.elastic import ElasticZO
from elasticzo.optim.reference import ReferenceElasticZO
from elasticzo.zo.noise import derive_seed, layer_noise
from elasticzo.zo.perturb import perturbed


def tiny_mlp(seed=0):
    torch.manual_seed(seed)
    return MLP(in_features=12, hidden=(10, 8), num_classes=4)


def batch(seed=0, n=16, features=12, classes=4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, features, generator=g), torch.randint(0, classes, (n,), generator=g)


def make_closure(model, x, y):
    def closure(backward=True):
        loss = F.cross_entropy(model(x), y)
        if backward:
            loss.backward()
        return loss
    return closure


def snapshot(model):
    return [p.detach().clone() for p in model.parameters()]


def assert_bitwise_equal(a, b):
    for u, v in zip(a, b):
        assert torch.equal(u, v), (u - v).abs().max()


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31), eps=st.floats(1e-4, 1.0), kind=st.sampled_from(["gaussian", "rademacher"]))
def test_perturbed_forward_never_modifies_parameters(seed, eps, kind):
    model = tiny_mlp(seed % 100)
    before = snapshot(model)
    layers = parametrised_layers(model)
    x, _ = batch(seed)
    with perturbed(layers, lambda i: derive_seed(seed, 0, 0, i), eps, kind):
        out_plus = model(x)
    with perturbed(layers, lambda i: derive_seed(seed, 0, 0, i), -eps, kind):
        out_minus = model(x)
    assert_bitwise_equal(before, snapshot(model))
    assert all(isinstance(p, nn.Parameter) for p in model.parameters())
    assert not torch.equal(out_plus, out_minus)  # the perturbation did act on the forward


def test_perturbed_forward_uses_theta_plus_eps_z():
    model = tiny_mlp()
    x, _ = batch()
    layers = parametrised_layers(model)
    seeds = lambda i: derive_seed(3, 7, 0, i)
    with torch.no_grad(), perturbed(layers, seeds, 0.01, "gaussian"):
        out = model(x)
    manual = copy.deepcopy(model)
    with torch.no_grad():
        for i, layer in enumerate(parametrised_layers(manual)):
            params = list(layer.parameters(recurse=False))
            for p, z in zip(params, layer_noise(params, seeds(i), "gaussian")):
                p.copy_(p + 0.01 * z)  # theta + (eps z), two roundings, as perturb() defines it
        assert torch.equal(out, manual(x))


def test_exception_inside_perturbed_forward_restores_parameters():
    model = tiny_mlp()
    originals = list(model.parameters())
    with pytest.raises(RuntimeError):
        with perturbed(parametrised_layers(model), lambda i: i, 0.1, "gaussian"):
            model(torch.randn(2, 5))  # wrong width: fails inside the first layer
    assert all(a is b for a, b in zip(originals, model.parameters()))


@pytest.mark.parametrize("bp_layers", [0, 1, 2])
@pytest.mark.parametrize("queries", [1, 3])
def test_step_matches_reference_twin_bit_for_bit(bp_layers, queries):
    model = tiny_mlp()
    twin = copy.deepcopy(model)
    opts = dict(lr_zo=0.01, lr_bp=0.1, eps=1e-3, queries=queries, grad_clip=None, seed=5, normalize=False,
                momentum=0.0)
    opt = ElasticZO.for_model(model, bp_layers, **opts)
    ref = ReferenceElasticZO(twin, bp_layers, **opts)
    for step in range(4):
        x, y = batch(step)
        opt.step(make_closure(model, x, y))
        ref.step(x, lambda out: F.cross_entropy(out, y))
        assert_bitwise_equal(snapshot(model), snapshot(twin))


def test_zo_update_is_exactly_theta_minus_lr_g_z():
    model = tiny_mlp()
    theta = snapshot(model)
    opt = ElasticZO.for_model(model, 0, lr_zo=0.05, eps=1e-2, grad_clip=None, normalize=False, seed=11)
    x, y = batch()
    opt.step(make_closure(model, x, y))
    g = opt.last_projected_grads[0]
    expected = []
    for i, layer in enumerate(parametrised_layers(model)):
        params = list(layer.parameters(recurse=False))
        expected += layer_noise(params, derive_seed(11, 0, 0, i), "gaussian")
    for p, old, z in zip(model.parameters(), theta, expected):
        assert torch.equal(p.detach(), old + (g * -0.05) * z)  # two roundings: coef * z, then the sum
        assert torch.allclose(p.detach(), old - 0.05 * g * z, rtol=0, atol=1e-6)  # the rule itself


def test_projected_gradient_is_the_two_sided_difference():
    model = tiny_mlp()
    x, y = batch()
    eps = 1e-2
    layers = parametrised_layers(model)
    seeds = lambda i: derive_seed(2, 0, 0, i)
    with torch.no_grad():
        with perturbed(layers, seeds, eps, "gaussian"):
            plus = F.cross_entropy(model(x), y)
        with perturbed(layers, seeds, -eps, "gaussian"):
            minus = F.cross_entropy(model(x), y)
    opt = ElasticZO.for_model(model, 0, lr_zo=0.0, eps=eps, grad_clip=None, normalize=False, seed=2)
    opt.step(make_closure(model, x, y))
    assert torch.equal(opt.last_projected_grads[0], (plus - minus) / (2 * eps))


@pytest.mark.parametrize("momentum,weight_decay,nesterov", [(0.0, 0.0, False), (0.9, 5e-4, False), (0.9, 1e-3, True)])
def test_all_layers_in_bp_is_torch_sgd_bit_for_bit(momentum, weight_decay, nesterov):
    model = tiny_mlp()
    twin = copy.deepcopy(model)
    k = len(parametrised_layers(model))
    opt = ElasticZO.for_model(model, k, lr_bp=0.05, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
    sgd = torch.optim.SGD(twin.parameters(), lr=0.05, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
    for step in range(5):
        x, y = batch(step)
        opt.step(make_closure(model, x, y))
        sgd.zero_grad()
        F.cross_entropy(twin(x), y).backward()
        sgd.step()
        assert_bitwise_equal(snapshot(model), snapshot(twin))


def test_zero_bp_layers_is_vanilla_zo():
    """k = 0: every parameter is in the ZO part, nothing requires grad, and the twin agrees."""
    model = tiny_mlp()
    twin = copy.deepcopy(model)
    opt = ElasticZO.for_model(model, 0, lr_zo=0.01, seed=1)
    ref = ReferenceElasticZO(twin, 0, lr_zo=0.01, seed=1)
    assert [g["part"] for g in opt.param_groups] == ["zo"]
    assert not any(p.requires_grad for p in model.parameters())
    x, y = batch()
    opt.step(make_closure(model, x, y))
    ref.step(x, lambda out: F.cross_entropy(out, y))
    assert_bitwise_equal(snapshot(model), snapshot(twin))
    assert not torch.equal(snapshot(model)[0], snapshot(tiny_mlp())[0])  # the step did move the weights


def test_bp_gradient_equals_autograd_on_the_tail():
    """The BP part's gradient is the mean over the +- passes of autograd on the tail sub-network."""
    torch.manual_seed(0)
    model = LeNet5()
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    zo_layers, _ = split_layers(model, 2)
    head, tail = nn.Sequential(*list(model)[:9]), nn.Sequential(*list(model)[9:])  # fc2 (index 9) and fc3 (index 11) are the last 2 layers
    assert parametrised_layers(tail) == split_layers(model, 2)[1]
    eps, seed = 1e-3, 4
    expected = [torch.zeros_like(p) for p in tail.parameters()]
    for sign in (1, -1):
        with torch.no_grad(), perturbed(zo_layers, lambda i: derive_seed(seed, 0, 0, i), sign * eps, "gaussian"):
            features = head(x)
        loss = F.cross_entropy(tail(features), y)
        expected = [e + g for e, g in zip(expected, torch.autograd.grad(loss, list(tail.parameters())))]
    opt = ElasticZO.for_model(model, 2, lr_zo=0.0, lr_bp=0.0, eps=eps, seed=seed)
    opt.step(make_closure(model, x, y))
    for p, e in zip(tail.parameters(), expected):
        assert torch.allclose(p.grad, e / 2, rtol=1e-6, atol=1e-7)


def count_saved_tensors(fn):
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        fn()
    return saved


def test_zo_part_saves_nothing_for_backward():
    torch.manual_seed(0)
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    model = LeNet5()
    opt = ElasticZO.for_model(model, 0)
    assert count_saved_tensors(lambda: opt.step(make_closure(model, x, y))) == []
    # with the last 2 layers in BP, only the tail's tensors are saved: the same as the tail alone
    model = LeNet5()
    opt = ElasticZO.for_model(model, 2)
    saved = count_saved_tensors(lambda: opt.step(make_closure(model, x, y)))
    features = nn.Sequential(*list(model)[:9])(x).detach()
    tail_alone = count_saved_tensors(lambda: F.cross_entropy(nn.Sequential(*list(model)[9:])(features), y).backward())
    assert saved and sorted(saved) == sorted(tail_alone * 2)  # + and - pass


def test_non_finite_loss_ignored_leaves_zo_parameters_untouched():
    model = tiny_mlp()
    before = snapshot(model)
    opt = ElasticZO.for_model(model, 0, lr_zo=0.1, nonfinite="ignore")
    x, y = batch()
    x[0, 0] = float("nan")
    opt.step(make_closure(model, x, y))
    assert opt.last_projected_grads[0].item() == 0.0
    assert_bitwise_equal(before, snapshot(model))


def test_grad_clip_bounds_the_projected_gradient():
    model = tiny_mlp()
    opt = ElasticZO.for_model(model, 0, lr_zo=0.0, eps=1e-3, grad_clip=1e-6, normalize=False)
    x, y = batch()
    opt.step(make_closure(model, x, y))
    assert opt.last_projected_grads.abs().max().item() <= 1e-6


def test_same_seed_same_trajectory_and_different_seed_differs():
    runs = []
    for seed in (0, 0, 1):
        model = tiny_mlp()
        opt = ElasticZO.for_model(model, 1, lr_zo=0.01, seed=seed)
        for step in range(3):
            x, y = batch(step)
            opt.step(make_closure(model, x, y))
        runs.append(snapshot(model))
    assert_bitwise_equal(runs[0], runs[1])
    assert not torch.equal(runs[0][0], runs[2][0])


@pytest.mark.parametrize("bad", [dict(lr_zo=-1), dict(eps=0), dict(queries=0), dict(noise="uniform"),
                                 dict(momentum=1.0), dict(bp_grad="max"), dict(grad_clip=0)])
def test_bad_hyper_parameters_raise_value_error_naming_them(bad):
    name = next(iter(bad))
    with pytest.raises(ValueError, match=name):
        ElasticZO.for_model(tiny_mlp(), 1, **bad)


def test_bp_layers_out_of_range_names_the_limit():
    with pytest.raises(ValueError, match="0..3"):
        ElasticZO.for_model(tiny_mlp(), 4)


def test_state_dict_round_trip_continues_bit_identically():
    """Momentum buffers, the running RMS of g and the step counters all survive the round trip."""
    options = dict(lr_zo=0.01, momentum=0.9, normalize=True, seed=2)
    model = tiny_mlp()
    opt = ElasticZO.for_model(model, 1, **options)
    for step in range(2):
        opt.step(make_closure(model, *batch(step)))
    other_model = copy.deepcopy(model)
    other = ElasticZO.for_model(other_model, 1, **options)
    other.load_state_dict(copy.deepcopy(opt.state_dict()))  # no tensor shared with the original
    assert [g["step"] for g in other.param_groups] == [2, 2]
    for step in range(2, 4):
        opt.step(make_closure(model, *batch(step)))
        other.step(make_closure(other_model, *batch(step)))
    assert_bitwise_equal(snapshot(model), snapshot(other_model))


def _slow_takes_backward(fn):
    import inspect
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)
    return any(p.kind in kinds for p in inspect.signature(fn).parameters.values())


def _positional_only(flag, /):
    return flag


@pytest.mark.parametrize("fn", [lambda: 0, lambda b: b, lambda b=True: b, lambda *a: a, lambda *, b=True: b,
                                _positional_only, lambda **kw: kw])
def test_the_closure_form_read_from_its_code_agrees_with_its_signature(fn):
    from elasticzo.optim.closure import takes_backward
    assert takes_backward(fn) == _slow_takes_backward(fn)


def test_step_hooks_and_the_profiler_still_see_a_step():
    """step() skips torch.optim's wrapper only while nobody listens: registered step hooks run and a
    running profiler records the step's range, as with any torch optimiser."""
    model = MLP(hidden=(8,))
    opt = ElasticZO.for_model(model, 0)
    x, y = torch.randn(4, 1, 28, 28), torch.tensor([1, 2, 3, 4])
    calls = []
    pre = opt.register_step_pre_hook(lambda o, args, kwargs: calls.append("pre"))
    post = opt.register_step_post_hook(lambda o, args, kwargs: calls.append("post"))
    opt.step(lambda: F.cross_entropy(model(x), y))
    assert calls == ["pre", "post"]
    pre.remove(), post.remove()
    opt.step(lambda: F.cross_entropy(model(x), y))
    assert calls == ["pre", "post"]
    with torch.profiler.profile() as prof:
        opt.step(lambda: F.cross_entropy(model(x), y))
    assert any(e.name == "Optimizer.step#ElasticZO.step" for e in prof.events())


def test_a_subclass_that_overrides_step_runs_the_step_hooks_once():
    """torch.optim wraps a subclass's own step(); ElasticZO.step must then not wrap again."""
    class Logged(ElasticZO):
        def step(self, closure=None):
            return super().step(closure)

    model = MLP(hidden=(8,))
    opt = Logged.for_model(model, 0)
    x, y = torch.randn(4, 1, 28, 28), torch.tensor([1, 2, 3, 4])
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append("pre"))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append("post"))
    opt.step(lambda: F.cross_entropy(model(x), y))
    assert calls == ["pre", "post"]
    assert opt.param_groups[0]["step"] == 1
