"""Fetching the auth events a received PDU lacks (services/missing_events.py
``MissingEvents.auth_chain``): ``/event_auth``, else ``/event`` one by one, within a request
budget whatever the PDU cites (a review found the fallback unbounded: 1,001 requests for
one event citing 1,000 made-up auth events)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from peekproxy.core.federation_errors import RemoteError
from peekproxy.core.room_versions import room_version
from peekproxy.federation.keyring import Keyring
from peekproxy.services.missing_events import MissingEvents
from peekproxy.store.sqlite import open_sqlite
from tests.offline import offline_client


class _Refusing:
    """A federation client whose server knows neither ``/event_auth`` nor the events."""

    def __init__(self) -> None:
        self.paths: list[str] = []

    async def get_json(self, destination: str, path: str, **kwargs: Any) -> Any:
        self.paths.append(path)
        raise RemoteError(destination, 404, b'{"errcode": "M_UNRECOGNIZED"}')


async def test_the_event_fallback_stops_at_its_request_budget(tmp_path: Path) -> None:
    store = await open_sqlite(tmp_path / "p.db", "local.test")
    try:
        client = _Refusing()
        missing = MissingEvents(store=store, client=client, keyring=Keyring(offline_client()))  # type: ignore[arg-type]
        lacking = [f"$made-up-{n}" for n in range(1000)]
        found, used = await missing.auth_chain(
            "evil.test",
            "!r:evil.test",
            "$e",
            lacking,
            room_version("10"),
            known=set(),
            max_requests=7,
        )
        assert found == [] and used == 7
        assert len(client.paths) == 7
        assert client.paths[0].startswith("/_matrix/federation/v1/event_auth/")
        assert all(p.startswith("/_matrix/federation/v1/event/") for p in client.paths[1:])
    finally:
        await store.aclose()
