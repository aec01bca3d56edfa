"""The README's Python blocks run as printed (a newcomer copies them first)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", README.read_text(), re.S | re.M)


def test_the_readme_has_python_blocks():
    assert BLOCKS


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_block_runs(index, data_root, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("ELASTICZO_DATA", str(Path(data_root).resolve()))  # the block runs in tmp_path
    monkeypatch.chdir(tmp_path)
    exec(compile(BLOCKS[index], f"README.md python block {index}", "exec"), {"__name__": "__readme__"})


def test_readme_results_table_is_generated_from_the_bench_results():
    """The table and its memory/time lines are exactly what the committed results.json files say."""
    from elasticzo.bench.readme import render

    block = render()
    assert block in README.read_text(), "README.md is stale: run python -m elasticzo.bench.readme"
    assert "Measured on" in block and "SIMD" in block  # the CPU the times were taken on


def test_cpu_info_reads_model_and_simd_flags(tmp_path):
    from elasticzo.bench.machine import cpu_info, describe

    fake = tmp_path / "cpuinfo"
    fake.write_text("processor\t: 0\nmodel name\t: Test CPU 9000\nflags\t\t: fpu sse4_2 avx avx2 fma\n\n"
                    "processor\t: 1\nmodel name\t: Test CPU 9000\nflags\t\t: fpu sse4_2 avx avx2 fma\n")
    info = cpu_info(fake)
    assert info["model"] == "Test CPU 9000" and info["simd"] == ["sse4_2", "avx", "avx2", "fma"]
    assert "Test CPU 9000" in describe(info) and "avx2" in describe(info)


def test_the_readme_shows_both_precisions_with_data_loading_and_a_resume():
    assert any("ElasticZO.for_model" in b and "load_split" in b for b in BLOCKS)
    assert any("IntElasticZO.for_model" in b and "load_split" in b and "load_state_dict" in b for b in BLOCKS)
