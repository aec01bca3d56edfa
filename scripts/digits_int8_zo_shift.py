"""INT8 vanilla ZO on a digits model for a list of zo_shift values, scored on a validation split.

    python scripts/digits_int8_zo_shift.py cnn 0,-1,-2 >> docs/bench/digits-int8-zo-shift-val.jsonl

The last fifth of the (shuffled) training split is held out and scored; the test images are not
used, so a shift picked here carries no test-set selection. 40 epochs, batch 64, eps 1, seed 0:
``examples/digits_table.py``'s ``run_int8``, one thread. One JSON line per shift.
"""
import importlib.util
import json
import sys
import time
from pathlib import Path

import torch

from elasticzo.data.digits import load_digits_split

spec = importlib.util.spec_from_file_location("digits_table", Path(__file__).resolve().parent.parent / "examples" / "digits_table.py")
digits_table = importlib.util.module_from_spec(spec)
spec.loader.exec_module(digits_table)

torch.set_num_threads(1)
x, y, _, _ = load_digits_split(0)
n_val = len(y) // 5  # the last fifth of the (already shuffled) training split: validation only
data = (x[:-n_val], y[:-n_val], x[-n_val:], y[-n_val:])
model = sys.argv[1]
for shift in map(int, sys.argv[2].split(",")):
    t = time.time()
    acc = digits_table.run_int8(model, 0, 40, shift, 0, data)
    print(json.dumps(dict(model=model, k=0, zo_shift=shift, eps=1, val_acc=acc, train=len(data[1]), val=n_val,
                          s=round(time.time() - t))), flush=True)
