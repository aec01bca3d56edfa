"""Datasets (MNIST, Fashion-MNIST) read from their original IDX files, and in-memory batching."""
from elasticzo.data.idx import IDXError, read_idx
from elasticzo.data.loader import BatchLoader, epoch_seed
from elasticzo.data.vision import (
    DATASETS,
    ENV_VAR,
    DatasetNotFoundError,
    DatasetSpec,
    get_spec,
    load_split,
    normalise_images,
    resolve_data_root,
)

__all__ = [
    "BatchLoader",
    "DATASETS",
    "DatasetNotFoundError",
    "DatasetSpec",
    "ENV_VAR",
    "IDXError",
    "epoch_seed",
    "get_spec",
    "load_split",
    "normalise_images",
    "read_idx",
    "resolve_data_root",
]
