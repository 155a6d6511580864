"""The PostgreSQL database is named ``dbname@host:port`` in errors, logs and /ready's body,
never by its DSN (which may hold a password)."""

from __future__ import annotations

import psycopg.conninfo
import pytest

from peekproxy.store import StoreError, StoreUnavailable
from peekproxy.store.postgres.engine import database_name, open_postgres


@pytest.mark.parametrize(
    ("dsn", "name"),
    [
        ("postgresql://u:SECRET@db.example:5433/peek", "peek@db.example:5433"),
        ("host=db password=SECRET dbname=peek", "peek@db:5432"),
        ("postgresql://u:SECRET@db.example", "u@db.example:5432"),
    ],
)
def test_database_name(dsn: str, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("PGDATABASE", "PGHOST", "PGPORT"):
        monkeypatch.delenv(var, raising=False)
    assert database_name(psycopg.conninfo.conninfo_to_dict(dsn)) == name


async def test_a_bad_dsn_is_not_quoted() -> None:
    with pytest.raises(StoreError) as caught:
        await open_postgres("postgresql://u:SECRET@db/peek?bad_option=1 x", "local.test")
    assert "SECRET" not in str(caught.value)


async def test_an_unreachable_database_with_a_password_in_its_dsn_is_not_quoted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """(10 s: the pool's open timeout.) Neither the error (which /ready's body carries) nor
    a log line holds the password."""
    dsn = "postgresql://u:SECRET@127.0.0.1:9?connect_timeout=1"  # no dbname; nothing listens
    with pytest.raises(StoreUnavailable) as caught:
        await open_postgres(dsn, "local.test")
    assert "u@127.0.0.1:9" in str(caught.value)
    assert "SECRET" not in str(caught.value)
    assert not [r for r in caplog.records if "SECRET" in r.getMessage()]
