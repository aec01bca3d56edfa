"""`elasticzo plan`: size parsing, measured memory per split, and the choice of the largest split."""
from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from elasticzo.bench.plan import (UNITS, choose_plan, largest_fitting, measure_split, measure_splits, micro_candidates,
                                  parse_size, train_command)
from elasticzo.bench.process_memory import step_peaks
from elasticzo.cli import main

BATCH = 4  # small batch: the whole table is measured in a second or two


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def rows():
    return measure_splits("lenet5", batch_size=BATCH, precision="fp32")


@pytest.mark.parametrize("text, expected", [
    ("256KiB", 256 * 1024), ("3MB", 3_000_000), ("1.5MiB", 1_572_864), ("1000000", 1_000_000),
    ("2 kB", 2000), ("2KB", 2000), (" 1gib ", 2**30), ("10B", 10), (".5KiB", 512),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "abc", "12XB", "-5", "0", "0KiB", "1.5B", "1..2MB", "1e6", "KiB", "nan", "inf",
                                  "3 MB s"])
def test_parse_size_rejects_garbage_with_a_clear_error(text):
    with pytest.raises(ValueError, match="--budget"):
        parse_size(text)


@given(st.integers(1, 10**6), st.sampled_from(sorted(u for u in UNITS if u)))
def test_parse_size_integer_times_unit(n, unit):
    assert parse_size(f"{n}{unit}") == n * UNITS[unit]
    assert parse_size(f"{n}{unit.upper()}") == n * UNITS[unit]


def test_every_split_is_measured(rows):
    assert [r.k for r in rows] == list(range(6))  # LeNet-5: five parametrised layers
    assert rows[1].bp_layers == ("Linear(84->10)",) and rows[0].bp_layers == ()
    assert all(sum(r.breakdown.values()) == r.peak_bytes for r in rows)
    assert rows[0].breakdown["gradients"] == 0 and rows[5].breakdown["saved_for_backward"] > 0
    # reproducible: test_cli_plan_picks_the_split re-measures and must land between the same values


def test_largest_split_for_a_budget_between_two_measured_values(rows):
    peaks = sorted({r.peak_bytes for r in rows})
    for low, high in zip(peaks, peaks[1:]):
        budget = (low + high) // 2
        expected = max(r.k for r in rows if r.peak_bytes <= low)
        assert largest_fitting(rows, budget).k == expected
    assert largest_fitting(rows, peaks[-1]).k == 5
    assert largest_fitting(rows, peaks[0] - 1) is None


def test_cli_plan_picks_the_split(rows, capsys):
    k = 2
    budget = (rows[k].peak_bytes + rows[k + 1].peak_bytes) // 2
    assert rows[k].peak_bytes < budget < rows[k + 1].peak_bytes
    assert main(["plan", "--batch-size", str(BATCH), "--budget", str(budget), "--precision", "fp32"]) == 0
    out = capsys.readouterr().out
    assert f"plan fp32: k={k} " in out and "--bp-layers 2" in out


def test_cli_plan_when_nothing_fits(capsys):
    assert main(["plan", "--model", "mlp", "--batch-size", str(BATCH), "--budget", "1KiB", "--precision", "fp32"]) == 1
    err = capsys.readouterr().err
    assert "nothing fits in 1.00 KiB" in err and "k=0 with micro-batch 1" in err and "lower --batch-size" in err


def test_cli_plan_bad_budget_and_settings(capsys):
    assert main(["plan", "--budget", "lots"]) == 2
    assert "--budget: cannot read 'lots'" in capsys.readouterr().err
    assert main(["plan", "--set", "bp_layers=2"]) == 2
    assert "--set: bp_layers" in capsys.readouterr().err


def test_int8_plan():
    rows = measure_splits("mlp", batch_size=BATCH, precision="int8")
    assert [r.k for r in rows] == list(range(4)) and all(r.peak_bytes > 0 for r in rows)
    assert [len(r.bp_layers) for r in rows] == [0, 1, 2, 3]  # the named BP layers follow k


def test_micro_candidates():
    assert micro_candidates(64) == [1, 2, 4, 8, 16, 32, 64]
    assert micro_candidates(10) == [1, 2, 4, 8, 10] and micro_candidates(1) == [1]


def test_micro_batches_lower_the_measured_peak():
    whole = measure_split("lenet5", 8, "int8", 1)
    chunked = measure_split("lenet5", 8, "int8", 1, micro_batch=1)
    assert chunked.peak_bytes < whole.peak_bytes  # at batch 8 the ZO weights dominate; the activations shrink
    assert chunked.breakdown["workspace"] + chunked.breakdown["inputs"] < whole.breakdown["workspace"] + whole.breakdown["inputs"]
    assert chunked.breakdown["inputs"] < whole.breakdown["inputs"]  # streamed: indices and labels only


def test_plan_picks_most_bp_layers_then_largest_chunk_then_faster_options():
    big = measure_split("mlp", 4, "int8", 3).peak_bytes
    plan, tried = choose_plan("mlp", 4, "int8", big)
    assert (plan.k, plan.micro_batch) == (3, 0)  # everything fits whole
    k0_m1 = measure_split("mlp", 4, "int8", 0, micro_batch=1).peak_bytes
    k0_m2 = measure_split("mlp", 4, "int8", 0, micro_batch=2).peak_bytes
    budget = (k0_m1 + k0_m2) // 2
    assert k0_m1 < budget < k0_m2
    plan, tried = choose_plan("mlp", 4, "int8", budget)
    assert plan.k == 0 and plan.micro_batch == 1 and plan.peak_bytes <= budget
    assert all(r.peak_bytes > budget for r in tried if r.k > 0)  # every larger split was too big
    assert "--micro-batch 1" in train_command("mlp", 4, "int8", plan)


def test_outside_views_of_a_step_see_its_allocations():
    x = torch.zeros(1)
    peaks = step_peaks(lambda: torch.ones(1 << 20).sum() + x, warmup=0)  # a 4 MiB temporary
    assert 4 * 2**20 <= peaks["allocator_step_bytes"] < 5 * 2**20
    if peaks["rss_step_bytes"] is not None:
        assert peaks["rss_step_bytes"] >= 3 * 2**20  # pages, after malloc_trim: the temporary was resident


def test_budget_accuracy_comes_from_the_plans_own_run(tmp_path):
    """FP32 chunks change the float sums, so an FP32 plan needs its own run; an INT8 plan may use the
    unchunked run of its split (bit-identical), but prefers its own."""
    from elasticzo.bench.budgets import accuracy

    def write(name, acc, epochs=5):
        (tmp_path / name).mkdir()
        lines = [json.dumps({"epoch": e, "test_acc": acc}) for e in range(1, epochs + 1)]
        (tmp_path / name / "metrics.jsonl").write_text("\n".join(lines) + "\n")

    write("mnist-fp32-k1", 80.0)
    write("mnist-int8-k1", 90.0)
    write("mnist-int8-k2-mb4", 95.0)
    write("mnist-int8-k2", 94.0)
    write("mnist-int8-k3", 97.0, epochs=3)  # unfinished: no accuracy
    assert accuracy(tmp_path, "fp32", 1, 4) == (None, None)
    assert accuracy(tmp_path, "fp32", 1, 0) == (80.0, "mnist-fp32-k1")
    assert accuracy(tmp_path, "int8", 1, 2) == (90.0, "mnist-int8-k1")
    assert accuracy(tmp_path, "int8", 2, 4) == (95.0, "mnist-int8-k2-mb4")
    assert accuracy(tmp_path, "int8", 3, 2) == (None, None)
    assert accuracy(None, "int8", 1, 0) == (None, None)
