from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme

from peekproxy.federation.signing_key import write_new_signing_key
from tests.support import DaemonProcess, start_daemon


@pytest.fixture(scope="session")
def tls_ca() -> trustme.CA:
    """A throwaway certificate authority for real TLS in tests."""
    return trustme.CA()


@pytest.fixture
def server_dir(tmp_path: Path) -> Path:
    """A directory holding a fresh signing key (``signing.key``)."""
    write_new_signing_key(tmp_path / "signing.key")
    return tmp_path


Spawn = Callable[..., Awaitable[DaemonProcess]]

#: Fixtures that start real processes (peekproxy, a testbed, Synapse, nginx, Caddy): a test
#: using one is an end-to-end test, marked ``slow`` so that ``-m "not slow"`` runs the fast
#: set alone.
PROCESS_FIXTURES = frozenset(
    {"spawn", "synapse", "synapse_b", "reverse_proxies", "auth_oracle", "outage_world"}
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if PROCESS_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture
async def spawn() -> AsyncIterator[Spawn]:
    """``await spawn(config_path, env=..., expect_ready=...)`` starts ``peekproxy run``;
    any daemon still running when the test ends is killed."""
    started: list[DaemonProcess] = []
    async with trio.open_nursery() as nursery:

        async def _spawn(config: Path, **kwargs: Any) -> DaemonProcess:
            daemon = await start_daemon(nursery, config, **kwargs)
            started.append(daemon)
            return daemon

        yield _spawn
        for daemon in started:
            if daemon.process.returncode is None:
                daemon.process.kill()
                await daemon.process.wait()
        nursery.cancel_scope.cancel()


@pytest.fixture
def tls_files(tls_ca: trustme.CA, tmp_path: Path) -> Iterator[tuple[Path, Path, Path]]:
    """(certificate chain, private key, CA certificate) for localhost / 127.0.0.1."""
    cert = tls_ca.issue_cert("localhost", "127.0.0.1")
    chain, key, ca = tmp_path / "tls.crt", tmp_path / "tls.key", tmp_path / "ca.pem"
    cert.private_key_pem.write_to_path(str(key))
    with open(chain, "wb") as out:
        for blob in cert.cert_chain_pems:
            out.write(blob.bytes())
    tls_ca.cert_pem.write_to_path(str(ca))
    yield chain, key, ca


from tests.proxies import fronted, reverse_proxies  # noqa: E402,F401  (nginx, Caddy)
from tests.synapse import synapse, synapse_b  # noqa: E402,F401  (session fixtures)
from tests.synapse_oracle import auth_oracle  # noqa: E402,F401  (Synapse auth rules)
