"""ElasticZO on MNIST in ~50 lines: a plain PyTorch loop with the ElasticZO optimiser.

Diff it against your own loop: the only changes are the optimiser and the closure, which the
optimiser calls once per perturbation (twice per step), with backward=False when no layer is BP.

    python examples/train_mnist.py --data-root ../shared/datasets --bp-layers 2 --epochs 1
"""
import argparse

import torch
import torch.nn.functional as F

from elasticzo.data import BatchLoader, load_split
from elasticzo.models import LeNet5
from elasticzo.optim import ElasticZO


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--bp-layers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--limit", type=int, default=None, help="use the first N training images")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    x, y = load_split("mnist", args.data_root, "train", limit=args.limit)
    x_test, y_test = load_split("mnist", args.data_root, "test")
    loader = BatchLoader(x.to(device), y.to(device), batch_size=64, seed=0)

    torch.manual_seed(0)
    model = LeNet5().to(device)
    opt = ElasticZO.for_model(model, args.bp_layers, lr_zo=1e-3, lr_bp=0.05, momentum=0.9, normalize=True, seed=0)

    for epoch in range(args.epochs):
        model.train()
        for step, (xb, yb) in enumerate(loader.epoch_batches(epoch)):
            def closure(backward=True):
                loss = F.cross_entropy(model(xb), yb)
                if backward:
                    loss.backward()
                return loss

            loss = opt.step(closure)
            if step % 200 == 0:
                print(f"epoch {epoch} step {step} loss {loss.item():.4f}")
        model.eval()
        with torch.no_grad():
            acc = (model(x_test.to(device)).argmax(1) == y_test.to(device)).float().mean().item()
        print(f"epoch {epoch}: test accuracy {100 * acc:.2f} %")


if __name__ == "__main__":
    main()
