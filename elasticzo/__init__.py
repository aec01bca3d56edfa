"""elasticzo: ElasticZO and ElasticZO-INT8 on-device training."""
__version__ = "0.1.0"


def __getattr__(name: str):
    """``elasticzo.load_model``, imported on first use (``import elasticzo`` stays light for the CLI)."""
    if name == "load_model":
        from elasticzo.train.inference import load_model

        return load_model
    raise AttributeError(f"module 'elasticzo' has no attribute {name!r}")
