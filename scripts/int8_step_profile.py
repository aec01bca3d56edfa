"""Where an INT8 training step's time goes: native kernels, torch below Python, Python (py-spy samples).

Two parts, because the sampler is an outside process (``pip install py-spy``, the ``profile`` extra):

    py-spy record -r 250 --native -f raw -o zo.raw -- python scripts/int8_step_profile.py loop zo 10 --data-root ../shared/datasets
    python scripts/int8_step_profile.py summary zo.raw

``loop`` runs LeNet-5 INT8 training steps of one method (zo, k1, k2, bp; the defaults of
``elasticzo train``, MNIST batch of 64, one thread) for the given seconds after a warm-up.
``summary`` reads py-spy's raw output and splits the samples inside ``Learner.train_step`` into
the native kernel running (the outermost ``ezo_*`` frame), torch's C++ below the deepest Python
frame (op dispatch, argument parsing, tensor creation, aten kernels such as ``_int_mm``) and Python
itself. Warm-up, the speed probe and the kernel build are left out. docs/results.md quotes it.
"""
from __future__ import annotations

import argparse
import collections
import time


def loop(method: str, seconds: float, data_root: str | None, batch: int) -> None:
    import torch

    from elasticzo.bench.speed import METHODS, _batch, lenet_steps

    torch.set_num_threads(1)
    step = lenet_steps(_batch(data_root, batch, torch.device("cpu")), torch.device("cpu"),
                       {method: METHODS[method]})[f"{method}-int8"]
    for _ in range(5):  # warm-up: kernels built, speed probe run
        step()
    end = time.time() + seconds
    while time.time() < end:
        step()


def classify(stack: str) -> str | None:
    """The category of one raw py-spy stack, or None outside a training step."""
    if "train_step" not in stack or "probe" in stack or "select" in stack:
        return None
    frames = stack.split(";")
    native = [f.split(" (")[0] for f in frames if f.startswith("ezo_")]
    if native:
        return "native " + native[0]
    deepest = max(i for i, f in enumerate(frames) if ".py:" in f)
    return "torch below Python" if deepest < len(frames) - 1 else "Python"


def summary(path: str) -> str:
    counts: collections.Counter = collections.Counter()
    for line in open(path):
        stack, _, n = line.rstrip().rpartition(" ")
        kind = classify(stack)
        if kind is not None:
            counts[kind] += int(n)
    total = sum(counts.values())
    if total == 0:
        raise SystemExit(f"{path}: no samples inside Learner.train_step (was it recorded with --native -f raw?)")
    kernels = sum(v for k, v in counts.items() if k.startswith("native "))
    lines = [f"{100 * v / total:5.1f} %  {k}" for k, v in counts.most_common()]
    return "\n".join([*lines, f"{100 * kernels / total:5.1f} %  native kernels in all ({total} samples)"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("loop", help="run INT8 training steps (under py-spy)")
    run.add_argument("method", choices=("zo", "k1", "k2", "bp"))
    run.add_argument("seconds", type=float)
    run.add_argument("--data-root", default=None, help="else $ELASTICZO_DATA, else ./data")
    run.add_argument("--batch-size", type=int, default=64)
    sub.add_parser("summary", help="split py-spy's raw samples").add_argument("raw")
    args = p.parse_args()
    if args.cmd == "loop":
        loop(args.method, args.seconds, args.data_root, args.batch_size)
    else:
        print(summary(args.raw))


if __name__ == "__main__":
    main()
