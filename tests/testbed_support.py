"""Start the testbed in the test process, on an ephemeral TLS port, trusting the test CA; or
the command line that runs it as a child process (:func:`argv_for_testbed`)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import httpx
import trio
import trustme

from peekproxy.testbed.config import testbed_config_from_flags
from peekproxy.testbed.server import Testbed, TestbedListening, run_testbed
from tests.support import issue_cert
from tests.synapse import free_tcp_port


def argv_for_testbed(
    server_name: str,
    data_dir: Path,
    *,
    federation_bind: str = "127.0.0.1:0",
    tls: tuple[Path, Path] | None = None,
    extra: tuple[str, ...] = (),
) -> list[str]:
    """``python -m peekproxy testbed`` with its server name, federation listener, an ephemeral
    admin listener, its data directory, and ``tls`` (certificate, key) when given."""
    command = [
        sys.executable,
        "-m",
        "peekproxy",
        "testbed",
        "--server-name",
        server_name,
        "--federation-bind",
        federation_bind,
        "--admin-bind",
        "127.0.0.1:0",
    ]
    if tls is not None:
        command += ["--tls-cert", str(tls[0]), "--tls-key", str(tls[1])]
    return [*command, "--data-dir", str(data_dir), *extra]


async def start_testbed(
    nursery: trio.Nursery,
    ca: trustme.CA,
    tmp_path: Path,
    *,
    server_name: str | None = None,
    port: int | None = None,
    dns: str | None = None,
    **peeks: Any,
) -> tuple[TestbedListening, Testbed]:
    """A testbed with TLS on 127.0.0.1; named ``localhost:<port>`` unless ``server_name`` is
    given (then its certificate is for that name, and ``dns`` is the DNS server it uses to
    find other servers). ``peeks`` go to its [peeks] section."""
    port = port or free_tcp_port()
    directory = tmp_path / f"testbed-{port}"
    directory.mkdir()
    name = server_name or f"localhost:{port}"
    host = name.rsplit(":", 1)[0] if server_name and ":" in server_name else name
    cert, key = issue_cert(ca, directory, *((host,) if server_name else ("localhost", "127.0.0.1")))
    ca_file = directory / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    config = testbed_config_from_flags(
        server_name=name,
        federation_bind=f"127.0.0.1:{port}",
        admin_bind="127.0.0.1:0",
        tls_cert=str(cert),
        tls_key=str(key),
        data_dir=str(directory / "data"),
        environ={},
        extra={
            "federation": {
                "ip_range_whitelist": ["127.0.0.0/8", "::1/128"],
                "tls_ca_file": str(ca_file),
            }
            | ({"dns_nameservers": [dns]} if dns else {}),
            "peeks": peeks,
        },
    )
    result: tuple[TestbedListening, Testbed] = await nursery.start(
        lambda task_status: run_testbed(config, task_status=task_status)
    )
    return result


def admin(listening: TestbedListening) -> httpx.AsyncClient:
    """An HTTP client for the testbed's admin API."""
    return httpx.AsyncClient(
        base_url=f"{listening.admin}/_testbed/v1",
        headers={"Authorization": f"Bearer {listening.admin_token}"},
        timeout=20,
    )
