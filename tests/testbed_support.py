"""Start the testbed in the test process, on an ephemeral TLS port, trusting the test CA."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import trio
import trustme

from peekproxy.testbed.config import testbed_config_from_flags
from peekproxy.testbed.server import Testbed, TestbedListening, run_testbed
from tests.support import issue_cert
from tests.synapse import free_tcp_port


async def start_testbed(
    nursery: trio.Nursery, ca: trustme.CA, tmp_path: Path, **peeks: Any
) -> tuple[TestbedListening, Testbed]:
    """A testbed named ``localhost:<port>`` with TLS; ``peeks`` go to its [peeks] section."""
    port = free_tcp_port()
    directory = tmp_path / f"testbed-{port}"
    directory.mkdir()
    cert, key = issue_cert(ca, directory, "localhost", "127.0.0.1")
    ca_file = directory / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    config = testbed_config_from_flags(
        server_name=f"localhost:{port}",
        federation_bind=f"127.0.0.1:{port}",
        admin_bind="127.0.0.1:0",
        tls_cert=str(cert),
        tls_key=str(key),
        data_dir=str(directory / "data"),
        extra={
            "federation": {
                "ip_range_whitelist": ["127.0.0.0/8", "::1/128"],
                "tls_ca_file": str(ca_file),
            },
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
