"""ModelNet40 loader on small HDF5 files written in exactly the PointNet release layout, bad files
included; point sampling, augmentation, and the checksummed download (served from a local zip)."""
from __future__ import annotations

import io
import urllib.error
import zipfile

import h5py
import numpy as np
import pytest
import torch

from elasticzo.config import TrainConfig
from elasticzo.data import DatasetNotFoundError, load_dataset
from elasticzo.data import modelnet
from elasticzo.data.modelnet import CLASSES, FOLDER, ModelNetError, augment, load_modelnet, sample_points
from elasticzo.train.loop import train

POINTS = 64  # per stored cloud (the release has 2048)


def write_h5(path, n, seed=0, points=POINTS, labels=None, **overrides):
    """One release-style file: 'data' float32 [n, points, 3] in the unit sphere, 'label' uint8 [n, 1]."""
    rng = np.random.default_rng(seed)
    data = rng.normal(size=(n, points, 3)).astype(np.float32)
    data /= np.linalg.norm(data, axis=2, keepdims=True).max()
    label = (rng.integers(0, 40, size=(n, 1)) if labels is None else np.asarray(labels).reshape(n, 1)).astype(np.uint8)
    datasets = {"data": data, "label": label, **overrides}
    with h5py.File(path, "w") as f:
        for key, value in datasets.items():
            if value is not None:
                f.create_dataset(key, data=value)
    return data, label


@pytest.fixture
def release(tmp_path):
    """<tmp>/modelnet40_ply_hdf5_2048/ with train0, train1, test0 and shape_names.txt."""
    folder = tmp_path / FOLDER
    folder.mkdir()
    parts = {name: write_h5(folder / name, n, seed)
             for name, n, seed in (("ply_data_train0.h5", 6, 0), ("ply_data_train1.h5", 4, 1), ("ply_data_test0.h5", 5, 2))}
    (folder / "shape_names.txt").write_text("\n".join(CLASSES) + "\n")
    return tmp_path, folder, parts


def test_loads_the_files_of_a_split_in_index_order(release):
    root, folder, parts = release
    write_h5(folder / "ply_data_train10.h5", 2, seed=9)
    train2, _ = write_h5(folder / "ply_data_train2.h5", 2, seed=8)  # by number 0, 1, 2, 10; as text 10 before 2
    x, y, names = load_modelnet(root, "train", download=False)
    expected = np.concatenate([parts["ply_data_train0.h5"][0], parts["ply_data_train1.h5"][0], train2])
    assert x.shape == (14, POINTS, 3) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.equal(x[:12], torch.from_numpy(expected))
    assert y[:6].tolist() == parts["ply_data_train0.h5"][1][:, 0].tolist()
    assert names == CLASSES and len(names) == 40
    xt, yt, _ = load_modelnet(root, "test", download=False)
    assert xt.shape == (5, POINTS, 3)


def test_as_a_dataset_sampled_deterministically_with_a_class_subset(release):
    root, _, _ = release
    a = load_dataset("modelnet40", root, "test", download=False, num_points=16)
    b = load_dataset("modelnet40", root, "test", download=False, num_points=16)
    assert a.x.shape == (5, 16, 3) and torch.equal(a.x, b.x) and a.num_classes == 40
    full, labels, _ = load_modelnet(root, "test", download=False)
    for cloud, sample in zip(full, a.x):  # every sampled point is a distinct stored point
        hits = (sample[:, None, :] == cloud[None]).all(-1)
        assert bool(hits.any(1).all()) and len(set(hits.float().argmax(1).tolist())) == 16
    wanted = sorted(set(labels.tolist()))[:2]
    sub = load_dataset("modelnet40", root, "test", download=False, num_points=8, classes=",".join(map(str, wanted)))
    assert sub.class_names == tuple(CLASSES[c] for c in wanted)
    assert sorted(set(sub.y.tolist())) == [0, 1] and len(sub.y) == sum(int((labels == c).sum()) for c in wanted)


BAD_FILES = {
    "no data key": (dict(data=None), "no dataset 'data'"),
    "no label key": (dict(label=None), "no dataset 'label'"),
    "two coordinates": (dict(data=np.zeros((3, POINTS, 2), np.float32)), r"shape \(3, 64, 2\)"),
    "flat data": (dict(data=np.zeros((3, POINTS * 3), np.float32)), "expected \\[n, points, 3\\]"),
    "label count": (dict(label=np.zeros((2, 1), np.uint8)), "one label per cloud"),
    "label out of range": (dict(label=np.array([[0], [40], [3]], np.uint8)), "label 40 at index 1 is out of range 0..39"),
    "negative label": (dict(label=np.array([[0], [-1], [3]], np.int64)), "label -1 at index 1"),
    "float labels": (dict(label=np.zeros((3, 1), np.float32)), "expected integers"),
    "integer points": (dict(data=np.zeros((3, POINTS, 3), np.int32)), "float32 coordinates"),
    "nan points": (dict(data=np.full((3, POINTS, 3), np.nan, np.float32)), "non-finite"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_a_bad_file_raises_an_error_that_names_it(tmp_path, case):
    overrides, message = BAD_FILES[case]
    folder = tmp_path / FOLDER
    folder.mkdir()
    write_h5(folder / "ply_data_train0.h5", 3, **overrides)
    with pytest.raises(ModelNetError, match=message) as err:
        load_modelnet(tmp_path, "train", download=False)
    assert "ply_data_train0.h5" in str(err.value)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_an_unreadable_file_raises_an_error_that_names_it(tmp_path, damage):
    folder = tmp_path / FOLDER
    folder.mkdir()
    path = folder / "ply_data_test0.h5"
    write_h5(path, 4)
    blob = path.read_bytes()
    path.write_bytes({"garbage": b"not an hdf5 file" * 10, "truncated": blob[: len(blob) // 2], "empty": b""}[damage])
    with pytest.raises(ModelNetError, match="ply_data_test0.h5: not a readable HDF5 file"):
        load_modelnet(tmp_path, "test", download=False)


def test_shape_names_set_the_label_range_and_default_to_the_40_classes(release):
    root, folder, _ = release
    (folder / "shape_names.txt").write_text("cube\nsphere\n")
    with pytest.raises(ModelNetError, match="out of range 0..1"):
        load_modelnet(root, "test", download=False)
    (folder / "shape_names.txt").unlink()
    assert load_modelnet(root, "test", download=False)[2] == CLASSES


def test_sample_points_is_a_seeded_subset_and_checks_the_count():
    clouds = torch.arange(2 * 10 * 3, dtype=torch.float32).reshape(2, 10, 3)
    a = sample_points(clouds, 4, torch.Generator().manual_seed(0))
    b = sample_points(clouds, 4, torch.Generator().manual_seed(0))
    c = sample_points(clouds, 4, torch.Generator().manual_seed(1))
    assert a.shape == (2, 4, 3) and torch.equal(a, b) and not torch.equal(a, c)
    rows = (a[..., 0] / 3).long() % 10  # which stored point each sample is
    assert all(len(set(r.tolist())) == 4 for r in rows)
    assert torch.equal(sample_points(clouds, 10, torch.Generator()).sort(dim=1).values, clouds)
    with pytest.raises(ValueError, match="have 10 points"):
        sample_points(clouds, 11, torch.Generator())


def test_augment_rotates_about_the_up_axis_scales_and_jitters_from_the_generator():
    x = torch.randn(8, 50, 3, generator=torch.Generator().manual_seed(0))
    keep = x.clone()
    rot = augment(x, torch.Generator().manual_seed(1), jitter=0, scale=(1, 1))
    assert torch.equal(rot[..., 1], x[..., 1])  # y is up: unchanged
    torch.testing.assert_close(rot[..., [0, 2]].norm(dim=-1), x[..., [0, 2]].norm(dim=-1))
    assert not torch.allclose(rot, x)
    scaled = augment(x, torch.Generator().manual_seed(1), rotate=False, jitter=0, scale=(0.8, 1.25))
    factor = scaled.norm(dim=-1) / x.norm(dim=-1)  # [8, 50]: one factor per cloud
    torch.testing.assert_close(factor, factor[:, :1].expand_as(factor))
    assert bool(((factor > 0.8 - 1e-6) & (factor < 1.25 + 1e-6)).all())
    jit = augment(x, torch.Generator().manual_seed(1), rotate=False, scale=(1, 1), jitter=0.5, jitter_clip=0.05)
    assert 0 < float((jit - x).abs().max()) <= 0.05 + 1e-6
    assert torch.equal(augment(x, torch.Generator().manual_seed(3)), augment(x, torch.Generator().manual_seed(3)))
    assert torch.equal(x, keep)  # the input is never modified
    with pytest.raises(ValueError, match="scale"):
        augment(x, torch.Generator(), scale=(1.2, 0.9))


# ---------------------------------------------------------------- download


def test_offline_the_error_says_what_to_put_where(tmp_path, monkeypatch):
    with pytest.raises(DatasetNotFoundError, match="download=False") as err:
        load_modelnet(tmp_path, "test", download=False)
    assert "ply_data_test0.h5" in str(err.value) and "ply_data_test1.h5" in str(err.value)
    assert str(tmp_path / FOLDER) in str(err.value) and "--data-root" in str(err.value)

    def offline(url, timeout):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(modelnet.urllib.request, "urlopen", offline)
    with pytest.raises(DatasetNotFoundError, match="download failed") as err:
        load_modelnet(tmp_path, "test")
    assert all(url in str(err.value) for url in modelnet.MIRRORS) and "no network" in str(err.value)


def serve_release(tmp_path, monkeypatch, corrupt=None):
    """A local 'release zip' of small files, with MD5 pinned to them; ``corrupt`` is changed after hashing."""
    src = tmp_path / "src"
    src.mkdir()
    md5 = {}
    for name in modelnet.MD5:
        write_h5(src / name, 3, seed=len(md5))
        md5[name] = modelnet._md5(src / name)
    if corrupt:
        write_h5(src / corrupt, 3, seed=99)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name in md5:
            z.write(src / name, f"{FOLDER}/{name}")
        z.writestr(f"{FOLDER}/shape_names.txt", "\n".join(CLASSES))
    monkeypatch.setattr(modelnet, "MD5", md5)
    monkeypatch.setattr(modelnet.urllib.request, "urlopen", lambda url, timeout: io.BytesIO(buf.getvalue()))


def test_download_extracts_and_checks_every_file(tmp_path, monkeypatch):
    serve_release(tmp_path, monkeypatch)
    x, y, names = load_modelnet(tmp_path / "root", "train")
    assert x.shape == (15, POINTS, 3) and names == CLASSES
    folder = tmp_path / "root" / FOLDER
    assert sorted(p.name for p in folder.iterdir()) == sorted([*modelnet.MD5, "shape_names.txt"])  # no temp left


def test_download_with_a_wrong_checksum_keeps_nothing(tmp_path, monkeypatch):
    serve_release(tmp_path, monkeypatch, corrupt="ply_data_test1.h5")
    with pytest.raises(DatasetNotFoundError, match="ply_data_test1.h5: MD5 mismatch"):
        load_modelnet(tmp_path / "root", "train")
    assert list((tmp_path / "root" / FOLDER).iterdir()) == []


def test_pointnet_trains_on_generated_modelnet_files(release, tmp_path):
    root, _, _ = release
    cfg = TrainConfig(dataset="modelnet40", model="pointnet", data_root=str(root), num_points=32, epochs=1,
                      batch_size=4, progress=False, run_dir=str(tmp_path / "run"), download=False)
    history = train(cfg, log=lambda *_: None)
    assert history[0]["steps"] == 3 and 0 <= history[0]["test_acc"] <= 100
