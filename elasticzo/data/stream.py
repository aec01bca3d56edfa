"""A mini-batch read from the dataset a chunk at a time: only its indices are resident.

With micro-batched passes (``--micro-batch``) a step never needs the whole batch at once, so
the batch need not be gathered either: each pass reads rows ``lo..hi`` of the batch from the
dataset (on a device: from flash) when it reaches them.

Example::

    batch = StreamedBatch(images, torch.tensor([5, 17, 3]))
    batch[0:2]        # images[[5, 17]], gathered now
"""
from __future__ import annotations

import torch


class StreamedBatch:
    """Rows ``index`` of ``source``, gathered chunk by chunk on request (``batch[lo:hi]``)."""

    def __init__(self, source: torch.Tensor, index: torch.Tensor, device: torch.device | str | None = None):
        if index.dim() != 1:
            raise ValueError(f"StreamedBatch index must be 1-D, got shape {tuple(index.shape)}")
        self.source, self.index = source, index.to(source.device)
        self.device = torch.device(device) if device is not None else source.device

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.index.shape[0], *self.source.shape[1:]))

    @property
    def dtype(self) -> torch.dtype:
        return self.source.dtype

    def __len__(self) -> int:
        return self.index.shape[0]

    def __getitem__(self, rows: slice) -> torch.Tensor:
        if not isinstance(rows, slice) or rows.step not in (None, 1):
            raise TypeError(f"StreamedBatch takes a contiguous slice of rows, got {rows!r}")
        return self.source[self.index[rows]].to(self.device, non_blocking=True)

    def full(self) -> torch.Tensor:
        """The whole batch as one tensor (what a pass without micro-batches needs)."""
        return self[0:len(self)]


def whole(x) -> torch.Tensor:
    """``x`` as a tensor: a StreamedBatch gathered, a tensor as it is."""
    return x.full() if isinstance(x, StreamedBatch) else x
