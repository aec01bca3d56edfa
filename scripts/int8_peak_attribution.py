"""Where the live bytes of a micro-batched INT8 step go: the tracker's breakdown at the peak, with the
allocations of the BP tail's weight-gradient products, the NITI update and the error products tagged by
the function that made them (``instrument.memory_tag``, applied here by wrapping those functions).

    python scripts/int8_peak_attribution.py K MICRO [K MICRO ...]     # e.g. 3 1 5 1

LeNet-5, batch 64, random batch, one thread; one JSON line per (K, MICRO). The sums that a
micro-batched sweep adds each chunk into are made by ``int8.microbatch.add_weight_grad`` (tagged
``grad_sums``); the chunk products it computes inside are tagged by their own function.
"""
import functools
import json
import sys

import torch

import elasticzo.int8.elastic as elastic
import elasticzo.int8.layers as layers
from elasticzo.bench.memory import measure_step_memory
from elasticzo.bench.plan import random_batch
from elasticzo.config import TrainConfig
from elasticzo.data.stream import StreamedBatch
from elasticzo.instrument import memory_tag
from elasticzo.train.loop import make_learner

TAGS = ((layers, "add_weight_grad", "grad_sums"), (layers, "int8_linear_grad_weight", "linear_grad_products"),
        (layers, "int8_conv2d_grad_weight", "conv_grad_products"), (elastic, "niti_update", "niti_update"),
        (layers, "int8_linear_grad_input", "error_products"), (layers, "int8_conv2d_grad_input_requant", "error_products"))


def tag(module, name: str, label: str) -> None:
    """Charge the allocations of ``module.name`` to ``label`` (the innermost tag wins)."""
    if not hasattr(module, name):
        return
    fn = getattr(module, name)

    @functools.wraps(fn)
    def tagged(*args, **kwargs):
        with memory_tag(label):
            return fn(*args, **kwargs)

    setattr(module, name, tagged)


def attribute(k: int, micro: int) -> dict:
    config = TrainConfig(precision="int8", bp_layers=k, micro_batch=micro, device="cpu").validate()
    learner = make_learner(config, 10, torch.device("cpu"))
    x, y = random_batch(64, "int8", 10, 0)
    x = StreamedBatch(x, torch.arange(64)) if micro else x
    inputs = (x.index, y) if micro else (x, y)
    mem = measure_step_memory(lambda: learner.train_step(x, y), params=learner.model, optimizer=learner.optimizer,
                              inputs=inputs)
    return {"k": k, "micro_batch": micro, "peak_bytes": mem.peak_bytes,
            "at_peak": {c: n for c, n in mem.breakdown_at_peak.items() if n}}


def main(argv: list[str]) -> None:
    torch.set_num_threads(1)
    for module, name, label in TAGS:
        tag(module, name, label)
    pairs = [int(a) for a in argv] or [3, 1, 5, 1]
    for k, micro in zip(pairs[::2], pairs[1::2]):
        print(json.dumps(attribute(k, micro)), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
