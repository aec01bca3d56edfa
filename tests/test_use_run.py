"""Using what training produced: load_model for inference, ``elasticzo replay``, finished runs, log lines."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

import elasticzo
from elasticzo.cli import main
from elasticzo.config import TrainConfig
from elasticzo.data import load_dataset
from elasticzo.int8 import quantize_input
from elasticzo.train.loop import CHECKPOINT, train
from elasticzo.train.replay import replay_run

TINY = dict(train_limit=192, test_limit=96, batch_size=32, epochs=2, progress=False, checkpoint_every=0)


def run(tmp_path, data_root, name, **kw):
    cfg = TrainConfig(**{**TINY, "data_root": str(data_root), "run_dir": str(tmp_path / name), **kw})
    lines: list[str] = []
    history = train(cfg, log=lines.append)
    return cfg, history, lines


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_root):
    tmp = tmp_path_factory.mktemp("runs")
    return {"fp32": run(tmp, data_root, "fp32", bp_layers=2),
            "int8": run(tmp, data_root, "int8", precision="int8", bp_layers=2)}


def _accuracy(predict, data_root, raw: bool) -> float:
    test = load_dataset("mnist", data_root, "test", limit=TINY["test_limit"], raw=raw)
    return 100.0 * (predict(test.x) == test.y).sum().item() / len(test.y)


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_load_model_gives_the_run_s_test_accuracy(runs, data_root, precision):
    cfg, history, _ = runs[precision]
    for where in (cfg.run_dir, f"{cfg.run_dir}/{CHECKPOINT}"):
        model = elasticzo.load_model(where)
        if precision == "int8":
            predict = lambda x: model(quantize_input(x), store=False).values.argmax(dim=1)
        else:
            assert not model.training
            predict = lambda x: model(x).argmax(dim=1)
        with torch.no_grad():
            assert _accuracy(predict, data_root, raw=precision == "int8") == history[-1]["test_acc"]


def test_load_model_needs_a_model_name_without_config(runs, tmp_path):
    lone = tmp_path / "lone.safetensors"
    shutil.copy(f"{runs['fp32'][0].run_dir}/{CHECKPOINT}", lone)
    with pytest.raises(ValueError, match="pass model="):
        elasticzo.load_model(lone)
    assert isinstance(elasticzo.load_model(lone, model="lenet5"), torch.nn.Module)


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_replay_rebuilds_the_zo_weights_bit_for_bit(runs, precision, capsys):
    cfg = runs[precision][0]
    result = replay_run(cfg.run_dir)
    assert result.steps == 12 and result.tensors and result.mismatched == []
    assert main(["replay", cfg.run_dir]) == 0
    assert "all equal to the checkpoint, bit for bit" in capsys.readouterr().out


def test_replay_detects_a_tampered_seed_log(runs, tmp_path, capsys):
    tampered = tmp_path / "tampered"
    shutil.copytree(runs["fp32"][0].run_dir, tampered)
    lines = (tampered / "seeds.jsonl").read_text().splitlines()
    record = json.loads(lines[5])
    record["g"] = [g + 0.5 for g in record["g"]]
    lines[5] = json.dumps(record)
    (tampered / "seeds.jsonl").write_text("\n".join(lines) + "\n")
    assert main(["replay", str(tampered), "--out", str(tmp_path / "zo.safetensors")]) == 1
    assert "DIFFERENT from the checkpoint" in capsys.readouterr().out
    assert (tmp_path / "zo.safetensors").is_file()


def test_resume_of_a_finished_run_says_it_is_finished(runs, data_root):
    cfg = runs["fp32"][0]
    lines: list[str] = []
    history = train(TrainConfig(**{**cfg.to_dict(), "resume": True}), log=lines.append)
    assert len(history) == TINY["epochs"]
    assert any("is finished (2/2 epochs)" in line and "--epochs" in line for line in lines), lines


def test_fine_tuning_epoch_0_line_reads_like_the_others(runs, tmp_path, data_root):
    init = f"{runs['fp32'][0].run_dir}/{CHECKPOINT}"
    _, history, lines = run(tmp_path, data_root, "ft", init=init, epochs=1, bp_layers=2)
    zero = next(line for line in lines if line.startswith("epoch 0/1"))
    assert f"test_acc {history[0]['test_acc']:.2f} %" in zero and not zero.lstrip().startswith("{")
    assert lines[-1].startswith("epoch 1/1: test_acc")
