"""Fine-tune a float model on the device in integers: train (or load) a float model with BatchNorm
and Dropout, save it, convert it to INT8 and go on training it with integer-only ElasticZO.

    python examples/finetune_int8.py --float-epochs 3 --int8-epochs 10 --bp-layers 1

The float model is ``BNDropoutMLP`` (``elasticzo.models.small``; ``--model resnet`` for the
small ResNet, a residual graph with BatchNorm) on scikit-learn's 8x8 digits.
Conversion (``int8.convert``) folds each BatchNorm into the linear layer before it (running
statistics), keeps the biases as integer biases and drops the Dropout layers (INT8 training has
no dropout). The fine-tuning step is the device path: ZO for the early layers, NITI backprop for
the last ``--bp-layers``, every operation on integers after the data is quantised once.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from elasticzo.data import BatchLoader
from elasticzo.data.digits import load_digits_split
from elasticzo.int8 import IntElasticZO, QTensor, convert, loss_closure
from elasticzo.int8.inputs import quantize_once
from elasticzo.models.small import SMALL_MODELS


def train_float(model: torch.nn.Module, x, y, epochs: int, seed: int) -> None:
    """Plain float training with Adam (the pretraining a user has done elsewhere)."""
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    loader = BatchLoader(x, y, batch_size=64, seed=seed)
    model.train()
    for epoch in range(epochs):
        for xb, yb in loader.epoch_batches(epoch):
            opt.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            opt.step()


def float_accuracy(model: torch.nn.Module, x, y) -> float:
    model.eval()
    with torch.no_grad():
        return 100.0 * float((model(x).argmax(1) == y).float().mean())


def int8_accuracy(net, xq: QTensor, y) -> float:
    net.eval()
    with torch.no_grad():
        return 100.0 * float((net(xq).values.argmax(1) == y).float().mean())


def finetune(net, xq: QTensor, y, epochs: int, bp_layers: int, seed: int) -> None:
    """Integer-only ElasticZO on the converted network (the device's training loop)."""
    opt = IntElasticZO.for_model(net, bp_layers, seed=seed)
    loader = BatchLoader(xq.values, y, batch_size=64, seed=seed)
    net.train()
    for epoch in range(epochs):
        for xb, yb in loader.epoch_batches(epoch):
            opt.step(loss_closure(net, QTensor(xb, xq.exponent), yb))


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--float-epochs", type=int, default=3, help="float pretraining (0 with --checkpoint)")
    parser.add_argument("--checkpoint", default="finetune_int8_float.pt", help="float state_dict: loaded if it "
                        "exists and --float-epochs is 0, else written after pretraining")
    parser.add_argument("--int8-epochs", type=int, default=10)
    parser.add_argument("--bp-layers", type=int, default=1, help="last layers trained by NITI backprop")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", choices=("bn-dropout-mlp", "resnet", "cnn"), default="bn-dropout-mlp")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    x, y, x_test, y_test = load_digits_split(args.seed)
    model = SMALL_MODELS[args.model]()
    if args.float_epochs == 0 and Path(args.checkpoint).exists():
        model.load_state_dict(torch.load(args.checkpoint))
    else:
        train_float(model, x, y, args.float_epochs, args.seed)
        torch.save(model.state_dict(), args.checkpoint)
    result = {"float": float_accuracy(model, x_test, y_test)}
    net = convert(model)  # BatchNorm folded, Dropout dropped, biases kept
    xq, xq_test = quantize_once(x, x_test)  # once, at load time: the steps are integer-only
    result["int8 converted"] = int8_accuracy(net, xq_test, y_test)
    finetune(net, xq, y, args.int8_epochs, args.bp_layers, args.seed)
    result["int8 fine-tuned"] = int8_accuracy(net, xq_test, y_test)
    for name, acc in result.items():
        print(f"{name:>16}: {acc:5.1f} % test accuracy")
    return result


if __name__ == "__main__":
    main()
