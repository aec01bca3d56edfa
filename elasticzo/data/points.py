"""Point clouds sampled from images (MNIST, Fashion-MNIST): a real point-cloud task available offline.

Each image becomes a cloud of ``num_points`` points: pixel (row, col) is drawn with probability
proportional to its intensity (with replacement), and the point lands uniformly inside that pixel,
so the cloud is a sample of the image's ink density rather than a copy of the pixel grid:

    x = (col + u - 14) / 14,   y = (14 - row - v) / 14,   z = 0      u, v ~ U[0, 1)

Coordinates lie in [-1, 1) (y points up, as in an upright image). With ``lift3d`` each cloud is
turned by its own uniformly random 3D rotation, so the flat digit floats in space at an arbitrary
orientation. Every draw comes from the generator passed in: the same seed gives the same clouds.

Datasets ``mnist-points`` and ``fashion-mnist-points`` are these clouds of the IDX images (see
``data.registry``); their point clouds are a fixed function of (split, num_points, lift3d, seed).
"""
from __future__ import annotations

import hashlib

import torch

IMAGE_SIZE = 28
CHUNK = 4096  # images per multinomial call: bounds the float32 weight copy to 13 MB


def point_seed(seed: int, split: str) -> int:
    """Seed of the clouds of one split: a hash, so train and test never share draws."""
    key = f"elasticzo.points:{seed}:{split}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1


def image_point_clouds(images: torch.Tensor, num_points: int, generator: torch.Generator,
                       lift3d: bool = False) -> torch.Tensor:
    """uint8 images [N, 28, 28] (or [N, 1, 28, 28]) -> float32 clouds [N, num_points, 3].

    An all-black image (no ink) samples its pixels uniformly instead of failing.

    Example::

        gen = torch.Generator().manual_seed(0)
        clouds = image_point_clouds(images, 256, gen)  # [N, 256, 3], z = 0
    """
    if images.dim() == 4 and images.shape[1] == 1:
        images = images[:, 0]
    if images.dim() != 3 or images.dtype != torch.uint8:
        raise ValueError(f"expected uint8 images [N, H, W], got {images.dtype} {tuple(images.shape)}")
    if num_points < 1:
        raise ValueError(f"num_points must be >= 1, got {num_points}")
    n, h, w = images.shape
    flat = torch.empty(n, num_points, dtype=torch.int64)
    for lo in range(0, n, CHUNK):
        weights = images[lo:lo + CHUNK].reshape(-1, h * w).float()  # [n', h*w]
        weights[weights.sum(dim=1) == 0] = 1.0  # no ink: uniform over the pixels
        flat[lo:lo + CHUNK] = torch.multinomial(weights, num_points, replacement=True, generator=generator)
    offset = torch.rand(n, num_points, 2, generator=generator)  # position inside the pixel
    col = (flat % w).float() + offset[..., 0]
    row = (flat // w).float() + offset[..., 1]
    clouds = torch.stack([(col - w / 2) / (w / 2), (h / 2 - row) / (h / 2), torch.zeros_like(col)], dim=-1)
    if lift3d:
        clouds = clouds @ random_rotations(n, generator).transpose(1, 2)  # rotate each cloud: p -> R p
    return clouds


def random_rotations(n: int, generator: torch.Generator) -> torch.Tensor:
    """n rotation matrices [n, 3, 3], uniform over SO(3): from unit quaternions (normalised Gaussians)."""
    q = torch.randn(n, 4, generator=generator, dtype=torch.float64)
    w, x, y, z = (q / q.norm(dim=1, keepdim=True)).unbind(dim=1)
    rot = torch.stack([
        1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w),
        2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w),
        2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y),
    ], dim=1).reshape(n, 3, 3)
    return rot.float()
