"""``make demo``'s program: testbed + peekproxy + ``peekproxy peek``, ending in one line."""

from __future__ import annotations

import subprocess
import sys


def test_demo_runs_end_to_end() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "peekproxy.demo"], capture_output=True, text=True, timeout=180
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[-1].startswith("demo: OK - peeked #demo:localhost:")
    assert any("Hello from the testbed!" in line for line in lines)
    assert any("name:    peekproxy demo" in line for line in lines)
    assert any("unpeeked" in line for line in lines)
