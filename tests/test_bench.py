"""`elasticzo bench` end to end (quick mode, real data), its peers, ratios and memory rankings.

No wall-clock time is asserted: timings only have to be finite and positive.
"""
from __future__ import annotations

import csv
import importlib.util
import json
import math

import pytest
import torch
import torch.nn.functional as F

from elasticzo.bench.peer import MeZOPeer, PlainBPLoop, forward_loss
from elasticzo.bench.plan import measure_splits
from elasticzo.bench.grid import GRID_METHODS, BenchConfig, Method, grid_methods, parse_overrides
from elasticzo.bench.measure import time_interleaved
from elasticzo.bench.ratios import compute_ratios
from elasticzo.bench.runner import run_bench
from elasticzo.cli import build_parser, main
from elasticzo.config import TrainConfig
from elasticzo.models import LeNet5, build_model
from elasticzo.optim.elastic import ElasticZO
from elasticzo.train.learner import Learner, seeded

HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
FP32_LABELS = ["BP", "ZO", "ElasticZO k=1", "ElasticZO k=2", "ElasticZO k=3"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def quick(tmp_path_factory, data_root):
    """One quick bench through the CLI, shared by the end-to-end checks."""
    out = tmp_path_factory.mktemp("bench")
    argv = ["bench", "--quick", "--precision", "fp32", "--out", str(out), "--data-root", str(data_root),
            "--no-download", "--timing-steps", "8", "--warmup", "2"]
    if not HAS_MATPLOTLIB:
        argv.append("--no-plots")
    threads = torch.get_num_threads()
    assert main(argv) == 0
    assert torch.get_num_threads() == threads  # the bench gives the thread setting back
    return out, json.loads((out / "results.json").read_text())


def test_quick_bench_writes_every_file(quick):
    out, results = quick
    for name in ("results.json", "results.csv", "results.md"):
        assert (out / name).stat().st_size > 0
    if HAS_MATPLOTLIB:
        for fig in ("accuracy_vs_epoch", "accuracy_vs_memory", "time_per_phase"):
            assert (out / f"{fig}.png").stat().st_size > 0 and (out / f"{fig}.svg").stat().st_size > 0
    assert results["meta"]["command"].startswith("elasticzo bench --quick")
    assert not [n for n in results["notes"] if "INT8" in n]  # no INT8 row failed or was left out


def test_quick_bench_records_the_cpu_with_its_timings(quick):
    out, results = quick
    cpu = results["meta"]["cpu"]
    assert cpu["model"] and isinstance(cpu["simd"], list) and cpu["cores"] >= 1
    assert f"Machine: {cpu['model']}" in (out / "results.md").read_text()


def test_quick_bench_table_has_every_row_and_finite_numbers(quick):
    out, results = quick
    md = (out / "results.md").read_text()
    for dataset in ("mnist", "fashion-mnist"):
        for label in FP32_LABELS:
            assert f"| {dataset} | {label} |" in md
    for label in ("one forward pass", "MeZO peer (reference form)", "plain PyTorch BP loop"):
        assert label in md
    assert len(results["runs"]) == 10
    for run in results["runs"]:
        assert len(run["acc_per_epoch"]) == 1 and 0 <= run["final_acc"] <= 100
        assert all(math.isfinite(s) and s > 0 for s in run["epoch_seconds"])
    for m in results["measurements"].values():
        assert m["peak_bytes"] > 0 and sum(m["breakdown"].values()) == m["peak_bytes"]
        assert math.isfinite(m["median_step_ms"]) and m["median_step_ms"] > 0 and m["steps"] == 8
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert {r["method"] for r in rows} >= {"bp-fp32", "zo-fp32", "k1-fp32", "mezo", "plain_bp", "forward"}


def test_quick_bench_memory_and_ratios(quick):
    _, results = quick
    peak = {k: m["peak_bytes"] for k, m in results["measurements"].items()}
    assert peak["zo-fp32"] <= peak["k1-fp32"] <= peak["k2-fp32"] <= peak["k3-fp32"] <= peak["bp-fp32"]
    assert peak["zo-fp32"] < peak["bp-fp32"]
    assert peak["bp-fp32"] == peak["plain_bp"]  # our BP mode holds exactly what the plain loop holds
    ratios = {r["name"]: r for r in results["ratios"]}
    for name in ("zo_step_over_forward", "mezo_over_ours", "k1_memory_overhead_pct", "bp_over_plain"):
        assert math.isfinite(ratios[name]["value"]) and ratios[name]["met"] in (True, False)
    assert results["restore_drift"]["ours_max_abs"] == 0.0


def test_vanilla_zo_costs_inference_memory_and_less_than_bp():
    """Vanilla ZO holds what one forward pass holds, plus at most one layer's perturbed weights."""
    rows = {r.k: r.peak_bytes for r in measure_splits("lenet5", batch_size=8)}
    model = LeNet5()
    x, y = torch.randn(8, 1, 28, 28), torch.arange(8) % 10
    from elasticzo.bench.memory import measure_step_memory

    forward = measure_step_memory(lambda: forward_loss(model, x, y), params=model, inputs=(x, y)).peak_bytes
    largest_layer = max(m.weight.numel() + m.bias.numel() for m in model if hasattr(m, "weight")) * 4
    assert forward <= rows[0] <= forward + largest_layer
    assert rows[0] < rows[5]
    assert all(rows[k] <= rows[k + 1] for k in range(5))


def test_mezo_perturbation_drifts_in_float32_ours_is_exact():
    torch.manual_seed(0)
    drift = MeZOPeer(LeNet5(), eps=1e-3).restore_drift(repeats=5)
    assert drift > 0.0  # measured about 1.5e-8 after 1 round, 2e-7 after 50: (+eps z - 2 eps z + eps z) != 0
    model = LeNet5()
    before = [p.detach().clone() for p in model.parameters()]
    opt = ElasticZO.for_model(model, 0, lr_zo=0.0, eps=1e-3)
    x, y = torch.randn(8, 1, 28, 28), torch.arange(8) % 10
    for _ in range(20):
        opt.step(lambda backward=False: F.cross_entropy(model(x), y))
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_mezo_peer_applies_the_mezo_update_rule():
    """In float64 (no visible drift) one step is theta - lr * g * z, z from torch.manual_seed(seed)."""
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10)).double()
    x, y = torch.randn(4, 1, 28, 28, dtype=torch.float64), torch.arange(4)
    peer = MeZOPeer(model, lr=0.1, eps=1e-3, seed=3)
    theta = [p.detach().clone() for p in model.parameters()]
    seed = MeZOPeer(model, seed=3)._seeds.randrange(10**9)  # the seed the peer's first step draws
    torch.manual_seed(seed)
    z = [torch.normal(0, 1, size=p.shape, dtype=p.dtype) for p in theta]
    loss = lambda s: F.cross_entropy(torch.func.functional_call(
        model, {n: t + s * 1e-3 * d for (n, _), t, d in zip(model.named_parameters(), theta, z)}, (x,)), y)
    g = float((loss(1) - loss(-1)) / 2e-3)
    peer.step(x, y)
    for p, t, d in zip(model.parameters(), theta, z):
        torch.testing.assert_close(p, t - 0.1 * g * d, rtol=0, atol=1e-12)


def test_our_bp_mode_equals_the_plain_pytorch_loop_bit_for_bit():
    x, y = torch.randn(16, 1, 28, 28), torch.arange(16) % 10
    ours = Learner(TrainConfig(method="bp", lr_bp=0.02, momentum=0.9), 10, torch.device("cpu"))
    with seeded(0):
        model = build_model("lenet5", 10)
    plain = PlainBPLoop(model, lr=0.02, momentum=0.9)
    for _ in range(3):
        ours.train_step(x, y)
        plain.step(x, y)
    assert all(torch.equal(a, b) for a, b in zip(ours.model.parameters(), model.parameters()))


def test_time_interleaved_runs_warmup_then_rounds():
    calls = {"a": 0, "b": 0}

    def count(key):
        def step():
            calls[key] += 1
        return step

    reports = time_interleaved({"a": count("a"), "b": count("b")}, total=5, warmup=2, rounds=2)
    assert calls == {"a": 2 + 6, "b": 2 + 6}  # 5 steps in 2 rounds: 3 per round
    assert reports["a"].steps == 6 and reports["a"].median_step_s >= 0


def test_ratios_from_measurements():
    meas = {k: {"median_step_ms": ms, "peak_bytes": peak, "label": k}
            for k, ms, peak in (("zo-fp32", 10.0, 1000), ("k1-fp32", 11.0, 1010), ("bp-fp32", 10.4, 3000),
                                ("forward", 4.0, 900), ("mezo", 14.0, 950), ("mezo_inplace", 12.0, 950),
                                ("plain_bp", 10.0, 3000))}
    runs = [{"dataset": "mnist", "method": "zo-fp32", "final_acc": 80.0},
            {"dataset": "mnist", "method": "k1-fp32", "final_acc": 86.0}]
    r = {e["name"]: e for e in compute_ratios(meas, runs)}
    assert r["zo_step_over_forward"]["value"] == 2.5 and r["zo_step_over_forward"]["met"] is False
    assert r["mezo_over_ours"]["value"] == 1.4 and r["mezo_over_ours"]["met"] is True
    assert r["mezo_inplace_over_ours"]["met"] is False
    assert r["k1_memory_overhead_pct"]["value"] == pytest.approx(1.0) and r["k1_memory_overhead_pct"]["met"]
    assert r["bp_over_plain"]["value"] == pytest.approx(1.04) and r["bp_over_plain"]["met"]
    assert r["mnist_k1-fp32_acc_gain"]["value"] == 6.0


def test_grid_has_a_row_per_method_and_precision():
    methods = grid_methods(BenchConfig(precision="all", methods=("zo", "k2")).resolved())
    assert [m.key for m in methods] == ["zo-fp32", "k2-fp32", "zo-int8", "k2-int8"]
    assert [m.key for m in grid_methods(BenchConfig(precision="int8", methods=("bp",)).resolved())] == ["bp-int8"]


def test_int8_measurements_when_the_learner_exists(tmp_path, data_root):
    results = run_bench(BenchConfig(out=str(tmp_path), quick=True, precision="all", methods=("zo", "k1"),
                                    datasets=("mnist",), train_grid=False, timing_steps=3, warmup=1, rounds=1,
                                    data_root=str(data_root), download=False, plots=False), log=lambda _: None)
    assert not [n for n in results["notes"] if "INT8" in n]  # a failure would be noted, its row left out
    for key in ("zo-int8", "k1-int8"):
        m = results["measurements"][key]
        assert m["peak_bytes"] > 0 and math.isfinite(m["median_step_ms"]) and m["label"].startswith("INT8")
    assert any(r["name"] == "k1_int8_memory_gain" for r in results["ratios"])


def test_bench_settings_are_checked():
    assert parse_overrides(["lr_zo=3e-4", "normalize=true", "noise=rademacher", "queries=2"]) == \
        {"lr_zo": 3e-4, "normalize": True, "noise": "rademacher", "queries": 2}
    for bad in (["lr_zo"], ["nope=1"], ["queries=two"], ["normalize=maybe"]):
        with pytest.raises(ValueError, match="--set"):
            parse_overrides(bad)
    for cfg, match in ((BenchConfig(datasets=("cifar",)), "--datasets"), (BenchConfig(methods=("k9",)), "--methods"),
                       (BenchConfig(overrides={"epochs": 3}), "--set"), (BenchConfig(epochs=0), "--epochs")):
        with pytest.raises(ValueError, match=match):
            cfg.resolved()
    assert Method("k2", "int8").label == "INT8 ElasticZO k=2"


def test_cli_choices_match_the_runner():
    bench = build_parser()._subparsers._group_actions[0].choices["bench"]
    flags = {a.dest: a for a in bench._actions}
    assert tuple(flags["methods"].choices) == tuple(GRID_METHODS) and tuple(flags["methods"].default) == tuple(GRID_METHODS)


def test_cli_bench_reports_bad_settings_without_traceback(capsys):
    assert main(["bench", "--quick", "--set", "epochs=2", "--out", "unused"]) == 2
    assert "--set: epochs" in capsys.readouterr().err


def test_bench_into_an_existing_out_says_what_it_reuses_and_keeps_the_earlier_rows(tmp_path, data_root):
    """A second bench into the same --out: the reused run is named, the earlier rows stay, the paths are printed."""
    small = dict(out=str(tmp_path), quick=True, precision="fp32", methods=("k1",), train_limit=64, test_limit=32,
                 epochs=1, timing_steps=2, warmup=1, rounds=1, data_root=str(data_root), download=False, plots=False)
    run_bench(BenchConfig(**small, datasets=("mnist",)), log=lambda _: None)
    lines: list[str] = []
    results = run_bench(BenchConfig(**small, datasets=("mnist", "fashion-mnist")), log=lines.append)
    assert {(r["dataset"], r["method"]) for r in results["runs"]} == {("mnist", "k1-fp32"), ("fashion-mnist", "k1-fp32")}
    assert any("reusing the existing run" in line and "mnist-k1-fp32" in line for line in lines)
    assert any("reused the existing run" in n for n in results["notes"])
    assert str(tmp_path / "results.json") in lines[-1] and str(tmp_path / "runs") in lines[-1]
    lines.clear()
    third = run_bench(BenchConfig(**small, datasets=("fashion-mnist",)), log=lines.append)  # a smaller grid
    assert {r["dataset"] for r in third["runs"]} == {"mnist", "fashion-mnist"}  # the report did not shrink
    assert any(n.startswith("Kept from the earlier report") and "mnist ElasticZO k=1" in n for n in third["notes"])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert len(saved["runs"]) == 2
