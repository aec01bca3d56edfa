"""Training loop and CLI end to end, on small subsets of the real MNIST."""
import json
import subprocess
import sys

import pytest
import torch

from elasticzo.cli import main
from elasticzo.config import TrainConfig
from elasticzo.train.checkpoint import CheckpointError, load_checkpoint
from elasticzo.train.loop import CHECKPOINT, TrainingDiverged, train

SMALL = dict(train_limit=640, test_limit=200, batch_size=32, progress=False, checkpoint_every=7)


def config(tmp_path, name="run", **kw):
    return TrainConfig(run_dir=str(tmp_path / name), **{**SMALL, **kw})


def weights(run_dir):
    tensors, _ = load_checkpoint(run_dir / CHECKPOINT)
    return tensors


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def without_times(records):
    return [{k: v for k, v in r.items() if "seconds" not in k} for r in records]


def test_run_dir_holds_config_metrics_seed_log_and_checkpoint(tmp_path, data_root):
    cfg = config(tmp_path, data_root=str(data_root), epochs=2, bp_layers=2)
    history = train(cfg, log=lambda *_: None)
    run = tmp_path / "run"
    assert json.loads((run / "config.json").read_text())["bp_layers"] == 2
    records = metrics(run)
    assert records == history and [r["epoch"] for r in records] == [1, 2]
    assert {"epoch", "test_acc", "train_loss", "epoch_seconds"} <= set(records[0])
    seeds = [json.loads(line) for line in (run / "seeds.jsonl").read_text().splitlines()]
    assert [s["step"] for s in seeds] == list(range(2 * 20))
    assert all(len(s["g"]) == 1 for s in seeds)
    assert "model.0.weight" in weights(run)


def test_same_seed_same_metrics_and_weights(tmp_path, data_root):
    a = train(config(tmp_path, "a", data_root=str(data_root), epochs=1), log=lambda *_: None)
    b = train(config(tmp_path, "b", data_root=str(data_root), epochs=1), log=lambda *_: None)
    assert without_times(a) == without_times(b)
    wa, wb = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("method,kill_at", [("elasticzo", 13), ("zo", 20), ("bp", 33)])
def test_resume_after_a_crash_is_bit_identical(tmp_path, data_root, monkeypatch, method, kill_at):
    """A run that dies at step ``kill_at`` and is resumed ends with the uninterrupted run's weights."""
    off = {"normalize": False} if method == "elasticzo" else {}  # a setting only where it acts (config.APPLIES)
    kw = dict(data_root=str(data_root), epochs=2, method=method, momentum=0.9, **off)
    full = train(config(tmp_path, "full", **kw), log=lambda *_: None)

    from elasticzo.train import learner as learner_module
    original = learner_module.Learner.train_step
    calls = {"n": 0}

    def dying_step(self, x, y):  # fault injection: the process "dies" before step kill_at
        if calls["n"] == kill_at:
            raise KeyboardInterrupt
        calls["n"] += 1
        return original(self, x, y)

    monkeypatch.setattr(learner_module.Learner, "train_step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        train(config(tmp_path, "cut", **kw), log=lambda *_: None)
    monkeypatch.setattr(learner_module.Learner, "train_step", original)
    resumed = train(config(tmp_path, "cut", resume=True, **kw), log=lambda *_: None)

    assert without_times(resumed) == without_times(full)
    assert without_times(metrics(tmp_path / "cut")) == without_times(full)
    seeds = (tmp_path / "cut" / "seeds.jsonl").read_text()
    assert seeds == (tmp_path / "full" / "seeds.jsonl").read_text()
    wf, wc = weights(tmp_path / "full"), weights(tmp_path / "cut")
    assert wf.keys() == wc.keys() and all(torch.equal(wf[k], wc[k]) for k in wf)


def test_existing_run_is_never_overwritten(tmp_path, data_root):
    train(config(tmp_path, data_root=str(data_root), epochs=1), log=lambda *_: None)
    with pytest.raises(ValueError, match="--resume"):
        train(config(tmp_path, data_root=str(data_root), epochs=1), log=lambda *_: None)


def test_resume_with_other_settings_is_refused(tmp_path, data_root):
    train(config(tmp_path, data_root=str(data_root), epochs=1), log=lambda *_: None)
    with pytest.raises(ValueError, match="lr_zo"):
        train(config(tmp_path, data_root=str(data_root), epochs=2, lr_zo=0.5, resume=True), log=lambda *_: None)


@pytest.mark.parametrize("damage", ["truncate", "garble", "empty"])
def test_corrupt_checkpoint_gives_a_clear_error(tmp_path, data_root, damage):
    train(config(tmp_path, data_root=str(data_root), epochs=1), log=lambda *_: None)
    ckpt = tmp_path / "run" / CHECKPOINT
    data = ckpt.read_bytes()
    ckpt.write_bytes({"truncate": data[: len(data) // 2], "garble": b"\x07" * 64 + data[64:], "empty": b""}[damage])
    with pytest.raises(CheckpointError, match=CHECKPOINT):
        load_checkpoint(ckpt)
    code = main(["train", "--run-dir", str(tmp_path / "run"), "--resume", "--data-root", str(data_root),
                 "--train-limit", "640", "--test-limit", "200", "--batch-size", "32", "--epochs", "2",
                 "--checkpoint-every", "7", "--no-progress"])
    assert code == 2


def test_divergence_stops_with_a_message_and_keeps_the_last_good_checkpoint(tmp_path, data_root, monkeypatch):
    from elasticzo.train import learner as learner_module
    original = learner_module.Learner.train_step
    calls = {"n": 0}

    def poisoned_step(self, x, y):  # fault injection: the loss turns NaN at step 10
        calls["n"] += 1
        loss = original(self, x, y)
        return loss * float("nan") if calls["n"] > 10 else loss

    monkeypatch.setattr(learner_module.Learner, "train_step", poisoned_step)
    with pytest.raises(TrainingDiverged, match="non-finite loss at step 10.*last good checkpoint"):
        train(config(tmp_path, data_root=str(data_root), epochs=2), log=lambda *_: None)
    tensors, meta = load_checkpoint(tmp_path / "run" / CHECKPOINT)
    assert meta["position"]["global_step"] == 7
    assert all(torch.isfinite(t).all() for t in tensors.values())
    done = subprocess.run([sys.executable, "-m", "elasticzo.cli", "train", "--lr-bp", "1e9", "--method", "bp",
                           "--momentum", "0", "--epochs", "1", "--train-limit", "320", "--test-limit", "100",
                           "--data-root", str(data_root), "--run-dir", str(tmp_path / "cli"), "--no-progress"],
                          capture_output=True, text=True)
    assert done.returncode == 1 and "non-finite loss" in done.stderr and "Traceback" not in done.stderr


def test_cli_end_to_end_and_bad_values(tmp_path, data_root):
    run = tmp_path / "cli"
    args = ["train", "--data-root", str(data_root), "--train-limit", "320", "--test-limit", "100",
            "--epochs", "1", "--batch-size", "32", "--bp-layers", "3", "--run-dir", str(run), "--no-progress"]
    done = subprocess.run([sys.executable, "-m", "elasticzo.cli", *args], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert metrics(run)[0]["epoch"] == 1
    for bad, name in ((["--lr-zo", "-1"], "--lr-zo"), (["--bp-layers", "9"], "--bp-layers"),
                      (["--method", "adam"], "--method"), (["--epochs", "0"], "--epochs")):
        done = subprocess.run([sys.executable, "-m", "elasticzo.cli", *args[:-3], "--run-dir", str(tmp_path / "x"), *bad],
                              capture_output=True, text=True)
        assert done.returncode == 2 and name in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_seed_log_replays_the_zo_weights_bit_for_bit(tmp_path, data_root):
    """Vanilla ZO: initial weights + seeds.jsonl rebuild the trained weights exactly."""
    from elasticzo.train.learner import Learner, schedule_factor
    from elasticzo.zo.replay import replay_zo

    cfg = config(tmp_path, data_root=str(data_root), epochs=2, method="zo", normalize=True, zo_weight_decay=0.01)
    train(cfg, log=lambda *_: None)
    records = [json.loads(line) for line in (tmp_path / "run" / "seeds.jsonl").read_text().splitlines()]
    fresh = Learner(cfg, 10, torch.device("cpu"))
    lrs = [cfg.zo_learning_rate() * schedule_factor(cfg.schedule, r["step"] / len(records)) for r in records]
    replay_zo(fresh.optimizer, records, lrs)
    trained = weights(tmp_path / "run")
    for name, value in fresh.model.state_dict().items():
        assert torch.equal(value, trained[f"model.{name}"]), name


def test_example_loop_runs(data_root):
    """examples/train_mnist.py, the loop users diff against their own, runs and learns."""
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "examples" / "train_mnist.py"
    done = subprocess.run([sys.executable, str(script), "--data-root", str(data_root), "--limit", "3200",
                           "--bp-layers", "3", "--epochs", "1"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    accuracy = float(done.stdout.strip().splitlines()[-1].split("test accuracy")[1].split("%")[0])
    assert accuracy > 50  # 50 steps with 3 BP layers: far above the 10 % of chance


@pytest.mark.parametrize("threads", [1, 0])
def test_training_runs_with_threads_and_gives_the_setting_back(tmp_path, data_root, threads):
    """Default 1 thread (measured: docs/bench/threads.json); 0 leaves torch's setting; restored after."""
    assert TrainConfig().threads == 1
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen = []
        train(config(tmp_path, data_root=str(data_root), epochs=1, train_limit=64, threads=threads),
              log=lambda _: seen.append(torch.get_num_threads()))
        assert set(seen) == {threads or 2}
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
