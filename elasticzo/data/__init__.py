"""Datasets (MNIST, Fashion-MNIST, their point clouds, ModelNet40) and in-memory batching."""
from elasticzo.data.idx import IDXError, read_idx
from elasticzo.data.loader import BatchLoader, epoch_seed
from elasticzo.data.registry import DATASET_NAMES, Split, is_point_dataset, load_dataset, parse_classes, select_classes
from elasticzo.data.vision import (
    DATASETS,
    ENV_VAR,
    DataAccessError,
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
    "DATASET_NAMES",
    "DataAccessError",
    "DatasetNotFoundError",
    "DatasetSpec",
    "ENV_VAR",
    "IDXError",
    "Split",
    "epoch_seed",
    "get_spec",
    "is_point_dataset",
    "load_dataset",
    "load_split",
    "normalise_images",
    "parse_classes",
    "read_idx",
    "resolve_data_root",
    "select_classes",
]
