"""Optional TensorBoard event files beside metrics.jsonl (``--tensorboard``).

metrics.jsonl and seeds.jsonl stay the record of a run; the event files in
``<run_dir>/tensorboard/`` are a view of the same numbers for people who watch runs in
TensorBoard: the train loss of every step, and per epoch the test accuracy, the epoch's mean
train loss and the time per step. A resumed run purges the events past its checkpoint, so
the curves never show a step twice. Needs ``pip install 'elasticzo[tensorboard]'``.
"""
from __future__ import annotations

from pathlib import Path

EVENTS_DIR = "tensorboard"


def summary_writer_class():
    """torch's SummaryWriter; a ValueError that says what to install when tensorboard is absent.

    The loop calls this before it touches the run dir, so a missing package costs nothing.
    """
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:  # torch raises ImportError when the tensorboard package is absent
        raise ValueError("--tensorboard needs the tensorboard package: pip install 'elasticzo[tensorboard]' "
                         f"({err})") from None
    return SummaryWriter


class EventLog:
    """Scalars to TensorBoard, or nothing when disabled (the loop calls it either way)."""

    def __init__(self, run_dir: Path, enabled: bool, start_step: int = 0):
        self.writer = None
        if enabled:  # x axis: steps done, so step t's loss sits at t + 1 and an epoch's end at its "steps"
            purge = start_step + 1 if start_step else None  # drop what a killed run logged past the checkpoint
            self.writer = summary_writer_class()(str(Path(run_dir) / EVENTS_DIR), purge_step=purge)

    def steps(self, records: list[tuple[int, float]]) -> None:
        """Per-step train losses: (global step, loss), logged at step + 1 (steps done)."""
        if self.writer is not None:
            for step, loss in records:
                self.writer.add_scalar("train/loss_step", loss, step + 1)

    def epoch(self, record: dict) -> None:
        """One metrics.jsonl record, at the global step where its epoch ended."""
        if self.writer is None:
            return
        step = record["steps"]
        self.writer.add_scalar("test/accuracy", record["test_acc"], step)
        for key, tag in (("train_loss", "train/loss_epoch"), ("step_seconds", "time/step_seconds")):
            if key in record:
                self.writer.add_scalar(tag, record[key], step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
