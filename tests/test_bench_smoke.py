"""The benchmarks still run (bench/): each in a tiny size, so a change that breaks one fails
here rather than when someone next measures. The figures themselves are not checked."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.pg_cluster import pg_binaries
from tests.proxies import proxy_binary
from tests.synapse import synapse_python

BENCH = Path(__file__).resolve().parent.parent / "bench"

_FANOUT = ["--devices", "10", "--rounds", "2", "--rooms", "10", "--peeks", "50"]
#: Each run: (id, script, arguments, what its output must show besides a ratio).
SMALL = [
    ("fanout", "fanout.py", [*_FANOUT, "--backend", "sqlite"], ["sqlite, 1 process"]),
    (
        "fanout-postgres-instances",
        "fanout.py",
        [*_FANOUT, "--backend", "postgres", "--instances", "1,2"],
        ["memory on postgres", "postgres, 1 process", "postgres, 2 processes"],
    ),
    (
        "fanout-synapse",
        "fanout.py",
        ["--devices", "5,10", "--rounds", "2", "--no-memory", "--synapse", "--backend", "sqlite"],
        ["send answer p99: with 10 devices", "ratio p99 peekproxy/synapse"],
    ),
    ("send_ingest", "send_ingest.py", ["--events", "60", "--backend", "sqlite"], []),
    (
        "send_ingest-both",
        "send_ingest.py",
        ["--events", "60"],
        ["ingest on sqlite", "ingest on postgres", "ratio postgres/sqlite"],
    ),
    ("front_overhead", "front_overhead.py", ["--rounds", "10", "--wakes", "2"], []),
    ("pdu_verify", "pdu_verify.py", ["--rounds", "1", "--repeat", "1"], []),
    ("first_view", "first_view.py", ["--members", "5", "--rounds", "1"], []),
]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("script", "arguments", "shows"), [run[1:] for run in SMALL], ids=[run[0] for run in SMALL]
)
def test_a_benchmark_runs(script: str, arguments: list[str], shows: list[str]) -> None:
    if "sqlite" not in arguments and script in ("fanout.py", "send_ingest.py"):
        pg_binaries()  # a throwaway PostgreSQL (skipped without, failed in CI)
    if script == "front_overhead.py":  # a real Synapse and nginx (skipped without, failed in CI)
        synapse_python()
        proxy_binary("nginx")
    if script == "first_view.py" or "--synapse" in arguments:  # real Synapses
        synapse_python()
    try:
        result = subprocess.run(
            [sys.executable, str(BENCH / script), *arguments],
            capture_output=True,
            text=True,
            timeout=300,
        )
    except subprocess.TimeoutExpired as e:  # say where it stalled
        raise AssertionError(f"{script} ran over 300 s: {_text(e.stdout)}{_text(e.stderr)}") from e
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    for expected in ["ratio", *shows]:
        assert expected in result.stdout, result.stdout[-2000:]


def _text(output: bytes | str | None) -> str:
    """The tail of a timed-out run's output (bytes from TimeoutExpired, whatever ``text``)."""
    if isinstance(output, bytes):
        output = output.decode(errors="replace")
    return (output or "")[-3000:]
