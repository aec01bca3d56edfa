"""Point clouds sampled from images: intensity-proportional, seeded, optionally rotated in 3D; the
mnist-points dataset, class subsets, and training PointNet on it from the CLI (FP32 and INT8)."""
from __future__ import annotations

import json

import pytest
import torch

from elasticzo.cli import main
from elasticzo.config import TrainConfig
from elasticzo.data import load_dataset, load_split, parse_classes, select_classes
from elasticzo.data.points import image_point_clouds, point_seed, random_rotations
from elasticzo.train.checkpoint import load_checkpoint
from elasticzo.train.loop import CHECKPOINT, train


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def pixel_of(clouds):
    """(row, col) of the pixel each point of a flat cloud lies in."""
    col = ((clouds[..., 0] + 1) * 14).floor().long()
    row = ((1 - clouds[..., 1]) * 14).floor().long()
    return row, col


def digits(n=6):
    images = torch.zeros(n, 28, 28, dtype=torch.uint8)
    for i in range(n):
        images[i, 5 + i:20, 10:12 + i] = 40 * (i + 1)
    return images


def test_points_lie_on_the_ink_and_are_seeded():
    images = digits()
    a = image_point_clouds(images, 100, gen(0))
    assert a.shape == (6, 100, 3) and a.dtype == torch.float32
    assert torch.equal(a, image_point_clouds(images, 100, gen(0)))
    assert not torch.equal(a, image_point_clouds(images, 100, gen(1)))
    assert bool((a[..., 2] == 0).all()) and bool((a[..., :2].abs() <= 1).all())
    row, col = pixel_of(a)
    ink = images[torch.arange(6)[:, None], row, col]
    assert bool((ink > 0).all())  # no point on a black pixel
    assert torch.equal(image_point_clouds(images[:, None], 100, gen(0)), a)  # [N, 1, 28, 28] works too


def test_pixels_are_drawn_in_proportion_to_their_intensity():
    image = torch.zeros(1, 28, 28, dtype=torch.uint8)
    image[0, 3, 4], image[0, 20, 21] = 50, 150  # 1 : 3
    row, _ = pixel_of(image_point_clouds(image, 8000, gen(2)))
    bright = int((row == 20).sum())
    assert abs(bright - 6000) < 4 * (8000 * 0.75 * 0.25) ** 0.5  # binomial, 4 sigma
    assert int((row == 3).sum()) + bright == 8000


def test_a_black_image_samples_uniformly_and_bad_input_is_rejected():
    clouds = image_point_clouds(torch.zeros(1, 28, 28, dtype=torch.uint8), 2000, gen())
    row, col = pixel_of(clouds)
    assert len(set((row * 28 + col).flatten().tolist())) > 700  # spread over the whole image
    with pytest.raises(ValueError, match="uint8"):
        image_point_clouds(torch.zeros(1, 28, 28), 10, gen())
    with pytest.raises(ValueError, match="num_points"):
        image_point_clouds(digits(), 0, gen())


def test_lift3d_turns_each_flat_cloud_by_its_own_rotation():
    images = digits()
    flat = image_point_clouds(images, 64, gen(5))
    lifted = image_point_clouds(images, 64, gen(5), lift3d=True)  # same draws, then a rotation
    torch.testing.assert_close(lifted.norm(dim=-1), flat.norm(dim=-1))
    dist = lambda c: (c[:, :, None] - c[:, None]).norm(dim=-1)  # [N, P, P] pairwise distances
    torch.testing.assert_close(dist(lifted), dist(flat), atol=1e-5, rtol=0)
    assert float(lifted[..., 2].abs().max()) > 0.1
    rot = random_rotations(1000, gen(1)).double()
    torch.testing.assert_close(rot @ rot.transpose(1, 2), torch.eye(3, dtype=torch.float64).expand(1000, 3, 3),
                               atol=1e-6, rtol=0)
    torch.testing.assert_close(torch.linalg.det(rot), torch.ones(1000, dtype=torch.float64), atol=1e-6, rtol=0)
    assert abs(float(rot[:, 2, 2].mean())) < 0.1  # uniform: no preferred axis


def test_mnist_points_dataset_is_fixed_per_split(data_root):
    a = load_dataset("mnist-points", data_root, "test", limit=50, num_points=32)
    b = load_dataset("mnist-points", data_root, "test", limit=50, num_points=32)
    _, labels = load_split("mnist", data_root, "test", limit=50)
    assert a.x.shape == (50, 32, 3) and torch.equal(a.x, b.x) and torch.equal(a.y, labels) and a.num_classes == 10
    train_like = image_point_clouds(load_split("mnist", data_root, "test", limit=50, normalise=False)[0], 32,
                                    gen(point_seed(0, "train")))
    assert not torch.equal(train_like, a.x)  # the train split draws from another seed
    assert point_seed(0, "train") != point_seed(0, "test") != point_seed(1, "test")
    fashion = load_dataset("fashion-mnist-points", data_root, "test", limit=4, num_points=8, lift3d=True)
    assert fashion.x.shape == (4, 8, 3) and fashion.class_names[0] == "T-shirt/top"


def test_parse_and_select_classes():
    assert parse_classes("5-9", 10) == (5, 6, 7, 8, 9)
    assert parse_classes(" 0,2 , 4", 10) == (0, 2, 4)
    assert parse_classes("7,0-2", 10) == (7, 0, 1, 2)
    assert parse_classes("", 10) == ()
    for bad, message in (("9-5", "empty range"), ("a", "cannot read"), ("3,10", "out of range"), ("1,1", "twice"),
                         ("-1", "cannot read")):
        with pytest.raises(ValueError, match=message):
            parse_classes(bad, 10)
    x, y = torch.arange(6).float(), torch.tensor([3, 1, 4, 1, 5, 9])
    xs, ys = select_classes(x, y, (4, 1))
    assert xs.tolist() == [1.0, 2.0, 3.0] and ys.tolist() == [1, 0, 1]
    assert select_classes(x, y, (8,))[1].numel() == 0


def test_classes_then_limit_on_a_real_split(data_root):
    s = load_dataset("mnist", data_root, "test", limit=40, classes="5-9")
    _, labels = load_split("mnist", data_root, "test")
    original = labels[labels >= 5][:40]
    assert s.x.shape == (40, 1, 28, 28) and s.y.tolist() == (original - 5).tolist()
    assert s.class_names == ("5", "6", "7", "8", "9") and s.num_classes == 5
    raw = load_dataset("mnist", data_root, "test", limit=3, raw=True)
    assert raw.x.dtype == torch.uint8


SMALL = ["--data-root", None, "--dataset", "mnist-points", "--model", "pointnet", "--num-points", "32",
         "--train-limit", "128", "--test-limit", "64", "--batch-size", "32", "--epochs", "1", "--no-progress"]


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_cli_trains_pointnet_on_mnist_points(tmp_path, data_root, precision):
    args = ["train", *SMALL, "--precision", precision, "--method", "elasticzo", "--bp-layers", "2",
            "--run-dir", str(tmp_path / "run")]
    args[args.index("--data-root") + 1] = str(data_root)
    assert main(args) == 0
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["steps"] == 4
    weights, _ = load_checkpoint(tmp_path / "run" / CHECKPOINT)
    assert (weights["model.0.weight"].dtype == torch.int8) == (precision == "int8")
    assert json.loads((tmp_path / "run" / "config.json").read_text())["num_points"] == 32


def test_a_model_that_does_not_fit_the_data_is_refused(tmp_path, data_root):
    for model, dataset in (("lenet5", "mnist-points"), ("pointnet", "mnist")):
        cfg = TrainConfig(model=model, dataset=dataset, data_root=str(data_root), run_dir=str(tmp_path / model))
        with pytest.raises(ValueError, match="does not fit"):
            train(cfg, log=lambda *_: None)
    with pytest.raises(ValueError, match="num-points"):
        TrainConfig(num_points=0).validate()
