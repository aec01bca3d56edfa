"""Fine-tuning with --init: weights copied, a new head when the class count differs, clear errors
for checkpoints that do not fit, INT8 from INT8 or from float checkpoints, epoch-0 accuracy, resume."""
from __future__ import annotations

import json

import pytest
import torch

from elasticzo.config import TrainConfig
from elasticzo.data import load_dataset
from elasticzo.int8 import quantize
from elasticzo.train.checkpoint import CheckpointError, load_checkpoint
from elasticzo.train.finetune import init_from_checkpoint
from elasticzo.train.learner import Learner
from elasticzo.train.loop import CHECKPOINT, evaluate, train

TINY = dict(train_limit=64, test_limit=32, batch_size=32, epochs=1, progress=False)
CPU = torch.device("cpu")


def pretrain(tmp_path, data_root, name="pre", **kw):
    """A tiny BP run on digits 0-4; returns its checkpoint path."""
    cfg = TrainConfig(**{**TINY, "data_root": str(data_root), "method": "bp", "classes": "0-4",
                         "run_dir": str(tmp_path / name), **kw})
    train(cfg, log=lambda *_: None)
    return str(tmp_path / name / CHECKPOINT)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, data_root):
    tmp = tmp_path_factory.mktemp("pre")
    return {"lenet5": pretrain(tmp, data_root), "int8": pretrain(tmp, data_root, "int8", precision="int8"),
            "mlp": pretrain(tmp, data_root, "mlp", model="mlp")}


def model_tensors(path):
    tensors, _ = load_checkpoint(path)
    return {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}


def test_same_class_count_copies_every_weight(checkpoints):
    learner = Learner(TrainConfig(), 5, CPU)
    message = init_from_checkpoint(learner, TrainConfig(), checkpoints["lenet5"])
    assert "kept the checkpoint's head" in message
    saved = model_tensors(checkpoints["lenet5"])
    assert all(torch.equal(v, saved[k]) for k, v in learner.model.state_dict().items())
    assert all(not state for state in learner.optimizer.state.values())  # the optimiser starts fresh


def test_another_class_count_gets_a_new_seeded_head(checkpoints):
    fresh = Learner(TrainConfig(seed=3), 10, CPU).model.state_dict()
    learner = Learner(TrainConfig(seed=3), 10, CPU)
    assert "new head" in init_from_checkpoint(learner, TrainConfig(), checkpoints["lenet5"])
    saved, state = model_tensors(checkpoints["lenet5"]), learner.model.state_dict()
    head = {"11.weight", "11.bias"}  # LeNet5's last Linear
    assert all(torch.equal(state[k], fresh[k]) for k in head)
    assert all(torch.equal(state[k], saved[k]) for k in state if k not in head)


@pytest.mark.parametrize("case", ["other model", "other width", "int8 into float", "no file"])
def test_a_checkpoint_that_does_not_fit_raises_checkpoint_error(checkpoints, tmp_path, case):
    model = "mlp" if case == "other width" else "lenet5"
    learner = Learner(TrainConfig(model=model), 5, CPU)
    if case == "other width":
        learner.model[1] = torch.nn.Linear(784, 200)  # the checkpoint's layer is 784 -> 256
    path = {"other model": checkpoints["mlp"], "other width": checkpoints["mlp"], "int8 into float": checkpoints["int8"],
            "no file": str(tmp_path / "missing.safetensors")}[case]
    match = {"other model": "model.0.weight is missing",
             "other width": r"model.1.weight is float32 \[256, 784\], expected float32 \[200, 784\]",
             "int8 into float": "INT8 checkpoint", "no file": "no checkpoint file"}[case]
    with pytest.raises(CheckpointError, match=match):
        init_from_checkpoint(learner, TrainConfig(model=model), path)


def test_int8_from_an_int8_checkpoint_copies_values_and_exponents(checkpoints):
    saved = model_tensors(checkpoints["int8"])
    learner = Learner(TrainConfig(precision="int8"), 10, CPU)
    assert "new head" in init_from_checkpoint(learner, TrainConfig(precision="int8"), checkpoints["int8"])
    layers, keys = learner.model.weight_layers(), ["0", "3", "7", "9", "11"]
    assert all(torch.equal(layer.weight, saved[f"{k}.weight"]) for k, layer in zip(keys, layers[:-1]))
    assert [layer.weight_exponent for layer in layers[:-1]] == [int(saved[f"{k}.exponent"]) for k in keys[:-1]]
    assert layers[-1].weight.shape == (10, 84)


def test_int8_from_a_float_checkpoint_converts_once_and_drops_biases(checkpoints):
    learner = Learner(TrainConfig(precision="int8"), 5, CPU)
    with pytest.warns(UserWarning, match="biases were dropped"):
        message = init_from_checkpoint(learner, TrainConfig(precision="int8"), checkpoints["lenet5"])
    assert "kept" in message
    saved = model_tensors(checkpoints["lenet5"])
    for layer, key in zip(learner.model.weight_layers(), ["0", "3", "7", "9", "11"]):
        q = quantize(saved[f"{key}.weight"])
        assert torch.equal(layer.weight, q.values) and layer.weight_exponent == q.exponent


@pytest.mark.filterwarnings("ignore:--init")
def test_fine_tuning_run_logs_epoch_0_and_resumes_bit_identically(checkpoints, tmp_path, data_root):
    kw = dict(TINY, data_root=str(data_root), classes="5-9", init=checkpoints["lenet5"], precision="int8",
              method="elasticzo", bp_layers=1, schedule="constant")  # constant: 1 epoch + 1 equals 2 epochs
    full = train(TrainConfig(**{**kw, "epochs": 2}, run_dir=str(tmp_path / "full")), log=lambda *_: None)
    assert [r["epoch"] for r in full] == [0, 1, 2] and full[0]["steps"] == 0
    lines = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["epoch"] == 0 and lines[0]["init"] == checkpoints["lenet5"]
    train(TrainConfig(**kw, run_dir=str(tmp_path / "cut")), log=lambda *_: None)  # 1 epoch, then resume to 2
    resumed = train(TrainConfig(**{**kw, "epochs": 2}, run_dir=str(tmp_path / "cut"), resume=True), log=lambda *_: None)
    strip = lambda rs: [{k: v for k, v in r.items() if "seconds" not in k} for r in rs]
    assert strip(resumed) == strip(full)
    a, b = load_checkpoint(tmp_path / "full" / CHECKPOINT)[0], load_checkpoint(tmp_path / "cut" / CHECKPOINT)[0]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_epoch_0_is_the_accuracy_of_the_checkpoint_on_the_new_task(checkpoints, tmp_path, data_root):
    cfg = TrainConfig(**TINY, data_root=str(data_root), classes="5-9", init=checkpoints["lenet5"], method="bp",
                      run_dir=str(tmp_path / "ft"))
    history = train(cfg, log=lambda *_: None)
    learner = Learner(cfg, 5, CPU)
    init_from_checkpoint(learner, cfg, cfg.init)
    test = load_dataset("mnist", data_root, "test", limit=32, classes="5-9")
    assert history[0] == {"epoch": 0, "test_acc": evaluate(learner, test.x, test.y), "steps": 0, "init": cfg.init}
    assert history[1]["steps"] == 2


def test_default_run_dirs_of_pretraining_and_fine_tuning_differ():
    pre = TrainConfig(classes="0-4", method="bp")
    tune = TrainConfig(classes="0-4", method="bp", init="runs/x/checkpoint.safetensors")
    assert pre.default_run_dir() == "runs/mnist-c0-4-lenet5-bp-fp32-s0"
    assert tune.default_run_dir() == "runs/mnist-c0-4-lenet5-bp-fp32-ft-s0"
    assert TrainConfig(classes="0,2").default_run_dir() == "runs/mnist-c0_2-lenet5-elasticzo-k1-fp32-s0"
