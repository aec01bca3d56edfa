"""Non-IID splits of a labelled dataset over federated clients (index lists, one per client).

- ``class_split``: each client holds ``classes_per_client`` classes (the pathological non-IID
  split of McMahan et al.); a class held by several clients is shared out evenly among them.
- ``dirichlet_split``: for each class, the clients' shares are drawn from Dirichlet(alpha);
  small alpha -> few classes per client, large alpha -> close to IID.
- ``iid_split``: a random equal split.

All are pure functions of (labels, clients, their parameter, seed): every client and the server
derive the same split without exchanging it.
"""
from __future__ import annotations

import numpy as np
import torch

SPLITS = ("classes", "dirichlet", "iid")


def _check(clients: int, n: int) -> None:
    if clients < 1:
        raise ValueError(f"--clients: must be >= 1, got {clients}")
    if n < clients:
        raise ValueError(f"{n} training examples cannot be split over {clients} clients")


def iid_split(labels: torch.Tensor, clients: int, seed: int) -> list[torch.Tensor]:
    _check(clients, labels.numel())
    perm = torch.randperm(labels.numel(), generator=torch.Generator().manual_seed(seed))
    return [part.sort().values for part in perm.tensor_split(clients)]


def class_split(labels: torch.Tensor, clients: int, classes_per_client: int, seed: int) -> list[torch.Tensor]:
    """Client c holds classes order[(c * m + i) % C] for i < m, where order is a seeded permutation."""
    _check(clients, labels.numel())
    num_classes = int(labels.max()) + 1
    if not 1 <= classes_per_client <= num_classes:
        raise ValueError(f"--classes-per-client: must be in 1..{num_classes}, got {classes_per_client}")
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(num_classes, generator=gen).tolist()
    held = [[order[(c * classes_per_client + i) % num_classes] for i in range(classes_per_client)]
            for c in range(clients)]
    parts: list[list[torch.Tensor]] = [[] for _ in range(clients)]
    for k in range(num_classes):
        owners = [c for c in range(clients) if k in held[c]]
        idx = (labels == k).nonzero().flatten()
        idx = idx[torch.randperm(idx.numel(), generator=gen)]
        for c, chunk in zip(owners, idx.tensor_split(len(owners)) if owners else []):
            parts[c].append(chunk)
    return [torch.cat(p).sort().values if p else torch.empty(0, dtype=torch.long) for p in parts]


def dirichlet_split(labels: torch.Tensor, clients: int, alpha: float, seed: int,
                    tries: int = 100) -> list[torch.Tensor]:
    """Per class, shares ~ Dirichlet(alpha) over clients; redrawn until every client has an example."""
    _check(clients, labels.numel())
    if not alpha > 0:
        raise ValueError(f"--alpha: must be > 0, got {alpha}")
    rng = np.random.default_rng(seed)
    num_classes = int(labels.max()) + 1
    by_class = [(labels == k).nonzero().flatten().numpy() for k in range(num_classes)]
    for _ in range(tries):
        parts: list[list[np.ndarray]] = [[] for _ in range(clients)]
        for idx in by_class:
            idx = rng.permutation(idx)
            cuts = (np.cumsum(rng.dirichlet(np.full(clients, alpha))) * idx.size).astype(int)[:-1]
            for c, chunk in enumerate(np.split(idx, cuts)):
                parts[c].append(chunk)
        out = [torch.from_numpy(np.sort(np.concatenate(p))).long() for p in parts]
        if all(p.numel() > 0 for p in out):
            return out
    raise ValueError(f"Dirichlet(alpha={alpha}) left a client without data in {tries} draws; raise --alpha "
                     "or lower --clients")


def split_indices(labels: torch.Tensor, clients: int, how: str, seed: int, classes_per_client: int = 2,
                  alpha: float = 0.5) -> list[torch.Tensor]:
    """The split named ``how`` (one of SPLITS)."""
    if how == "classes":
        return class_split(labels, clients, classes_per_client, seed)
    if how == "dirichlet":
        return dirichlet_split(labels, clients, alpha, seed)
    if how == "iid":
        return iid_split(labels, clients, seed)
    raise ValueError(f"--split: {how!r} is not one of {', '.join(SPLITS)}")
