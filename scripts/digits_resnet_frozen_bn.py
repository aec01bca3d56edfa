"""Float BP on the digits ResNet with BatchNorm in batch-statistics mode against BatchNorm frozen
(eval mode: the affine map that int8.convert folds), to see how much the ResNet depends on batch
statistics (docs/digits.md, the INT8 ResNet row).

    OMP_NUM_THREADS=1 python scripts/digits_resnet_frozen_bn.py --epochs 10 --seed 0
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

from elasticzo.data.digits import load_digits_split
from elasticzo.models.small import TinyResNet


def train(frozen_bn: bool, epochs: int, seed: int) -> float:
    """Test accuracy (%) after ``epochs`` of SGD (lr 0.05, momentum 0.9, batch 64)."""
    x, y, xt, yt = load_digits_split(seed)
    torch.manual_seed(seed)
    model = TinyResNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        if frozen_bn:
            for m in model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        for idx in torch.randperm(len(y), generator=gen).split(64):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        return 100.0 * (model(xt).argmax(1) == yt).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for frozen in (False, True):
        print(f"BatchNorm {'frozen (eval mode)' if frozen else 'batch statistics'}: "
              f"{train(frozen, args.epochs, args.seed):.1f} % after {args.epochs} epochs")


if __name__ == "__main__":
    main()
