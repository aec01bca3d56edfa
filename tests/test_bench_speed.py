"""The speed bench runs end to end at toy size and reports every ratio (no timing is asserted)."""
from __future__ import annotations

import json

from elasticzo.bench import speed


def test_speed_bench_writes_every_ratio(tmp_path, data_root, one_thread):
    assert speed.main(["--data-root", str(data_root), "--batch-sizes", "64", "--rounds", "1", "--steps", "1",
                       "--out", str(tmp_path), "--profile"]) == 0
    results = json.loads((tmp_path / "speed.json").read_text())
    ratios = results["results"]["64"]["ratios"]
    assert set(ratios) == {name for name, *_ in speed.RATIOS}
    assert all(r > 0 for r in ratios.values())
    assert results["meta"]["cpu"]["model"] and "FP32 / INT8 step, NITI-BP" in (tmp_path / "speed.md").read_text()
    profile = (tmp_path / "profile.txt").read_text()
    assert "ZO step, LeNet-5" in profile and "ZO step, 1M MLP" in profile and "tottime" in profile


def test_median_ratio_is_the_median_of_per_round_ratios():
    times = {"a": [2.0, 9.0, 3.0], "b": [1.0, 3.0, 1.0]}  # per-round ratios 2, 3, 3
    assert speed.median_ratio(times, "a", "b") == 3.0
