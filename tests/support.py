"""Helpers for tests that run the real daemon as a child process."""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

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
    binds: dict[str, str] | None = None,
) -> Path:
    """Write the generated example config, bound to ephemeral loopback ports
    (``binds`` maps a listener name to another bind address).

    ``extra`` maps a TOML ``[section]`` header (e.g. ``"listeners.federation"``) to lines
    appended to that section.
    """
    text = render_config(server_name)
    text = re.sub(r'^bind = "127\.0\.0\.1:\d+"$', 'bind = "127.0.0.1:0"', text, flags=re.M)
    for listener, bind in (binds or {}).items():
        text, count = re.subn(
            rf'(\[listeners\.{listener}\]\n(?:#.*\n|enabled.*\n)*)bind = "[^"]*"',
            rf'\g<1>bind = "{bind}"',
            text,
        )
        assert count == 1, listener
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


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The sub-command parsers of ``parser`` by name (``{}`` when it has none)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


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

    async def wait_for_log(self, pattern: bytes, timeout: float = 60.0) -> re.Match[bytes]:
        """Wait until ``pattern`` appears in stderr (fail if the process exits first, or
        with the log after ``timeout`` seconds)."""
        with trio.move_on_after(timeout):
            while True:
                match = re.search(pattern, self.stderr)
                if match:
                    return match
                if self.process.returncode is not None and self._output.is_set():
                    raise AssertionError(f"daemon exited ({self.process.returncode}):\n{self.log}")
                await self._output.wait()
        raise AssertionError(f"{pattern!r} not logged within {timeout} s:\n{self.log}")

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
    preexec_fn: Callable[[], None] | None = None,
) -> DaemonProcess:
    """Start ``python -m peekproxy run -c CONFIG``; wait (≤ 30 s) for its ready line.
    ``preexec_fn`` runs in the child before the exec (limits, say)."""
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "peekproxy", "run", "-c", str(config)],
        stderr=subprocess.PIPE,
        env={**_clean_env(), **(env or {})},
        preexec_fn=preexec_fn,
    )
    daemon = DaemonProcess(process)
    nursery.start_soon(daemon._pump)
    if expect_ready:
        with trio.fail_after(30):
            match = await daemon.wait_for_log(READY.pattern)
        for name in ("client", "federation", "metrics", "key"):
            setattr(daemon, name, match.group(name).decode())
    return daemon


async def serve_app(
    nursery: trio.Nursery,
    app: Any,
    *,
    bind: str = "127.0.0.1:0",
    tls: tuple[Path, Path] | None = None,
    keep_alive_timeout: float | None = None,
) -> str:
    """Serve an ASGI ``app`` with hypercorn in ``nursery``; returns its base URL.
    ``keep_alive_timeout``: seconds an idle connection stays open (hypercorn's default: 5)."""
    from hypercorn.config import Config as HypercornConfig
    from hypercorn.trio import serve

    config = HypercornConfig()
    config.bind = [bind]
    config.accesslog = None
    config.errorlog = "-" if os.environ.get("PEEKPROXY_TEST_DEBUG") else None
    config.graceful_timeout = 0.1
    if keep_alive_timeout is not None:
        config.keep_alive_timeout = keep_alive_timeout
    if tls is not None:
        config.certfile, config.keyfile = str(tls[0]), str(tls[1])
    binds: list[str] = await nursery.start(partial(serve, app, config))
    return binds[0]


def issue_cert(ca: Any, directory: Path, *names: str) -> tuple[Path, Path]:
    """A trustme certificate for exactly ``names``: (chain file, key file)."""
    cert = ca.issue_cert(*names)
    stem = re.sub(r"[^A-Za-z0-9.]", "_", names[0])
    chain, key = directory / f"{stem}.crt", directory / f"{stem}.key"
    cert.private_key_pem.write_to_path(str(key))
    with open(chain, "wb") as out:
        for blob in cert.cert_chain_pems:
            out.write(blob.bytes())
    return chain, key


class JsonApp:
    """A tiny ASGI app: ``routes`` maps (method, path) to an async handler
    ``(scope, body) -> (status, payload)`` or ``(status, payload, headers)``; a ``bytes``
    payload is sent as it is, anything else as JSON. A path ending in ``*`` matches by
    prefix. Unrouted requests get 404."""

    def __init__(self, routes: dict[tuple[str, str], Any]) -> None:
        self.routes = routes
        self.requests: list[dict[str, Any]] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                kind = message["type"].removeprefix("lifespan.")
                await send({"type": f"lifespan.{kind}.complete"})
                if kind == "shutdown":
                    return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        self.requests.append(
            {"method": scope["method"], "path": scope["path"], "headers": headers, "body": body}
        )
        handler = self.routes.get((scope["method"], scope["path"])) or next(
            (
                h
                for (method, path), h in self.routes.items()
                if path.endswith("*")
                and method == scope["method"]
                and scope["path"].startswith(path[:-1])
            ),
            None,
        )
        extra: dict[str, str] = {}
        if handler is None:
            status, payload = 404, {"errcode": "M_UNRECOGNIZED", "error": "no route"}
        else:
            answer = await handler(scope, body)
            status, payload = answer[0], answer[1]
            if len(answer) > 2:
                extra = answer[2]
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        response_headers = [(b"content-type", b"application/json")]
        response_headers += [(k.encode(), v.encode()) for k, v in extra.items()]
        await send({"type": "http.response.start", "status": status, "headers": response_headers})
        await send({"type": "http.response.body", "body": data})
