"""Users' own models on the 8x8 digits: test accuracy of BP, vanilla ZO, ElasticZO k=1 and k=2,
each beside the same run with the ZO learning rate 0 (the control that shows the ZO part learns).

    python examples/digits_table.py --epochs 30 --out docs/digits.md
    python examples/digits_table.py --precision int8 --epochs 40 --out docs/digits-int8.md

With ``--precision int8`` each convertible model (``int8.convert``: biases, BatchNorm folded,
Dropout dropped, the ResNet traced by torch.fx; the transformer has no integer form) trains
with ``IntElasticZO`` on the digits quantised once (int8, one exponent): NITI-BP (every layer in
BP), vanilla ZO, ElasticZO k=1 and k=2. The control freezes the ZO part (``zo_shift=30``: a step
below 2**-30 weight units, checked to leave the ZO weights unchanged).

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
from elasticzo.int8 import IntElasticZO, QTensor, convert, loss_closure
from elasticzo.int8.inputs import quantize_once
from elasticzo.models.small import SMALL_MODELS
from elasticzo.optim import ElasticZO

METHODS = {"BP": "all", "vanilla ZO": 0, "ElasticZO k=1": 1, "ElasticZO k=2": 2}
INT8_MODELS = ("cnn", "bn-dropout-mlp", "resnet")  # the transformer has no integer form
FROZEN_SHIFT = 30  # the INT8 control: ZO steps below 2**-30 units never reach the int8 weights


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


def run_int8(model_name: str, k, epochs: int, zo_shift: int, seed: int, data, eps: int = 1) -> float:
    """Convert the float model (its random init, biases, BatchNorm folded) and train it in integers."""
    x, y, x_test, y_test = data
    torch.manual_seed(seed)
    net = convert(SMALL_MODELS[model_name]())
    layers = net.weight_layers()
    opt = IntElasticZO.for_model(net, len(layers) if k == "all" else k, seed=seed, zo_shift=zo_shift, eps=eps)
    start = [layer.weight.clone() for layer in opt.zo_layers]
    xq, xq_test = quantize_once(x, x_test)
    loader = BatchLoader(xq.values, y, batch_size=64, seed=seed)
    net.train()
    for epoch in range(epochs):
        for xb, yb in loader.epoch_batches(epoch):
            opt.step(loss_closure(net, QTensor(xb, xq.exponent), yb))
    if zo_shift == FROZEN_SHIFT and not all(torch.equal(a, l.weight) for a, l in zip(start, opt.zo_layers)):
        raise RuntimeError("the control's ZO weights moved")
    net.eval()
    with torch.no_grad():
        return 100.0 * float((net(xq_test).values.argmax(1) == y_test).float().mean())


def int8_row(name: str, args, data) -> dict:
    row = {"model": name, "NITI-BP": run_int8(name, "all", args.epochs, args.zo_shift, args.seed, data)}
    for method, k in list(METHODS.items())[1:]:
        row["INT8 " + method] = run_int8(name, k, args.epochs, args.zo_shift, args.seed, data, args.eps)
        row[f"INT8 {method} (frozen ZO)"] = run_int8(name, k, args.epochs, FROZEN_SHIFT, args.seed, data, args.eps)
        print(name, method, row["INT8 " + method], row[f"INT8 {method} (frozen ZO)"], flush=True)
    return row


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
    parser.add_argument("--models", default=None, help="comma-separated (default: every model of the precision)")
    parser.add_argument("--precision", choices=("fp32", "int8"), default="fp32")
    parser.add_argument("--zo-shift", type=int, default=4, help="INT8: the ZO step's extra shift (IntElasticZO)")
    parser.add_argument("--eps", type=int, default=1, help="INT8: the perturbation in weight units")
    parser.add_argument("--out", default="docs/digits.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = load_digits_split(args.seed)
    rows, started = [], time.time()
    models = args.models.split(",") if args.models else list(INT8_MODELS if args.precision == "int8" else SMALL_MODELS)
    for name in models:
        if args.precision == "int8":
            rows.append(int8_row(name, args, data))
            continue
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
    int8 = args.precision == "int8"
    flags = (f" --precision int8 --zo-shift {args.zo_shift} --eps {args.eps}" if int8 else
             (f" --lr-zo {args.lr_zo}" if args.lr_zo is not None else ""))
    settings = (f"zo_shift {args.zo_shift}, eps {args.eps}, mu 3, constant" if int8 else
                f"cosine schedule, lr_zo {args.lr_zo or 'default'}")
    lines = [f"# Own models on sklearn digits{', INT8' if int8 else ''}: test accuracy (%)", "",
             f"`python examples/digits_table.py --epochs {args.epochs} --seed {args.seed}{flags} --out {args.out}`",
             f"({len(rows)} models, {args.epochs} epochs of 1437 training images, batch 64, {settings}, "
             f"other settings default, 360 test images; {seconds:.0f} s on {cpu_model()}, one thread).", "",
             "| model | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    lines += ["| " + r["model"] + " | " + " | ".join(f"{r[c]:.1f}" for c in columns) + " |" for r in rows]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    path.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
    print(path.read_text())


if __name__ == "__main__":
    main()
