"""Collapse detection: a run whose loss is no better than a constant guess and whose accuracy does not move.

At a learning rate too high for it, SPSA (and integer SPSA at a too small ``--int8-zo-shift``)
need not diverge to NaN: the logits are driven to a constant (the loss sticks at log C) or
blow up (the loss sits far above it), the accuracy stays at chance, and the run spends its
remaining epochs learning nothing. A NaN check cannot see that, so after every epoch the loop asks ``collapse_warning`` and prints what it answers:
the symptom and the knob to turn for the parts this run trains.
"""
from __future__ import annotations

import math

from elasticzo.config import TrainConfig

CHANCE_FACTOR = 2.0  # accuracy below twice chance (20 % for 10 classes)
PROGRESS_POINTS = 1.0  # an epoch that gains less than this (accuracy points) made no progress
CONSTANT_GUESS = 0.98  # a train loss above 0.98 log C is no better than guessing the class prior


def is_collapsed(history: list[dict], num_classes: int) -> bool:
    """True when, for the last epoch, the accuracy is near chance and gained nothing on the epoch
    before, and the train loss is no better than a constant guess (at log C, or above it).

    Calibration: the slowest healthy run of the bench grid, vanilla ZO FP32 on MNIST (14.6,
    19.5, 20.4, 20.6, 20.3 % over 5 epochs, final loss 2.24 < 0.98 log 10 = 2.26), is not flagged.
    """
    epochs = [h for h in history if "train_loss" in h]  # not the epoch-0 line of a fine-tuning run
    if len(epochs) < 2 or num_classes < 2:
        return False
    prev, last = epochs[-2], epochs[-1]
    chance = 100.0 / num_classes
    no_progress = last["test_acc"] < prev["test_acc"] + PROGRESS_POINTS
    stuck = last["test_acc"] < CHANCE_FACTOR * chance and last["train_loss"] >= CONSTANT_GUESS * math.log(num_classes)
    return stuck and no_progress


def knobs(config: TrainConfig) -> str:
    """The settings that set the step size of the parts this run trains, and which way to turn them."""
    zo = config.method != "bp"
    bp = config.method == "bp" or (config.method == "elasticzo" and config.bp_layers != 0)  # None: the default 1
    if config.precision == "int8":
        parts = ([f"raise --int8-zo-shift (now {config.int8_zo_shift}; each +1 halves the ZO step)"] if zo else []) \
            + ([f"lower --int8-lr-bits (now {config.int8_lr_bits})"] if bp else [])
    else:
        parts = ([f"lower --lr-zo (now {config.zo_learning_rate():g}, try a third)"] if zo else []) \
            + ([f"lower --lr-bp (now {config.lr_bp:g})"] if bp else [])
    return " and/or ".join(parts)


def collapse_warning(config: TrainConfig, history: list[dict], num_classes: int) -> str | None:
    """The message to print when the run has collapsed, else None."""
    if not is_collapsed(history, num_classes):
        return None
    last, log_c = history[-1], math.log(num_classes)
    where = "at" if last["train_loss"] <= 1.05 * log_c else "above"
    return (f"warning: the run looks collapsed: train_loss {last['train_loss']:.4g} is {where} log({num_classes}) = "
            f"{log_c:.3f}, the loss of a constant guess, and test_acc {last['test_acc']:.2f} % is near chance with "
            f"no progress over the last epoch. The steps are too large: {knobs(config)}, and start again.")
