"""One meaning per flag: every setting acts on the run or is rejected by name; config.json holds
the resolved values; the lists of choices are defined once."""
import itertools
import json

import pytest

from elasticzo import config as config_module
from elasticzo.cli import build_parser, main
from elasticzo.config import APPLIES, METHODS, PRECISIONS, TrainConfig, acts_on
from elasticzo.train.loop import train

# A value off the default for every setting that acts only in some runs.
CHANGED = dict(lr_zo=3e-3, eps=1e-2, queries=2, noise="rademacher", grad_clip=5.0, normalize=False,
               zo_weight_decay=1e-4, lr_bp=0.1, momentum=0.5, weight_decay=1e-4, bp_grad="plus", bp_layers=2,
               int8_lr_bits=2, int8_zo_shift=5, int8_tile=4)


def test_every_restricted_setting_has_a_changed_value_here():
    assert set(CHANGED) == set(APPLIES)


@pytest.mark.parametrize("method,precision", list(itertools.product(METHODS, PRECISIONS)))
def test_each_setting_is_honoured_or_rejected_by_name(method, precision):
    TrainConfig(method=method, precision=precision).validate()  # the defaults always pass
    for name, value in CHANGED.items():
        config = TrainConfig(method=method, precision=precision, **{name: value})
        if acts_on(name, method, precision):
            config.validate()
        else:
            with pytest.raises(ValueError, match=f"--{name.replace('_', '-')}: has no effect"):
                config.validate()


def test_the_examples_of_the_issue_are_rejected(capsys):
    assert main(["train", "--method", "zo", "--bp-layers", "3"]) == 2
    assert "--bp-layers: has no effect with --method zo" in capsys.readouterr().err
    assert main(["train", "--precision", "int8", "--lr-zo", "1e-3"]) == 2
    assert "--lr-zo: has no effect with --precision int8" in capsys.readouterr().err


def test_int8_zo_shift_has_the_same_range_in_the_cli_and_in_python():
    from elasticzo.int8 import IntElasticZO
    low, high = config_module.INT8_ZO_SHIFTS
    for shift in (low, -1, high):
        TrainConfig(precision="int8", int8_zo_shift=shift).validate()  # -1: the best shift on the digits CNN
    for shift in (low - 1, high + 1):
        with pytest.raises(ValueError, match=f"--int8-zo-shift: must be in {low}..{high}, got {shift}"):
            TrainConfig(precision="int8", int8_zo_shift=shift).validate()
        with pytest.raises(ValueError, match=f"zo_shift={shift}"):
            IntElasticZO([], [], zo_shift=shift)


def test_the_split_follows_the_method():
    assert TrainConfig(method="bp").split(5) == 5 and TrainConfig(method="zo").split(5) == 0
    assert TrainConfig().split(5) == 1 and TrainConfig(bp_layers=3).split(5) == 3
    with pytest.raises(ValueError, match="--bp-layers: 6 is out of range"):
        TrainConfig(bp_layers=6).split(5)


def test_resolved_fills_what_was_left_open():
    done = TrainConfig(method="zo").resolved("cpu", 5)
    assert (done.lr_zo, done.bp_layers, done.device) == (3e-4, None, "cpu")
    assert done.run_dir == "runs/mnist-lenet5-zo-fp32-s0"
    done = TrainConfig(precision="int8").resolved("cpu", 5)
    assert (done.lr_zo, done.bp_layers, done.run_dir) == (None, 1, "runs/mnist-lenet5-elasticzo-k1-int8-s0")


def test_config_json_holds_the_resolved_values(tmp_path, data_root):
    run_dir = tmp_path / "run"
    train(TrainConfig(data_root=str(data_root), epochs=1, train_limit=64, test_limit=32, batch_size=32,
                      progress=False, run_dir=str(run_dir)), log=lambda *_: None)
    saved = json.loads((run_dir / "config.json").read_text())
    assert (saved["lr_zo"], saved["bp_layers"], saved["device"], saved["run_dir"]) == (1e-3, 1, "cpu", str(run_dir))


def test_choices_are_defined_once():
    flags = {a.dest: a for a in build_parser()._subparsers._group_actions[0].choices["train"]._actions}
    for name, allowed in config_module.CHOICES.items():
        assert tuple(flags[name].choices) == allowed
