"""Communication of data-parallel training, measured: bytes per step of every method, and accuracy
after the same epochs on 1, 2 and 4 processes.

    python -m elasticzo.bench.comm --data-root ../shared/datasets --out docs/bench/comm

Each row is a real ``torchrun`` launch (gloo, CPU); the bytes are the ``comm_bytes_per_step`` the
run recorded, i.e. the payload of the tensors each rank handed to its collectives in a step.
Writes ``results.json`` and ``results.md`` to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

METHODS = {"bp": ["--method", "bp"], "zo": ["--method", "zo"], "k1": ["--bp-layers", "1"],
           "k2": ["--bp-layers", "2"], "k3": ["--bp-layers", "3"]}


def launch(nproc: int, run_dir: Path, data_root: str, args: list[str]) -> list[dict]:
    """One training run on ``nproc`` ranks (plain ``python -m elasticzo`` for 1); its metrics."""
    train = ["-m", "elasticzo", "train", "--data-root", data_root, "--run-dir", str(run_dir), "--no-progress"] + args
    if nproc == 1:
        cmd = [sys.executable] + train
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)] + train
    done = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def bytes_table(out: Path, data_root: str, precisions: list[str]) -> list[dict]:
    """Bytes per step of each method and precision on 2 ranks (a few steps suffice: the size is fixed)."""
    rows = []
    for precision in precisions:
        for name, flags in METHODS.items():
            run = out / "runs" / f"bytes-{name}-{precision}"
            record = launch(2, run, data_root, flags + ["--precision", precision, "--train-limit", "256",
                                                        "--test-limit", "64", "--epochs", "1"])[-1]
            rows.append({"method": name, "precision": precision, "bytes_per_step": record["comm_bytes_per_step"],
                         "collectives_per_step": record["collectives_per_step"]})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def scaling_table(out: Path, data_root: str, epochs: int, train_limit: int, precisions: list[str]) -> list[dict]:
    """Test accuracy after ``epochs`` epochs of ElasticZO k=2 (FP32 and INT8) on 1, 2 and 4 processes."""
    rows = []
    for precision in precisions:
        for nproc in (1, 2, 4):
            run = out / "runs" / f"scale-k2-{precision}-n{nproc}"
            records = launch(nproc, run, data_root, ["--bp-layers", "2", "--precision", precision, "--epochs",
                                                     str(epochs), "--train-limit", str(train_limit)])
            rows.append({"method": "k2", "precision": precision, "processes": nproc,
                         "test_acc": [r["test_acc"] for r in records],
                         "step_seconds": records[-1]["step_seconds"]})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def markdown(bytes_rows: list[dict], scale_rows: list[dict], settings: dict) -> str:
    lines = ["# Data-parallel communication (measured)", "", f"Settings: {json.dumps(settings)}", "",
             "| method | precision | bytes per step per rank | collectives per step |", "| --- | --- | --- | --- |"]
    lines += [f"| {r['method']} | {r['precision']} | {r['bytes_per_step']:,} | {r['collectives_per_step']} |"
              for r in bytes_rows]
    lines += ["", "| method | precision | processes | test accuracy per epoch (%) |", "| --- | --- | --- | --- |"]
    lines += [f"| {r['method']} | {r['precision']} | {r['processes']} | "
              + ", ".join(f"{a:.2f}" for a in r["test_acc"]) + " |" for r in scale_rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", default=os.environ.get("ELASTICZO_DATA", "data"))
    p.add_argument("--out", default="bench-results/comm")
    p.add_argument("--epochs", type=int, default=2, help="epochs of the 1/2/4-process accuracy runs")
    p.add_argument("--train-limit", type=int, default=10000, help="training examples of those runs (0: all)")
    p.add_argument("--precisions", nargs="+", default=["fp32", "int8"], choices=("fp32", "int8"))
    p.add_argument("--skip-scaling", action="store_true", help="only the bytes table")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {"epochs": args.epochs, "train_limit": args.train_limit, "model": "lenet5", "dataset": "mnist",
                "batch_size": 64, "launcher": "torchrun --standalone, gloo, OMP_NUM_THREADS=1"}
    bytes_rows = bytes_table(out, args.data_root, args.precisions)
    scale_rows = [] if args.skip_scaling else scaling_table(out, args.data_root, args.epochs, args.train_limit,
                                                             args.precisions)
    (out / "results.json").write_text(json.dumps({"settings": settings, "bytes": bytes_rows,
                                                  "scaling": scale_rows}, indent=2) + "\n")
    (out / "results.md").write_text(markdown(bytes_rows, scale_rows, settings))
    print(f"wrote {out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
