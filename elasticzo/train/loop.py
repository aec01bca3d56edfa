"""The training loop: epochs of learner steps, evaluation, metrics, seed log and checkpoints.

Run directory layout::

    config.json       the resolved TrainConfig
    metrics.jsonl     one JSON object per epoch: epoch, test_acc, train_loss, epoch_seconds, ...
    seeds.jsonl       one JSON object per step: step, epoch, loss, and the projected gradients g
                      of its queries (with the run seed they replay the ZO trajectory)
    checkpoint.safetensors   weights, optimiser state and the position in the run

Resuming checks the config, the checkpoint (``train.schema``) and the records in full, then
cuts metrics.jsonl and seeds.jsonl back to what the checkpoint covers (atomically, after every
check) and replays the remaining steps with the same batches and seeds, so a resumed run ends
bit-identical to an uninterrupted one. A run that died before its first checkpoint restarts
from step 0 with ``--resume``, its old records moved to ``stale-N/``.

Under torchrun (``train.distributed``) every rank runs this loop on its slice of each batch;
only rank 0 writes the run directory and logs.
"""
from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from elasticzo.config import RESUME_FREE, TrainConfig
from elasticzo.data import BatchLoader, is_point_dataset, load_dataset
from elasticzo.train import distributed
from elasticzo.train.checkpoint import load_checkpoint, save_checkpoint
from elasticzo.train.events import EventLog, summary_writer_class
from elasticzo.train.health import collapse_warning
from elasticzo.train.records import CONFIG, existing_records, move_aside, plan_cut, write_atomic
from elasticzo.train.schema import validate_checkpoint
from elasticzo.train.learner import Learner

CHECK_EVERY = 50  # steps between host syncs (finite-loss check, progress bar, seed-log buffer)
CHECKPOINT = "checkpoint.safetensors"


class TrainingDiverged(RuntimeError):
    """A non-finite loss was seen; the last good checkpoint on disk is untouched."""


@dataclass
class RunPosition:
    """Where a run is: the next step to take and the running sums of the current epoch."""
    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    loss_sum: float = 0.0
    epoch_seconds: float = 0.0
    history: list = field(default_factory=list)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device: cuda was asked for but torch.cuda.is_available() is False")
    return torch.device(name)


def make_learner(config: TrainConfig, num_classes: int, device: torch.device) -> Learner:
    return Learner(config, num_classes, device)


def train(config: TrainConfig, log=print) -> list[dict]:
    """Train as ``config`` says; returns the per-epoch metrics. Raises ValueError for bad settings.

    Runs with ``config.threads`` torch threads and gives the caller's setting back afterwards.
    """
    config.validate()
    with torch_threads(config.threads):
        return _train(config, log)


@contextlib.contextmanager
def torch_threads(threads: int):
    """torch.set_num_threads(threads) for a block (0: leave as is), restored on exit."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _train(config: TrainConfig, log) -> list[dict]:
    """Alone, or as one rank of a torchrun group (``train.distributed``): only rank 0 logs."""
    device = resolve_device(config.device)
    replicas = distributed.Replicas(distributed.device_for_rank(device)) if distributed.launched() else None
    try:
        if replicas is not None:
            device = replicas.device
            replicas.check_configs(config.to_dict())
            log = log if replicas.writer else _quiet
        return _train_on(config, device, replicas, log)
    finally:
        if replicas is not None:
            replicas.close()


def _quiet(*_args) -> None:
    """The log of ranks other than 0."""


def _train_on(config: TrainConfig, device: torch.device, replicas, log) -> list[dict]:
    writer = replicas is None or replicas.writer
    data = _load_data(config, device)
    learner = make_learner(config, data["num_classes"], device)
    config = config.resolved(device.type, learner.num_layers)  # what config.json records
    run_dir = Path(config.run_dir)
    if config.init:  # before _start, so that a resumed fine-tuning run overwrites it
        from elasticzo.train.finetune import init_from_checkpoint

        log(init_from_checkpoint(learner, config, config.init))
    loader = BatchLoader(data["x"], data["y"], config.batch_size, seed=config.seed,
                         stream=0 < config.micro_batch < config.batch_size)
    if config.tensorboard:
        summary_writer_class()  # fail before the run dir is made, not after
    pos = (_start(config, run_dir, learner, len(loader), log) if replicas is None
           else _start_replicas(config, run_dir, learner, replicas, len(loader), log))
    log(f"run dir {run_dir} | {config.dataset} {config.model} {config.method} "
        f"bp_layers={learner.bp_layers} {config.precision} on {device}"
        + ("" if replicas is None else f" x {replicas.world} ranks"))
    describe = getattr(learner.optimizer, "describe_split", None)
    if describe is not None:  # which layers train with ZO and which with BP, and what each costs
        log(describe())
    if config.resume and pos.epoch >= config.epochs:
        log(f"run {run_dir} is finished ({pos.epoch}/{config.epochs} epochs); nothing to train. "
            "To train on, resume with a larger --epochs.")
    if config.init and pos.global_step == 0 and not pos.history and writer:
        record = _initial_record(config, run_dir, learner, data, pos)
        log(f"epoch 0/{config.epochs}: test_acc {record['test_acc']:.2f} % | initial weights from {config.init}")
    events = EventLog(run_dir, config.tensorboard and writer, pos.global_step)
    try:
        if pos.history and pos.global_step == 0:
            events.epoch(pos.history[0])  # epoch 0 of a fine-tuning run
        _run_epochs(config, run_dir, learner, loader, data, pos, log, events, replicas)
    finally:
        events.close()
    return pos.history


def _run_epochs(config, run_dir, learner, loader, data, pos: RunPosition, log, events: EventLog,
                replicas=None) -> None:
    """Epochs until ``config.epochs``: train, evaluate, log, check for a collapse."""
    total = config.epochs * len(loader)
    while pos.epoch < config.epochs:
        _train_epoch(config, run_dir, learner, loader, pos, total, events, replicas)
        record = _end_epoch(config, run_dir, learner, data, pos, replicas)
        events.epoch(record)
        log(f"epoch {record['epoch']}/{config.epochs}: test_acc {record['test_acc']:.2f} % | "
            f"train_loss {record['train_loss']:.4f} | {record['epoch_seconds']:.1f} s "
            f"({1e3 * record['step_seconds']:.2f} ms/step)")
        warning = collapse_warning(config, pos.history, data["num_classes"])
        if warning:
            log(warning)


def _load_data(config: TrainConfig, device: torch.device) -> dict:
    """Both splits on ``device`` and the class count. INT8 inputs are integers from here on:
    images stay raw uint8 (the engine shifts them), point clouds are quantised to int8 once."""
    model_points, data_points = config.model == "pointnet", is_point_dataset(config.dataset)
    if model_points != data_points:
        raise ValueError(f"--model {config.model} does not fit --dataset {config.dataset}: pointnet takes the "
                         "point datasets (mnist-points, fashion-mnist-points, modelnet40), the others take images")
    int8 = config.precision == "int8"
    data = {}
    for split, limit, key in (("train", config.train_limit, ""), ("test", config.test_limit, "_test")):
        part = load_dataset(config.dataset, config.data_root, split, config.download, limit or None,
                            classes=config.classes, raw=int8, num_points=config.num_points, lift3d=config.points_3d)
        x = part.x
        if int8 and x.is_floating_point():
            from elasticzo.int8.inputs import quantize_points

            x = quantize_points(x)
        data["x" + key], data["y" + key], data["num_classes"] = x.to(device), part.y.to(device), part.num_classes
    return data


def _initial_record(config, run_dir: Path, learner, data, pos: RunPosition) -> dict:
    """Epoch 0 of a fine-tuning run: the test accuracy of the initial weights, before any step."""
    record = {"epoch": 0, "test_acc": evaluate(learner, data["x_test"], data["y_test"], config.batch_size * 16),
              "steps": 0, "init": config.init}
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    pos.history.append(record)
    return record


def _start(config: TrainConfig, run_dir: Path, learner, steps_per_epoch: int, log=print) -> RunPosition:
    """A fresh run dir, or the position restored from its checkpoint with ``--resume``.

    Nothing in ``run_dir`` is written before the config, the checkpoint and the records have all
    been checked; a refused resume leaves every file as it was.
    """
    ckpt = run_dir / CHECKPOINT
    if not config.resume:
        if ckpt.exists() or existing_records(run_dir):
            raise ValueError(f"--run-dir: {run_dir} already holds a run; pass --resume to continue it "
                             "or choose another --run-dir (nothing was overwritten)")
        run_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(run_dir / CONFIG, config.json())
        return RunPosition()
    if not ckpt.exists():
        return _restart(config, run_dir, log)
    _check_same_run(config, run_dir / CONFIG)
    tensors, meta = load_checkpoint(ckpt)
    pos = RunPosition(**validate_checkpoint(learner, tensors, meta, ckpt, steps_per_epoch))
    cut = plan_cut(run_dir, pos.global_step, pos.history)
    learner.load_state(tensors, meta["learner"], ckpt)  # checked in full above: cannot fail half-way
    for path, text in cut.items():
        write_atomic(path, text)
    write_atomic(run_dir / CONFIG, config.json())  # records a changed --epochs
    return pos


def _start_replicas(config: TrainConfig, run_dir: Path, learner, replicas, steps_per_epoch: int,
                    log) -> RunPosition:
    """Rank 0 starts or resumes the run dir; every rank then takes rank 0's state and position."""
    pos, error = None, None
    if replicas.writer:
        try:
            pos = _start(config, run_dir, learner, steps_per_epoch, log)
        except Exception as err:  # re-raised on rank 0 by share_outcome, reported on the others
            error = err
    replicas.share_outcome(error)
    mine = (learner.state_tensors(), learner.state_meta(), dict(pos.__dict__)) if replicas.writer else None
    tensors, meta, position = replicas.broadcast_state(mine)
    if not replicas.writer:
        learner.load_state({k: v.to(replicas.device) for k, v in tensors.items()}, meta, Path("<rank 0>"))
        pos = RunPosition(**position)
    distributed.attach(learner, replicas)
    return pos


def _restart(config: TrainConfig, run_dir: Path, log) -> RunPosition:
    """--resume of a run that died before its first checkpoint: start at step 0, old records kept aside."""
    if not existing_records(run_dir):
        raise ValueError(f"--resume: {run_dir} has no {CHECKPOINT} and no records to resume from; "
                         "leave out --resume to start a new run there")
    _check_same_run(config, run_dir / CONFIG)
    aside = move_aside(run_dir)
    write_atomic(run_dir / CONFIG, config.json())
    log(f"--resume: {run_dir} has no {CHECKPOINT} (the run stopped before its first checkpoint); "
        f"restarting from step 0, the old records were moved to {aside}")
    return RunPosition()


def _check_same_run(config: TrainConfig, path: Path) -> None:
    saved = TrainConfig.load(path).to_dict()
    wanted = config.to_dict()
    diff = [k for k in wanted if k not in RESUME_FREE and saved.get(k) != wanted[k]]
    if diff:
        pairs = ", ".join(f"{k}: saved {saved.get(k)!r}, given {wanted[k]!r}" for k in diff)
        raise ValueError(f"--resume: the settings differ from the run in {path.parent} ({pairs})")


def _train_epoch(config, run_dir, learner, loader, pos: RunPosition, total: int, events: EventLog,
                 replicas=None) -> None:
    writer = replicas is None or replicas.writer
    pending: list[tuple[int, torch.Tensor, torch.Tensor | None]] = []
    bar = tqdm(total=len(loader), initial=pos.step_in_epoch, desc=f"epoch {pos.epoch + 1}/{config.epochs}",
               disable=not (config.progress and writer), leave=False, dynamic_ncols=True)
    start = time.perf_counter()
    for x, y in loader.epoch_batches(pos.epoch, pos.step_in_epoch):
        learner.set_progress(pos.global_step / total)
        if replicas is not None:
            x, y = replicas.shard(x, y)
        loss = learner.train_step(x, y)
        record = learner.step_record()
        pending.append((pos.global_step, loss, None if record is None else record.detach()))  # fresh each step
        pos.global_step += 1
        pos.step_in_epoch += 1
        checkpoint_due = config.checkpoint_every and pos.global_step % config.checkpoint_every == 0
        if len(pending) >= CHECK_EVERY or pos.step_in_epoch == len(loader) or checkpoint_due:
            events.steps(_flush(run_dir, pos, pending, bar, writer))
            bar.update(len(pending))
            pending.clear()
            if checkpoint_due and pos.step_in_epoch < len(loader) and writer:  # the epoch end saves anyway
                pos.epoch_seconds += time.perf_counter() - start
                start = time.perf_counter()
                _save(run_dir, learner, pos)
        if replicas is not None and config.check_every and pos.global_step % config.check_every == 0:
            replicas.check_replicas(learner.state_tensors(), pos.global_step)
    pos.epoch_seconds += time.perf_counter() - start
    bar.close()


def _flush(run_dir: Path, pos: RunPosition, pending: list, bar, writer: bool = True) -> list[tuple[int, float]]:
    """One host sync for many steps: check losses are finite, append to the seed log (``writer``
    only); (step, loss) pairs."""
    losses = torch.stack([p[1] for p in pending]).double().tolist()
    bad = next((step for (step, _, _), v in zip(pending, losses) if not math.isfinite(v)), None)
    if bad is not None:
        ckpt = run_dir / CHECKPOINT
        where = f"the last good checkpoint is {ckpt}" if ckpt.exists() else "no checkpoint was written yet"
        raise TrainingDiverged(f"non-finite loss at step {bad} (epoch {pos.epoch + 1}); training stopped; "
                               f"{where}. Lower --lr-zo / --lr-bp or --grad-clip and start again.")
    for loss in losses:
        pos.loss_sum += loss
    if writer:
        with open(run_dir / "seeds.jsonl", "a") as f:
            for (step, _, g), loss in zip(pending, losses):
                f.write(json.dumps({"step": step, "epoch": pos.epoch, "loss": loss,
                                    "g": None if g is None else g.double().tolist()}) + "\n")
    bar.set_postfix(loss=f"{losses[-1]:.4f}")
    return [(step, loss) for (step, _, _), loss in zip(pending, losses)]


def _end_epoch(config, run_dir, learner, data, pos: RunPosition, replicas=None) -> dict:
    steps = pos.step_in_epoch
    record = {"epoch": pos.epoch + 1, "test_acc": _test_accuracy(config, learner, data, replicas),
              "train_loss": pos.loss_sum / max(steps, 1), "epoch_seconds": pos.epoch_seconds,
              "step_seconds": pos.epoch_seconds / max(steps, 1), "steps": pos.global_step}
    if replicas is not None:
        record.update(world_size=replicas.world, comm_bytes_per_step=replicas.bytes_per_step,
                      collectives_per_step=replicas.collectives)
        replicas.check_replicas(learner.state_tensors(), pos.global_step)
    pos.history.append(record)
    pos.epoch, pos.step_in_epoch, pos.loss_sum, pos.epoch_seconds = pos.epoch + 1, 0, 0.0, 0.0
    if replicas is None or replicas.writer:
        with open(run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        _save(run_dir, learner, pos)
    return record


def _test_accuracy(config, learner, data, replicas) -> float:
    """Test accuracy in percent; under torchrun each rank counts its slice of the test set."""
    x, y, batch = data["x_test"], data["y_test"], config.batch_size * 16
    if replicas is None:
        return evaluate(learner, x, y, batch)
    lo, hi = distributed.shard_bounds(x.shape[0], replicas.rank, replicas.world)
    return 100.0 * replicas.sum(count_correct(learner, x[lo:hi], y[lo:hi], batch)) / max(x.shape[0], 1)


def count_correct(learner, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024) -> int:
    correct = 0
    for lo in range(0, x.shape[0], batch_size):
        correct += int((learner.predict(x[lo:lo + batch_size]) == y[lo:lo + batch_size]).sum())
    return correct


def evaluate(learner, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024) -> float:
    """Test accuracy in percent."""
    return 100.0 * count_correct(learner, x, y, batch_size) / max(x.shape[0], 1)


def _save(run_dir: Path, learner, pos: RunPosition) -> None:
    meta = {"learner": learner.state_meta(), "position": pos.__dict__}
    save_checkpoint(run_dir / CHECKPOINT, learner.state_tensors(), meta)
