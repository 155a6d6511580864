"""Helpers for tests that run the real daemon as a child process."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import trio

from peekproxy.cli import render_config

READY = re.compile(
    rb"ready: server_name=(?P<server_name>\S+) key=(?P<key>\S+) client=(?P<client>\S+) "
    rb"federation=(?P<federation>\S+) key_server=\S+ metrics=(?P<metrics>\S+?)(?:/metrics)?\s"
)


def write_config(
    directory: Path,
    *,
    server_name: str = "localhost:8448",
    extra: dict[str, str] | None = None,
) -> Path:
    """Write the generated example config, bound to ephemeral loopback ports.

    ``extra`` maps a TOML ``[section]`` header (e.g. ``"listeners.federation"``) to lines
    appended to that section.
    """
    text = render_config(server_name)
    text = re.sub(r'^bind = "127\.0\.0\.1:\d+"$', 'bind = "127.0.0.1:0"', text, flags=re.M)
    for section, lines in (extra or {}).items():
        header = f"[{section}]\n"
        assert header in text, section
        text = text.replace(header, header + lines.rstrip("\n") + "\n", 1)
    path = directory / "config.toml"
    path.write_text(text)
    return path


def run_cli(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m peekproxy ARGS`` to completion and capture its output."""
    return subprocess.run(
        [sys.executable, "-m", "peekproxy", *args],
        cwd=cwd,
        env={**_clean_env(), **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("PEEKPROXY_")}


@dataclass
class DaemonProcess:
    """A running ``peekproxy run`` child process and what it logged."""

    process: trio.Process
    stderr: bytearray = field(default_factory=bytearray)
    client: str = ""
    federation: str = ""
    metrics: str = ""
    key: str = ""
    _output: trio.Event = field(default_factory=trio.Event)

    @property
    def log(self) -> str:
        return self.stderr.decode(errors="replace")

    async def _pump(self) -> None:
        assert self.process.stderr is not None
        while chunk := await self.process.stderr.receive_some(65536):
            self.stderr += chunk
            self._output.set()
            self._output = trio.Event()
        self._output.set()

    async def wait_for_log(self, pattern: bytes) -> re.Match[bytes]:
        """Wait until ``pattern`` appears in stderr (fail if the process exits first)."""
        while True:
            match = re.search(pattern, self.stderr)
            if match:
                return match
            if self.process.returncode is not None and self._output.is_set():
                raise AssertionError(f"daemon exited ({self.process.returncode}):\n{self.log}")
            await self._output.wait()

    def signal(self, signum: int = signal.SIGTERM) -> None:
        self.process.send_signal(signum)

    async def wait(self) -> int:
        return await self.process.wait()


async def start_daemon(
    nursery: trio.Nursery,
    config: Path,
    *,
    env: dict[str, str] | None = None,
    expect_ready: bool = True,
) -> DaemonProcess:
    """Start ``python -m peekproxy run -c CONFIG``; wait (≤ 30 s) for its ready line."""
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "peekproxy", "run", "-c", str(config)],
        stderr=subprocess.PIPE,
        env={**_clean_env(), **(env or {})},
    )
    daemon = DaemonProcess(process)
    nursery.start_soon(daemon._pump)
    if expect_ready:
        with trio.fail_after(30):
            match = await daemon.wait_for_log(READY.pattern)
        for name in ("client", "federation", "metrics", "key"):
            setattr(daemon, name, match.group(name).decode())
    return daemon
