"""ElasticZO on users' own models: split by forward order, dropout, BatchNorm, attention, closures,
param groups, BP optimisers, schedulers, non-finite losses and defaults (issue 10's defects)."""
import copy
import inspect

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from elasticzo.config import TrainConfig
from elasticzo.models.small import BNDropoutMLP, DigitsCNN, TinyResNet, TinyTransformer
from elasticzo.optim.elastic import ElasticZO, NonFiniteLoss


def data(n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def build(cls, seed=0, **kw):
    torch.manual_seed(seed)
    return cls(**kw)


def params_of(model):
    return [p.detach().clone() for p in model.parameters()]


def bp_names(opt, model):
    names = {id(p): n for n, p in model.named_parameters()}
    return sorted(names[id(p)] for g in opt.param_groups if g["part"] == "bp" for p in g["params"])


# --- the split follows the forward order -------------------------------------------------------

def test_head_registered_first_is_still_the_last_layer():
    model, (x, _) = build(TinyResNet), data()
    opt = ElasticZO.for_model(model, 1, example_input=x[:2])
    assert bp_names(opt, model) == ["fc.bias", "fc.weight"]


def test_untraced_split_in_the_wrong_order_is_refused_at_the_first_step():
    model, (x, y) = build(TinyResNet), data()
    opt = ElasticZO.for_model(model, 1)  # registration order would put fc in ZO and bn2 in BP
    before = params_of(model)
    with pytest.raises(ValueError, match="example_input"):
        opt.step(lambda: F.cross_entropy(model(x), y))
    assert all(torch.equal(a, b) for a, b in zip(before, params_of(model)))


def test_norm_layers_and_a_positional_parameter_are_not_layers():
    model, (x, _) = build(TinyTransformer), data()
    opt = ElasticZO.for_model(model, 2, example_input=x[:2])
    assert len(opt.split.layers) == 5  # embed (+pos), attention (+norm1), linear1, linear2 (+norms), head
    assert bp_names(opt, model) == ["encoder.linear2.bias", "encoder.linear2.weight", "encoder.norm2.bias",
                                    "encoder.norm2.weight", "head.bias", "head.weight", "norm.bias", "norm.weight"]
    mlp = build(BNDropoutMLP)
    assert bp_names(ElasticZO.for_model(mlp, 1, example_input=x[:2]), mlp) == ["9.bias", "9.weight"]


@pytest.mark.parametrize("spec", [lambda m: [m.fc, m.bn2], lambda m: ["fc", "bn2.weight", "bn2.bias"],
                                  lambda m: (lambda name, p: name.startswith(("fc", "bn2")))])
def test_bp_part_named_by_modules_names_or_predicate(spec):
    model, (x, y) = build(TinyResNet), data()
    opt = ElasticZO.for_model(model, bp=spec(model), example_input=x[:2])
    assert bp_names(opt, model) == ["bn2.bias", "bn2.weight", "fc.bias", "fc.weight"]
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"bn2.bias", "bn2.weight", "fc.bias", "fc.weight"}
    opt.step(lambda: F.cross_entropy(model(x), y))


def test_bad_bp_spec_names_the_problem():
    model, (x, _) = build(TinyResNet), data()
    with pytest.raises(ValueError, match="'nope'"):
        ElasticZO.for_model(model, bp=["nope"], example_input=x[:2])
    with pytest.raises(ValueError, match="exactly one"):
        ElasticZO(model.parameters(), model, bp_layers=1, bp=["fc"])


def test_describe_split_lists_both_parts_with_counts_and_memory():
    model, (x, _) = build(TinyTransformer), data()
    text = ElasticZO.for_model(model, 1, example_input=x[:2]).describe_split()
    zo_count = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("head"))
    assert f"ZO  8 module(s), {zo_count:,} parameters" in text and "BP  1 module(s), 330 parameters" in text
    assert "encoder.self_attn.out_proj.weight" in text and "KiB" in text


# --- attention: a parameter read outside its module's forward ----------------------------------

def test_out_proj_is_perturbed_through_attention_and_gets_a_real_gradient():
    model, (x, y) = build(TinyTransformer, dropout=0.0), data()
    only_out_proj = lambda name, p: "out_proj" not in name  # everything else in BP: the ZO part is out_proj
    opt = ElasticZO.for_model(model, bp=only_out_proj, example_input=x[:2], lr_zo=0.0, lr_bp=0.0, normalize=False)
    assert [u.module for u in opt.zo_layers] == [model.encoder.self_attn]
    opt.step(lambda: F.cross_entropy(model(x), y))
    assert opt.last_projected_grads.abs().item() > 0  # 0 exactly if the perturbation never acted


def test_untraced_attention_is_refused_with_a_message():
    model, (x, y) = build(TinyTransformer), data()
    opt = ElasticZO.for_model(model, 1)
    with pytest.raises(ValueError, match="out_proj"):
        opt.step(lambda: F.cross_entropy(model(x), y))


def test_parameters_that_never_reach_the_output_are_in_neither_part():
    class WithSpareHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.unused = nn.Linear(64, 10), nn.Linear(3, 3)

        def forward(self, x):
            return self.body(x)

    model, x = WithSpareHead(), torch.randn(4, 64)
    opt = ElasticZO.for_model(model, 1, example_input=x)
    assert opt.split.unused == ["unused.weight", "unused.bias"]
    assert not model.unused.weight.requires_grad
    assert all(id(p) != id(model.unused.weight) for g in opt.param_groups for p in g["params"])


# --- dropout and BatchNorm ---------------------------------------------------------------------

def masks_of_each_pass(model, opt, x, y):
    seen = []  # (output zero, input non-zero) of the dropout layer in each pass
    hook = model[4].register_forward_hook(lambda m, args, out: seen.append((out.eq(0), args[0].ne(0))))
    opt.step(lambda: F.cross_entropy(model(x), y))
    hook.remove()
    return seen


def same_mask(a, b):
    both = a[1] & b[1]  # where ReLU let both passes through, only dropout can zero an entry
    return torch.equal(a[0] & both, b[0] & both)


@pytest.mark.parametrize("k", [0, 1])
def test_plus_and_minus_pass_see_the_same_dropout_mask(k):
    model, (x, y) = build(BNDropoutMLP, p=0.5), data()
    opt = ElasticZO.for_model(model, k, example_input=x[:2], queries=2)
    masks = masks_of_each_pass(model, opt, x.flatten(1), y)
    assert len(masks) == 4 and same_mask(masks[0], masks[1]) and same_mask(masks[2], masks[3])
    assert not same_mask(masks[0], masks[2])  # another query, another mask
    assert not same_mask(masks[0], masks_of_each_pass(model, opt, x.flatten(1), y)[0])  # another step too


def test_dropout_keeps_the_projected_gradient_small():
    """With frozen weights, a mask that differed between passes made |g| ~10x larger (issue 10)."""
    x, y = data(64)
    sizes = {}
    for p in (0.0, 0.2):
        model = build(BNDropoutMLP, p=p)
        opt = ElasticZO.for_model(model, 0, example_input=x[:2], lr_zo=0.0, normalize=False, grad_clip=None)
        sizes[p] = sum(float(opt.step(lambda: F.cross_entropy(model(x), y)) * 0 + opt.last_projected_grads.abs())
                       for _ in range(20))
    assert sizes[0.2] < 3 * sizes[0.0]


def test_step_leaves_the_callers_rng_alone_and_replays_exactly():
    x, y = data()
    runs = []
    for _ in range(2):
        model = build(BNDropoutMLP, p=0.3)
        opt = ElasticZO.for_model(model, 1, example_input=x[:2], seed=3)
        torch.manual_seed(123)
        for _ in range(3):
            opt.step(lambda: F.cross_entropy(model(x), y))
        runs.append((params_of(model), torch.rand(1)))
    torch.manual_seed(123)
    assert torch.equal(runs[0][1], torch.rand(1))  # as if the steps had drawn nothing
    assert all(torch.equal(a, b) for a, b in zip(runs[0][0], runs[1][0]))


@pytest.mark.parametrize("k,queries", [(0, 1), (1, 2), (2, 1)])
def test_batchnorm_statistics_update_once_per_step(k, queries):
    model, (x, y) = build(TinyResNet), data()
    opt = ElasticZO.for_model(model, k, example_input=x[:2], queries=queries)
    for _ in range(10):
        opt.step(lambda: F.cross_entropy(model(x), y))
    assert int(model.bn1.num_batches_tracked) == int(model.stem[1].num_batches_tracked) == 10


def test_batchnorm_statistics_come_from_the_first_plus_pass():
    from elasticzo.zo.noise import derive_seed
    from elasticzo.zo.perturb import perturbed

    model, (x, y) = build(TinyResNet), data()
    twin = copy.deepcopy(model)
    opt = ElasticZO.for_model(model, 0, example_input=x[:2], seed=5)
    opt.step(lambda: F.cross_entropy(model(x), y))
    with torch.no_grad(), perturbed(ElasticZO.for_model(twin, 0, example_input=x[:2]).zo_layers, lambda i: derive_seed(5, 0, 0, i), 1e-3, "gaussian"):
        twin(x)
    assert torch.equal(model.bn2.running_var, twin.bn2.running_var)


# --- closures ----------------------------------------------------------------------------------

def train(k, closure_kind, steps=3, **options):
    model, (x, y) = build(DigitsCNN), data()
    opt = ElasticZO.for_model(model, k, example_input=x[:2], **options)
    closures = {
        "flag": lambda backward=True: (lambda l: (l.backward() if backward else None, l)[1])(F.cross_entropy(model(x), y)),
        "zero_arg": lambda: F.cross_entropy(model(x), y),
        "torch_style": lambda: (opt.zero_grad(), (lambda l: (l.backward(), l)[1])(F.cross_entropy(model(x), y)))[1],
        "forgot_backward": lambda backward=True: F.cross_entropy(model(x), y),
    }
    for _ in range(steps):
        opt.step(closures[closure_kind])
    return params_of(model)


@pytest.mark.parametrize("k", [0, 1, 3])
@pytest.mark.parametrize("kind", ["zero_arg", "torch_style", "forgot_backward"])
def test_every_closure_form_gives_the_same_update_as_closure_backward(k, kind):
    if k == 0 and kind == "torch_style":
        pytest.skip("vanilla ZO has no graph to backpropagate: covered by the error-message test")
    expected = train(k, "flag")
    assert all(torch.equal(a, b) for a, b in zip(expected, train(k, kind)))


def test_all_layers_in_bp_with_a_forgotten_backward_still_trains():
    model, _ = build(DigitsCNN), data()
    before = params_of(model)
    train_params = train(3, "forgot_backward", steps=1)
    assert not torch.equal(before[0], train_params[0])


def test_closure_mistakes_get_messages_that_say_what_to_change():
    model, (x, y) = build(DigitsCNN), data()
    opt = ElasticZO.for_model(model, 1, example_input=x[:2])
    with pytest.raises(TypeError, match=r"not loss.item\(\)"):
        opt.step(lambda: F.cross_entropy(model(x), y).item())
    with pytest.raises(RuntimeError, match="does not require grad"):
        opt.step(lambda: F.cross_entropy(model(x), y).detach())
    with pytest.raises(ValueError, match="reduce it"):
        opt.step(lambda: F.cross_entropy(model(x), y, reduction="none"))
    with pytest.raises(ValueError, match="closure"):
        opt.step()
    zo = ElasticZO.for_model(model, 0, example_input=x[:2])
    with pytest.raises(RuntimeError, match="Drop loss.backward"):
        zo.step(lambda: (lambda l: (l.backward(), l)[1])(F.cross_entropy(model(x), y)))
    zo.step(lambda: F.cross_entropy(model(x), y).item())  # vanilla ZO needs no graph: a float is fine


# --- a torch.optim citizen ---------------------------------------------------------------------

def test_param_groups_with_per_group_learning_rates():
    model, (x, y) = build(DigitsCNN), data()
    frozen_conv = model[0]
    groups = [{"params": frozen_conv.parameters(), "lr_zo": 0.0},
              {"params": list(model[3].parameters()) + list(model[7].parameters()), "lr_zo": 1e-2, "lr_bp": 0.1}]
    opt = ElasticZO(groups, model, bp_layers=1, example_input=x[:2])
    assert [(g["part"], g["lr"]) for g in opt.param_groups] == [("zo", 0.0), ("zo", 1e-2), ("bp", 0.1)]
    before = params_of(model)
    opt.step(lambda: F.cross_entropy(model(x), y))
    after = params_of(model)
    assert torch.equal(before[0], after[0]) and not torch.equal(before[2], after[2]) and not torch.equal(before[4], after[4])


def test_parameters_left_out_are_not_trained_and_collect_no_grad():
    model, (x, y) = build(DigitsCNN), data()
    opt = ElasticZO(list(model[3].parameters()) + list(model[7].parameters()), model, bp_layers=1, example_input=x[:2])
    before = params_of(model)
    opt.step(lambda: F.cross_entropy(model(x), y))
    assert torch.equal(before[0], model[0].weight) and model[0].weight.grad is None
    assert not model[0].weight.requires_grad


@pytest.mark.parametrize("make", [lambda ps: torch.optim.Adam(ps, lr=1e-2), lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
                                  lambda ps: torch.optim.RMSprop(ps, lr=1e-3)])
def test_any_torch_optimiser_for_the_bp_part_equals_it_alone(make):
    model, (x, y) = build(DigitsCNN), data()
    twin = copy.deepcopy(model)
    opt = ElasticZO.for_model(model, 3, example_input=x[:2], bp_optimizer=make)
    plain = make(twin.parameters())
    for _ in range(3):
        opt.step(lambda: F.cross_entropy(model(x), y))
        plain.zero_grad()
        F.cross_entropy(twin(x), y).backward()
        plain.step()
    assert all(torch.equal(a, b) for a, b in zip(params_of(model), params_of(twin)))


def test_adam_tail_state_is_in_the_state_dict_and_round_trips():
    model, (x, y) = build(DigitsCNN), data()
    opt = ElasticZO.for_model(model, 1, example_input=x[:2], bp_optimizer=torch.optim.Adam)
    opt.step(lambda: F.cross_entropy(model(x), y))
    saved = copy.deepcopy(opt.state_dict())  # as from disk: no tensor shared with opt
    assert any("exp_avg" in s for s in saved["state"].values())
    twin = copy.deepcopy(model)
    other = ElasticZO.for_model(twin, 1, example_input=x[:2], bp_optimizer=torch.optim.Adam)
    other.load_state_dict(saved)
    opt.step(lambda: F.cross_entropy(model(x), y))
    other.step(lambda: F.cross_entropy(twin(x), y))
    assert all(torch.equal(a, b) for a, b in zip(params_of(model), params_of(twin)))


@pytest.mark.parametrize("k", [0, 1])
def test_schedulers_including_one_cycle_drive_every_group(k):
    model, (x, y) = build(DigitsCNN), data()
    opt = ElasticZO.for_model(model, k, example_input=x[:2])
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[1e-3] * (k == 0) + [1e-3, 0.1][:1 + k] * (k > 0) if k else 1e-3,
                                                total_steps=10)
    lrs = []
    for _ in range(10):
        opt.step(lambda: F.cross_entropy(model(x), y))
        sched.step()
        lrs.append([g["lr"] for g in opt.param_groups])
    assert lrs[0] != lrs[3] and all(lr >= 0 for row in lrs for lr in row)
    if k:
        assert opt.bp_optimizer.param_groups[0]["lr"] == opt.param_groups[-1]["lr"]  # the tail follows the schedule


# --- non-finite losses and defaults ------------------------------------------------------------

@pytest.mark.parametrize("k", [0, 1, 3])
def test_non_finite_loss_raises_before_any_update(k):
    model, (x, y) = build(DigitsCNN), data()
    x[0, 0, 0, 0] = float("nan")
    opt = ElasticZO.for_model(model, k, example_input=x[1:3])
    before = params_of(model)
    with pytest.raises(NonFiniteLoss, match="step 0.*nonfinite='ignore'"):
        opt.step(lambda: F.cross_entropy(model(x), y))
    assert all(torch.equal(a, b) for a, b in zip(before, params_of(model)))


def test_python_defaults_are_the_cli_defaults():
    cli, signature = TrainConfig(), inspect.signature(ElasticZO.__init__).parameters
    for name in ("lr_bp", "eps", "queries", "noise", "grad_clip", "normalize", "momentum", "weight_decay",
                 "zo_weight_decay", "bp_grad", "seed"):
        assert signature[name].default == getattr(cli, name), name
    model, _ = build(DigitsCNN), data()
    assert ElasticZO.for_model(model, 0).param_groups[0]["lr"] == TrainConfig(method="zo").zo_learning_rate()
    assert ElasticZO.for_model(model, 1).param_groups[0]["lr"] == TrainConfig(method="elasticzo").zo_learning_rate()


def test_cli_prints_the_split_at_start_up(tmp_path, data_root):
    from elasticzo.train.loop import train as run

    lines = []
    cfg = TrainConfig(data_root=str(data_root), epochs=1, train_limit=64, test_limit=32, bp_layers=2,
                      run_dir=str(tmp_path / "run"), progress=False, download=False)
    run(cfg, log=lines.append)
    split = next(line for line in lines if line.startswith("ElasticZO split of LeNet5"))
    assert "ZO  3 module(s)" in split and "BP  2 module(s)" in split


# --- float16 / bfloat16 models -----------------------------------------------------------------

def test_bfloat16_zo_update_is_the_rule_in_a_float32_master_rounded_once():
    from elasticzo.zo.noise import derive_seed, layer_noise

    model, (x, y) = build(DigitsCNN).to(torch.bfloat16), data()
    xb = x.to(torch.bfloat16)
    opt = ElasticZO.for_model(model, 0, example_input=xb[:2], lr_zo=1e-4, seed=2)
    weight = model[0].weight
    start = weight.detach().float()
    opt.step(lambda: F.cross_entropy(model(xb).float(), y))
    master, g = opt.state[weight]["master"], opt.last_projected_grads[0]
    z = layer_noise([start, model[0].bias.detach().float()], derive_seed(2, 0, 0, 0), "gaussian")[0]
    assert master.dtype == torch.float32 and g != 0
    assert torch.equal(master, start + (g * -1e-4) * z)  # steps far below bf16's resolution are kept
    assert torch.equal(weight.detach(), master.to(torch.bfloat16))


def test_bfloat16_master_survives_a_state_dict_round_trip():
    model, (x, y) = build(DigitsCNN).to(torch.bfloat16), data()
    opt = ElasticZO.for_model(model, 1, example_input=x[:2].to(torch.bfloat16))
    opt.step(lambda: F.cross_entropy(model(x.to(torch.bfloat16)).float(), y))
    other = ElasticZO.for_model(copy.deepcopy(model), 1, example_input=x[:2].to(torch.bfloat16))
    other.load_state_dict(copy.deepcopy(opt.state_dict()))
    mine, theirs = opt.state[model[0].weight]["master"], other.state[other.model[0].weight]["master"]
    assert theirs.dtype == torch.float32 and torch.equal(mine, theirs)


def test_a_bfloat16_loss_warns_that_it_hides_the_perturbation():
    model, (x, y) = build(DigitsCNN).to(torch.bfloat16), data()
    xb = x.to(torch.bfloat16)
    opt = ElasticZO.for_model(model, 0, example_input=xb[:2])
    with pytest.warns(UserWarning, match="float32"):
        opt.step(lambda: F.cross_entropy(model(xb), y))


def test_param_groups_without_the_model_say_to_pass_it():
    model = build(DigitsCNN)
    with pytest.raises(ValueError, match="model="):
        ElasticZO([{"params": model.parameters()}])
