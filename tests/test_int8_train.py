"""ElasticZO-INT8 training: integer-only steps, exact restore, NITI at k = all, determinism,
state_dict round trips, the public-API resume, and the CLI run."""
import copy
import io
import json

import pytest
import torch
from hypothesis import given, settings, strategies as st

from elasticzo.config import TrainConfig
from elasticzo.int8 import IntElasticZO, QTensor, convert, quantize_pixels
from elasticzo.int8.audit import DtypeAudit
from elasticzo.int8.loss import cross_entropy, loss_closure
from elasticzo.int8.rounding import bitlength, saturate_int8
from elasticzo.int8.update import int8_noise, niti_update, perturb_weight, zo_update
from elasticzo.models import LeNet5
from elasticzo.train.checkpoint import load_checkpoint
from elasticzo.train.loop import CHECKPOINT, train
from elasticzo.zo.noise import derive_seed


def lenet(seed=0):
    return convert(LeNet5(), init=torch.Generator().manual_seed(seed))


def net_and_batch(seed=0, n=16):
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (n, 1, 28, 28), generator=gen, dtype=torch.uint8)
    return lenet(seed), pixels, torch.randint(0, 10, (n,), generator=gen)


def weights(net):
    return [layer.weight.clone() for layer in net.weight_layers()]


@pytest.mark.parametrize("bp_layers", [0, 1, 2, 5])
def test_a_full_training_step_is_integer_only(bp_layers):
    net, pixels, y = net_and_batch()
    opt = IntElasticZO.for_model(net, bp_layers, seed=3)
    with torch.no_grad():  # once per process, outside the audit: the ops dispatch's speed probe (times float ops)
        copy.deepcopy(net)(pixels)
    with DtypeAudit() as rec:
        for _ in range(2):  # the second step also exercises the running |d| scale
            opt.step(loss_closure(net, pixels, y))
    assert rec.count > 100
    assert rec.float_ops == []
    with DtypeAudit() as control:  # the recorder does see floats
        torch.ones(2).mul(2)
    assert control.float_ops


def test_perturbed_passes_restore_weights_exactly_and_store_only_the_tail():
    net, pixels, y = net_and_batch()
    before = weights(net)
    opt = IntElasticZO.for_model(net, 2, eps=3)
    zo = opt.param_groups[0]
    with opt._perturbed(zo, +1), torch.no_grad():
        plus = net(pixels)
    with opt._perturbed(zo, -1), torch.no_grad():
        minus = net(pixels)
    assert not torch.equal(plus.values, minus.values)
    assert all(torch.equal(a, b) for a, b in zip(before, weights(net)))
    net(pixels)  # training mode, grad mode on: only the BP tail (from fc2, layer 9) stores its input
    assert [i for i, layer in enumerate(net) if getattr(layer, "_input", None) is not None] == [9, 11]
    assert all(getattr(layer, "_mask", None) is None for layer in list(net)[:9])


def test_the_perturbed_weight_is_saturated_w_plus_eps_z():
    net, pixels, _ = net_and_batch()
    opt = IntElasticZO.for_model(net, 2, eps=3, seed=5)
    first = net.weight_layers()[0]
    z = int8_noise(first.weight.shape, torch.Generator().manual_seed(derive_seed(5, 0, 0, 0)))
    with opt._perturbed(opt.param_groups[0], -1):
        assert torch.equal(first.perturbation(), saturate_int8(first.weight.to(torch.int16) - 3 * z.to(torch.int16)))
    assert first.perturbation is None


def test_zo_update_with_carry_is_the_documented_integer_rule():
    net, pixels, y = net_and_batch()
    before = weights(net)
    opt = IntElasticZO.for_model(net, 0, zo_shift=2, seed=7)
    opt.step(loss_closure(net, pixels, y))
    d = opt.last_projected_grads[0]
    s = bitlength((d.abs() >> 4).clamp(min=1)) + 2
    for i, (w0, layer) in enumerate(zip(before, net.weight_layers())):
        z = int8_noise(w0.shape, torch.Generator().manual_seed(derive_seed(7, 0, 0, i))).to(torch.int64)
        rule = [_carry_rule(w, 128, int(d) * zi, int(s)) for w, zi in zip(w0.view(-1).tolist(), z.view(-1).tolist())]
        assert layer.weight.view(-1).tolist() == [w for w, _ in rule]  # carry starting at 1/2 unit
        assert opt.state[layer.weight]["carry"].view(-1).tolist() == [c for _, c in rule]


@settings(max_examples=30, deadline=None)
@given(steps=st.lists(st.integers(-3000, 3000), min_size=1, max_size=10))  # |sum| < 127 units: no saturation
def test_carry_applies_the_exact_sum_of_small_steps(steps):
    """Carried updates lose nothing: after any sequence, W moved by round(sum of the steps)."""
    w = torch.zeros(1, dtype=torch.int8)
    carry = torch.full((1,), 128, dtype=torch.uint8)
    for step in steps:  # d * z / 2**(s - 8) = step / 2**8 weight units (s = 8)
        w = zo_update(w, torch.ones(1, dtype=torch.int8), torch.tensor(step), 8, carry=carry)
    assert -int(w) == (128 + sum(steps)) >> 8  # floor(1/2 + sum): the sum rounded to nearest, once


def _carry_rule(w: int, carry: int, dz: int, s: int) -> tuple[int, int]:
    """The documented rule in Python ints: T = carry + d z 2**(8 - s), rounded half up when s > 8."""
    scaled = dz << (8 - s) if s <= 8 else (dz + (1 << (s - 9))) >> (s - 8)
    total = carry + scaled
    return max(-127, min(127, w - (total >> 8))), total & 255


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(-5000, 5000), st.sampled_from([-1, 1]), st.integers(0, 16)),
                min_size=1, max_size=8))
def test_carried_step_is_d_z_over_2_to_the_s_for_every_shift(steps):
    """Shifts below 8 too: the step is d z / 2**s weight units, not 2**(8 - s) times smaller."""
    w, carry = torch.tensor([3], dtype=torch.int8), torch.full((1,), 128, dtype=torch.uint8)
    w_ref, carry_ref = 3, 128
    for d, z, s in steps:
        w = zo_update(w, torch.tensor([z], dtype=torch.int8), torch.tensor(d), torch.tensor(s), carry=carry)
        w_ref, carry_ref = _carry_rule(w_ref, carry_ref, d * z, s)
        assert (int(w), int(carry)) == (w_ref, carry_ref)


def test_carried_step_saturates_instead_of_wrapping():
    w, carry = torch.zeros(2, dtype=torch.int8), torch.full((2,), 128, dtype=torch.uint8)
    w = zo_update(w, torch.tensor([1, -1], dtype=torch.int8), torch.tensor(1 << 62), 0, carry=carry)
    assert w.tolist() == [-127, 127]


def test_all_layers_in_bp_is_pure_niti():
    """k = all is NITI written out by hand: forward, integer CE gradient, backward, niti_update."""
    net, pixels, y = net_and_batch()
    twin = copy.deepcopy(net)
    opt = IntElasticZO.for_model(net, 5, mu=3)
    for _ in range(3):
        opt.step(loss_closure(net, pixels, y))
        _, grad = cross_entropy(twin.forward(quantize_pixels(pixels), store=True), y)
        twin.backward(grad)
        for layer in twin.weight_layers():
            layer.weight = niti_update(layer.weight, layer.grad_acc, 3)
        assert all(torch.equal(a, b) for a, b in zip(weights(net), weights(twin)))


def test_same_seed_same_integer_weights():
    runs = []
    for seed in (1, 1, 2):
        net, pixels, y = net_and_batch()
        opt = IntElasticZO.for_model(net, 2, seed=seed)
        for _ in range(3):
            opt.step(loss_closure(net, pixels, y))
        runs.append(weights(net))
    assert all(torch.equal(a, b) for a, b in zip(runs[0], runs[1]))
    assert not all(torch.equal(a, b) for a, b in zip(runs[0], runs[2]))


def _steps(net, opt, batches):
    for pixels, y in batches:
        opt.step(loss_closure(net, pixels, y))


def _round_trip(obj):
    """Through bytes, as a checkpoint file would: no tensor is shared with the original."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer)


@pytest.mark.parametrize("bp_layers", [0, 2, 5])
def test_state_dict_round_trip_continues_bit_identically(bp_layers):
    """Public API only: convert, for_model, step, state_dict, load_state_dict."""
    batches = [net_and_batch(seed)[1:] for seed in range(6)]
    net = lenet()
    opt = IntElasticZO.for_model(net, bp_layers, seed=4, zo_shift=1)
    _steps(net, opt, batches)
    cut = lenet()
    cut_opt = IntElasticZO.for_model(cut, bp_layers, seed=4, zo_shift=1)
    _steps(cut, cut_opt, batches[:3])
    saved_model, saved_opt = _round_trip(cut.state_dict()), _round_trip(cut_opt.state_dict())
    resumed = lenet(seed=9)  # other weights: everything must come from the state dicts
    resumed_opt = IntElasticZO.for_model(resumed, bp_layers, seed=4, zo_shift=1)
    resumed.load_state_dict(saved_model)
    resumed_opt.load_state_dict(saved_opt)
    _steps(resumed, resumed_opt, batches[3:])
    assert all(torch.equal(a, b) for a, b in zip(weights(net), weights(resumed)))
    assert [g["step"] for g in resumed_opt.param_groups] == [g["step"] for g in opt.param_groups]
    for p, q in zip(opt.state, resumed_opt.state):
        assert all(torch.equal(opt.state[p][k], resumed_opt.state[q][k]) for k in opt.state[p])


def test_integer_model_is_a_module_with_state_dict_and_device_moves():
    net = lenet()
    state = net.state_dict()
    assert [k for k in state if k.endswith(".weight")] == ["0.weight", "3.weight", "7.weight", "9.weight", "11.weight"]
    assert state["0.exponent"].dtype == torch.int64 and int(state["0.exponent"]) == -7
    other = lenet(seed=1)
    state["0.exponent"].fill_(-6)
    other.load_state_dict(state)
    assert other.weight_layers()[0].weight_exponent == -6  # the Python mirror follows the buffer
    assert torch.equal(other.weight_layers()[1].weight, net.weight_layers()[1].weight)
    assert next(net.to("cpu").buffers()).device.type == "cpu" and not net.eval().training


def test_integer_model_takes_raw_batches_and_names_what_it_wants():
    net, pixels, _ = net_and_batch()
    with torch.no_grad():
        assert torch.equal(net(pixels).values, net(quantize_pixels(pixels)).values)
        out = net(torch.rand(2, 1, 28, 28))  # float: quantised at the boundary
    assert isinstance(out, QTensor) and out.shape == (2, 10)
    with pytest.raises(TypeError, match="int16"):
        net(torch.zeros(1, 1, 28, 28, dtype=torch.int16))


@pytest.mark.parametrize("bad", [dict(eps=0), dict(eps=1.5), dict(zo_shift=-9), dict(mu=9), dict(bp_layers=6),
                                 dict(zo_shift=31)])
def test_bad_settings_raise(bad):
    net, _, _ = net_and_batch()
    kw = {"bp_layers": 2, **bad}
    with pytest.raises(ValueError, match=next(iter(bad))):
        IntElasticZO.for_model(net, kw.pop("bp_layers"), **kw)


def test_a_closure_without_backward_is_named():
    net, pixels, y = net_and_batch()
    opt = IntElasticZO.for_model(net, 1)
    with pytest.raises(RuntimeError, match="model.backward"):
        opt.step(lambda backward=True: loss_closure(net, pixels, y)(False))


def test_quantize_pixels_rejects_float_images():
    with pytest.raises(TypeError, match="uint8"):
        quantize_pixels(torch.zeros(1, 1, 28, 28))


def test_perturb_weight_saturates():
    w = torch.tensor([127, -127, 0], dtype=torch.int8)
    assert perturb_weight(w, torch.ones(3, dtype=torch.int8), 5).tolist() == [127, -122, 5]


SMALL = dict(train_limit=320, test_limit=200, batch_size=32, progress=False, checkpoint_every=4, precision="int8")


def test_int8_run_learns_and_resumes_bit_identically(tmp_path, data_root, monkeypatch):
    kw = dict(SMALL, data_root=str(data_root), epochs=2, method="elasticzo", bp_layers=2)
    full = train(TrainConfig(run_dir=str(tmp_path / "full"), **kw), log=lambda *_: None)
    assert full[-1]["test_acc"] > 30  # ten classes: chance is 10 %
    from elasticzo.train import learner as learner_module
    original = learner_module.Learner.train_step
    calls = {"n": 0}

    def dying_step(self, x, y):  # fault injection: the process "dies" before step 14
        if calls["n"] == 14:
            raise KeyboardInterrupt
        calls["n"] += 1
        return original(self, x, y)

    monkeypatch.setattr(learner_module.Learner, "train_step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(run_dir=str(tmp_path / "cut"), **kw), log=lambda *_: None)
    monkeypatch.setattr(learner_module.Learner, "train_step", original)
    resumed = train(TrainConfig(run_dir=str(tmp_path / "cut"), resume=True, **kw), log=lambda *_: None)
    strip = lambda rs: [{k: v for k, v in r.items() if "seconds" not in k} for r in rs]
    assert strip(resumed) == strip(full)
    a, _ = load_checkpoint(tmp_path / "full" / CHECKPOINT)
    b, _ = load_checkpoint(tmp_path / "cut" / CHECKPOINT)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert a["model.0.weight"].dtype == torch.int8 and a["model.0.exponent"].tolist() == -7
    assert json.loads((tmp_path / "full" / "config.json").read_text())["precision"] == "int8"


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 2**62), st.integers(-(2**62), 2**62), st.integers(-8, 30))
def test_running_shift_in_python_ints_equals_the_tensor_rule(scale, d, zo_shift):
    """The CPU path of the ZO update (Python ints) and the device path (0-dim tensors) agree."""
    from elasticzo.int8.elastic import running_shift, running_shift_int

    running, s = running_shift(torch.tensor(scale), torch.tensor(d), zo_shift)
    assert (int(running), int(s)) == running_shift_int(scale, d, zo_shift)

