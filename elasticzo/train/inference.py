"""Use what training produced: a run's checkpoint as a ready model for inference.

    from elasticzo import load_model
    model = load_model("runs/mnist-lenet5-elasticzo-k1-fp32-s0")   # the run dir or its checkpoint
    predictions = model(x).argmax(dim=1)                            # x: normalised [B, 1, 28, 28]

A float run gives its ``nn.Module`` in eval mode. An INT8 run gives its integer network
(``IntSequential``, also an ``nn.Module`` in eval mode), which takes the raw uint8 pixels (or
int8 points) and returns a ``QTensor``: ``model(pixels).values.argmax(dim=1)``.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from elasticzo.config import TrainConfig
from elasticzo.models import build_model
from elasticzo.train.checkpoint import CheckpointError, load_checkpoint
from elasticzo.train.finetune import PREFIX, _check_weights, _checkpoint_classes
from elasticzo.train.learner import seeded
from elasticzo.train.schema import spec_of, split_meta

CHECKPOINT = "checkpoint.safetensors"


def run_files(path: str | Path) -> tuple[Path, Path]:
    """(checkpoint, config.json) of a run dir, or of the run that holds checkpoint file ``path``."""
    path = Path(path)
    checkpoint = path / CHECKPOINT if path.is_dir() else path
    return checkpoint, checkpoint.parent / "config.json"


def load_model(path: str | Path, model: str | None = None, device: str | torch.device = "cpu"):
    """The trained model of a run, ready for inference.

    ``path`` is a run dir or a ``checkpoint.safetensors``; the architecture is the run's
    ``config.json`` model, or ``model`` (lenet5, mlp, pointnet) for a checkpoint without one.
    Raises CheckpointError (naming the file) for a missing, corrupt or non-fitting checkpoint.
    """
    checkpoint, config_path = run_files(path)
    if model is None:
        if not config_path.is_file():
            raise ValueError(f"{path}: no config.json beside the checkpoint; pass model= (lenet5, mlp or pointnet)")
        model = TrainConfig.load(config_path).model
    tensors, meta = load_checkpoint(checkpoint)
    split_meta(meta, checkpoint)
    weights = {k[len(PREFIX):]: v for k, v in tensors.items() if k.startswith(PREFIX)}
    if not weights:
        raise CheckpointError(f"{checkpoint}: holds no model weights (no '{PREFIX}*' tensors)")
    with seeded(0):  # the init is overwritten; the caller's global RNG stays untouched
        net: nn.Module = build_model(model, _checkpoint_classes(weights, model, checkpoint))
    if any(v.dtype == torch.int8 for v in weights.values()):
        from elasticzo.int8.convert import convert

        net = convert(net, init=torch.Generator().manual_seed(0))  # the integer model of the run
    _check_weights(weights, {k: spec_of(k, v) for k, v in net.state_dict().items()}, [], checkpoint)
    net.load_state_dict(weights)  # checked in full above (train.schema)
    return net.to(device).eval()
