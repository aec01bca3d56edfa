"""--tensorboard: event files beside metrics.jsonl hold the same numbers; py.typed ships with the package."""
from __future__ import annotations

import importlib.resources
import json

import pytest

from elasticzo.config import TrainConfig
from elasticzo.train.loop import train


def _scalars(folder) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_events_match_metrics_and_seed_log(tmp_path, data_root):
    pytest.importorskip("tensorboard")  # the [test] extra installs it
    run = tmp_path / "run"
    cfg = TrainConfig(train_limit=128, test_limit=64, batch_size=32, epochs=2, progress=False, tensorboard=True,
                      data_root=str(data_root), run_dir=str(run))
    history = train(cfg, log=lambda _: None)
    scalars = _scalars(run / "tensorboard")
    assert scalars["test/accuracy"] == [(h["steps"], pytest.approx(h["test_acc"])) for h in history]
    assert [v for _, v in scalars["train/loss_epoch"]] == pytest.approx([h["train_loss"] for h in history])
    seeds = [json.loads(line) for line in (run / "seeds.jsonl").read_text().splitlines()]
    assert scalars["train/loss_step"] == [(r["step"] + 1, pytest.approx(r["loss"], rel=1e-6)) for r in seeds]


def test_a_resumed_run_shows_every_step_and_epoch_once(tmp_path, data_root):
    pytest.importorskip("tensorboard")
    kw = dict(train_limit=128, test_limit=64, batch_size=32, progress=False, tensorboard=True, schedule="constant",
              data_root=str(data_root), run_dir=str(tmp_path / "run"))
    train(TrainConfig(epochs=1, **kw), log=lambda _: None)
    history = train(TrainConfig(epochs=2, resume=True, **kw), log=lambda _: None)
    scalars = _scalars(tmp_path / "run" / "tensorboard")
    assert [s for s, _ in scalars["train/loss_step"]] == list(range(1, 9))
    assert scalars["test/accuracy"] == [(h["steps"], pytest.approx(h["test_acc"])) for h in history]


def test_without_the_flag_no_event_files_are_written(tmp_path, data_root):
    run = tmp_path / "run"
    train(TrainConfig(train_limit=64, test_limit=32, batch_size=32, epochs=1, progress=False,
                      data_root=str(data_root), run_dir=str(run)), log=lambda _: None)
    assert not (run / "tensorboard").exists()


def test_the_package_is_marked_typed():
    assert importlib.resources.files("elasticzo").joinpath("py.typed").is_file()
