"""A run's records (metrics.jsonl, seeds.jsonl): read and checked, cut back atomically, moved aside.

The records are the run's history; a failed resume must leave them byte-identical. So a resume
first computes the cut-back files in memory (``plan_cut``, which checks that the records hold
what the checkpoint says was written), and only after every check has passed writes them
(``write_atomic``: a new file, then a rename, so a crash mid-write leaves the old file whole).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

METRICS, SEEDS, CONFIG = "metrics.jsonl", "seeds.jsonl", "config.json"
RECORDS = (METRICS, SEEDS)


class RecordsError(ValueError):
    """A record file that cannot be read or does not fit the checkpoint; the message names the file."""


def read_jsonl(path: Path) -> list[tuple[str, dict]]:
    """(line, parsed object) per non-blank line; RecordsError naming the file and line number."""
    if not path.exists():
        return []
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise RecordsError(f"{path}: cannot read the run's records ({err})") from None
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as err:
            raise RecordsError(f"{path}: line {number} is not JSON ({err})") from None
        if not isinstance(record, dict):
            raise RecordsError(f"{path}: line {number} is not a JSON object")
        rows.append((line, record))
    return rows


def plan_cut(run_dir: Path, global_step: int, history: list[dict]) -> dict[Path, str]:
    """The record files cut back to a checkpoint at ``global_step`` with ``history``, as new contents.

    Checks, before anything is written, that the records cover the checkpoint: the seed log holds
    steps 0..global_step-1 in order, metrics.jsonl holds the checkpoint's epoch records.
    """
    seeds = [(ln, r) for ln, r in read_jsonl(run_dir / SEEDS) if _number(r, "step", run_dir / SEEDS) < global_step]
    steps = [r["step"] for _, r in seeds]
    if steps != list(range(global_step)):
        raise RecordsError(f"{run_dir / SEEDS}: holds {len(steps)} of the steps 0..{global_step - 1} the checkpoint "
                           "covers; the seed log does not belong to this checkpoint")
    epochs = {r["epoch"] for r in history}
    metrics = [(ln, r) for ln, r in read_jsonl(run_dir / METRICS) if _number(r, "epoch", run_dir / METRICS) in epochs]
    if [r for _, r in metrics] != history:
        raise RecordsError(f"{run_dir / METRICS}: its epoch records differ from the {len(history)} the checkpoint "
                           "holds; they do not belong to this checkpoint")
    return {run_dir / SEEDS: "".join(ln + "\n" for ln, _ in seeds),
            run_dir / METRICS: "".join(ln + "\n" for ln, _ in metrics)}


def _number(record: dict, key: str, path: Path) -> int:
    value = record.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise RecordsError(f"{path}: a record has {key}={value!r}, expected an integer")
    return value


def write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` by ``text`` via a temporary file and a rename; unchanged files are not touched."""
    if path.exists() and path.read_text() == text:
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def existing_records(run_dir: Path) -> list[Path]:
    """The record files (and config) present in ``run_dir``."""
    return [run_dir / name for name in (CONFIG, *RECORDS) if (run_dir / name).exists()]


def move_aside(run_dir: Path) -> Path:
    """Move metrics.jsonl and seeds.jsonl into a new ``run_dir/stale-N/``; returns that folder."""
    n = 1
    while (run_dir / f"stale-{n}").exists():
        n += 1
    target = run_dir / f"stale-{n}"
    target.mkdir()
    for name in RECORDS:
        if (run_dir / name).exists():
            os.replace(run_dir / name, target / name)
    return target
