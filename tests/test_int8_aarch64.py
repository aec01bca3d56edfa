"""The native kernels cross-compiled for aarch64 (+dotprod) are exact under qemu (slow: excluded by default).

Run: ``python -m pytest -m slow tests/test_int8_aarch64.py`` or ``scripts/aarch64_exactness.sh``
(needs ``apt-get install -y gcc-aarch64-linux-gnu qemu-user``). The same driver runs natively in
the default suite (``test_portable_kernels_are_exact_natively``), for the portable and the AVX2 code.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KERNELS = ROOT / "elasticzo" / "int8" / "kernels"


@pytest.mark.slow
@pytest.mark.skipif(not (shutil.which("aarch64-linux-gnu-gcc") and shutil.which("qemu-aarch64")),
                    reason="needs gcc-aarch64-linux-gnu and qemu-user")
def test_aarch64_dotprod_kernels_are_exact_under_qemu():
    res = subprocess.run([str(ROOT / "scripts" / "aarch64_exactness.sh")], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "0 of" in res.stdout and " 0 sdot" not in res.stdout


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")
@pytest.mark.parametrize("flags", [[], ["-march=native"]], ids=["portable", "native"])
def test_portable_kernels_are_exact_natively(flags, tmp_path):
    exe = tmp_path / "exactness"
    subprocess.run(["cc", "-O2", *flags, str(KERNELS / "exactness.c"), "-o", str(exe)], check=True, timeout=300)
    res = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "0 of" in res.stdout, res.stdout
