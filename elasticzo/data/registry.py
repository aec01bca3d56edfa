"""Every dataset by its CLI name, loaded as one checked (x, y) split, optionally a subset of classes.

=========================  ==========================================================================
``mnist``                  images [N, 1, 28, 28]: float32 normalised, or raw uint8 (``raw=True``)
``fashion-mnist``          the same for Fashion-MNIST
``mnist-points``           float32 point clouds [N, num_points, 3] sampled from the MNIST images
``fashion-mnist-points``   the same from Fashion-MNIST (``data.points``)
``modelnet40``             float32 [N, num_points, 3]: a random subset of each ModelNet40 cloud
=========================  ==========================================================================

``classes`` keeps only the examples of the listed labels and renumbers them 0..n-1 in the order
given (``parse_classes("5-9")`` -> (5, 6, 7, 8, 9): digit 5 becomes label 0): the way to build a
fine-tuning task (pretrain on digits 0-4, fine-tune on 5-9). ``limit`` then keeps the first
``limit`` examples that remain. Point clouds are sampled after both, so a small limit is fast.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from elasticzo.data.modelnet import load_modelnet, sample_points
from elasticzo.data.points import image_point_clouds, point_seed
from elasticzo.data.vision import DATASETS, get_spec, load_split, normalise_images

POINT_DATASETS = {"mnist-points": "mnist", "fashion-mnist-points": "fashion-mnist"}  # name -> image source
MODELNET = "modelnet40"
DATASET_NAMES = (*DATASETS, *POINT_DATASETS, MODELNET)


@dataclass
class Split:
    """One loaded split: inputs, int64 labels in 0..len(class_names)-1, and the class names."""

    x: torch.Tensor
    y: torch.Tensor
    class_names: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def is_point_dataset(name: str) -> bool:
    return name in POINT_DATASETS or name == MODELNET


def parse_classes(text: str, num_classes: int) -> tuple[int, ...]:
    """'5-9' or '0,2,4' or '0-2,7' -> label tuple, checked against ``num_classes``; '' -> ()."""
    labels: list[int] = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        lo, sep, hi = part.partition("-")
        try:
            span = range(int(lo), int(hi) + 1) if sep else [int(lo)]
        except ValueError:
            raise ValueError(f"--classes: cannot read {part!r}; write labels like 5-9 or 0,2,4") from None
        if sep and int(hi) < int(lo):
            raise ValueError(f"--classes: empty range {part!r}")
        labels += list(span)
    bad = [c for c in labels if not 0 <= c < num_classes]
    if bad:
        raise ValueError(f"--classes: {bad} out of range; the dataset has labels 0..{num_classes - 1}")
    if len(set(labels)) != len(labels):
        raise ValueError(f"--classes: {text!r} lists a label twice")
    return tuple(labels)


def select_classes(x: torch.Tensor, y: torch.Tensor, classes: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Examples whose label is in ``classes``, relabelled to its position there (order kept)."""
    size = max([*classes, int(y.max()) if y.numel() else 0]) + 1
    new = torch.full((size,), -1, dtype=torch.int64)
    new[torch.tensor(classes, dtype=torch.int64)] = torch.arange(len(classes))
    mapped = new[y]
    keep = mapped >= 0
    return x[keep], mapped[keep]


def load_dataset(name: str, root: str | Path | None = None, split: str = "train", download: bool = True,
                 limit: int | None = None, *, classes: str | tuple[int, ...] = (), raw: bool = False,
                 num_points: int = 256, lift3d: bool = False, seed: int = 0) -> Split:
    """Load ``split`` of dataset ``name`` (see the table above).

    ``raw``: images as uint8 pixels (the INT8 engine quantises them itself); ignored for points.
    ``num_points``, ``lift3d``, ``seed``: the point clouds (a fixed function of these and the split).

    Example::

        s = load_dataset("mnist-points", split="test", limit=100, classes="5-9")  # 100 clouds of digits 5..9
        s.x.shape, s.num_classes   # [100, 256, 3], 5
    """
    if name not in DATASET_NAMES:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASET_NAMES)}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0 or None, got {limit}")
    gen = torch.Generator().manual_seed(point_seed(seed, split))
    if name == MODELNET:
        x, y, names = load_modelnet(root, split, download)
    else:
        spec = get_spec(POINT_DATASETS.get(name, name))
        x, y = load_split(spec.name, root, split, download, normalise=False)  # uint8 [N, 1, 28, 28]
        names = spec.classes
    if isinstance(classes, str):
        classes = parse_classes(classes, len(names))
    if classes:
        x, y = select_classes(x, y, classes)
        names = tuple(names[c] for c in classes)
    if limit is not None:
        x, y = x[:limit].clone(), y[:limit].clone()  # clones: a slice would pin the whole split
    if name == MODELNET:
        x = sample_points(x, num_points, gen)
    elif name in POINT_DATASETS:
        x = image_point_clouds(x, num_points, gen, lift3d)
    elif not raw:
        x = normalise_images(x, get_spec(name))
    return Split(x.contiguous(), y, names)
