"""A real Synapse for interop tests (its own venv; see docs/testing.md).

Synapse runs as a child process with a TLS federation listener and trusts the test CA, so it
verifies peekproxy's certificate, keys and X-Matrix signatures for real.
"""

from __future__ import annotations

import os
import random
import socket
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import trustme
from signedjson.key import generate_signing_key, write_signing_keys

from tests.dns import REQUIRE_ALL

REPO = Path(__file__).resolve().parent.parent

CONFIG = """\
server_name: "localhost:{tls_port}"
pid_file: {d}/homeserver.pid
signing_key_path: {d}/signing.key
log_config: {d}/log.yaml
media_store_path: {d}/media
report_stats: false
registration_shared_secret: "interop-shared-secret"
macaroon_secret_key: "interop-macaroon"
form_secret: "interop-form"
listeners:
  - {{port: {http_port}, bind_addresses: ['127.0.0.1'], type: http, tls: false,
      resources: [{{names: [client, federation]}}]}}
  - {{port: {tls_port}, bind_addresses: ['127.0.0.1'], type: http, tls: true,
      resources: [{{names: [client, federation]}}]}}
tls_certificate_path: {d}/tls.crt
tls_private_key_path: {d}/tls.key
database: {{name: sqlite3, args: {{database: {d}/homeserver.db}}}}
trusted_key_servers: []
suppress_key_server_warning: true
federation_verify_certificates: true
federation_custom_ca_list: [{d}/ca.pem]
ip_range_whitelist: ['127.0.0.0/8', '::1/128']
default_room_version: "10"
enable_registration: true
enable_registration_without_verification: true
bcrypt_rounds: 4
presence: {{enabled: false}}
rc_message: {{per_second: 1000, burst_count: 10000}}
rc_registration: {{per_second: 1000, burst_count: 10000}}
rc_login: {{address: {{per_second: 1000, burst_count: 10000}},
  account: {{per_second: 1000, burst_count: 10000}},
  failed_attempts: {{per_second: 1000, burst_count: 10000}}}}
rc_room_creation: {{per_second: 1000, burst_count: 10000}}
rc_joins: {{local: {{per_second: 1000, burst_count: 10000}},
  remote: {{per_second: 1000, burst_count: 10000}}}}
rc_joins_per_room: {{per_second: 1000, burst_count: 10000}}
rc_federation: {{window_size: 1000, sleep_limit: 10000, sleep_delay: 0, reject_limit: 10000,
  concurrent: 100}}
"""

LOG = """version: 1
formatters: {precise: {format: '%(asctime)s %(name)s %(levelname)s %(request)s %(message)s'}}
handlers: {console: {class: logging.StreamHandler, formatter: precise}}
root: {level: INFO, handlers: [console]}
disable_existing_loggers: false
"""


def synapse_python() -> str:
    """The Python of Synapse's venv ($PEEKPROXY_TEST_SYNAPSE_PYTHON or ./.synapse-venv)."""
    python = os.environ.get("PEEKPROXY_TEST_SYNAPSE_PYTHON") or str(
        REPO / ".synapse-venv" / "bin" / "python"
    )
    if not Path(python).exists():
        message = f"Synapse is not installed at {python} (make synapse-venv)"
        if REQUIRE_ALL:
            pytest.fail(message)
        pytest.skip(message)
    return python


_HANDED_OUT: set[int] = set()


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def free_tcp_port() -> int:
    """A TCP port free on 127.0.0.1 now, below the kernel's ephemeral range.

    A port the kernel hands out (``bind(0)``) is from the ephemeral range, so while a test restarts
    the daemon on it, any outgoing connection may take it as its source port and the restart fails
    with "Address already in use". Ports below that range are never chosen by the kernel.
    """
    low, _ = _ephemeral_range()
    rng = random.SystemRandom()
    for _ in range(1000):
        port = rng.randrange(10000, max(low, 10001))
        if port in _HANDED_OUT:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    raise RuntimeError("no free TCP port below the ephemeral range")


@dataclass
class Synapse:
    """A running Synapse: ``client`` is its plain-HTTP client-API base URL."""

    server_name: str
    client: str
    directory: Path
    process: subprocess.Popen[bytes]
    log: list[str] = field(default_factory=list)

    def register(self, username: str) -> str:
        """Register a user; returns an access token."""
        response = httpx.post(
            f"{self.client}/_matrix/client/v3/register",
            json={
                "username": username,
                "password": "interop-password",
                "auth": {"type": "m.login.dummy"},
            },
            timeout=30,
        )
        response.raise_for_status()
        token: str = response.json()["access_token"]
        return token


@contextmanager
def running_synapse(
    ca: trustme.CA, directory: Path, *, python: str | None = None, log: str = LOG
) -> Iterator[Synapse]:
    """Start a Synapse in ``directory`` (its config, keys and database), trusting ``ca`` for
    federation; stop it on exit. Used by the ``synapse`` fixture and by bench/. ``log`` is its
    logging config (YAML; default: everything at INFO on its stdout, kept in ``Synapse.log``);
    whatever it keeps on stdout must include ``synapse.app._base`` at INFO (the "now
    listening" lines tell that it is ready).

    Raises:
        RuntimeError: it did not start within 120 s (the message holds its last log lines).
    """
    python = python or synapse_python()
    directory.mkdir(parents=True, exist_ok=True)
    http_port, tls_port = free_tcp_port(), free_tcp_port()
    with open(directory / "signing.key", "w") as stream:
        write_signing_keys(stream, [generate_signing_key("a1")])
    cert = ca.issue_cert("localhost", "127.0.0.1")
    cert.private_key_pem.write_to_path(str(directory / "tls.key"))
    cert.cert_chain_pems[0].write_to_path(str(directory / "tls.crt"))
    ca.cert_pem.write_to_path(str(directory / "ca.pem"))
    (directory / "log.yaml").write_text(log)
    (directory / "homeserver.yaml").write_text(
        CONFIG.format(d=directory, http_port=http_port, tls_port=tls_port)
    )
    process = subprocess.Popen(
        [python, "-m", "synapse.app.homeserver", "-c", str(directory / "homeserver.yaml")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=directory,
    )
    server = Synapse(f"localhost:{tls_port}", f"http://127.0.0.1:{http_port}", directory, process)
    ready = threading.Event()
    markers = {f"listening on TCP port {http_port}", f"listening on TCP port {tls_port}"}

    def read_output() -> None:
        assert process.stdout is not None
        for raw in process.stdout:
            line = raw.decode(errors="replace").rstrip()
            server.log.append(line)
            for marker in list(markers):
                if marker in line:
                    markers.discard(marker)
            if not markers:
                ready.set()
        ready.set()  # exited

    threading.Thread(target=read_output, daemon=True).start()
    try:
        if not ready.wait(120) or process.poll() is not None or markers:
            raise RuntimeError("Synapse did not start:\n" + "\n".join(server.log[-40:]))
        yield server
    finally:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="session")
def synapse(tls_ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Synapse]:
    with running_synapse(tls_ca, tmp_path_factory.mktemp("synapse")) as server:
        yield server


@pytest.fixture(scope="session")
def synapse_b(tls_ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Synapse]:
    """A second Synapse ("B") beside the session's ``synapse`` ("A"): the same CA, so the
    two federate over TLS (both named ``localhost:<port>``; loopback allowed)."""
    with running_synapse(tls_ca, tmp_path_factory.mktemp("synapse-b")) as server:
        yield server
