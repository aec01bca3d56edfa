"""scripts/int8_step_profile.py: py-spy's raw stacks split into native kernels, torch below Python, Python."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "int8_step_profile.py"


@pytest.fixture(scope="module")
def profile():
    spec = importlib.util.spec_from_file_location("int8_step_profile", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


STEP = "<module> (loop.py:1);Learner.train_step (elasticzo/train/learner.py:128);"


def test_stacks_are_split_by_their_deepest_python_frame_and_outermost_kernel(profile):
    assert profile.classify(STEP + "_conv2d_requant (elasticzo/int8/native_ops.py:90);ffi_call (libffi.so);"
                            "ezo_conv2d_requant (ezo_int8.so);conv_image (ezo_int8.so)") == "native ezo_conv2d_requant"
    assert profile.classify(STEP + "random_word_rounds (elasticzo/zo/noise.py:67);"
                            "at::CPUGeneratorImpl::random64 (libtorch_cpu.so)") == "torch below Python"
    assert profile.classify(STEP + "IntElasticZO.step (elasticzo/int8/elastic.py:161)") == "Python"
    assert profile.classify("<module> (loop.py:1);loop (int8_step_profile.py:30);probe (speed_probe.py:70)") is None


def test_summary_gives_shares_of_the_step_samples(profile, tmp_path):
    raw = tmp_path / "zo.raw"
    raw.write_text(STEP + "ezo_maxpool2d (x.so) 3\n" + STEP + "f (a.py:1) 1\n" + "<module> (loop.py:1) 5\n")
    text = profile.summary(str(raw))
    assert "75.0 %  native ezo_maxpool2d" in text and "25.0 %  Python" in text
    assert "75.0 %  native kernels in all (4 samples)" in text
