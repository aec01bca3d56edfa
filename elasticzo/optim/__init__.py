"""Optimisers: ElasticZO (vanilla ZO at bp_layers=0, SGD at bp_layers=all) and its Reference twin."""
from elasticzo.optim.elastic import ElasticZO
from elasticzo.optim.reference import ReferenceElasticZO

__all__ = ["ElasticZO", "ReferenceElasticZO"]
