"""The INT8 loss's batch sum: the device path's 32-bit tensor halves against the CPU's Python integers.

    OMP_NUM_THREADS=1 python scripts/int8_loss_sum_ab.py

Interleaved, 15 rounds of 2000 calls each, thread CPU time; prints the median microseconds a call.
"""
import statistics, time, torch
from elasticzo.int8 import loss as L
torch.set_num_threads(1)
for b in (16, 64):
    x = torch.randint(0, 1 << 40, (b,), dtype=torch.int64)
    r = []
    for _ in range(15):
        t0 = time.thread_time()
        for _ in range(2000): L._saturating_sum_on_device(x)
        t1 = time.thread_time()
        for _ in range(2000): L.saturating_sum(x)
        t2 = time.thread_time()
        r.append(((t1 - t0) / 2000 * 1e6, (t2 - t1) / 2000 * 1e6))
    print(b, "tensor halves us %.1f, python ints us %.1f" % (statistics.median(a for a, _ in r), statistics.median(c for _, c in r)))
