"""The benchmarks still run (bench/): each in a tiny size, so a change that breaks one fails
here rather than when someone next measures. The figures themselves are not checked."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.proxies import proxy_binary
from tests.synapse import synapse_python

BENCH = Path(__file__).resolve().parent.parent / "bench"

SMALL = {
    "fanout.py": ["--devices", "10", "--rooms", "10", "--peeks", "50"],
    "send_ingest.py": ["--events", "60"],
    "front_overhead.py": ["--rounds", "10", "--wakes", "2"],
    "pdu_verify.py": ["--rounds", "1", "--repeat", "1"],
    "first_view.py": ["--members", "5", "--rounds", "1"],
}


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(SMALL))
def test_a_benchmark_runs(script: str) -> None:
    if script == "front_overhead.py":  # a real Synapse and nginx (skipped without, failed in CI)
        synapse_python()
        proxy_binary("nginx")
    if script == "first_view.py":  # two real Synapses
        synapse_python()
    result = subprocess.run(
        [sys.executable, str(BENCH / script), *SMALL[script]],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "ratio" in result.stdout, result.stdout[-2000:]
