"""The live-tensor peak of INT8 LeNet-5 steps with and without the native ops' own tensors.

``bench.memory``'s tracker is a ``TorchDispatchMode``: it sees the tensors each op returns, but an
op's implementation runs with the mode popped, so the scratch a native INT8 op allocates inside
(packed operands, workspaces) is not counted, just as aten's internal buffers are not counted for
FP32. This script counts them by re-entering the mode inside ``elasticzo_int8`` ops and prints
both peaks (one JSON line per split), to show how much the live-tensor figure leaves out.

    OMP_NUM_THREADS=1 python scripts/int8_workspace_peak.py [--out FILE]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from elasticzo.bench import memory
from elasticzo.bench.plan import measure_split
from elasticzo.int8 import native_ops

SPLITS = ((2, 4), (2, 2), (2, 1), (0, 1), (1, 1), (3, 1), (5, 1), (0, 0), (1, 0), (5, 0))
_tensors_only = memory._Mode.__torch_dispatch__


def _with_op_scratch(self, func, types, args=(), kwargs=None):
    """As the tracker's dispatch, but an ``elasticzo_int8`` op runs inside the mode: its scratch counts."""
    impl = native_ops._IMPLS.get(func._opname) if getattr(func, "namespace", None) == native_ops.NAMESPACE else None
    if impl is None:
        return _tensors_only(self, func, types, args, kwargs)
    with self:
        out = impl(*args, **(kwargs or {}))
    self.tracker._on_op(func, args, kwargs, out)
    return out


def peaks(k: int, micro_batch: int) -> dict:
    row = {"k": k, "micro_batch": micro_batch}
    for name, dispatch in (("tracker", _tensors_only), ("with_op_scratch", _with_op_scratch)):
        memory._Mode.__torch_dispatch__ = dispatch
        try:
            row[name] = measure_split("lenet5", 64, "int8", k, micro_batch=micro_batch).peak_bytes
        finally:
            memory._Mode.__torch_dispatch__ = _tensors_only
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON lines here")
    args = parser.parse_args()
    lines = [json.dumps(peaks(k, mb)) for k, mb in SPLITS]
    print("\n".join(lines))
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
