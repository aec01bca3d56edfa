"""INT8 ElasticZO k=1 step of the digits CNN at batch 64: with biases (fused native conv), with biases on
the unfused path (what main ran before the fused conv took a bias), and without biases, interleaved.

    python scripts/digits_int8_bias_step.py [rounds] >> docs/bench/digits-int8-bias-step.jsonl

One thread; each round times ``reps`` steps of each variant in turn (the order rotates per round), and
the ratios are taken per round, then the median. One JSON line with the CPU model and SIMD flags.
"""
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

from elasticzo.data.digits import load_digits_split
from elasticzo.int8 import IntElasticZO, QTensor, convert, loss_closure
from elasticzo.int8.inputs import quantize_once
from elasticzo.int8.layers import IntConv2d
from elasticzo.models.small import SMALL_MODELS

SIMD = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avxvnni", "fma")


def cpu() -> tuple[str, list[str]]:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((l.split(":", 1)[1].strip() for l in info.splitlines() if l.startswith("model name")), "unknown")
    flags = next((l.split(":", 1)[1].split() for l in info.splitlines() if l.startswith("flags")), [])
    return model, [f for f in SIMD if f in flags]


def variant(drop_bias: bool, unfused_bias: bool, xb: QTensor, yb: torch.Tensor):
    """A step function of one freshly converted digits CNN (seed 0) and its IntElasticZO k=1."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = convert(SMALL_MODELS["cnn"](), drop_bias=drop_bias)
    if unfused_bias:  # main before the fused conv took a bias: a biased conv skipped the native kernel
        for layer in net.modules():
            if isinstance(layer, IntConv2d) and layer.bias is not None:
                layer._fused_forward = lambda *a: None
    opt = IntElasticZO.for_model(net, 1, seed=0)
    net.train()
    return lambda: opt.step(loss_closure(net, xb, yb))


def main(rounds: int = 21, reps: int = 20) -> None:
    torch.set_num_threads(1)
    x, y, _, _ = load_digits_split(0)
    xq, _ = quantize_once(x, x[:1])
    xb, yb = QTensor(xq.values[:64], xq.exponent), y[:64]
    steps = {"bias_fused": variant(False, False, xb, yb), "bias_unfused": variant(False, True, xb, yb),
             "no_bias": variant(True, False, xb, yb)}
    times = {k: [] for k in steps}
    for f in steps.values():  # warm-up: native build, speed probe, caches
        for _ in range(reps):
            f()
    for r in range(rounds):
        names = list(steps)[r % 3:] + list(steps)[: r % 3]
        for name in names:
            t = time.perf_counter()
            for _ in range(reps):
                steps[name]()
            times[name].append((time.perf_counter() - t) / reps * 1e3)
    ratio = lambda a, b: statistics.median(p / q for p, q in zip(times[a], times[b]))
    model, flags = cpu()
    print(json.dumps(dict(
        model="digits cnn", batch=64, k=1, threads=1, rounds=rounds, steps_per_round=reps,
        ms_median={k: round(statistics.median(v), 3) for k, v in times.items()},
        bias_unfused_over_no_bias=round(ratio("bias_unfused", "no_bias"), 3),
        bias_fused_over_no_bias=round(ratio("bias_fused", "no_bias"), 3),
        bias_unfused_over_fused=round(ratio("bias_unfused", "bias_fused"), 3),
        cpu=model, simd=flags, torch=torch.__version__)), flush=True)


if __name__ == "__main__":
    main(*map(int, sys.argv[1:]))
