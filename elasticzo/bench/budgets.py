"""Training in a memory budget: the plan at each budget, measured three ways, timed, with its accuracy.

For every budget and precision: ``choose_plan`` (measured, shared measurements across budgets),
then for the chosen (split, micro-batch, options) the peak memory three ways (live tensors,
allocator, resident high water: ``bench.process_memory``), the median step time over
``steps`` steps (one thread), and the 5-epoch test accuracy read from a run directory when one
is given. Writes ``results.json`` and ``results.md`` to ``out``.

    python -m elasticzo.bench.budgets --out docs/bench/budgets --runs docs/bench/plan256

A plan's run is looked up as ``<runs>/mnist-<precision>-k<k>-mb<micro>/metrics.jsonl`` (no
``-mb`` suffix for the whole batch). An INT8 plan may also take the unchunked run
``mnist-int8-k<k>``: its micro-batched step is bit-identical to the unchunked one
(tests/test_microbatch.py), so one trajectory serves every chunk size. FP32 chunks change the
float summation order, so an FP32 plan needs its own run.

``--ratios M`` instead measures the FP32 / INT8 ratio of the live-tensor peaks at every split at
micro-batch M (where the parameters and their state dominate) and writes ``ratios.json``/``.md``.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from elasticzo.bench.memory import PERSISTENT
from elasticzo.bench.plan import choose_plan, format_size, measure_splits, parse_size, random_batch, train_command
from elasticzo.bench.process_memory import step_peaks
from elasticzo.config import TrainConfig
from elasticzo.data.stream import StreamedBatch
from elasticzo.train.loop import make_learner

BUDGETS = ("256KiB", "512KiB", "1MiB", "2.5MiB")


def cpu_description() -> dict:
    """CPU model and the SIMD flags that matter for int8 / fp32 kernels (from /proc/cpuinfo)."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), platform.processor())
    flags = next((ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), [])
    simd = [f for f in flags if f.startswith(("avx", "sse4", "fma", "amx")) or f in ("vnni", "avx_vnni")]
    return {"cpu": model, "simd": simd, "torch": torch.__version__, "threads": torch.get_num_threads()}


def measure_plan(model: str, batch_size: int, precision: str, row, steps: int) -> dict:
    """Outside views of the peak and the median step time of a plan (``row``: a SplitMemory)."""
    config = TrainConfig(model=model, batch_size=batch_size, precision=precision, method="elasticzo", bp_layers=row.k,
                         micro_batch=row.micro_batch, device="cpu", **row.options).validate()
    learner = make_learner(config, 10, torch.device("cpu"))
    x, y = random_batch(batch_size, precision, 10, 0, model)
    if row.micro_batch:
        x = StreamedBatch(x, torch.arange(batch_size))
    peaks = step_peaks(lambda: learner.train_step(x, y))
    times = []
    for _ in range(steps):  # thread CPU time: the other jobs of a shared machine do not inflate it
        start = time.thread_time()
        learner.train_step(x, y)
        times.append(time.thread_time() - start)
    return {**peaks, "step_ms": 1e3 * statistics.median(times), "steps_timed": steps}


def run_names(precision: str, k: int, micro_batch: int) -> list[str]:
    """Run directories whose 5-epoch accuracy is that of the plan, preferred first."""
    names = [f"mnist-{precision}-k{k}" + (f"-mb{micro_batch}" if micro_batch else "")]
    if precision == "int8" and micro_batch:
        names.append(f"mnist-int8-k{k}")  # bit-identical trajectory (tests/test_microbatch.py)
    return names


def accuracy(runs: Path | None, precision: str, k: int, micro_batch: int = 0) -> tuple[float | None, str | None]:
    """(test accuracy after epoch 5, the run it came from) of the plan's run under ``runs``."""
    for name in run_names(precision, k, micro_batch) if runs else []:
        path = runs / name / "metrics.jsonl"
        if not path.exists():
            continue
        lines = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
        if lines and lines[-1]["epoch"] == 5:
            return lines[-1]["test_acc"], name
    return None, None


def run(out: Path, runs: Path | None, budgets=BUDGETS, model="lenet5", batch_size=64, steps=5, log=print,
        precisions=("int8", "fp32")) -> list[dict]:
    torch.set_num_threads(1)
    out.mkdir(parents=True, exist_ok=True)
    results, memo, timed = [], {}, {}
    for precision in precisions:
        for text in budgets:
            budget = parse_size(text)
            best, _ = choose_plan(model, batch_size, precision, budget, memo=memo, log=log)
            entry = {"budget": text, "budget_bytes": budget, "precision": precision, "plan": None}
            if best is not None:
                key = (precision, best.k, best.micro_batch, tuple(sorted(best.options.items())))
                if key not in timed:
                    timed[key] = measure_plan(model, batch_size, precision, best, steps)
                acc, source = accuracy(runs, precision, best.k, best.micro_batch)
                entry.update(plan={"k": best.k, "micro_batch": best.micro_batch, "options": best.options},
                             tensor_peak_bytes=best.peak_bytes, breakdown=best.breakdown, **timed[key],
                             resident_bytes=sum(best.breakdown.get(c, 0) for c in PERSISTENT),  # as the tracker saw it
                             command=train_command(model, batch_size, precision, best),
                             test_acc_5_epochs=acc, accuracy_run=source)
            results.append(entry)
            log(json.dumps(entry))
            _write(out, results)
    return results


def _write(out: Path, results: list[dict]) -> None:
    (out / "results.json").write_text(json.dumps({"machine": cpu_description(), "results": results}, indent=1) + "\n")
    lines = ["| budget | precision | k | micro-batch | options | live tensors | allocator (resident + step) | "
             "VmHWM rise | step ms | MNIST 5 ep. |", "| --- " * 10 + "|"]
    for r in results:
        if r["plan"] is None:
            lines.append(f"| {r['budget']} | {r['precision']} | nothing fits | | | | | | | |")
            continue
        p = r["plan"]
        alloc = r["resident_bytes"] + r["allocator_step_bytes"]
        rss = "n/a" if r["rss_step_bytes"] is None else format_size(r["rss_step_bytes"])
        acc = "-" if r["test_acc_5_epochs"] is None else f"{r['test_acc_5_epochs']:.2f}"
        options = ", ".join(f"{k}={v}" for k, v in p["options"].items()) or "-"
        lines.append(f"| {r['budget']} | {r['precision']} | {p['k']} | {p['micro_batch'] or 'all'} | {options} | "
                     f"{format_size(r['tensor_peak_bytes'])} | {format_size(alloc)} | {rss} | {r['step_ms']:.0f} | {acc} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")


def ratios(out: Path, micro_batch: int, model: str = "lenet5", batch_size: int = 64) -> list[dict]:
    """FP32 / INT8 live-tensor peak of one step at every split, both at ``micro_batch``: written to
    ``ratios.json`` and ``ratios.md`` in ``out`` (the breakdowns say where the bytes go)."""
    torch.set_num_threads(1)
    out.mkdir(parents=True, exist_ok=True)
    rows = {p: measure_splits(model, batch_size, p, micro_batch=micro_batch) for p in ("fp32", "int8")}
    found = [{"k": f.k, "micro_batch": micro_batch, "fp32_bytes": f.peak_bytes, "int8_bytes": i.peak_bytes,
              "ratio": f.peak_bytes / i.peak_bytes, "fp32": f.breakdown, "int8": i.breakdown}
             for f, i in zip(rows["fp32"], rows["int8"])]
    (out / "ratios.json").write_text(json.dumps({"machine": cpu_description(), "ratios": found}, indent=1) + "\n")
    lines = [f"| k | FP32 peak | INT8 peak | FP32 / INT8 | INT8 breakdown (micro-batch {micro_batch}) |",
             "| --- " * 5 + "|"]
    for r in found:
        parts = ", ".join(f"{c} {n:,}" for c, n in r["int8"].items() if n)
        lines.append(f"| {r['k']} | {r['fp32_bytes']:,} B | {r['int8_bytes']:,} B | {r['ratio']:.2f}x | {parts} |")
    (out / "ratios.md").write_text("\n".join(lines) + "\n")
    return found


def verify_on_mnist(data_root: str, k: int, micro_batch: int, steps: int, **options) -> dict:
    """Train ``steps`` real MNIST steps INT8 at split ``k`` twice, whole and in chunks of ``micro_batch``
    (streamed), and compare every weight, carry and loss after every step: the evidence that the
    unchunked 5-epoch run is the micro-batched plan's run."""
    from elasticzo.data.loader import BatchLoader
    from elasticzo.data.registry import load_dataset

    part = load_dataset("mnist", data_root, "train", False, None, raw=True)
    learners, losses = [], []
    for micro in (0, micro_batch):
        config = TrainConfig(precision="int8", bp_layers=k, micro_batch=micro, **options).validate()
        learners.append(make_learner(config, 10, torch.device("cpu")))
    loaders = [BatchLoader(part.x, part.y, 64, seed=0, stream=stream) for stream in (False, True)]
    batches = [loader.epoch_batches(0) for loader in loaders]
    for _ in range(steps):
        pair = [learner.train_step(*next(b)) for learner, b in zip(learners, batches)]
        losses.append([float(v) for v in pair])
        states = [learner.state_tensors() for learner in learners]
        if any(not torch.equal(states[0][name], states[1][name]) for name in states[0]) or pair[0] != pair[1]:
            return {"k": k, "micro_batch": micro_batch, "equal_steps": len(losses) - 1, "steps": steps}
    return {"k": k, "micro_batch": micro_batch, "equal_steps": steps, "steps": steps, "losses": losses}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--runs", type=Path, default=None, help="directory of 5-epoch runs mnist-<precision>-k<k>")
    parser.add_argument("--budgets", nargs="+", default=list(BUDGETS))
    parser.add_argument("--steps", type=int, default=5, help="steps timed per plan (median)")
    parser.add_argument("--precisions", nargs="+", default=["int8", "fp32"], choices=("int8", "fp32"))
    parser.add_argument("--verify", nargs=2, type=int, action="append", metavar=("K", "MICRO"), default=[],
                        help="instead: check on real MNIST that INT8 split K in chunks of MICRO equals the whole batch")
    parser.add_argument("--ratios", type=int, default=None, metavar="MICRO",
                        help="instead: FP32 / INT8 peak ratio of every split at micro-batch MICRO")
    parser.add_argument("--data-root", default=None)
    args = parser.parse_args(argv)
    if args.ratios is not None:
        print(json.dumps([{k: r[k] for k in ("k", "fp32_bytes", "int8_bytes", "ratio")}
                          for r in ratios(args.out, args.ratios)]))
        return
    if args.verify:
        torch.set_num_threads(1)
        args.out.mkdir(parents=True, exist_ok=True)
        found = [verify_on_mnist(args.data_root, k, micro, args.steps) for k, micro in args.verify]
        (args.out / "verify.json").write_text(json.dumps(found, indent=1) + "\n")
        print(json.dumps(found))
        return
    run(args.out, args.runs, args.budgets, steps=args.steps, precisions=tuple(args.precisions))


if __name__ == "__main__":
    main()
