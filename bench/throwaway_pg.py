"""A throwaway PostgreSQL database for the benches: tests/pg_cluster.py's cluster (initdb +
pg_ctl in a temporary directory, ``fsync=off``), one empty database, stopped and removed at
the end. ``fsync=off`` flatters PostgreSQL's writes (no disk wait at commit), while SQLite
runs as configured (WAL, ``synchronous=FULL``): read a PostgreSQL figure as an upper bound."""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.pg_cluster import start_cluster

__all__ = ["BACKENDS", "backends_of", "store_env", "throwaway_database"]

#: The ``--backend`` choices of the benches.
BACKENDS = ("sqlite", "postgres", "both")


def backends_of(choice: str) -> list[str]:
    """``"both"`` → ``["sqlite", "postgres"]``; a single backend → itself."""
    return ["sqlite", "postgres"] if choice == "both" else [choice]


@contextmanager
def throwaway_database() -> Iterator[str]:
    """Start a cluster, create one database: its libpq DSN (unix socket). Everything is
    removed on exit. Raises ``pytest``'s skip when PostgreSQL is not installed."""
    cluster = start_cluster()
    try:
        yield cluster.new_database()
    except BaseException:  # the server's own account of a failed run, before it is removed
        log = cluster.directory / "server.log"
        if log.exists():
            tail = log.read_text(errors="replace").splitlines()[-30:]
            print("PostgreSQL server.log (end):", *tail, sep="\n", file=sys.stderr)
        raise
    finally:
        cluster.pg_ctl("stop", "-m", "immediate")
        shutil.rmtree(cluster.directory, ignore_errors=True)


def store_env(dsn: str | None) -> dict[str, str]:
    """The daemon's environment overrides for the ``[store]`` section: PostgreSQL at
    ``dsn``, or nothing (the config's SQLite) for ``None``."""
    if dsn is None:
        return {}
    return {"PEEKPROXY_STORE__BACKEND": "postgres", "PEEKPROXY_STORE__DSN": dsn}
