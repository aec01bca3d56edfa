"""MNIST and Fashion-MNIST: where the files live, how to fetch them, how to load a split.

The files are the original IDX gzip files, kept in ``<root>/<name>/`` under their official
names (``x.gz`` or the uncompressed ``x``). Nothing is cached in memory between calls: a
loaded split is a plain tensor pair that the caller owns.
"""
from __future__ import annotations

import hashlib
import http.client
import os
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import torch

from elasticzo.data.idx import IDXError, read_idx

ENV_VAR = "ELASTICZO_DATA"
CLI_FLAG = "--data-root"
DEFAULT_ROOT = Path("data")
DOWNLOAD_TIMEOUT_S = 10  # short, so an offline machine fails in seconds rather than minutes
SPLITS = ("train", "test")


class DatasetNotFoundError(FileNotFoundError):
    """Dataset files are missing and could not be fetched; the message says what to put where."""


class DataAccessError(DatasetNotFoundError):
    """A data file or folder exists but cannot be read (permissions); the message names it."""


@dataclass(frozen=True)
class DatasetSpec:
    """Everything needed to find, fetch, check and normalise one IDX image dataset."""

    name: str
    mirrors: tuple[str, ...]  # base URLs ending in "/", tried in order
    md5: dict[str, str]  # official .gz file name -> MD5 of that file
    mean: float  # of x/255 over the train images; used to normalise
    std: float
    classes: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def files(self, split: str) -> tuple[str, str]:
        """(images, labels) official .gz file names of ``split``."""
        prefix = {"train": "train", "test": "t10k"}[split]
        return f"{prefix}-images-idx3-ubyte.gz", f"{prefix}-labels-idx1-ubyte.gz"


_MNIST_MD5 = {  # torchvision's checksums; equal to the shared datasets README
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
_FASHION_MD5 = {  # Zalando's published checksums
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}

DATASETS: dict[str, DatasetSpec] = {
    "mnist": DatasetSpec(
        name="mnist",
        mirrors=("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"),
        md5=_MNIST_MD5,
        mean=0.1307,
        std=0.3081,
        classes=tuple(str(d) for d in range(10)),
    ),
    "fashion-mnist": DatasetSpec(
        name="fashion-mnist",
        mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        md5=_FASHION_MD5,
        mean=0.2860,
        std=0.3530,
        classes=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                 "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
    ),
}


def resolve_data_root(explicit: str | Path | None = None) -> Path:
    """The folder that holds one subfolder per dataset (``<root>/mnist/``, ...).

    Lookup order, first hit wins:

    1. ``explicit``: the CLI flag ``--data-root`` (or the ``root`` argument of ``load_split``);
    2. the environment variable ``ELASTICZO_DATA``, when set and non-empty;
    3. ``./data``, relative to the current working directory.

    The path is returned as given (not resolved), and it need not exist yet: downloads create it.
    """
    if explicit is not None and str(explicit) != "":
        return Path(explicit).expanduser()
    env = os.environ.get(ENV_VAR, "")
    if env:
        return Path(env).expanduser()
    return DEFAULT_ROOT


def get_spec(name: str) -> DatasetSpec:
    """The spec of dataset ``name``, with a ValueError that lists the choices."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}")
    return DATASETS[name]


def load_split(
    name: str,
    root: str | Path | None = None,
    split: str = "train",
    download: bool = True,
    limit: int | None = None,
    normalise: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load one split as (images, labels), checked.

    Returns float32 images [N, 1, 28, 28] normalised as (x/255 - mean) / std, or, with
    ``normalise=False``, the raw uint8 images [N, 1, 28, 28] (the INT8 engine quantises them
    itself); labels are int64 [N]. ``limit`` keeps the first ``limit`` examples (fast tests).
    ``root`` goes through ``resolve_data_root``. Missing files are fetched when ``download``.

    Example::

        x, y = load_split("mnist", split="test", limit=256)  # [256, 1, 28, 28], [256]
    """
    spec = get_spec(name)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0 or None, got {limit}")
    folder = resolve_data_root(root) / spec.name
    image_path, label_path = ensure_files(spec, folder, spec.files(split), download)
    images, labels = read_idx(image_path), read_idx(label_path)
    _check_pair(spec, image_path, images, label_path, labels)
    if limit is not None:  # clone so the slice does not pin the full 47 MB buffer
        images, labels = images[:limit].clone(), labels[:limit]
    images = images.unsqueeze(1)  # [N, 1, 28, 28]
    if normalise:
        images = normalise_images(images, spec)
    return images, labels.long()


def normalise_images(images: torch.Tensor, spec: DatasetSpec) -> torch.Tensor:
    """uint8 pixels -> float32 (x/255 - mean) / std, the inputs the float models train on."""
    return (images.float() / 255.0 - spec.mean) / spec.std


def _check_pair(spec: DatasetSpec, image_path: Path, images: torch.Tensor,
                label_path: Path, labels: torch.Tensor) -> None:
    """Shapes, matching counts and label range: the defects read_idx cannot see alone."""
    if images.dim() != 3 or tuple(images.shape[1:]) != (28, 28):
        raise IDXError(f"{image_path}: expected images of 28x28, header gives shape {tuple(images.shape)}")
    if labels.dim() != 1:
        raise IDXError(f"{label_path}: expected a 1-dimensional labels file, header gives shape "
                       f"{tuple(labels.shape)}")
    if images.shape[0] != labels.shape[0]:
        raise IDXError(
            f"count mismatch: {image_path} has {images.shape[0]} images "
            f"but {label_path} has {labels.shape[0]} labels"
        )
    bad = (labels >= spec.num_classes).nonzero()
    if bad.numel():
        i = int(bad[0])
        raise IDXError(
            f"{label_path}: label {int(labels[i])} at index {i} is out of range 0..{spec.num_classes - 1} "
            f"for {spec.name} ({bad.numel()} bad labels in all)"
        )


def ensure_files(spec: DatasetSpec, folder: Path, names: tuple[str, ...], download: bool) -> list[Path]:
    """Paths of ``names`` in ``folder`` (``x.gz`` or uncompressed ``x``), fetching missing ones.

    Stops at the first file no mirror could serve: offline, the next file would fail the same
    way, and waiting out every timeout only delays the message that says what to do. The
    message lists every missing file of the dataset, both splits, so one fix is enough.
    """
    missing = [n for n in names if _find(folder, n) is None]
    if missing and not download:
        raise DatasetNotFoundError(_missing_message(spec, folder, _all_missing(spec, folder), "download=False"))
    for name in missing:
        failures = _download(spec, folder, name)
        if failures:
            raise DatasetNotFoundError(_missing_message(spec, folder, _all_missing(spec, folder),
                                                        "download failed", failures))
    return [_find(folder, n) for n in names]


def _all_missing(spec: DatasetSpec, folder: Path) -> list[str]:
    """Every file of the dataset (train and test) that is in neither form in ``folder``."""
    return [n for split in SPLITS for n in spec.files(split) if _find(folder, n) is None]


def _find(folder: Path, gz_name: str) -> Path | None:
    """``folder/x.gz`` or else ``folder/x``, whichever exists first; None if neither.

    A folder that cannot be searched, or a file that cannot be read, is a DataAccessError.
    """
    for path in (folder / gz_name, folder / gz_name.removesuffix(".gz")):
        try:
            found = path.is_file()
        except OSError as err:  # PermissionError on a folder without search permission
            raise DataAccessError(f"{path.parent}: cannot look inside ({err.strerror}); "
                                  "check the folder's permissions") from None
        if found:
            if not os.access(path, os.R_OK, effective_ids=os.access in os.supports_effective_ids):
                raise DataAccessError(f"{path}: cannot read the file (permission denied); check its permissions")
            return path
    return None


def _missing_message(spec: DatasetSpec, folder: Path, missing: list[str], reason: str,
                     failures: str = "") -> str:
    """What to put where, where to get it, how to point elasticzo elsewhere, and what went wrong."""
    files = "\n".join(f"  {n}" for n in missing)
    mirrors = "\n".join(f"  {m}" for m in spec.mirrors)
    message = (
        f"{spec.name}: missing files in {folder}/ ({reason}):\n{files}\n"
        f"Put these files (the .gz or the uncompressed form) into {folder}/; get them from:\n{mirrors}\n"
        f"To use another folder holding a {spec.name}/ subfolder, pass {CLI_FLAG} DIR "
        f"or set the environment variable {ENV_VAR}=DIR."
    )
    return message + (f"\nDownload attempts:\n{failures}" if failures else "")


def _download(spec: DatasetSpec, folder: Path, name: str) -> str:
    """Fetch ``name`` from the first mirror that serves it intact; '' on success, else the reasons."""
    reasons = []
    for mirror in spec.mirrors:
        url = mirror + name
        try:
            _fetch_verified(url, folder / name, spec.md5[name])
            return ""
        except (OSError, http.client.HTTPException, ValueError) as err:  # URLError, timeout, refused, bad MD5
            reasons.append(f"  {url}: {err}")
    return "\n".join(reasons)


def _fetch_verified(url: str, dest: Path, md5: str) -> None:
    """Stream ``url`` into a temp file next to ``dest``, check its MD5, then rename it into place.

    The rename is atomic, so a crash or a concurrent run never leaves a half-written ``dest``;
    a file with the wrong checksum is deleted, never kept.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        digest = hashlib.md5(usedforsecurity=False)  # an integrity check, so FIPS builds allow it
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as resp:
            while chunk := resp.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != md5:
            raise ValueError(f"MD5 mismatch: got {digest.hexdigest()}, expected {md5}; "
                             f"the download was deleted")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
