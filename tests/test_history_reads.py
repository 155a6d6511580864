"""The history-reads service in-process (services/reads.py) and the one place a service's
PeekError becomes Matrix error JSON (api/errors.py). Paging and backfill against a real
remote are tested end to end in tests/test_delegation_api.py."""

from __future__ import annotations

import json

import pytest
from starlette.requests import Request

from peekproxy.api.errors import exception_handlers
from peekproxy.core import paging
from peekproxy.federation.keyring import Keyring
from peekproxy.services.errors import PeekError
from peekproxy.services.event_auth import EventAuth
from peekproxy.services.missing_events import MissingEvents
from peekproxy.services.reads import HistoryReads
from peekproxy.store import Storage
from tests.conftest import OpenStore
from tests.offline import offline_client
from tests.test_history import ROOM, store_with_gap


def reads_over(store: Storage, asked: list[str]) -> HistoryReads:
    """Reads over ``store`` for a room followed through no server (``asked``: the rooms
    whose server was looked up)."""

    def server_of(room_id: str) -> str | None:
        asked.append(room_id)
        return None

    client = offline_client()
    keyring = Keyring(client)
    missing = MissingEvents(store=store, client=client, keyring=keyring)
    return HistoryReads(
        store=store,
        client=client,
        keyring=keyring,
        auth=EventAuth(store=store, missing=missing),
        server_of=server_of,
        clock_ms=lambda: 0,
    )


async def test_a_room_followed_through_no_server_pages_over_its_hole(open_store: OpenStore) -> None:
    store, _ = await store_with_gap(open_store, closed=False)
    asked: list[str] = []
    reads = reads_over(store, asked)
    page = await reads.messages(ROOM, from_point=None, to_point=None, direction="b", limit=10)
    assert [e["event_id"] for e in page.chunk] == ["$e7", "$e6", "$e5", "$e4", "$e2", "$e1"]
    assert page.end is None and asked == [ROOM]
    assert all(e["room_id"] == ROOM for e in page.chunk)
    forward = await reads.messages(ROOM, from_point=None, to_point=None, direction="f", limit=2)
    assert [e["event_id"] for e in forward.chunk] == ["$e1", "$e2"]
    assert forward.end == "pp1_2"
    await store.aclose()


async def test_read_errors_are_peek_errors(open_store: OpenStore) -> None:
    store, _ = await store_with_gap(open_store, closed=True)
    reads = reads_over(store, [])
    with pytest.raises(PeekError) as ahead:
        await reads.messages(
            ROOM, from_point=paging.Point(999), to_point=None, direction="b", limit=1
        )
    assert (ahead.value.status, ahead.value.errcode) == (400, "M_INVALID_PARAM")
    assert ahead.value.error == "from token 'pp1_999' is from the future"
    with pytest.raises(PeekError) as missing:
        await reads.event(ROOM, "$nope")
    assert (missing.value.status, missing.value.errcode) == (404, "M_NOT_FOUND")
    assert (await reads.event(ROOM, "$e5"))["content"]["body"] == "e5"
    assert not await reads.is_peeking("@alice:local.test", "D1", ROOM)
    await store.aclose()


async def test_a_peek_error_becomes_matrix_error_json() -> None:
    handler = exception_handlers()[PeekError]
    request = Request({"type": "http", "method": "GET", "path": "/", "headers": []})
    error = PeekError(429, "M_LIMIT_EXCEEDED", "slow down", retry_after_ms=1500)
    response = await handler(request, error)
    assert response.status_code == 429 and response.headers["retry-after"] == "2"
    assert json.loads(response.body) == {
        "errcode": "M_LIMIT_EXCEEDED",
        "error": "slow down",
        "retry_after_ms": 1500,
    }
