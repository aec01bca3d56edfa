"""Fault injection on a real run dir: every damaged checkpoint, config or record is refused with
one line that names the file and the key, and the run's files stay byte-identical.

The cases (``tests/faults.py``) are generated from the files of a real short run that died
mid-epoch, FP32 and INT8. Resume cases run the Python entry point ``train`` in-process; a few
go through the CLI in a subprocess to prove exit status 2 without a traceback.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from elasticzo.cli import main
from elasticzo.config import TrainConfig
from elasticzo.data import load_dataset
from elasticzo.train.checkpoint import load_checkpoint, save_checkpoint
from elasticzo.train.loop import CHECKPOINT, RunPosition, train
from elasticzo.train.schema import POSITION_FIELDS
from faults import (Fault, byte_faults, config_faults, meta_faults, raw_meta_faults, record_faults,
                    tensor_faults)

pytestmark = pytest.mark.usefixtures("one_thread")
STEPS_PER_EPOCH, KILL_AT = 3, 4  # the run dies before its 5th step; its last checkpoint is at step 4
SMALL = dict(train_limit=96, test_limit=32, batch_size=32, epochs=2, checkpoint_every=2, progress=False,
             download=False, momentum=0.9, normalize=True)
PRECISIONS = ("fp32", "int8")


@pytest.fixture(scope="module")
def mini_root(tmp_path_factory, data_root) -> Path:
    """The first 96 train and 32 test images of the real MNIST as small uncompressed IDX files
    (the .gz originals take seconds to read, and each case reads the data once)."""
    root = tmp_path_factory.mktemp("data")
    folder = root / "mnist"
    folder.mkdir()
    for split, prefix, n in (("train", "train", 96), ("test", "t10k", 32)):
        part = load_dataset("mnist", str(data_root), split, False, n, raw=True)
        _write_idx(folder / f"{prefix}-images-idx3-ubyte", part.x.squeeze(1).numpy())
        _write_idx(folder / f"{prefix}-labels-idx1-ubyte", part.y.numpy().astype(np.uint8))
    return root


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def settings(root: Path, run: Path, precision: str, **kw) -> TrainConfig:
    return TrainConfig(**{**SMALL, "data_root": str(root), "run_dir": str(run), "precision": precision, **kw})


@pytest.fixture(scope="module")
def runs(mini_root, tmp_path_factory) -> dict[str, Path]:
    """Per precision, the run dir of a real run killed before its 5th step (mid epoch 2)."""
    from elasticzo.train.learner import Learner

    out = {}
    for precision, cls in (("fp32", Learner), ("int8", Learner)):
        run = tmp_path_factory.mktemp("run") / precision
        original, calls = cls.train_step, {"n": 0}

        def dying_step(self, x, y, original=original, calls=calls):  # the process "dies" at step KILL_AT
            if calls["n"] == KILL_AT:
                raise KeyboardInterrupt
            calls["n"] += 1
            return original(self, x, y)

        with pytest.MonkeyPatch.context() as mp, pytest.raises(KeyboardInterrupt):
            mp.setattr(cls, "train_step", dying_step)
            train(settings(mini_root, run, precision), log=lambda *_: None)
        out[precision] = run
    return out


def snapshot(run: Path) -> dict[str, bytes | None]:
    """Every file under ``run`` with its bytes (None for a directory)."""
    return {str(p.relative_to(run)): None if p.is_dir() else p.read_bytes() for p in sorted(run.rglob("*"))}


def refusal_problem(fault: Fault, run: Path, call) -> str | None:
    """Damage ``run``, call ``call``; None when it is refused cleanly with the files unchanged."""
    fault.apply(run)
    before = snapshot(run)
    try:
        call()
    except ValueError as err:
        message = str(err)
        if "\n" in message or fault.expect not in message:
            return f"{fault.name}: unclear error {message!r} (should name {fault.expect!r} in one line)"
    except Exception as err:  # noqa: BLE001 -- any other exception is a defect the suite reports
        return f"{fault.name}: {type(err).__name__}: {err}"
    else:
        return f"{fault.name}: accepted"
    return None if snapshot(run) == before else f"{fault.name}: the run's files changed"


def resume_problems(faults: list[Fault], source: Path, root: Path, precision: str, tmp: Path) -> list[str]:
    problems = []
    for i, fault in enumerate(faults):
        run = tmp / f"case{i}"
        shutil.copytree(source, run)
        config = settings(root, run, precision, resume=True)
        problems.append(refusal_problem(fault, run, lambda: train(config, log=lambda *_: None)))
        shutil.rmtree(run, ignore_errors=True)
    return [p for p in problems if p]


def checkpoint_faults(source: Path) -> list[Fault]:
    tensors, meta = load_checkpoint(source / CHECKPOINT)
    return (tensor_faults(tensors, meta) + meta_faults(tensors, meta) + raw_meta_faults(tensors)
            + byte_faults((source / CHECKPOINT).read_bytes()))


@pytest.mark.parametrize("precision", PRECISIONS)
def test_every_damaged_checkpoint_is_refused_on_resume(runs, mini_root, tmp_path, precision):
    faults = checkpoint_faults(runs[precision])
    problems = resume_problems(faults, runs[precision], mini_root, precision, tmp_path)
    print(f"{precision} --resume: {len(faults)} damaged checkpoints, {len(faults) - len(problems)} refused cleanly")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_every_damaged_config_or_record_is_refused_on_resume(runs, mini_root, tmp_path, precision):
    source = runs[precision]
    faults = config_faults(json.loads((source / "config.json").read_text())) + record_faults(KILL_AT)
    problems = resume_problems(faults, source, mini_root, precision, tmp_path)
    print(f"{precision} --resume: {len(faults)} damaged configs/records, {len(faults) - len(problems)} refused cleanly")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_every_damaged_init_checkpoint_is_refused_and_nothing_is_written(runs, mini_root, tmp_path, precision):
    """--init uses only the weights (and INT8 exponents): every damage to those is refused before
    the new run dir exists."""
    tensors, meta = load_checkpoint(runs[precision] / CHECKPOINT)
    weights = {k: v for k, v in tensors.items() if k.startswith("model.")}
    structure = [f for f in meta_faults(tensors, meta) if f.name.startswith("meta")]
    faults = (tensor_faults(weights, meta)[: -2] + structure + raw_meta_faults(tensors)
              + byte_faults((runs[precision] / CHECKPOINT).read_bytes()))
    problems = []
    for i, fault in enumerate(faults):
        source = tmp_path / f"src{i}"
        source.mkdir()
        fault.apply(source)
        new_run = tmp_path / f"new{i}"
        config = settings(mini_root, new_run, precision, init=str(source / CHECKPOINT), epochs=1)
        problems.append(refusal_problem(Fault(fault.name, lambda run: None, fault.expect), source,
                                        lambda: train(config, log=lambda *_: None)))
        if new_run.exists():
            problems.append(f"{fault.name}: {new_run} was created")
    problems = [p for p in problems if p]
    print(f"{precision} --init: {len(faults)} damaged checkpoints, {len(faults) - len(problems)} refused cleanly")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_the_python_loader_refuses_every_damaged_state_and_changes_nothing(runs, mini_root, tmp_path, precision):
    """``learner.load_state`` (the Python loader) runs the same schema: every tensor fault and every
    damage to the learner metadata is refused before the learner changes."""
    from elasticzo.train.loop import make_learner

    source = runs[precision]
    tensors, meta = load_checkpoint(source / CHECKPOINT)
    # without a run position, step counters that agree with each other (steps + 1) are a valid state
    faults = tensor_faults(tensors, meta) + [f for f in meta_faults(tensors, meta) if f.name.startswith("learner.")]
    learner = make_learner(settings(mini_root, tmp_path, precision), 10, torch.device("cpu"))
    fresh = {k: v.clone() for k, v in learner.state_tensors().items()}
    problems = []
    for i, fault in enumerate(faults):
        run = tmp_path / f"case{i}"
        run.mkdir()
        fault.apply(run)
        damaged, damaged_meta = load_checkpoint(run / CHECKPOINT)
        problems.append(refusal_problem(Fault(fault.name, lambda _: None, fault.expect), run,
                                        lambda: learner.load_state(damaged, damaged_meta["learner"], run / CHECKPOINT)))
        state = learner.state_tensors()
        if state.keys() != fresh.keys() or not all(torch.equal(state[k], fresh[k]) for k in fresh):
            problems.append(f"{fault.name}: the learner changed")
    problems = [p for p in problems if p]
    print(f"{precision} load_state: {len(faults)} damaged states, {len(faults) - len(problems)} refused cleanly")
    assert not problems, "\n".join(problems)
    learner.load_state(tensors, meta["learner"], source / CHECKPOINT)  # the control: the real state loads
    assert all(torch.equal(learner.state_tensors()[k], tensors[k]) for k in tensors)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_the_undamaged_copy_resumes_and_cuts_records_written_after_the_checkpoint(runs, mini_root, tmp_path, precision):
    """The control: the same copy, undamaged, resumes; seed-log lines past the checkpoint (a crash
    after a flush) are cut back, and the run ends with one line per step."""
    run = tmp_path / "run"
    shutil.copytree(runs[precision], run)
    with open(run / "seeds.jsonl", "a") as f:
        f.write(json.dumps({"step": KILL_AT, "epoch": 1, "loss": 0.0, "g": None}) + "\n")
    history = train(settings(mini_root, run, precision, resume=True), log=lambda *_: None)
    assert [r["epoch"] for r in history] == [1, 2]
    steps = [json.loads(ln)["step"] for ln in (run / "seeds.jsonl").read_text().splitlines()]
    assert steps == list(range(2 * STEPS_PER_EPOCH))


def test_a_run_without_checkpoint_restarts_with_its_old_records_moved_aside(mini_root, tmp_path):
    """Killed before its first checkpoint: a plain restart is refused, --resume starts at step 0
    with the old records in stale-1/ and says so."""
    from elasticzo.train.learner import Learner

    run = tmp_path / "run"

    def dead(self, x, y):  # killed at its first step: the loop has written config.json only
        raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as mp, pytest.raises(KeyboardInterrupt):
        mp.setattr(Learner, "train_step", dead)
        train(settings(mini_root, run, "fp32"), log=lambda *_: None)
    old = "".join(json.dumps({"step": s, "epoch": 0, "loss": 2.3, "g": [0.1]}) + "\n" for s in range(2))
    (run / "seeds.jsonl").write_text(old)
    with pytest.raises(ValueError, match="--resume"):
        train(settings(mini_root, run, "fp32"), log=lambda *_: None)
    assert (run / "seeds.jsonl").read_text() == old
    said = []
    train(settings(mini_root, run, "fp32", resume=True), log=said.append)
    assert any("stale-1" in line and "step 0" in line for line in said)
    assert (run / "stale-1" / "seeds.jsonl").read_text() == old
    assert len((run / "seeds.jsonl").read_text().splitlines()) == 2 * STEPS_PER_EPOCH


def test_position_fields_match_the_loop():
    assert POSITION_FIELDS == tuple(RunPosition.__dataclass_fields__)


@pytest.mark.parametrize("flag,value", [("--lr-zo", "inf"), ("--lr-bp", "inf"), ("--zo-weight-decay", "inf"),
                                        ("--eps", "nan"), ("--classes", ","), ("--data-root", "")])
def test_non_finite_or_empty_flags_are_refused_before_anything_is_written(mini_root, tmp_path, capsys, flag, value):
    args = ["train", "--data-root", str(mini_root), "--run-dir", str(tmp_path / "run"), "--no-progress", flag, value]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert flag in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("damage", ["checkpoint", "config"])
def test_cli_refuses_a_damaged_run_with_exit_2_and_one_line(runs, mini_root, tmp_path, capsys, damage):
    """The checkpoint case runs the real process (exit status, no traceback); the config case main()."""
    run = tmp_path / "run"
    shutil.copytree(runs["fp32"], run)
    if damage == "checkpoint":
        tensors, meta = load_checkpoint(run / CHECKPOINT)
        save_checkpoint(run / CHECKPOINT, {**tensors, "model.0.weight": tensors["model.0.weight"].int()}, meta)
    else:
        (run / "config.json").write_text("null")
    before = snapshot(run)
    args = ["train", "--data-root", str(mini_root), "--run-dir", str(run), "--resume", "--no-progress",
            "--no-download", "--normalize", *(f"--{k.replace('_', '-')}={v}" for k, v in SMALL.items()
                                              if k not in ("progress", "download", "normalize"))]
    if damage == "checkpoint":
        done = subprocess.run([sys.executable, "-m", "elasticzo.cli", *args], capture_output=True, text=True)
        code, err = done.returncode, done.stderr
    else:
        code, err = main(args), capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert (CHECKPOINT if damage == "checkpoint" else "config.json") in err
    assert snapshot(run) == before
