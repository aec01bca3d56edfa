"""Micro-batched INT8 step of LeNet-5 (batch 64): each chunk's BP weight gradient added in place into the
batch sum (``int8.microbatch.add_weight_grad``: a CPU integer addmm for chunks of up to ADDMM_TERMS
examples, else tiles of GRAD_TILE_BYTES) against the chunk's whole product added at once (the form
before 0b76380, which held the product beside the sum), interleaved in one process.

    python scripts/int8_grad_tile_step.py [rounds] >> docs/bench/int8-grad-tile-step.jsonl

One thread, thread CPU time; each round times ``reps`` steps of each variant (the order alternates per
round) on twin learners (same seed, same batch); the ratio is taken per round, then the median. The twins'
states must stay bit-identical. One JSON line per plan, with the CPU model and SIMD flags.
"""
import json
import statistics
import sys
import time

import torch

from elasticzo.bench.budgets import cpu_description
from elasticzo.bench.plan import random_batch
from elasticzo.config import TrainConfig
from elasticzo.data.stream import StreamedBatch
from elasticzo.int8 import microbatch
from elasticzo.train.loop import make_learner

PLANS = ((2, 4), (3, 1), (5, 8), (5, 32))  # (k, micro-batch): the 256 KiB, many-chunk, 512 KiB and 1 MiB plans
WHOLE = (1 << 62, 0)  # one tile, no addmm: the chunk's whole product, then added


def timed(learner, x, y, setting: tuple[int, int], reps: int) -> float:
    microbatch.GRAD_TILE_BYTES, microbatch.ADDMM_TERMS = setting
    start = time.thread_time()
    for _ in range(reps):
        learner.train_step(x, y)
    return (time.thread_time() - start) / reps


def compare(k: int, micro: int, rounds: int, reps: int = 3) -> dict:
    config = TrainConfig(precision="int8", bp_layers=k, micro_batch=micro, device="cpu").validate()
    twins = [make_learner(config, 10, torch.device("cpu")) for _ in range(2)]
    x, y = random_batch(64, "int8", 10, 0)
    x = StreamedBatch(x, torch.arange(64))
    main = (microbatch.GRAD_TILE_BYTES, microbatch.ADDMM_TERMS)
    ratios, times = [], {"in_place": [], "whole": []}
    for r in range(rounds):
        order = [("in_place", 0, main), ("whole", 1, WHOLE)][:: 1 if r % 2 == 0 else -1]
        got = {name: timed(twins[i], x, y, setting, reps) for name, i, setting in order}
        for name in got:
            times[name].append(1e3 * got[name])
        ratios.append(got["in_place"] / got["whole"])
    microbatch.GRAD_TILE_BYTES, microbatch.ADDMM_TERMS = main
    states = [t.state_tensors() for t in twins]
    same = all(torch.equal(states[0][n], states[1][n]) for n in states[0])
    return {"k": k, "micro_batch": micro, "rounds": rounds, "reps": reps, "bit_identical": same,
            "in_place_ms_median": statistics.median(times["in_place"]),
            "whole_ms_median": statistics.median(times["whole"]), "in_place_over_whole_median": statistics.median(ratios)}


def main() -> None:
    torch.set_num_threads(1)
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 7
    machine = cpu_description()
    for k, micro in PLANS:
        print(json.dumps({**compare(k, micro, rounds), "cpu": machine["cpu"], "simd": machine["simd"],
                          "torch": machine["torch"]}), flush=True)


if __name__ == "__main__":
    main()
