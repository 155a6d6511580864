"""Numbered schema migrations (``<engine>/migrations/NNNN_name.sql``), as each engine ships
them: the same numbers for SQLite and PostgreSQL, each engine recording the version its own
way and refusing a database newer than its newest migration."""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources

from peekproxy.store.interface import StoreError, StoreVersionError

__all__ = ["Migration", "refuse_newer", "refuse_other_server", "shipped_migrations"]

_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def shipped_migrations(package: str) -> list[Migration]:
    """The migrations shipped in ``<package>/migrations/NNNN_name.sql``, ordered by version;
    versions are 1, 2, 3... without gaps (else ``RuntimeError``)."""
    found = []
    for entry in resources.files(package).joinpath("migrations").iterdir():
        match = _NAME.match(entry.name)
        if match:
            found.append(Migration(int(match.group(1)), entry.name, entry.read_text("utf-8")))
    found.sort(key=lambda m: m.version)
    if [m.version for m in found] != list(range(1, len(found) + 1)):
        raise RuntimeError(f"migration numbers are not 1..N: {[m.name for m in found]}")
    return found


def refuse_newer(where: str, current: int, migrations: list[Migration]) -> None:
    """Raise :class:`~peekproxy.store.StoreVersionError` when the database ``where`` (a
    path, or ``dbname@host:port``: never a DSN) has a schema version above the newest
    migration."""
    newest = migrations[-1].version
    if current > newest:
        raise StoreVersionError(
            f"database {where} has schema version {current}, but this peekproxy only knows "
            f"versions up to {newest}: it was written by a newer peekproxy. Run that newer "
            "version, or restore a backup made before the upgrade."
        )


def refuse_other_server(where: str, bound: str | None, server_name: str) -> None:
    """Raise :class:`~peekproxy.store.StoreError` when the database ``where`` is bound to
    a server name (``bound``) other than ``server_name``."""
    if bound is not None and bound != server_name:
        raise StoreError(
            f"database {where} belongs to server name {bound!r}, but the config says "
            f"{server_name!r}; a server name cannot change (use a new database)"
        )
