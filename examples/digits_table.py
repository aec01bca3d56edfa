"""Users' own models on the 8x8 digits: test accuracy of BP, vanilla ZO, ElasticZO k=1 and k=2,
each beside the same run with the ZO learning rate 0 (the control that shows the ZO part learns).

    python examples/digits_table.py --epochs 30 --out docs/digits.md

Models (``elasticzo.models.small``): a CNN with biases, an MLP with BatchNorm and Dropout, a
ResNet with a residual add and global average pooling (head registered first), a transformer
encoder (attention, LayerNorm, dropout, positional parameter). Everything runs on one thread.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from elasticzo.data import BatchLoader
from elasticzo.data.digits import load_digits_split
from elasticzo.models.small import SMALL_MODELS
from elasticzo.optim import ElasticZO

METHODS = {"BP": "all", "vanilla ZO": 0, "ElasticZO k=1": 1, "ElasticZO k=2": 2}


def run(model_name: str, k, epochs: int, lr_zo: float | None, seed: int, data) -> float:
    """Train one model with split k; returns the test accuracy in %."""
    x, y, x_test, y_test = data
    torch.manual_seed(seed)
    model = SMALL_MODELS[model_name]()
    opt = ElasticZO.for_model(model, None if k == "all" else k, example_input=x[:2], seed=seed,
                              **({"bp": lambda name, p: True} if k == "all" else {}), **({} if lr_zo is None else {"lr_zo": lr_zo}))
    loader = BatchLoader(x, y, batch_size=64, seed=seed)
    steps = epochs * len(loader)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 * (1 + torch.cos(torch.tensor(t / steps * torch.pi)).item()))
    for epoch in range(epochs):
        model.train()
        for xb, yb in loader.epoch_batches(epoch):
            opt.step(lambda: F.cross_entropy(model(xb), yb))
            schedule.step()
    model.eval()
    with torch.no_grad():
        return 100.0 * float((model(x_test).argmax(1) == y_test).float().mean())


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr-zo", type=float, default=None, help="ZO learning rate (default: the CLI's)")
    parser.add_argument("--models", default=",".join(SMALL_MODELS))
    parser.add_argument("--out", default="docs/digits.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = load_digits_split(args.seed)
    rows, started = [], time.time()
    for name in args.models.split(","):
        row = {"model": name}
        for method, k in METHODS.items():
            row[method] = run(name, k, args.epochs, args.lr_zo, args.seed, data)
            if k != "all":
                row[method + " (lr_zo=0)"] = run(name, k, args.epochs, 0.0, args.seed, data)
            print(name, method, row[method], row.get(method + " (lr_zo=0)"), flush=True)
        rows.append(row)
    write(Path(args.out), rows, args, time.time() - started)


def write(path: Path, rows: list[dict], args, seconds: float) -> None:
    columns = [c for c in rows[0] if c != "model"]
    lines = ["# Own models on sklearn digits: test accuracy (%)", "",
             f"`python examples/digits_table.py --epochs {args.epochs} --seed {args.seed}"
             + (f" --lr-zo {args.lr_zo}" if args.lr_zo is not None else "") + f" --out {args.out}`",
             f"({len(rows)} models, {args.epochs} epochs of 1437 training images, batch 64, cosine schedule, "
             f"lr_zo {args.lr_zo or 'default'}, other settings default, 360 test images; {seconds:.0f} s on {cpu_model()}, one thread).", "",
             "| model | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    lines += ["| " + r["model"] + " | " + " | ".join(f"{r[c]:.1f}" for c in columns) + " |" for r in rows]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    path.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
    print(path.read_text())


if __name__ == "__main__":
    main()
