"""The benchmarks still run (bench/): each in a tiny size, so a change that breaks one fails
here rather than when someone next measures. The figures themselves are not checked."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"

SMALL = {
    "fanout.py": ["--devices", "10", "--rooms", "10", "--peeks", "50"],
    "send_ingest.py": ["--events", "60"],
    "pdu_verify.py": ["--rounds", "1", "--repeat", "1"],
}


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(SMALL))
def test_a_benchmark_runs(script: str) -> None:
    result = subprocess.run(
        [sys.executable, str(BENCH / script), *SMALL[script]],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "ratio" in result.stdout, result.stdout[-2000:]
