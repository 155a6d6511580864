"""Other servers' signing keys (``server_keys``), persisted by the keyring."""

from __future__ import annotations

from collections.abc import Iterable

from peekproxy.store.reads import ServerKeyRow
from peekproxy.store.sql.base import SqlBase

__all__ = ["ServerKeyOps"]


class ServerKeyOps(SqlBase):
    """The operations of
    :class:`~peekproxy.store.reads.ServerKeyReads`
    and :class:`~peekproxy.store.writes.ServerKeyWrites`
    (documented there)."""

    def server_keys(self) -> list[ServerKeyRow]:
        return [
            (str(s), str(k), str(b), int(v), None if e is None else int(e), int(f))
            for s, k, b, v, e, f in self._conn.execute(
                "SELECT server_name, key_id, key_base64, valid_until_ts, expired_ts, fetched_ts "
                "FROM server_keys"
            )
        ]

    def save_server_keys(self, keys: Iterable[ServerKeyRow]) -> None:
        self._conn.executemany(
            "INSERT INTO server_keys (server_name, key_id, key_base64, valid_until_ts, "
            "expired_ts, fetched_ts) VALUES (?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (server_name, key_id) DO UPDATE SET key_base64 = excluded.key_base64, "
            "valid_until_ts = excluded.valid_until_ts, expired_ts = excluded.expired_ts, "
            "fetched_ts = excluded.fetched_ts",
            list(keys),
        )
