"""ModelNet40 in the standard PointNet HDF5 release (``modelnet40_ply_hdf5_2048``), checked.

Layout of the release, in ``<root>/modelnet40_ply_hdf5_2048/``:

    ply_data_train0.h5 .. ply_data_train4.h5   9840 training clouds
    ply_data_test0.h5, ply_data_test1.h5       2468 test clouds
    shape_names.txt                            the 40 class names, one per line, label order

Each ``.h5`` holds ``data``: float32 [n, 2048, 3] (each cloud centred and scaled into the unit
sphere; y is up) and ``label``: integer [n, 1]. Every defect (missing file, unreadable file,
missing dataset key, wrong shape, labels out of range, non-finite coordinates) raises a
``ModelNetError`` that names the file and the defect.

Missing files are downloaded when asked: the release zip from the first mirror that serves it;
only the expected members are extracted, and each ``.h5`` must match its published MD5 before it
is moved into place. Offline, ``DatasetNotFoundError`` says what to put where.

``sample_points`` (a random subset per cloud, 1024 of 2048 by default) and ``augment`` (rotation
about the up axis, jitter, scaling) draw from the generator passed in.
"""
from __future__ import annotations

import hashlib
import http.client
import math
import os
import re
import shutil
import tempfile
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import torch

from elasticzo.data.vision import DOWNLOAD_TIMEOUT_S, DatasetNotFoundError, ENV_VAR, resolve_data_root

FOLDER = "modelnet40_ply_hdf5_2048"
SHAPE_NAMES = "shape_names.txt"
NUM_POINTS = 1024  # PointNet's standard sample of the 2048 stored points
MIRRORS = (  # the release zip; integrity comes from the per-file MD5s below, not from the host
    "https://shapenet.cs.stanford.edu/media/modelnet40_ply_hdf5_2048.zip",
    "https://huggingface.co/datasets/Msun/modelnet40/resolve/main/modelnet40_ply_hdf5_2048.zip",
)
MD5 = {  # of the extracted files, as published with torchvision-style ModelNet40 loaders
    "ply_data_train0.h5": "3176385ffc31a7b6b5af22191fd920d1",
    "ply_data_train1.h5": "e3f613fb500559403b34925112754dc4",
    "ply_data_train2.h5": "0c56e233a090ff87c3049d4ce08e7d8b",
    "ply_data_train3.h5": "9d2af465adfa33a3285c369f3ca66c45",
    "ply_data_train4.h5": "dff38de489b2c41bfaeded86c2208984",
    "ply_data_test0.h5": "e9732e6d83b09e79e9a7617df058adee",
    "ply_data_test1.h5": "aba4b12a67c34391cc3c015a6f08ed4b",
}
CLASSES = (
    "airplane", "bathtub", "bed", "bench", "bookshelf", "bottle", "bowl", "car", "chair", "cone",
    "cup", "curtain", "desk", "door", "dresser", "flower_pot", "glass_box", "guitar", "keyboard", "lamp",
    "laptop", "mantel", "monitor", "night_stand", "person", "piano", "plant", "radio", "range_hood", "sink",
    "sofa", "stairs", "stool", "table", "tent", "toilet", "tv_stand", "vase", "wardrobe", "xbox",
)
_FILE = re.compile(r"^ply_data_(train|test)(\d+)\.h5$")


class ModelNetError(ValueError):
    """A ModelNet40 HDF5 file is unreadable or not in the release's layout; the message names the file."""


def split_files(folder: Path, split: str) -> list[Path]:
    """``ply_data_<split><i>.h5`` in ``folder``, by i (a folder may hold a subset, e.g. in tests)."""
    if split not in ("train", "test"):
        raise ValueError(f"unknown split {split!r}; choose train or test")
    found = [(int(m.group(2)), p) for p in folder.glob("ply_data_*.h5")
             if (m := _FILE.match(p.name)) and m.group(1) == split]
    return [p for _, p in sorted(found)]


def read_shape_names(folder: Path) -> tuple[str, ...]:
    """Class names from ``shape_names.txt`` (label order); the release's 40 names if the file is absent."""
    path = folder / SHAPE_NAMES
    if not path.is_file():
        return CLASSES
    names = tuple(line.strip() for line in path.read_text().splitlines() if line.strip())
    if not names:
        raise ModelNetError(f"{path}: no class names in the file")
    return names


def read_h5(path: Path, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One release file -> (float32 clouds [n, P, 3], int64 labels [n]), checked."""
    import h5py  # optional dependency: pip install 'elasticzo[pointcloud]'

    try:
        with h5py.File(path, "r") as f:
            data, label = _dataset(f, path, "data"), _dataset(f, path, "label")
            data, label = np.asarray(data), np.asarray(label)
    except OSError as err:  # not HDF5, truncated, permission denied
        raise ModelNetError(f"{path}: not a readable HDF5 file ({err}); delete it and fetch it again") from None
    return _check(path, data, label, num_classes)


def _dataset(f, path: Path, key: str):
    if key not in f:
        raise ModelNetError(f"{path}: no dataset {key!r} (found {sorted(f.keys())}); the PointNet release has "
                            "'data' [n, 2048, 3] and 'label' [n, 1]")
    return f[key]


def _check(path: Path, data: np.ndarray, label: np.ndarray, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    if data.ndim != 3 or data.shape[2] != 3:
        raise ModelNetError(f"{path}: 'data' has shape {data.shape}, expected [n, points, 3]")
    if not np.issubdtype(data.dtype, np.floating):
        raise ModelNetError(f"{path}: 'data' has dtype {data.dtype}, expected float32 coordinates")
    if label.ndim == 2 and label.shape[1] == 1:
        label = label[:, 0]
    if label.ndim != 1 or label.shape[0] != data.shape[0]:
        raise ModelNetError(f"{path}: 'label' has shape {label.shape}, expected [{data.shape[0]}, 1] "
                            f"(one label per cloud of 'data' {data.shape})")
    if not np.issubdtype(label.dtype, np.integer):
        raise ModelNetError(f"{path}: 'label' has dtype {label.dtype}, expected integers")
    bad = np.flatnonzero((label < 0) | (label >= num_classes))
    if bad.size:
        raise ModelNetError(f"{path}: label {int(label[bad[0]])} at index {int(bad[0])} is out of range "
                            f"0..{num_classes - 1} ({bad.size} bad labels in all)")
    if not np.isfinite(data).all():
        raise ModelNetError(f"{path}: 'data' holds non-finite coordinates (nan or inf)")
    return torch.from_numpy(data.astype(np.float32)), torch.from_numpy(label.astype(np.int64))


def load_modelnet(root: str | Path | None = None, split: str = "train",
                  download: bool = True) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...]]:
    """All clouds of a split: (float32 [N, P, 3], int64 labels [N], class names).

    Example::

        x, y, names = load_modelnet(split="test")  # [2468, 2048, 3], [2468], 40 names
    """
    folder = resolve_data_root(root) / FOLDER
    files = split_files(folder, split)
    if not files:
        files = _fetch(folder, split, download)
    names = read_shape_names(folder)
    parts = [read_h5(p, len(names)) for p in files]
    points = {tuple(x.shape[1:]) for x, _ in parts}
    if len(points) > 1:
        raise ModelNetError(f"{folder}: the {split} files disagree on the cloud shape: {sorted(points)}")
    return torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts]), names


def sample_points(clouds: torch.Tensor, num_points: int, generator: torch.Generator) -> torch.Tensor:
    """A random subset of ``num_points`` distinct points per cloud: [N, P, 3] -> [N, num_points, 3]."""
    n, p, _ = clouds.shape
    if not 1 <= num_points <= p:
        raise ValueError(f"num_points={num_points}: the clouds have {p} points, so choose 1..{p}")
    keys = torch.rand(n, p, generator=generator)
    idx = keys.topk(num_points, dim=1).indices  # a uniform random subset per cloud
    return clouds.gather(1, idx.unsqueeze(-1).expand(-1, -1, 3))


def augment(clouds: torch.Tensor, generator: torch.Generator, *, rotate: bool = True, jitter: float = 0.01,
            jitter_clip: float = 0.05, scale: tuple[float, float] = (0.8, 1.25)) -> torch.Tensor:
    """PointNet's training augmentation of [N, P, 3] clouds (returns a new tensor).

    Per cloud: a rotation about the up axis (y) by a uniform angle, then a uniform scale in
    ``scale``; per point: Gaussian jitter of std ``jitter`` clipped to +-``jitter_clip``.
    ``jitter=0``, ``scale=(1, 1)`` or ``rotate=False`` turn the parts off.
    """
    n = clouds.shape[0]
    out = clouds
    if rotate:
        angle = torch.rand(n, generator=generator, dtype=torch.float64) * (2 * math.pi)
        c, s = angle.cos().float(), angle.sin().float()
        x, y, z = out.unbind(dim=-1)
        out = torch.stack([c[:, None] * x + s[:, None] * z, y, -s[:, None] * x + c[:, None] * z], dim=-1)
    lo, hi = scale
    if (lo, hi) != (1.0, 1.0):
        if not 0 < lo <= hi:
            raise ValueError(f"scale={scale!r} must be a range 0 < lo <= hi")
        out = out * (lo + (hi - lo) * torch.rand(n, 1, 1, generator=generator))
    if jitter > 0:
        noise = torch.randn(out.shape, generator=generator) * jitter
        out = out + noise.clamp(-jitter_clip, jitter_clip)
    return out if out is not clouds else clouds.clone()


# ---------------------------------------------------------------- download


def _fetch(folder: Path, split: str, download: bool) -> list[Path]:
    """Download and verify the release, then the files of ``split``; DatasetNotFoundError if that fails."""
    wanted = [n for n in MD5 if _FILE.match(n).group(1) == split]
    if not download:
        raise DatasetNotFoundError(_missing_message(folder, wanted, "download=False"))
    reasons = []
    for url in MIRRORS:
        try:
            _fetch_release(url, folder)
            return split_files(folder, split)
        except (OSError, http.client.HTTPException, ValueError, zipfile.BadZipFile) as err:
            reasons.append(f"  {url}: {err}")
    raise DatasetNotFoundError(_missing_message(folder, wanted, "download failed") + "\nDownload attempts:\n"
                               + "\n".join(reasons))


def _fetch_release(url: str, folder: Path) -> None:
    """Stream the zip to a temp file, extract the expected members, check each MD5, move them in."""
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".download-") as tmp:
        archive = Path(tmp) / "release.zip"
        with open(archive, "wb") as out, urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as resp:
            shutil.copyfileobj(resp, out, 1 << 20)
        staged = _extract(archive, Path(tmp))
        for name, path in staged.items():
            os.replace(path, folder / name)  # atomic: never a half-written file in the folder


def _extract(archive: Path, into: Path) -> dict[str, Path]:
    with zipfile.ZipFile(archive) as z:
        members = {Path(m).name: m for m in z.namelist() if Path(m).name in MD5 or Path(m).name == SHAPE_NAMES}
        missing = sorted(set(MD5) - set(members))
        if missing:
            raise ValueError(f"the archive lacks {missing}")
        staged = {}
        for name, member in members.items():
            path = into / name
            with z.open(member) as src, open(path, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            if name in MD5 and (got := _md5(path)) != MD5[name]:
                raise ValueError(f"{name}: MD5 mismatch: got {got}, expected {MD5[name]}; nothing was kept")
            staged[name] = path
        return staged


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _missing_message(folder: Path, wanted: list[str], reason: str) -> str:
    files = "\n".join(f"  {n}" for n in wanted)
    mirrors = "\n".join(f"  {m}" for m in MIRRORS)
    return (f"modelnet40: no ply_data files in {folder}/ ({reason}); expected:\n{files}\n  {SHAPE_NAMES}\n"
            f"Unpack modelnet40_ply_hdf5_2048.zip (the PointNet HDF5 release) so that these files are in "
            f"{folder}/; it is served at:\n{mirrors}\nTo use another folder holding a {FOLDER}/ subfolder, "
            f"pass --data-root DIR or set the environment variable {ENV_VAR}=DIR.")
