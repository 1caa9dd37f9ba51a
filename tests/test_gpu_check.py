"""benchmarks/gpu_check.py: fails fast and clearly without a GPU, and its checks (EP, bitwise
repeatability, batch independence, parity, served = raw, the benchmark table) run end to end on
the CPU EP, so the script is known to work before it meets a GPU."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from service.launcher import ROOT

SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine has a GPU")
def test_without_a_gpu_it_fails_fast_and_says_why():
    result = subprocess.run(
        [sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 2
    assert "no NVIDIA GPU" in result.stderr
    assert "--cpu" in result.stderr


def test_cpu_mode_runs_every_check_and_prints_the_table():
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--cpu", "--no-install", "--size", "32",
         "--iterations", "4", "--rounds", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    for check in (
        "session runs on CPUExecutionProvider",
        "bitwise repeatability",
        "batch independence",
        "parity with the CPU EP",
        "served output is bitwise the raw session's (HTTP, batch 8)",
    ):
        assert f"[ok] {check}" in out, out
    assert "HTTP binary" in out
    assert "raw session.run" in out
    assert "gpu_check: PASSED" in out
