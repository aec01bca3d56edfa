"""Mini-batches over tensors already in memory, replayable from (seed, epoch, step).

MNIST fits in memory many times over, so a DataLoader with workers only adds start-up time and
nondeterminism. Here the order of an epoch is a pure function of (seed, epoch): a run resumed at
step k of epoch e sees exactly the batches an uninterrupted run would, and no global RNG is read.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterator

import torch

from elasticzo.data.stream import StreamedBatch

def epoch_seed(seed: int, epoch: int) -> int:
    """Seed of the shuffle of ``epoch``: a hash of (seed, epoch), 63-bit, non-negative.

    Hashed rather than ``seed + epoch`` so that runs with seeds 0 and 1 do not share every epoch
    but one; the "loader" tag keeps these seeds apart from the ZO noise seeds of the same run.
    """
    key = f"elasticzo.loader:{seed}:{epoch}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1


class BatchLoader:
    """Batches of (x, y) in a per-epoch order that depends only on (seed, epoch).

    Args:
        x, y: tensors with the same first dimension N (e.g. [N, 1, 28, 28] and [N]).
        batch_size: examples per batch (>= 1); the last batch is smaller unless ``drop_last``.
        shuffle: permute each epoch; when False, batches are contiguous views in order.
        seed: the run seed; the permutation of an epoch comes from ``epoch_seed(seed, epoch)``.
        drop_last: skip the final incomplete batch.
        device: where batches are sent (the data itself stays where it is).
        stream: yield shuffled inputs as ``StreamedBatch`` (indices only, rows read chunk by chunk
            by micro-batched passes) instead of gathering each batch.

    Example::

        loader = BatchLoader(x, y, batch_size=64, seed=0)
        for step, (xb, yb) in enumerate(loader.epoch_batches(epoch=3, start_step=10), start=10): ...
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool = True,
                 seed: int = 0, drop_last: bool = False, device: torch.device | str | None = None,
                 stream: bool = False):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"x and y differ in length: x has {x.shape[0]} examples, y has {y.shape[0]}")
        self.x, self.y = x, y
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.device = torch.device(device) if device is not None else None
        self.stream = stream

    @property
    def num_examples(self) -> int:
        return self.x.shape[0]

    def __len__(self) -> int:
        """Batches per epoch."""
        if self.drop_last:
            return self.num_examples // self.batch_size
        return -(-self.num_examples // self.batch_size)  # ceil division

    def permutation(self, epoch: int) -> torch.Tensor:
        """Order of the examples in ``epoch`` (int64 [N]); drawn on the CPU so every device agrees."""
        if not self.shuffle:
            return torch.arange(self.num_examples)
        gen = torch.Generator(device="cpu")
        gen.manual_seed(epoch_seed(self.seed, epoch))
        return torch.randperm(self.num_examples, generator=gen)

    def epoch_batches(self, epoch: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield the batches of ``epoch`` from step ``start_step`` on (0 <= start_step <= len(self))."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if not 0 <= start_step <= len(self):
            raise ValueError(f"start_step must be in 0..{len(self)} (batches per epoch), got {start_step}")
        perm = self.permutation(epoch) if self.shuffle else None
        for step in range(start_step, len(self)):
            lo, hi = step * self.batch_size, min((step + 1) * self.batch_size, self.num_examples)
            yield self._batch(lo, hi, perm)

    def _batch(self, lo: int, hi: int, perm: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Examples lo..hi of the epoch order: a view when unshuffled, a gather of one batch otherwise."""
        if perm is None:
            xb, yb = self.x[lo:hi], self.y[lo:hi]
        else:
            idx = perm[lo:hi].to(self.x.device)  # [B]; only this batch is copied, never the dataset
            yb = self.y[idx.to(self.y.device)]
            if self.stream:
                return StreamedBatch(self.x, idx, self.device), (yb if self.device is None else yb.to(self.device))
            xb = self.x[idx]
        if self.device is not None:
            xb, yb = xb.to(self.device, non_blocking=True), yb.to(self.device, non_blocking=True)
        return xb, yb
