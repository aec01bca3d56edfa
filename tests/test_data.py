"""The data package: IDX reading and its error messages, dataset loading and fetching, batching."""
from __future__ import annotations

import contextlib
import dataclasses
import gzip
import hashlib
import os
import shutil
import struct
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from elasticzo.data import (
    DATASETS,
    BatchLoader,
    DataAccessError,
    DatasetNotFoundError,
    IDXError,
    load_split,
    read_idx,
    resolve_data_root,
)

MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]  # shared README
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
UNREACHABLE = ("http://127.0.0.1:9/",)  # the discard port: refused at once, no network needed


def idx_bytes(array: np.ndarray) -> bytes:
    """An unsigned-byte IDX file holding ``array``: 00 00 08 ndim, big-endian sizes, data."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def write_idx(path: Path, array: np.ndarray, gz: bool = False) -> Path:
    data = idx_bytes(array)
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def write_split(folder: Path, images: np.ndarray, labels: np.ndarray, split: str = "t10k"):
    """A fake dataset split in ``folder`` under the official (uncompressed) names."""
    folder.mkdir(parents=True, exist_ok=True)
    return (write_idx(folder / f"{split}-images-idx3-ubyte", images),
            write_idx(folder / f"{split}-labels-idx1-ubyte", labels))


def raises_idx(path: Path, *words: str) -> IDXError:
    """read_idx(path) raises an IDXError naming the file and containing ``words``."""
    with pytest.raises(IDXError) as info:
        read_idx(path)
    for word in (path.name, *words):
        assert word in str(info.value), str(info.value)
    return info.value


# --- real files --------------------------------------------------------------------------------

def test_mnist_train_shapes_counts_and_histogram(data_root):
    x, y = load_split("mnist", data_root, "train", download=False, normalise=False)
    assert x.shape == (60000, 1, 28, 28) and x.dtype == torch.uint8
    assert y.shape == (60000,) and y.dtype == torch.int64
    assert torch.bincount(y, minlength=10).tolist() == MNIST_TRAIN_COUNTS


def test_mnist_test_histogram_and_normalisation(data_root):
    raw, y = load_split("mnist", data_root, "test", download=False, normalise=False)
    x, y2 = load_split("mnist", data_root, "test", download=False)
    assert torch.bincount(y, minlength=10).tolist() == MNIST_TEST_COUNTS
    assert torch.equal(y, y2)
    assert x.shape == (10000, 1, 28, 28) and x.dtype == torch.float32
    spec = DATASETS["mnist"]
    assert torch.allclose(x, (raw.float() / 255 - spec.mean) / spec.std)
    assert abs(x.mean().item()) < 0.02 and abs(x.std().item() - 1) < 0.02  # test set ~ train stats


@pytest.mark.parametrize("split, n", [("train", 60000), ("test", 10000)])
def test_fashion_mnist_is_balanced(data_root, split, n):
    x, y = load_split("fashion-mnist", data_root, split, download=False, normalise=False)
    assert x.shape == (n, 1, 28, 28)
    assert torch.bincount(y, minlength=10).tolist() == [n // 10] * 10


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_spec_checksums_match_the_real_files(data_root, name):
    """A typo in a hard-coded MD5 would make every download fail; check them against the files."""
    for file_name, md5 in DATASETS[name].md5.items():
        assert hashlib.md5((data_root / name / file_name).read_bytes()).hexdigest() == md5, file_name


def test_limit_keeps_the_first_examples(data_root):
    x, y = load_split("mnist", data_root, "test", download=False, normalise=False)
    xs, ys = load_split("mnist", data_root, "test", download=False, normalise=False, limit=100)
    assert xs.shape == (100, 1, 28, 28) and torch.equal(xs, x[:100]) and torch.equal(ys, y[:100])


def test_uncompressed_files_are_accepted(data_root, tmp_path):
    (tmp_path / "mnist").mkdir()
    for name in DATASETS["mnist"].files("test"):
        raw = gzip.decompress((data_root / "mnist" / name).read_bytes())
        (tmp_path / "mnist" / name.removesuffix(".gz")).write_bytes(raw)
    x, y = load_split("mnist", tmp_path, "test", download=False, normalise=False)
    x_gz, y_gz = load_split("mnist", data_root, "test", download=False, normalise=False)
    assert torch.equal(x, x_gz) and torch.equal(y, y_gz)


# --- damaged files: each names the file and the defect -------------------------------------------

def test_truncated_file(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte.gz"
    header = bytes([0, 0, 8, 3]) + struct.pack(">3I", 60000, 28, 28)
    path.write_bytes(gzip.compress(header + bytes(1000)))
    raises_idx(path, "truncated", "60000 images of 28x28 (47040000 bytes)", "only 1000 bytes follow")


def test_trailing_bytes(tmp_path):
    path = tmp_path / "labels"
    path.write_bytes(idx_bytes(np.zeros(5, np.uint8)) + b"\x00\x00")
    raises_idx(path, "trailing bytes", "5 labels", "2 extra")


def test_wrong_magic(tmp_path):
    path = tmp_path / "images"
    path.write_bytes(b"\x12\x34\x08\x01" + struct.pack(">I", 1) + b"\x00")
    raises_idx(path, "magic")


def test_unsupported_type_code(tmp_path):
    path = tmp_path / "floats"
    path.write_bytes(b"\x00\x00\x0d\x01" + struct.pack(">I", 1) + bytes(4))
    raises_idx(path, "unsupported", "0x0d")


@pytest.mark.parametrize("damage", ["garbled", "cut"])
def test_corrupt_gzip(tmp_path, damage):
    path = tmp_path / "x-idx1-ubyte.gz"
    blob = bytearray(gzip.compress(idx_bytes(np.arange(200, dtype=np.uint8))))
    if damage == "garbled":
        blob[12:40] = bytes(b ^ 0xFF for b in blob[12:40])  # deflate data, past the 10-byte header
    else:
        del blob[len(blob) // 2:]
    path.write_bytes(bytes(blob))
    raises_idx(path, "corrupt gzip")


def test_empty_file(tmp_path):
    path = tmp_path / "empty-idx3-ubyte"
    path.write_bytes(b"")
    raises_idx(path, "empty")


def test_truncated_header(tmp_path):
    path = tmp_path / "short"
    path.write_bytes(bytes([0, 0, 8, 3]) + struct.pack(">I", 7))
    raises_idx(path, "truncated header")


def test_label_out_of_range(tmp_path):
    labels_12 = np.array([1, 2, 12, 3], np.uint8)
    _, labels = write_split(tmp_path / "mnist", np.zeros((4, 28, 28), np.uint8), labels_12)
    with pytest.raises(IDXError) as info:
        load_split("mnist", tmp_path, "test", download=False)
    message = str(info.value)
    assert labels.name in message and "label 12" in message and "out of range" in message


def test_image_label_count_mismatch(tmp_path):
    images, labels = write_split(tmp_path / "mnist", np.zeros((5, 28, 28), np.uint8), np.zeros(4, np.uint8))
    with pytest.raises(IDXError) as info:
        load_split("mnist", tmp_path, "test", download=False)
    message = str(info.value)
    assert images.name in message and labels.name in message and "mismatch" in message
    assert "5 images" in message and "4 labels" in message


# --- missing files and downloads -------------------------------------------------------------------

def use_mirrors(monkeypatch, name: str, mirrors: tuple[str, ...]) -> None:
    """Point dataset ``name`` at ``mirrors`` for one test (file:// URLs work offline)."""
    monkeypatch.setitem(DATASETS, name, dataclasses.replace(DATASETS[name], mirrors=mirrors))


def test_missing_files_without_download(tmp_path):
    with pytest.raises(DatasetNotFoundError) as info:
        load_split("mnist", tmp_path, "train", download=False)
    assert isinstance(info.value, FileNotFoundError)
    message = str(info.value)
    for part in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", str(tmp_path / "mnist"),
                 "ossci-datasets.s3.amazonaws.com", "ELASTICZO_DATA", "--data-root"):
        assert part in message, message
    assert "t10k-images-idx3-ubyte.gz" in message and "t10k-labels-idx1-ubyte.gz" in message  # all at once


def test_missing_message_lists_both_splits_when_one_is_present(tmp_path):
    """With the train files present, asking for train works and asking for test names both test files."""
    rng = np.random.default_rng(0)
    write_split(tmp_path / "mnist", rng.integers(0, 256, (4, 28, 28)), rng.integers(0, 10, 4), split="train")
    assert load_split("mnist", tmp_path, "train", download=False)[0].shape == (4, 1, 28, 28)
    with pytest.raises(DatasetNotFoundError) as info:
        load_split("mnist", tmp_path, "test", download=False)
    message = str(info.value)
    assert "t10k-images-idx3-ubyte.gz" in message and "t10k-labels-idx1-ubyte.gz" in message
    assert "train-images" not in message  # present files are not asked for


@contextlib.contextmanager
def _unprivileged():
    """Run the body as a user that file permissions apply to: root switches its effective ids to
    nobody (65534) and back, since root itself reads any file whatever its mode."""
    if os.geteuid() != 0:
        yield
        return
    os.setegid(65534)
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


@pytest.mark.parametrize("target", ["file", "folder"])
def test_unreadable_data_is_a_clear_error_not_a_traceback(target):
    rng = np.random.default_rng(0)
    root = Path(tempfile.mkdtemp(prefix="elasticzo-perm-"))
    try:
        root.chmod(0o755)
        images, _ = write_split(root / "mnist", rng.integers(0, 256, (4, 28, 28)), rng.integers(0, 10, 4))
        locked = images if target == "file" else root / "mnist"
        locked.chmod(0o000)
        with _unprivileged(), pytest.raises(DataAccessError) as info:
            load_split("mnist", root, "test", download=False)
        assert str(locked) in str(info.value) and "permission" in str(info.value).lower(), str(info.value)
        assert isinstance(info.value, FileNotFoundError)  # the CLI's one-line user error
    finally:
        (root / "mnist").chmod(0o755)
        shutil.rmtree(root)


def test_unreachable_mirrors_fail_fast(tmp_path, monkeypatch):
    use_mirrors(monkeypatch, "fashion-mnist", UNREACHABLE)
    start = time.perf_counter()
    with pytest.raises(DatasetNotFoundError) as info:
        load_split("fashion-mnist", tmp_path, "test", download=True)
    assert time.perf_counter() - start < 5
    message = str(info.value)
    assert "t10k-images-idx3-ubyte.gz" in message and "t10k-labels-idx1-ubyte.gz" in message
    assert "127.0.0.1:9" in message and "download failed" in message
    assert list((tmp_path / "fashion-mnist").iterdir()) == []  # no partial files left behind


def test_download_checks_md5_and_deletes_bad_files(tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    for name in DATASETS["mnist"].files("test"):
        (mirror / name).write_bytes(b"<html>not the file</html>")
    use_mirrors(monkeypatch, "mnist", (mirror.as_uri() + "/",))
    with pytest.raises(DatasetNotFoundError, match="MD5 mismatch"):
        load_split("mnist", tmp_path / "root", "test", download=True)
    assert list((tmp_path / "root" / "mnist").iterdir()) == []


def test_download_from_a_mirror(data_root, tmp_path, monkeypatch):
    mirror = (data_root / "mnist").resolve().as_uri() + "/"  # the real files, served over file://
    use_mirrors(monkeypatch, "mnist", UNREACHABLE + (mirror,))
    x, y = load_split("mnist", tmp_path, "test", download=True, limit=10)
    assert x.shape == (10, 1, 28, 28)
    assert sorted(p.name for p in (tmp_path / "mnist").iterdir()) == sorted(DATASETS["mnist"].files("test"))


def test_only_missing_files_are_fetched(data_root, tmp_path, monkeypatch):
    shutil.copytree(data_root / "mnist", tmp_path / "mnist")
    use_mirrors(monkeypatch, "mnist", UNREACHABLE)
    assert load_split("mnist", tmp_path, "test", download=True, limit=3)[1].shape == (3,)


# --- data root lookup -----------------------------------------------------------------------------

def test_resolve_data_root_order(monkeypatch, tmp_path):
    monkeypatch.delenv("ELASTICZO_DATA", raising=False)
    assert resolve_data_root(None) == Path("data")
    monkeypatch.setenv("ELASTICZO_DATA", "")
    assert resolve_data_root(None) == Path("data")  # empty means unset
    monkeypatch.setenv("ELASTICZO_DATA", str(tmp_path / "env"))
    assert resolve_data_root(None) == tmp_path / "env"
    assert resolve_data_root(tmp_path / "flag") == tmp_path / "flag"
    assert resolve_data_root(str(tmp_path / "flag")) == tmp_path / "flag"


# --- batching -----------------------------------------------------------------------------------

def index_loader(n: int = 103, batch_size: int = 10, **kw) -> BatchLoader:
    """A loader whose x holds each example's index, so batches show the order directly."""
    return BatchLoader(torch.arange(n), torch.arange(n) * 2, batch_size, **kw)


def order(loader: BatchLoader, epoch: int, start_step: int = 0) -> list[list[int]]:
    return [xb.tolist() for xb, _ in loader.epoch_batches(epoch, start_step)]


def test_same_seed_same_batches_and_global_rng_untouched():
    torch.manual_seed(1)
    state = torch.get_rng_state()
    first = order(index_loader(seed=7), epoch=2)
    torch.manual_seed(12345)  # a different global state must not matter
    assert order(index_loader(seed=7), epoch=2) == first
    torch.manual_seed(1)
    order(index_loader(seed=7), epoch=3)
    assert torch.equal(torch.get_rng_state(), state)


def test_epochs_and_seeds_change_the_order():
    loader = index_loader(seed=0)
    assert order(loader, 0) != order(loader, 1)
    assert order(loader, 0) != order(index_loader(seed=1), 0)


def test_resume_mid_epoch_equals_uninterrupted_run():
    loader = index_loader(seed=3)
    full = order(loader, epoch=5)
    for start in (0, 1, 7, len(loader) - 1, len(loader)):
        assert order(index_loader(seed=3), 5, start_step=start) == full[start:]


@pytest.mark.parametrize("drop_last", [False, True])
def test_every_example_once_per_epoch(drop_last):
    loader = index_loader(n=103, batch_size=10, drop_last=drop_last)
    assert len(loader) == (10 if drop_last else 11)
    seen = [i for batch in order(loader, 4) for i in batch]
    assert len(seen) == (100 if drop_last else 103) and len(set(seen)) == len(seen)
    if not drop_last:
        assert sorted(seen) == list(range(103))
    for xb, yb in loader.epoch_batches(4):
        assert torch.equal(yb, xb * 2)  # x and y stay paired


def test_unshuffled_batches_are_in_order():
    assert order(index_loader(n=25, batch_size=10, shuffle=False), 0) == [
        list(range(10)), list(range(10, 20)), list(range(20, 25))]


@pytest.mark.parametrize("bad", [0, -3, 2.5])
def test_batch_size_is_validated(bad):
    with pytest.raises(ValueError, match=str(bad)):
        BatchLoader(torch.zeros(4), torch.zeros(4), bad)


def test_start_step_is_validated():
    with pytest.raises(ValueError, match="start_step"):
        list(index_loader().epoch_batches(0, start_step=12))


# --- IDX round trip -----------------------------------------------------------------------------

SHAPES = st.lists(st.integers(0, 6), min_size=1, max_size=4).map(tuple)  # zero sizes included


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(array=arrays(np.uint8, SHAPES), gz=st.booleans())
def test_idx_round_trip(tmp_path, array, gz):
    path = write_idx(tmp_path / "roundtrip", array, gz=gz)
    back = read_idx(path)
    assert back.dtype == torch.uint8 and tuple(back.shape) == array.shape
    assert np.array_equal(back.numpy(), array)
