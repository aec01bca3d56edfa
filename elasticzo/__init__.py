"""elasticzo: ElasticZO and ElasticZO-INT8 on-device training."""
__version__ = "0.1.0"
