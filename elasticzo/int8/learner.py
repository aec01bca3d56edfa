"""The INT8 learner: an integer network trained by ``IntElasticZO`` behind the loop's interface.

Images arrive as raw uint8 pixels; ``quantize_pixels`` turns them into int8 with exponent -8
(pixel / 256) by one shift, and from there every operation of a step is integer.

Point clouds are float coordinates in about [-1, 1]. They are quantised ONCE, when the dataset
is loaded (``quantize_points``: int8 with the fixed exponent -7, value q / 128), so batches arrive
as int8 and the training step stays integer-only: ``quantize_input`` only wraps them.
"""
from __future__ import annotations

import torch

from elasticzo.config import TrainConfig
from elasticzo.int8.convert import int8_lenet5, int8_mlp, int8_pointnet
from elasticzo.int8.elastic import IntElasticZO
from elasticzo.int8.format import QTensor
from elasticzo.int8.loss import loss_to_nats
from elasticzo.train.checkpoint import CheckpointError
from elasticzo.train.learner import resolve_bp_layers

PIXEL_EXPONENT = -8  # int8 pixel p >> 1 stands for (p >> 1) * 2**-7 = about p / 256
POINT_EXPONENT = -7  # int8 coordinate q stands for q / 128: [-1, 1) in steps of 1/128


def quantize_pixels(x: torch.Tensor) -> QTensor:
    """uint8 pixels [B, 1, 28, 28] -> int8 QTensor (0..127, exponent -7): one integer shift."""
    if x.dtype != torch.uint8:
        raise TypeError(f"the INT8 engine takes raw uint8 pixels, got {x.dtype} (load with normalise=False)")
    return QTensor((x >> 1).to(torch.int8), PIXEL_EXPONENT + 1)


def quantize_points(x: torch.Tensor) -> torch.Tensor:
    """float clouds -> int8 round(x * 128), saturated to [-127, 127]: once, at load time (not in a step)."""
    if not x.is_floating_point():
        raise TypeError(f"quantize_points takes float coordinates, got {x.dtype}")
    return torch.round(x * (2.0 ** -POINT_EXPONENT)).clamp_(-127, 127).to(torch.int8)


def quantize_input(x: torch.Tensor) -> QTensor:
    """A batch as the engine's input: uint8 pixels (one shift) or int8 points from ``quantize_points`` (a wrap)."""
    if x.dtype == torch.int8:
        return QTensor(x, POINT_EXPONENT)
    return quantize_pixels(x)


def build_int_model(name: str, num_classes: int, generator: torch.Generator):
    if name == "lenet5":
        return int8_lenet5(generator, num_classes)
    if name == "mlp":
        return int8_mlp(generator, num_classes=num_classes)
    if name == "pointnet":
        return int8_pointnet(generator, num_classes)
    raise ValueError(f"--model: no INT8 version of {name!r}; choose lenet5, mlp or pointnet")


class IntLearner:
    """ElasticZO-INT8 with the split of ``config`` (bp: pure NITI, zo: integer vanilla ZO)."""

    def __init__(self, config: TrainConfig, num_classes: int, device: torch.device):
        gen = torch.Generator(device="cpu")
        gen.manual_seed(config.seed)
        self.net = build_int_model(config.model, num_classes, gen)
        for layer in self.net.weight_layers():
            layer.weight = layer.weight.to(device)
            if hasattr(layer, "tile"):
                layer.tile = config.int8_tile
        self.bp_layers = resolve_bp_layers(config, len(self.net.weight_layers()))
        self.optimizer = IntElasticZO(self.net, self.bp_layers, eps=1, zo_shift=config.int8_zo_shift,
                                      mu=config.int8_lr_bits, seed=config.seed)
        self.base_mu, self.base_zo_shift, self.schedule = config.int8_lr_bits, config.int8_zo_shift, config.schedule

    def set_progress(self, progress: float) -> None:
        """Step decay of the integer learning rates, the integer twin of the float schedules:
        with ``--schedule cosine`` both halve at 50 % and again at 75 % of the run (the NITI
        bit width mu drops by one bit, the ZO shift grows by one)."""
        drops = int(progress >= 0.5) + int(progress >= 0.75) if self.schedule != "constant" else 0
        self.optimizer.mu = max(1, self.base_mu - drops)
        self.optimizer.zo_shift = self.base_zo_shift + drops

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One integer step; the returned loss is converted to mean nats for the logs only."""
        loss = self.optimizer.step(quantize_input(x), y)
        return loss_to_nats(loss) / x.shape[0]

    def step_record(self) -> torch.Tensor | None:
        d = self.optimizer.last_d
        return None if d is None or not self.optimizer.zo_layers else d.reshape(1)

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.optimizer.forward(quantize_input(x)).values.argmax(dim=1)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {f"model.{i}.weight": layer.weight for i, layer in enumerate(self.net.weight_layers())}
        tensors["optim.d_scale"] = self.optimizer.d_scale
        tensors.update({f"optim.{i}.carry": c for i, c in enumerate(self.optimizer.carries)})
        return tensors

    def state_meta(self) -> dict:
        return {"steps": [self.optimizer.step_count],
                "weight_exponents": [layer.weight_exponent for layer in self.net.weight_layers()]}

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict, path) -> None:
        layers = self.net.weight_layers()
        for i, layer in enumerate(layers):
            value = tensors.get(f"model.{i}.weight")
            if value is None or value.shape != layer.weight.shape or value.dtype != torch.int8:
                raise CheckpointError(f"{path}: model.{i}.weight is missing or not int8 {tuple(layer.weight.shape)}")
            layer.weight = value.to(layer.weight.device).clone()
        if meta.get("weight_exponents") != [layer.weight_exponent for layer in layers]:
            raise CheckpointError(f"{path}: weight exponents {meta.get('weight_exponents')} do not fit the model")
        self.optimizer.d_scale = tensors["optim.d_scale"].to(self.optimizer.d_scale.device).clone()
        for i, carry in enumerate(self.optimizer.carries):
            saved = tensors.get(f"optim.{i}.carry")
            if saved is None or saved.shape != carry.shape:
                raise CheckpointError(f"{path}: optim.{i}.carry is missing or has the wrong shape")
            carry.copy_(saved)
        self.optimizer.step_count = meta["steps"][0]
