"""``make demo``: peekproxy's main job on real input, end to end on this machine.

1. starts a testbed (``peekproxy testbed``: its own process, TLS, its own server name) that
   hosts a world_readable room with some history;
2. starts peekproxy (``peekproxy run``: its own process, TLS federation listener);
3. peeks the room by alias with ``peekproxy peek`` — MSC2444 over federation — which prints
   the room's name, topic, members and latest messages;
4. sends live events on the testbed and shows them arriving in ``peekproxy peek``'s /sync;
5. stops ``peekproxy peek`` (it unpeeks; peekproxy DELETEs the remote peek), then everything,
   and ends with a one-line result.

Needs ``trustme`` (installed by ``make demo``) for the throwaway TLS certificates.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import trio

from peekproxy.cli import render_config
from peekproxy.federation.signing_key import write_new_signing_key
from peekproxy.testbed.config import testbed_config_from_flags
from peekproxy.testbed.server import Testbed, TestbedListening, run_testbed

LIVE = [
    "Hello from the testbed!",
    "Peeking works: this arrived through MSC2444 /send",
    "…and through /sync to the peeking device.",
]
HISTORY = [
    "Welcome to the peekproxy demo room.",
    "This message was sent before the peek.",
    "So was this one.",
]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@dataclass(frozen=True)
class LoopbackTls:
    """A throwaway CA (``ca_file``) and a certificate for localhost and 127.0.0.1."""

    cert: Path
    key: Path
    ca_file: Path

    @property
    def env(self) -> dict[str, str]:
        """peekproxy overrides to reach loopback servers holding this CA's certificates."""
        return {
            "PEEKPROXY_FEDERATION__IP_RANGE_WHITELIST": '["127.0.0.0/8"]',
            "PEEKPROXY_FEDERATION__TLS_CA_FILE": str(self.ca_file),
        }


def write_loopback_tls(directory: Path, ca: Any = None) -> LoopbackTls:
    """Make a CA (or use ``ca``, a ``trustme.CA``, e.g. one a Synapse also trusts) and a
    localhost certificate with trustme (a test/demo dependency)."""
    import trustme

    ca = ca or trustme.CA()
    tls = LoopbackTls(directory / "tls.crt", directory / "tls.key", directory / "ca.pem")
    ca.cert_pem.write_to_path(str(tls.ca_file))
    cert = ca.issue_cert("localhost", "127.0.0.1")
    cert.private_key_pem.write_to_path(str(tls.key))
    tls.cert.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    return tls


def write_peekproxy_config(
    directory: Path, *, federation_port: int, client_port: int, tls: LoopbackTls, secret: str
) -> Path:
    """A peekproxy in ``directory`` named ``localhost:<federation_port>``: signing key,
    delegation secret and the shipped config template on those loopback ports, TLS on the
    federation listener, metrics off. Returns the config file."""
    directory.mkdir(parents=True, exist_ok=True)
    write_new_signing_key(directory / "signing.key")
    (directory / "delegation.secret").write_text(secret + "\n")
    config = render_config(f"localhost:{federation_port}")
    config = config.replace('bind = "127.0.0.1:8008"', f'bind = "127.0.0.1:{client_port}"')
    config = config.replace(
        'bind = "127.0.0.1:8448"',
        f'bind = "127.0.0.1:{federation_port}"\n'
        f'tls_certificate_file = "{tls.cert}"\n'
        f'tls_private_key_file = "{tls.key}"',
    )
    config = config.replace("enabled = true", "enabled = false")
    config = config.replace(
        "[delegation]\n", '[delegation]\nshared_secret_file = "delegation.secret"\n'
    )
    path = directory / "config.toml"
    path.write_text(config)
    return path


async def start_peekproxy(nursery: trio.Nursery, config: Path, env: dict[str, str]) -> trio.Process:
    """Run ``peekproxy run -c CONFIG`` until its ``ready:`` line; its log is drained in
    ``nursery`` so it never blocks."""
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "peekproxy", "run", "-c", str(config)],
        env=env,
        stderr=subprocess.PIPE,
    )
    assert process.stderr is not None
    log = b""
    while b"ready:" not in log:
        chunk = await process.stderr.receive_some(4096)
        if not chunk:
            raise RuntimeError(f"peekproxy did not start:\n{log.decode(errors='replace')}")
        log += chunk

    async def drain() -> None:
        assert process.stderr is not None
        while await process.stderr.receive_some(65536):
            pass

    nursery.start_soon(drain)
    return process


async def start_loopback_testbed(
    nursery: trio.Nursery, *, port: int, tls: LoopbackTls, data_dir: Path, room_version: str
) -> tuple[Testbed, str]:
    """An in-process testbed named ``localhost:<port>`` on loopback TLS, quiet, holding one
    world_readable public room of ``room_version``: (the testbed, the room ID). For the
    benches, which drive the testbed directly."""
    config = testbed_config_from_flags(
        server_name=f"localhost:{port}",
        federation_bind=f"127.0.0.1:{port}",
        admin_bind="127.0.0.1:0",
        tls_cert=str(tls.cert),
        tls_key=str(tls.key),
        data_dir=str(data_dir),
        environ={},
        extra={
            "federation": {"ip_range_whitelist": ["127.0.0.0/8"], "tls_ca_file": str(tls.ca_file)},
            "logging": {"level": "WARNING", "access_log": False},
        },
    )
    started: tuple[TestbedListening, Testbed] = await nursery.start(
        lambda task_status: run_testbed(config, task_status=task_status)
    )
    testbed = started[1]
    room = testbed.create_room(
        room_version=room_version,
        creator="admin",
        alias=None,
        history_visibility="world_readable",
        join_rule="public",
        encrypted=False,
        name=None,
        topic=None,
        initial_state=[],
    )
    return testbed, room.room_id


class _Process:
    def __init__(self, name: str, process: trio.Process) -> None:
        self.name, self.process = name, process
        self.lines: list[str] = []
        self._new = trio.Event()

    async def pump(self, stream: Any, echo: bool) -> None:
        buffer = b""
        while chunk := await stream.receive_some(65536):
            buffer += chunk
            while b"\n" in buffer:
                raw, buffer = buffer.split(b"\n", 1)
                line = raw.decode(errors="replace")
                self.lines.append(line)
                if echo:
                    print(f"  | {line}", flush=True)
                self._new.set()
                self._new = trio.Event()
        self._new.set()

    async def wait_for(self, pattern: str, timeout: float = 60) -> re.Match[str]:
        with trio.fail_after(timeout):
            while True:
                for line in self.lines:
                    match = re.search(pattern, line)
                    if match:
                        return match
                if self.process.returncode is not None:
                    raise RuntimeError(f"{self.name} exited:\n" + "\n".join(self.lines[-20:]))
                await self._new.wait()


async def _start(
    nursery: trio.Nursery,
    name: str,
    args: Sequence[str],
    env: dict[str, str],
    *,
    echo_stdout: bool = False,
) -> _Process:
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "peekproxy", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    handle = _Process(name, process)
    nursery.start_soon(handle.pump, process.stdout, echo_stdout)
    nursery.start_soon(handle.pump, process.stderr, False)
    return handle


async def _demo(directory: Path) -> str:
    try:
        tls = write_loopback_tls(directory)
    except ImportError:
        return "demo: FAILED - trustme is missing: run `make demo` (it installs it)"
    tls_cert, tls_key, ca_file = tls.cert, tls.key, tls.ca_file
    tb_port, pp_port, client_port = free_port(), free_port(), free_port()
    testbed_name, peekproxy_name = f"localhost:{tb_port}", f"localhost:{pp_port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PEEKPROXY_")}
    config_path = write_peekproxy_config(
        directory / "peekproxy",
        federation_port=pp_port,
        client_port=client_port,
        tls=tls,
        secret="demo-secret",
    )
    pp_env = env | tls.env | {"PEEKPROXY_PEEKS__LINGER": "0.5s"}

    async with trio.open_nursery() as nursery:
        print(
            f"starting the testbed ({testbed_name}) and peekproxy ({peekproxy_name}) ...",
            flush=True,
        )
        testbed = await _start(
            nursery,
            "testbed",
            [
                "testbed",
                "--server-name",
                testbed_name,
                "--federation-bind",
                f"127.0.0.1:{tb_port}",
                "--admin-bind",
                "127.0.0.1:0",
                "--tls-cert",
                str(tls_cert),
                "--tls-key",
                str(tls_key),
                "--tls-ca-file",
                str(ca_file),
                "--ip-range-whitelist",
                "127.0.0.0/8",
                "--data-dir",
                str(directory / "testbed"),
            ],
            env,
        )
        daemon = await _start(nursery, "peekproxy", ["run", "-c", str(config_path)], pp_env)
        admin_url = (await testbed.wait_for(r"testbed ready: .* admin=(\S+)")).group(1)
        await daemon.wait_for(r"ready: ")
        token = (directory / "testbed" / "admin.token").read_text().strip()
        async with httpx.AsyncClient(
            base_url=f"{admin_url}/_testbed/v1",
            timeout=30,
            headers={"Authorization": f"Bearer {token}"},
        ) as admin:
            created = (
                await admin.post(
                    "/rooms",
                    json={
                        "room_version": "10",
                        "alias": "demo",
                        "name": "peekproxy demo",
                        "topic": "A world_readable room hosted by the testbed",
                    },
                )
            ).json()
            room = quote_room(created["room_id"])
            await admin.post(f"/rooms/{room}/members/join", json={"user": "bob"})
            for body in HISTORY:
                await admin.post(
                    f"/rooms/{room}/send", json={"content": {"msgtype": "m.text", "body": body}}
                )
            alias = f"#demo:{testbed_name}"
            print(
                f"created {alias} ({created['room_id']}) on the testbed, with history", flush=True
            )
            print(f"$ peekproxy peek {alias}", flush=True)
            peek = await _start(
                nursery,
                "peekproxy peek",
                ["peek", alias, "-c", str(config_path)],
                env,
                echo_stdout=True,
            )
            await peek.wait_for(r"live events")
            for body in LIVE:
                await admin.post(
                    f"/rooms/{room}/send",
                    json={"sender": "bob", "content": {"msgtype": "m.text", "body": body}},
                )
                await peek.wait_for(re.escape(body))
        peek.process.send_signal(signal.SIGINT)
        with trio.fail_after(30):
            await peek.process.wait()
        await peek.wait_for(r"unpeeked")
        await testbed.wait_for(r"deleted by")  # peekproxy stopped the remote peek
        for process in (daemon, testbed):
            process.process.send_signal(signal.SIGTERM)
        with trio.fail_after(30):
            codes = [await daemon.process.wait(), await testbed.process.wait()]
        nursery.cancel_scope.cancel()
    # A new peek carries the room's state and its latest event (MSC2444), and peekproxy
    # fetches the newest events before it (/backfill): the first view shows the history.
    history_seen = all(any(body in line for line in peek.lines) for body in HISTORY)
    if codes != [0, 0] or not history_seen:
        return f"demo: FAILED - exit codes {codes}, history shown: {history_seen}"
    return (
        f"demo: OK - peeked {alias} over MSC2444: the room's state and its {len(HISTORY)} "
        "messages of history, "
        f"then {len(LIVE)} live messages, reached the device through /sync; unpeek "
        "DELETEd the remote peek"
    )


def quote_room(room_id: str) -> str:
    from urllib.parse import quote

    return quote(room_id, safe="")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m peekproxy.demo", description=__doc__)
    parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="peekproxy-demo-") as directory:
        try:
            result = trio.run(_demo, Path(directory))
        except Exception as e:  # the demo reports, it does not crash
            result = f"demo: FAILED - {type(e).__name__}: {e}"
    print(result, flush=True)
    return 0 if result.startswith("demo: OK") else 1


if __name__ == "__main__":
    raise SystemExit(main())
