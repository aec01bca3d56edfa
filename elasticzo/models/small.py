"""Small models written as ordinary PyTorch, as a user would, for 8x8 digit images.

They exercise what a user's own model has and LeNet-5 does not: biases, BatchNorm, Dropout, a
residual add, global average pooling, attention (``nn.MultiheadAttention`` reads ``out_proj``
outside its forward), a model-level positional ``nn.Parameter``, and a head registered before
the layers that run first. The test matrix and ``examples/digits_table.py`` train them on
``sklearn.datasets.load_digits`` (1x8x8 images, 10 classes).
"""
from __future__ import annotations

import torch
from torch import nn


class DigitsCNN(nn.Sequential):
    """Two conv layers with biases, max-pooling and a linear head: the plain user CNN."""

    def __init__(self, num_classes: int = 10, width: int = 8):
        super().__init__(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),           # 8 x 4 x 4
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),   # 16 x 2 x 2
            nn.Flatten(), nn.Linear(8 * width, num_classes))


class BNDropoutMLP(nn.Sequential):
    """An MLP with BatchNorm and Dropout after each hidden layer."""

    def __init__(self, num_classes: int = 10, hidden: int = 64, p: float = 0.2):
        super().__init__(
            nn.Flatten(),
            nn.Linear(64, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Dropout(p),
            nn.Linear(hidden, hidden // 2), nn.BatchNorm1d(hidden // 2), nn.ReLU(), nn.Dropout(p),
            nn.Linear(hidden // 2, num_classes))


class TinyResNet(nn.Module):
    """conv-BN stem, one residual block (conv-BN-ReLU-conv-BN + skip), global average pool, head.

    The head ``fc`` is registered first: the split must follow the forward order, not this one.
    """

    def __init__(self, num_classes: int = 10, width: int = 8):
        super().__init__()
        self.fc = nn.Linear(width, num_classes)
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)                                             # B x w x 8 x 8
        r = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(h)))))
        return self.fc(self.pool(torch.relu(h + r)).flatten(1))      # B x classes


class TinyTransformer(nn.Module):
    """The 8 rows of a digit as 8 tokens: linear embedding + positional parameter, one encoder
    layer (attention, feed-forward, LayerNorm, dropout), mean over tokens, LayerNorm, head."""

    def __init__(self, num_classes: int = 10, dim: int = 32, heads: int = 4, dropout: float = 0.1):
        super().__init__()
        self.embed = nn.Linear(8, dim)
        self.pos = nn.Parameter(torch.zeros(1, 8, dim))
        self.encoder = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=2 * dim, dropout=dropout, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x.reshape(x.shape[0], 8, 8)) + self.pos  # B x 8 x dim
        return self.head(self.norm(self.encoder(tokens).mean(dim=1)))


SMALL_MODELS = {"cnn": DigitsCNN, "bn-dropout-mlp": BNDropoutMLP, "resnet": TinyResNet, "transformer": TinyTransformer}
