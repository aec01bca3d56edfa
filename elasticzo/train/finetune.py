"""Fine-tuning: start a run from the weights of a trained checkpoint (``--init CHECKPOINT``).

Every layer takes the checkpoint's weights except, when the class count differs, the head (the
last weight layer), which keeps its fresh seeded init. The optimiser starts fresh (no
momentum, step 0): fine-tuning is a new run that only borrows weights.

Float runs take float checkpoints of the same architecture. INT8 runs take either

* an INT8 checkpoint (integer weights and their exponents, e.g. pretrained with NITI:
  ``--precision int8 --method bp``): loaded as they are; or
* a float checkpoint: loaded into the float model and converted once (``int8.convert``), the
  usual path for a net pretrained on a server and adapted on the device. The built-in INT8
  models keep NITI's bias-free layout (their checkpoints have no bias entries), so the biases
  are dropped (with a warning): the converted net starts close to, not exactly at, the float
  one. In Python, ``int8.convert`` keeps them as integer biases (``examples/finetune_int8.py``).

Both go through the model's ``load_state_dict``, after the weights are checked in full
(``train.schema``: present, none extra, dtype, shape, range, finite). Anything that does not fit
(another model, other widths, a damaged file) raises a ``CheckpointError`` that names the file,
the key and what was expected.
"""
from __future__ import annotations

import warnings
from dataclasses import replace

import torch
from torch import nn

from elasticzo.config import TrainConfig
from elasticzo.models import build_model, parametrised_layers
from elasticzo.train.checkpoint import CheckpointError, load_checkpoint
from elasticzo.train.learner import seeded
from elasticzo.train.schema import TensorSpec, check_tensors, describe, spec_of, split_meta

PREFIX = "model."


def init_from_checkpoint(learner, config: TrainConfig, path: str) -> str:
    """Load the weights of checkpoint ``path`` into ``learner.model``; returns a one-line summary."""
    tensors, meta = load_checkpoint(path)
    split_meta(meta, path)  # only the weights are used, but the metadata must be ours
    weights = {k[len(PREFIX):]: v for k, v in tensors.items() if k.startswith(PREFIX)}
    if not weights:
        raise CheckpointError(f"{path}: holds no model weights (no '{PREFIX}*' tensors)")
    is_int8 = any(v.dtype == torch.int8 for v in weights.values())
    if is_int8 and config.precision != "int8":
        raise CheckpointError(f"{path}: is an INT8 checkpoint; a float run cannot start from it "
                              "(use --precision int8, or a float checkpoint)")
    if config.precision == "int8" and not is_int8:
        weights = _converted(weights, config.model, path)
    kept = _load_weights(learner.model, weights, path)
    head = "kept the checkpoint's head" if kept else "new head (the class count differs)"
    return f"init from {path}: {head}"


def _load_weights(model: nn.Module, weights: dict[str, torch.Tensor], path) -> bool:
    """Copy ``weights`` into ``model``, checked in full first; the head keeps its init if only its
    class count differs."""
    state = model.state_dict()
    head = _head_keys(model)
    new_head = _check_weights(weights, {k: spec_of(k, v) for k, v in state.items()}, head, path)
    if new_head:
        weights = {**weights, **{k: state[k] for k in head}}
    model.load_state_dict(weights)
    return not new_head


def _head_keys(model: nn.Module) -> list[str]:
    """State-dict keys of the last weight layer (the classifier head), float or integer."""
    weight_layers = getattr(model, "weight_layers", None)
    head = weight_layers()[-1] if callable(weight_layers) else parametrised_layers(model)[-1]
    name = next(n for n, m in model.named_modules() if m is head)
    return [f"{name}.{k}" if name else k for k in head.state_dict()]


def _check_weights(weights: dict[str, torch.Tensor], expected: dict[str, TensorSpec], head: list[str], path) -> bool:
    """Check ``weights`` in full against ``expected`` (``train.schema``); the ``head`` keys may differ
    in their class count (first dimension) only. Returns True when they do: a new head."""
    rows = {int(weights[k].shape[0]) for k in head if k in weights and weights[k].dim() == len(expected[k].shape) >= 1
            and tuple(weights[k].shape[1:]) == expected[k].shape[1:]}
    sized = [k for k in head if len(expected[k].shape) >= 1]
    new_head = len(rows) == 1 and bool(sized) and rows != {expected[sized[0]].shape[0]}
    if new_head:
        n = rows.pop()
        expected = {**expected, **{k: replace(expected[k], shape=(n, *expected[k].shape[1:])) for k in sized}}
    check_tensors({PREFIX + k: v for k, v in weights.items()}, {PREFIX + k: v for k, v in expected.items()}, path,
                  hint="was it trained with another --model or width?")
    return new_head


def _converted(weights: dict[str, torch.Tensor], model_name: str, path) -> dict[str, torch.Tensor]:
    """The integer state of a float checkpoint: load the float model it fits, convert it once."""
    from elasticzo.int8.convert import convert

    with seeded(0):  # the init is overwritten; only the global RNG must stay untouched
        float_model = build_model(model_name, _checkpoint_classes(weights, model_name, path))
    _check_weights(weights, {k: spec_of(k, v) for k, v in float_model.state_dict().items()}, [], path)
    float_model.load_state_dict(weights)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # one summary warning below instead of one per layer
        converted = convert(float_model, drop_bias=True)
    if any(m.bias is not None and bool(m.bias.ne(0).any()) for m in parametrised_layers(float_model)):
        warnings.warn(f"--init {path}: the float biases were dropped (integer layers have none)", stacklevel=3)
    return converted.state_dict()


def _checkpoint_classes(weights: dict[str, torch.Tensor], model_name: str, path) -> int:
    """The class count of a float checkpoint: the rows of its head weight."""
    with seeded(0):
        head = _head_keys(build_model(model_name))[0]
    if head not in weights or weights[head].dim() != 2 or weights[head].shape[0] < 1:
        got = describe(weights[head]) if head in weights else "missing"
        raise CheckpointError(f"{path}: tensor {PREFIX}{head} is {got}, expected the [classes, features] "
                              f"head weight of a float {model_name} checkpoint")
    return int(weights[head].shape[0])
