"""A small fully connected classifier, the simplest model to test the split on."""
from torch import nn


class MLP(nn.Sequential):
    """Flatten - (Linear - ReLU) per hidden width - Linear to classes."""

    def __init__(self, in_features: int = 784, hidden: tuple[int, ...] = (256, 128), num_classes: int = 10):
        widths = (in_features, *hidden)
        blocks: list[nn.Module] = [nn.Flatten()]
        for a, b in zip(widths[:-1], widths[1:]):
            blocks += [nn.Linear(a, b), nn.ReLU(inplace=True)]
        blocks.append(nn.Linear(widths[-1], num_classes))
        super().__init__(*blocks)
