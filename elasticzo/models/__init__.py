"""Models and their structural split into ZO and BP layers."""
from torch import nn

from elasticzo.models.layers import layer_params, parametrised_layers, split_layers
from elasticzo.models.lenet import LeNet5
from elasticzo.models.mlp import MLP
from elasticzo.models.pointnet import GlobalMaxPool, PointNet

MODELS = {"lenet5": LeNet5, "mlp": MLP, "pointnet": PointNet}


def build_model(name: str, num_classes: int = 10) -> nn.Module:
    """Build a model by its CLI name."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    return MODELS[name](num_classes=num_classes)


__all__ = ["GlobalMaxPool", "LeNet5", "MLP", "PointNet", "MODELS", "build_model", "layer_params", "parametrised_layers", "split_layers"]
