"""The native kernels cross-compiled for aarch64 (+dotprod) are exact under qemu (slow: excluded by default).

Run: ``python -m pytest -m slow tests/test_int8_aarch64.py`` or ``scripts/aarch64_exactness.sh``
(needs ``apt-get install -y gcc-aarch64-linux-gnu qemu-user``). The same driver runs natively in
the default suite (``test_portable_kernels_are_exact_natively``), for the portable code, the AVX2 code
(x86-64-v3, as a CPU without AVX-512), the AVX-512 epilogues with the AVX2 product (x86-64-v4: no VNNI)
and this CPU's own (-march=native: VNNI where it has it).
"""
from __future__ import annotations

import platform
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


X86 = platform.machine() in ("x86_64", "AMD64")


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")
@pytest.mark.parametrize("flags", [[], ["-march=x86-64-v3"], ["-march=x86-64-v4"], ["-march=native"]],
                         ids=["portable", "avx2", "avx512-without-vnni", "native"])
def test_portable_kernels_are_exact_natively(flags, tmp_path):
    if flags != ["-march=native"] and flags and not X86:
        pytest.skip(f"{flags[0]} is an x86 target")
    exe = tmp_path / "exactness"
    subprocess.run(["cc", "-O2", *flags, str(KERNELS / "exactness.c"), "-o", str(exe)], check=True, timeout=300)
    res = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "0 of" in res.stdout, res.stdout
