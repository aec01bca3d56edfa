"""elasticzo: ElasticZO and ElasticZO-INT8 on-device training.

The public names load on first use, so ``import elasticzo`` stays light for the CLI and
``import elasticzo.optim`` pulls in nothing else::

    from elasticzo import ElasticZO, IntElasticZO, convert, TrainConfig, train, load_model
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "ElasticZO": "elasticzo.optim.elastic",
    "IntElasticZO": "elasticzo.int8.elastic",
    "convert": "elasticzo.int8.convert",
    "TrainConfig": "elasticzo.config",
    "train": "elasticzo.train.loop",
    "load_model": "elasticzo.train.inference",
}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'elasticzo' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
