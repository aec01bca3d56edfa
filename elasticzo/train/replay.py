"""``elasticzo replay RUN_DIR``: rebuild a run's ZO weights from its seed log and check them.

Every ZO update is a pure function of (seed, step, the logged projected gradient g, or the
integer loss difference d for INT8), so the initial weights plus ``seeds.jsonl`` give the
trained ZO weights again, without data and without a forward pass. The replay compares them
with the run's checkpoint, bit for bit: an audit of the run, or a way to ship it as a seed and
one number per step. The BP part (if any) learned from data and is not replayed.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from elasticzo.config import TrainConfig
from elasticzo.train.checkpoint import load_checkpoint, save_checkpoint
from elasticzo.train.schema import need_int, split_meta
from elasticzo.train.finetune import PREFIX, _checkpoint_classes
from elasticzo.train.inference import run_files
from elasticzo.train.loop import make_learner


@dataclass
class ReplayResult:
    steps: int
    tensors: dict[str, torch.Tensor]  # the rebuilt ZO weights, named as in the checkpoint
    mismatched: list[str]  # names whose rebuilt value differs from the checkpoint

    def summary(self) -> str:
        verdict = ("all equal to the checkpoint, bit for bit" if not self.mismatched
                   else f"DIFFERENT from the checkpoint: {', '.join(self.mismatched)}")
        return f"replayed {self.steps} ZO steps from seeds.jsonl: {len(self.tensors)} ZO tensors, {verdict}"


def replay_run(run_dir: str | Path) -> ReplayResult:
    """Rebuild the ZO weights of ``run_dir`` up to its checkpoint and compare them with it."""
    run_dir = Path(run_dir)
    checkpoint, config_path = run_files(run_dir)
    if not config_path.is_file():
        raise FileNotFoundError(f"replay: {run_dir} is not a run dir (no config.json)")
    config = TrainConfig.load(config_path)
    config.device = "cpu"
    saved, meta = load_checkpoint(checkpoint)
    done = need_int(split_meta(meta, checkpoint)[1].get("global_step"), f"{checkpoint}: metadata position.global_step")
    records = _records(run_dir / "seeds.jsonl", done)
    classes = _checkpoint_classes({k[len(PREFIX):]: v for k, v in saved.items() if k.startswith(PREFIX)},
                                  config.model, checkpoint)
    learner = make_learner(config, classes, torch.device("cpu"))
    if config.init:
        from elasticzo.train.finetune import init_from_checkpoint

        init_from_checkpoint(learner, config, config.init)
    total = config.epochs * _steps_per_epoch(records, run_dir)
    rebuilt = _replay_int(learner, records, total) if config.precision == "int8" else _replay_float(
        learner, records, total)
    if not rebuilt:
        raise ValueError(f"replay: {run_dir} has no ZO part (method {config.method}); nothing to replay")
    mismatched = [k for k, v in rebuilt.items() if k not in saved or not torch.equal(v, saved[k])]
    return ReplayResult(len(records), rebuilt, mismatched)


def _records(path: Path, steps: int) -> list[dict]:
    """The seed log's first ``steps`` records (the steps the checkpoint covers), checked complete."""
    if not path.is_file():
        raise FileNotFoundError(f"replay: {path} is missing")
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    records = [r for r in records if r["step"] < steps]
    if [r["step"] for r in records] != list(range(steps)):
        raise ValueError(f"replay: {path} does not hold steps 0..{steps - 1} in order; it cannot be replayed")
    return records


def _steps_per_epoch(records: list[dict], run_dir: Path) -> int:
    """Steps in one epoch (the schedule needs the run's total): the first epoch's records."""
    first = sum(1 for r in records if r["epoch"] == 0)
    if not any(r["epoch"] > 0 for r in records):
        raise ValueError(f"replay: {run_dir} has not finished its first epoch; the schedule's length is unknown")
    return first


def _replay_float(learner, records: list[dict], total: int) -> dict[str, torch.Tensor]:
    from elasticzo.zo.replay import replay_zo

    zo = learner.optimizer.zo_group()
    if zo is None:
        return {}
    lrs = []
    for r in records:  # the loop's schedule: set_progress(step / total) before each step
        learner.set_progress(r["step"] / total)
        lrs.append(zo["lr"])
    replay_zo(learner.optimizer, records, lrs)
    return _zo_tensors(learner, zo)


def _replay_int(learner, records: list[dict], total: int) -> dict[str, torch.Tensor]:
    opt = learner.optimizer
    zo = opt.zo_group()
    if zo is None:
        return {}
    for r in records:
        learner.set_progress(r["step"] / total)
        zo["step"] = r["step"]
        opt.apply_zo_update(torch.tensor(int(r["g"][0]), dtype=torch.int64))  # d, exact below 2**53
    return _zo_tensors(learner, zo)


def _zo_tensors(learner, zo: dict) -> dict[str, torch.Tensor]:
    """The ZO weights by checkpoint name (``model.<state_dict key>``)."""
    ids = {id(p) for p in zo["params"]}
    state = learner.model.state_dict(keep_vars=True)
    return {PREFIX + k: v.detach().clone() for k, v in state.items() if id(v) in ids}


def replay_main(run_dir: str, out: str | None = None, log=print) -> int:
    """The CLI: 0 when the rebuilt ZO weights equal the checkpoint's, 1 when they differ."""
    result = replay_run(run_dir)
    log(result.summary())
    if out:
        save_checkpoint(Path(out), result.tensors, {"replayed_from": str(run_dir), "steps": result.steps})
        log(f"rebuilt ZO weights written to {out}")
    return 1 if result.mismatched else 0
