"""The 8x8 digits of scikit-learn (1797 images, 10 classes), a small real dataset that ships inside
scikit-learn's wheel: no download. Used by the own-model test matrix and the digits table.

``pip install scikit-learn`` (it is in the ``test`` extra).
"""
from __future__ import annotations

import torch

TEST_FRACTION = 0.2


def load_digits_split(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_test, y_test): images N x 1 x 8 x 8 standardised with the training
    mean and std, a fixed random 80/20 split drawn from ``seed``."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise ImportError("the digits dataset needs scikit-learn: pip install scikit-learn "
                          "(or pip install -e '.[test]')") from error
    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1)  # N x 1 x 8 x 8, values 0..16
    y = torch.tensor(bunch.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(len(y) * TEST_FRACTION)
    test, train = order[:n_test], order[n_test:]
    mean, std = x[train].mean(), x[train].std()
    return (x[train] - mean) / std, y[train], (x[test] - mean) / std, y[test]
