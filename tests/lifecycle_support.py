"""Helpers for the lifecycle tests and bench/shutdown_drain.py: a systemd notify socket, log
counting, and waiting until a daemon has read every request sent to it."""

from __future__ import annotations

import re
import socket
from pathlib import Path

import trio

from tests.support import DaemonProcess


class NotifySocket:
    """An ``AF_UNIX`` datagram socket bound in a test directory, to pass as ``NOTIFY_SOCKET``:
    it records each ``sd_notify`` message the daemon sends."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / "notify.sock"
        self._sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.messages: list[str] = []

    async def __aenter__(self) -> NotifySocket:
        await self._sock.bind(str(self.path))
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._sock.close()

    @property
    def env(self) -> dict[str, str]:
        return {"NOTIFY_SOCKET": str(self.path)}

    async def next(self, timeout: float = 30.0) -> str:
        """The next message (fails after ``timeout`` seconds)."""
        with trio.fail_after(timeout):
            data = await self._sock.recv(4096)
        message = data.decode()
        self.messages.append(message)
        return message


def log_count(daemon: DaemonProcess, pattern: bytes) -> int:
    return len(re.findall(pattern, daemon.stderr))


async def wait_log_count(
    daemon: DaemonProcess, pattern: bytes, count: int, timeout: float = 30.0
) -> None:
    """Wait until ``pattern`` was logged at least ``count`` times."""
    with trio.fail_after(timeout):
        while log_count(daemon, pattern) < count:
            if daemon.process.returncode is not None:
                raise AssertionError(f"daemon exited ({daemon.process.returncode}):\n{daemon.log}")
            await daemon._output.wait()


_ESTABLISHED, _LISTEN = 0x01, 0x0A


def _server_sockets(port: int) -> list[tuple[int, int]]:
    """(state, receive queue) of each IPv4 TCP socket whose local port is ``port``
    (``/proc/net/tcp``): bytes not yet read for an ESTABLISHED socket, connections not yet
    accepted for the LISTEN one."""
    found = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, state, queues = fields[1], fields[3], fields[4]
        if int(local.rsplit(":", 1)[1], 16) == port:
            found.append((int(state, 16), int(queues.split(":")[1], 16)))
    return found


async def wait_requests_read(port: int, connections: int, timeout: float = 30.0) -> None:
    """Wait until at least ``connections`` connections to ``port`` are established and
    accepted, and the daemon has read everything sent on them (the accept queue and every
    receive queue empty): the requests are in its hands, not in the kernel's. Polls
    ``/proc/net/tcp`` with a deadline."""
    with trio.fail_after(timeout):
        while True:
            sockets = _server_sockets(port)
            established = [queued for state, queued in sockets if state == _ESTABLISHED]
            backlog = sum(queued for state, queued in sockets if state == _LISTEN)
            if len(established) >= connections and not any(established) and not backlog:
                return
            await trio.sleep(0.05)


def port_of(base_url: str) -> int:
    return int(base_url.rsplit(":", 1)[1])
