"""``make demo``'s program, on ephemeral ports: creates the key, checks the key server."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.support import write_config


def test_demo_creates_key_and_verifies_key_server(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "peekproxy.demo", "-c", str(config), "--once"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "signing.key").exists()
    assert "self-signature verified" in result.stdout
    assert result.stdout.strip().endswith("demo: OK")
