"""Benchmark: /send ingest — 50-PDU transactions from the testbed into a peekproxy daemon.

peekproxy runs as its own process (``python -m peekproxy run``); the testbed runs in this
one. A room is peeked, then N events are created on the testbed at once, so its sender
pushes them in transactions of 50 PDUs. The clock runs from the first push until peekproxy
has acknowledged the last one (it stores everything before it answers), so the figure is
events verified and stored per second, end to end over TLS.

In the same run it measures the floor of bench/pdu_verify.py (pynacl signature check plus
sha256 over pre-encoded bytes, per event) and prints the ratio. Usage:
``.venv/bin/python bench/send_ingest.py [--events 2000] [--version 10]``.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

import httpx
import trio
import trustme

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from pdu_verify import floor_inputs, load, time_floor

from peekproxy.cli import render_config
from peekproxy.federation.signing_key import write_new_signing_key
from peekproxy.testbed.config import testbed_config_from_flags
from peekproxy.testbed.server import Testbed, TestbedListening, run_testbed

SECRET = "bench-secret"


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def _cert(ca: trustme.CA, directory: Path, name: str) -> tuple[Path, Path]:
    cert = ca.issue_cert("localhost", "127.0.0.1")
    chain, key = directory / f"{name}.crt", directory / f"{name}.key"
    cert.private_key_pem.write_to_path(str(key))
    with open(chain, "wb") as out:
        for blob in cert.cert_chain_pems:
            out.write(blob.bytes())
    return chain, key


async def run(events: int, version: str, directory: Path) -> float:
    ca = trustme.CA()
    ca_file = directory / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    pp_port, tb_port = _free_port(), _free_port()

    # peekproxy, as its own process.
    pp = directory / "peekproxy"
    pp.mkdir()
    write_new_signing_key(pp / "signing.key")
    (pp / "secret").write_text(SECRET)
    cert, key = _cert(ca, pp, "tls")
    text = render_config(f"localhost:{pp_port}")
    text = re.sub(r'^bind = "127\.0\.0\.1:\d+"$', 'bind = "127.0.0.1:0"', text, flags=re.M)
    text = text.replace(
        "[listeners.federation]\n",
        f'[listeners.federation]\ntls_certificate_file = "{cert}"\n'
        f'tls_private_key_file = "{key}"\n',
    )
    text = re.sub(
        r'(\[listeners\.federation\]\n(?:.*\n)*?)bind = "127\.0\.0\.1:0"',
        rf'\1bind = "127.0.0.1:{pp_port}"',
        text,
        count=1,
    )
    text = text.replace("[delegation]\n", '[delegation]\nshared_secret_file = "secret"\n')
    (pp / "config.toml").write_text(text)
    env = {
        **os.environ,
        "PEEKPROXY_FEDERATION__IP_RANGE_WHITELIST": '["127.0.0.0/8"]',
        "PEEKPROXY_FEDERATION__TLS_CA_FILE": str(ca_file),
        "PEEKPROXY_LOGGING__ACCESS_LOG": "false",
    }
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "peekproxy", "run", "-c", str(pp / "config.toml")],
        env=env,
        stderr=subprocess.PIPE,
    )
    assert process.stderr is not None
    log = b""
    while b"ready:" not in log:
        chunk = await process.stderr.receive_some(4096)
        if not chunk:
            raise SystemExit(f"peekproxy did not start:\n{log.decode()}")
        log += chunk
    client_url = re.search(rb"client=(\S+)", log).group(1).decode()  # type: ignore[union-attr]

    async def drain() -> None:
        assert process.stderr is not None
        while await process.stderr.receive_some(65536):
            pass  # peekproxy's INFO log; drained so it never blocks

    async with trio.open_nursery() as nursery:
        nursery.start_soon(drain)
        tb = directory / "testbed"
        tb.mkdir()
        tb_cert, tb_key = _cert(ca, tb, "tls")
        config = testbed_config_from_flags(
            server_name=f"localhost:{tb_port}",
            federation_bind=f"127.0.0.1:{tb_port}",
            admin_bind="127.0.0.1:0",
            tls_cert=str(tb_cert),
            tls_key=str(tb_key),
            data_dir=str(tb / "data"),
            extra={
                "federation": {"ip_range_whitelist": ["127.0.0.0/8"], "tls_ca_file": str(ca_file)},
                "logging": {"level": "WARNING", "access_log": False},
            },
        )
        started: tuple[TestbedListening, Testbed] = await nursery.start(
            lambda task_status: run_testbed(config, task_status=task_status)
        )
        testbed = started[1]
        room = testbed.create_room(
            room_version=version,
            creator="admin",
            alias=None,
            history_visibility="world_readable",
            join_rule="public",
            encrypted=False,
            name=None,
            topic=None,
            initial_state=[],
        )
        async with httpx.AsyncClient(timeout=60) as http:
            response = await http.post(
                f"{client_url}/_peekproxy/v1/peek/{quote(room.room_id, safe='')}",
                params={"user_id": "@bench:localhost", "device_id": "B"},
                json={},
                headers={"Authorization": f"Bearer {SECRET}"},
            )
        response.raise_for_status()
        peekproxy_name = f"localhost:{pp_port}"
        # All events queued without a checkpoint: delivery starts when this task yields.
        ids = [
            testbed.send(
                room.room_id,
                sender="admin",
                type="m.room.message",
                content={"msgtype": "m.text", "body": f"event {i}"},
            )
            for i in range(events)
        ]
        sender = testbed.senders[peekproxy_name]
        last = ids[-1]
        start = time.perf_counter()
        await testbed.wait_until(
            lambda: any(last in t.event_ids and t.status == "sent" for t in sender.transactions),
            timeout=600,
        )
        elapsed = time.perf_counter() - start
        sizes = [len(t.event_ids) for t in sender.transactions]
        print(
            f"{events} events in {len(sizes)} transactions (largest {max(sizes)} PDUs), "
            f"room version {version}"
        )
        nursery.cancel_scope.cancel()
    process.terminate()
    await process.wait()
    return events / elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--version", default="10", choices=["10", "11", "12"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="send-ingest-") as directory:
        rate = trio.run(run, args.events, args.version, Path(directory))
    inputs = floor_inputs(load(["10", "11", "12"]))
    floor = min(time_floor(inputs, 40) for _ in range(5))
    floor_rate = len(inputs) * 40 / floor
    print(f"ingest (verify + store, end to end): {rate:9,.0f} events/s")
    print(f"floor (verify+sha256, same run):     {floor_rate:9,.0f} events/s")
    print(f"ratio ingest/floor: {rate / floor_rate:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
