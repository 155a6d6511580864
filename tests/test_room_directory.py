"""The room directory seam (:class:`peekproxy.services.directory.RoomDirectory`): what a device
asked to peek, a room ID or an alias, resolved to a room ID and the directory's servers, with
a stand-in federation client; and its wiring into :func:`peekproxy.services.build_services`."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import pytest

from peekproxy.federation.client import DestinationUnreachable, FederationClient, RemoteError
from peekproxy.services.directory import RoomDirectory
from peekproxy.services.errors import PeekError
from peekproxy.store.sqlite import open_sqlite
from tests.offline import offline_service

ROOM = "!r:remote.test"


class DirectoryClient:
    """Answers ``GET /query/directory`` with ``answer`` (or raises it); records the asks."""

    def __init__(self, answer: Any) -> None:
        self.answer = answer
        self.asked: list[tuple[str, str, dict[str, str]]] = []

    async def get_json(self, destination: str, path: str, *, query: dict[str, str]) -> Any:
        self.asked.append((destination, path, query))
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


def directory(answer: Any) -> tuple[RoomDirectory, DirectoryClient]:
    client = DirectoryClient(answer)
    return RoomDirectory(client=cast(FederationClient, client)), client


async def test_a_room_id_is_its_own_answer_without_asking() -> None:
    rooms, client = directory(AssertionError("not asked"))
    assert await rooms.resolve(ROOM) == (ROOM, [])
    assert client.asked == []


async def test_an_alias_is_asked_at_its_server_which_ends_the_servers() -> None:
    rooms, client = directory({"room_id": ROOM, "servers": ["a.test", 7, "b.test"]})
    assert await rooms.resolve("#r:remote.test") == (ROOM, ["a.test", "b.test", "remote.test"])
    assert client.asked == [
        ("remote.test", "/_matrix/federation/v1/query/directory", {"room_alias": "#r:remote.test"})
    ]


@pytest.mark.parametrize(
    ("asked", "answer", "status"),
    [
        ("not a room", {}, 400),
        ("#r:remote.test", RemoteError("remote.test", 404, b'{"errcode": "M_NOT_FOUND"}'), 404),
        ("#r:remote.test", RemoteError("remote.test", 500, b""), 502),
        ("#r:remote.test", DestinationUnreachable("remote.test", "refused"), 502),
        ("#r:remote.test", {"room_id": "nope"}, 502),
    ],
)
async def test_failures_are_peek_errors(asked: str, answer: Any, status: int) -> None:
    rooms, _ = directory(answer)
    with pytest.raises(PeekError) as caught:
        await rooms.resolve(asked)
    assert caught.value.status == status


async def test_build_services_gives_syncing_the_directory(tmp_path: Path) -> None:
    services = offline_service(await open_sqlite(tmp_path / "p.db", "local.test"))
    try:
        assert services.syncing.directory is services.directory
        assert services.directory.client is services.client
    finally:
        await services.client.aclose()
        await services.store.aclose()
