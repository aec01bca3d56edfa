"""The learner: a model and its optimiser, behind the few calls the training loop needs.

One class serves both precisions. FP32 builds the float model of ``config.model`` and trains it
with ``ElasticZO``; INT8 converts that same model (``int8.convert``, fresh integer init) and
trains it with ``IntElasticZO``. Both optimisers are built by ``for_model(model, bp_layers)``,
stepped with a closure, and checkpointed through ``model.state_dict()`` and
``optimizer.state_dict()``; the precision only decides the closure, the learning-rate schedule
and the unit of the logged loss.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from elasticzo.config import TrainConfig
from elasticzo.data.stream import whole
from elasticzo.models import build_model

OPTIM = "optim."
MODEL = "model."


def schedule_factor(schedule: str, progress: float) -> float:
    """Learning-rate multiplier at ``progress`` in [0, 1] of the run (a pure function: resume-safe)."""
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))
    return 1.0


def int8_decay_steps(schedule: str, progress: float) -> int:
    """Halvings of the integer learning rates at ``progress``: the step-decay twin of the float
    schedules (with ``cosine`` one at 50 % and one at 75 % of the run; ``constant`` none)."""
    return int(progress >= 0.5) + int(progress >= 0.75) if schedule != "constant" else 0


@contextlib.contextmanager
def seeded(seed: int):
    """Run a block (model init) with the global RNG seeded, then give the caller's RNG state back."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def build_learner_model(config: TrainConfig, num_classes: int, device: torch.device) -> nn.Module:
    """The model of ``config``: the float model (seeded init) or, for INT8, its integer conversion."""
    with seeded(config.seed):
        model = build_model(config.model, num_classes)
    if config.precision == "int8":
        from elasticzo.int8.convert import convert

        gen = torch.Generator(device="cpu").manual_seed(config.seed)
        model = convert(model, init=gen, tile=config.int8_tile)
    return model.to(device)


def build_optimizer(config: TrainConfig, model: nn.Module, bp_layers: int) -> torch.optim.Optimizer:
    """The optimiser of ``config`` for ``model`` (every option of the precision's optimiser set)."""
    if config.precision == "int8":
        from elasticzo.int8.elastic import IntElasticZO

        return IntElasticZO.for_model(model, bp_layers, eps=1, zo_shift=config.int8_zo_shift,
                                      mu=config.int8_lr_bits, seed=config.seed)
    from elasticzo.optim.elastic import ElasticZO

    return ElasticZO.for_model(
        model, bp_layers, lr_zo=config.zo_learning_rate(), lr_bp=config.lr_bp, eps=config.eps,
        queries=config.queries, noise=config.noise, grad_clip=config.grad_clip or None, normalize=config.normalize,
        zo_weight_decay=config.zo_weight_decay, momentum=config.momentum, weight_decay=config.weight_decay,
        bp_grad=config.bp_grad, seed=config.seed,
        nonfinite="ignore")  # the loop checks the loss every CHECK_EVERY steps, without a host sync per step


def micro_batched_closure(model: nn.Module, x, y: torch.Tensor, micro_batch: int = 0):
    """The closure(backward) of mean cross-entropy over the batch, evaluated ``micro_batch`` examples at a time.

    Each chunk adds sum(loss of its examples) / B, and its backward adds to the BP gradients, so
    loss and gradients are those of the whole batch up to float summation order (float32: loss
    within 1e-6 relative, gradients 1e-5; float64: 1e-12; tests/test_microbatch.py). Only one
    chunk's activations exist at a time. Not for models whose forward couples the examples
    (BatchNorm in train mode): their chunks see different batch statistics.
    """
    batch = y.shape[0]
    bounds = [(0, batch)] if not micro_batch or micro_batch >= batch else \
        [(lo, min(lo + micro_batch, batch)) for lo in range(0, batch, micro_batch)]

    def closure(backward: bool = True) -> torch.Tensor:
        total = None
        for lo, hi in bounds:
            xs, ys = (x[lo:hi], y[lo:hi]) if len(bounds) > 1 else (whole(x), y)
            loss = F.cross_entropy(model(xs), ys, reduction="sum") / batch
            if backward:
                loss.backward()
            loss = loss.detach() if loss.requires_grad else loss
            total = loss if total is None else total + loss
        return total

    return closure


class Learner:
    """The model of ``config`` trained by the optimiser of its precision, split as ``config`` says."""

    def __init__(self, config: TrainConfig, num_classes: int, device: torch.device):
        self.int8 = config.precision == "int8"
        self.model = build_learner_model(config, num_classes, device)
        self._modules = list(self.model.modules())
        self.num_layers = num_weight_layers(self.model)
        self.bp_layers = config.split(self.num_layers)
        self.optimizer = build_optimizer(config, self.model, self.bp_layers)
        self.schedule = config.schedule
        self.base = [dict(g) for g in self.optimizer.param_groups]  # hyper-parameters at progress 0
        self.replicas = None  # set by train.distributed.attach under torchrun
        self.micro_batch = config.micro_batch
        self._shift_guesses: dict = {}  # INT8 micro-batches: each pass's last requantisation shifts

    def set_progress(self, progress: float) -> None:
        """Set the learning rates for ``progress`` (fraction of all steps done)."""
        for group, base in zip(self.optimizer.param_groups, self.base):
            if not self.int8:
                group["lr"] = base["lr"] * schedule_factor(self.schedule, progress)
            elif group["part"] == "bp":  # NITI's bit width drops one bit per halving
                group["mu"] = max(1, base["mu"] - int8_decay_steps(self.schedule, progress))
            else:  # the ZO step shift grows by one
                group["zo_shift"] = base["zo_shift"] + int8_decay_steps(self.schedule, progress)

    def train_step(self, x, y: torch.Tensor) -> torch.Tensor:
        """One optimiser step on a batch; returns the mean loss in nats as a 0-dim tensor (no host sync).

        ``x`` may be a ``StreamedBatch``; with ``micro_batch`` each pass runs chunk by chunk.
        """
        if not all(m.training for m in self._modules):
            self.model.train()  # after predict(); Module.train walks every module through __setattr__
        if self.int8:
            from elasticzo.int8.loss import loss_to_nats
            from elasticzo.int8.microbatch import micro_batched_loss_closure

            count = x.shape[0] if self.replicas is None else self.replicas.batch_count  # the loss sums all ranks
            closure = micro_batched_loss_closure(self.model, x, y, self.micro_batch, self._shift_guesses)
            return loss_to_nats(self.optimizer.step(closure)) / count
        return self.optimizer.step(micro_batched_closure(self.model, x, y, self.micro_batch))

    def step_record(self) -> torch.Tensor | None:
        """The projected gradients of the last step (for the seed log), None without a ZO part."""
        return self.optimizer.last_projected_grads

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        self.model.eval()
        logits = self.model(x)
        return (logits.values if self.int8 else logits).argmax(dim=1)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor a resume needs, by checkpoint name: ``model.<state_dict key>`` and
        ``optim.<param index>.<state key>`` (momentum, g RMS; INT8 carries and running |d|)."""
        tensors = {MODEL + k: v for k, v in self.model.state_dict().items()}
        for index, state in self.optimizer.state_dict()["state"].items():
            tensors.update({f"{OPTIM}{index}.{key}": value for key, value in state.items()})
        return tensors

    def state_meta(self) -> dict:
        """The optimiser's param groups (hyper-parameters, step counters) as JSON."""
        return {"param_groups": self.optimizer.state_dict()["param_groups"]}

    def state_spec(self, global_step: int) -> dict:
        """name -> TensorSpec of every tensor ``state_tensors`` holds after ``global_step`` steps:
        this learner's own, plus the optimiser state the first step creates (momentum, the g RMS).
        INT8 exponents are fixed at init, the running |d| is >= 0."""
        from elasticzo.train.schema import TensorSpec, spec_of

        spec = {name: spec_of(name, t) for name, t in self.state_tensors().items()}
        for name, t in self.state_tensors().items():
            if self.int8 and name.startswith(MODEL) and name.endswith("exponent"):
                spec[name] = TensorSpec.like(t, int(t), int(t))
            if name.endswith("d_scale"):
                spec[name] = TensorSpec.like(t, lo=0)
        index = 0
        for group in self.optimizer.param_groups:
            for j, p in enumerate(group["params"]):
                if global_step and not self.int8 and group["part"] == "bp" and group["momentum"]:
                    spec[f"{OPTIM}{index}.momentum_buffer"] = TensorSpec.like(p)
                if global_step and not self.int8 and group["part"] == "zo" and group["normalize"] and j == 0:
                    spec[f"{OPTIM}{index}.g2_ema"] = TensorSpec(p.dtype, (), lo=0.0)
                    spec[f"{OPTIM}{index}.g2_count"] = TensorSpec(p.dtype, (), lo=1.0)
                index += 1
        return spec

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict, path) -> None:
        """Restore model and optimiser from a checkpoint, checked in full first (``train.schema``):
        CheckpointError names the file, the key and what was expected, and nothing changes."""
        from elasticzo.train.checkpoint import CheckpointError, load_into_module
        from elasticzo.train.schema import validate_state

        validate_state(self, tensors, meta, path)
        load_into_module(self.model, tensors, path, prefix=MODEL)
        state: dict[int, dict] = {}
        for name, value in tensors.items():
            if name.startswith(OPTIM):
                index, key = name[len(OPTIM):].split(".", 1)
                state.setdefault(int(index), {})[key] = value
        try:
            self.optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
        except (ValueError, KeyError, IndexError) as err:
            raise CheckpointError(f"{path}: the optimiser state does not fit this run ({err})") from None


def num_weight_layers(model: nn.Module) -> int:
    """How many layers the split counts: parametrised float layers, or integer weight layers."""
    from elasticzo.models.layers import parametrised_layers

    weight_layers = getattr(model, "weight_layers", None)
    return len(weight_layers()) if callable(weight_layers) else len(parametrised_layers(model))
