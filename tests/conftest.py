from __future__ import annotations

import contextlib
import shutil
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme

from peekproxy.federation.signing_key import write_new_signing_key
from peekproxy.store import Storage
from peekproxy.store.postgres import open_postgres
from peekproxy.store.sqlite import open_sqlite
from tests.pg_cluster import PgCluster, start_cluster
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
    {
        "spawn",
        "synapse",
        "synapse_b",
        "reverse_proxies",
        "auth_oracle",
        "pg_cluster",
        "pg_dsn",
        "own_pg_cluster",
        "pg_migrated_dsn",
        "outage_world",
    }
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if PROCESS_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


#: The daemons a test started (the ``spawn`` fixture), for their logs when it fails.
STARTED = pytest.StashKey[list[DaemonProcess]]()
#: How much of each daemon's log a failed test's report shows (its last lines).
LOG_LINES = 300


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """A failed test's report shows the last lines of each daemon's log (its stderr), so a
    CI failure says what the daemons did (pytest-trio tears the fixtures down within the
    call phase: the logs are kept in the item's stash until here)."""
    report = yield
    if report.when == "call" and report.failed:
        started = item.stash.setdefault(STARTED, [])
        for n, daemon in enumerate(started):
            tail = "\n".join(daemon.log.splitlines()[-LOG_LINES:])
            report.sections.append((f"daemon {n} log (last {LOG_LINES} lines)", tail))
    return report


@pytest.fixture
async def spawn(request: pytest.FixtureRequest) -> AsyncIterator[Spawn]:
    """``await spawn(config_path, env=..., expect_ready=...)`` starts ``peekproxy run``;
    any daemon still running when the test ends is killed. A failed test's report shows
    each daemon's log (:func:`pytest_runtest_makereport`)."""
    started: list[DaemonProcess] = []
    request.node.stash[STARTED] = started
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


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    """A throwaway PostgreSQL cluster for the session (tests/pg_cluster.py)."""
    cluster = start_cluster()
    try:
        yield cluster
    finally:
        cluster.pg_ctl("stop", "-m", "immediate")
        shutil.rmtree(cluster.directory, ignore_errors=True)


@pytest.fixture
def own_pg_cluster() -> Iterator[PgCluster]:
    """A throwaway PostgreSQL cluster of the test's own, which it may stop and start."""
    cluster = start_cluster()
    try:
        yield cluster
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):  # the test left it stopped
            cluster.pg_ctl("stop", "-m", "immediate")
        shutil.rmtree(cluster.directory, ignore_errors=True)


@pytest.fixture
def pg_dsn(pg_cluster: PgCluster) -> Iterator[str]:
    """The DSN of a fresh, empty PostgreSQL database (dropped after the test)."""
    dsn = pg_cluster.new_database()
    try:
        yield dsn
    finally:
        pg_cluster.drop_database(dsn)


@pytest.fixture
def pg_migrated_dsn(pg_cluster: PgCluster) -> Iterator[str]:
    """The DSN of a fresh PostgreSQL database already migrated (a copy of a template made
    once per session), not bound to a server name yet; dropped after the test."""
    dsn = pg_cluster.new_database(migrated=True)
    try:
        yield dsn
    finally:
        pg_cluster.drop_database(dsn)


OpenStore = Callable[..., Awaitable[Storage]]


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.slow)])
def open_store(request: pytest.FixtureRequest, tmp_path: Path) -> OpenStore:
    """The store's tests on both backends: ``await open_store(server_name="local.test",
    record_server_name=True)`` opens the test's one database (SQLite in ``tmp_path``, or a
    fresh PostgreSQL database, migrated from a template), again on each call."""
    dsn = request.getfixturevalue("pg_migrated_dsn") if request.param == "postgres" else None

    async def _open(server_name: str = "local.test", **kwargs: Any) -> Storage:
        if dsn is not None:
            return await open_postgres(dsn, server_name, pool_size=4, **kwargs)
        return await open_sqlite(tmp_path / "p.db", server_name, **kwargs)

    return _open
