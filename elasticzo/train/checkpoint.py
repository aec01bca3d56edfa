"""Checkpoints in safetensors (no pickle): named tensors plus JSON metadata, written atomically.

A checkpoint is written to a temporary file and renamed over the old one, so a run killed while
saving keeps its previous checkpoint intact.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

META_KEY = "elasticzo"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message names the file."""


def save_checkpoint(path: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Write ``tensors`` and ``meta`` (JSON-serialisable) to ``path`` atomically."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    cpu = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    save_file(cpu, str(tmp), metadata={META_KEY: json.dumps(meta)})
    os.replace(tmp, path)


def load_checkpoint(path: Path, device: torch.device | str = "cpu") -> tuple[dict[str, torch.Tensor], dict]:
    """Read a checkpoint; raises CheckpointError for a missing, truncated or corrupt file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint file there")
    try:
        tensors = load_file(str(path), device=str(device))
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(META_KEY)
        if raw is None:
            raise ValueError("the file has no elasticzo metadata")
        meta = json.loads(raw)
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{path}: not a readable elasticzo checkpoint (truncated or corrupt?): {err}") from None
    return tensors, meta


def load_into_module(module: torch.nn.Module, tensors: dict[str, torch.Tensor], path: Path, prefix: str = "model.") -> None:
    """Copy ``prefix``-named tensors into ``module``; CheckpointError on missing keys or shape mismatch."""
    state = module.state_dict()
    found = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    missing = sorted(set(state) - set(found))
    unexpected = sorted(set(found) - set(state))
    if missing or unexpected:
        raise CheckpointError(f"{path}: does not fit {type(module).__name__}: missing {missing}, unexpected {unexpected}")
    for name, value in found.items():
        if value.shape != state[name].shape:
            raise CheckpointError(f"{path}: {name} has shape {tuple(value.shape)}, the model wants {tuple(state[name].shape)}")
    module.load_state_dict(found)
