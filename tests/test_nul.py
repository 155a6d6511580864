"""U+0000 in the strings the store indexes (peekproxy.core.nul): refused as malformed on
both backends (PostgreSQL's TEXT cannot hold it). End to end on PostgreSQL:
tests/test_cluster_pg.py::test_a_pdu_with_a_nul_character_is_rejected_and_the_rest_stored."""

from __future__ import annotations

import logging
from typing import Any

import httpx
import pytest
import trio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from peekproxy.api.errors import exception_handlers
from peekproxy.core.ephemeral import per_user_edus
from peekproxy.core.nul import NUL_REASON, has_nul, pdu_nul_problem
from peekproxy.core.pdu_format import format_problem
from peekproxy.core.room_versions import room_version

PDU: dict[str, Any] = {
    "room_id": "!r:x.test",
    "sender": "@a:x.test",
    "type": "m.room.member",
    "state_key": "@a:x.test",
    "content": {"membership": "join", "body": "NUL \x00 in content is fine"},
    "origin_server_ts": 1,
    "depth": 3,
    "hashes": {"sha256": "abc"},
    "signatures": {},
    "prev_events": ["$p"],
    "auth_events": [["$a", {"sha256": "x"}]],
}


def test_has_nul() -> None:
    assert has_nul("a", 1, "b\x00") and not has_nul("a", None, b"\x00")


def test_a_clean_pdu_passes_and_content_may_hold_nul() -> None:
    assert pdu_nul_problem(PDU) is None
    assert pdu_nul_problem("not a dict") is None


@pytest.mark.parametrize(
    "change",
    [
        {"state_key": "a\x00b"},
        {"type": "m.\x00"},
        {"sender": "@a\x00:x.test"},
        {"room_id": "!r\x00:x.test"},
        {"event_id": "$e\x00"},
        {"redacts": "$e\x00"},
        {"prev_events": ["$p", "$q\x00"]},
        {"auth_events": [["$a\x00", {}]]},
        {"content": {"membership": "jo\x00in"}},
        {"content": {"redacts": "$x\x00"}},
    ],
)
def test_a_nul_in_an_indexed_string_is_refused(change: dict[str, Any]) -> None:
    pdu = PDU | change
    assert pdu_nul_problem(pdu) == NUL_REASON
    assert format_problem(pdu, room_version("10"), 100) == NUL_REASON


def test_edus_with_nul_give_nothing() -> None:
    def typing(room_id: str, user_id: str) -> dict[str, Any]:
        content = {"room_id": room_id, "user_id": user_id, "typing": True}
        return {"edu_type": "m.typing", "content": content}

    def receipt(room_id: str, receipt_type: str, user_id: str) -> dict[str, Any]:
        content = {room_id: {receipt_type: {user_id: {"event_ids": ["$e"]}}}}
        return {"edu_type": "m.receipt", "content": content}

    assert len(per_user_edus(typing("!r:x.test", "@a:x.test"))) == 1
    assert per_user_edus(typing("!r\x00:x.test", "@a:x.test")) == []
    assert per_user_edus(typing("!r:x.test", "@a\x00:x.test")) == []
    assert len(per_user_edus(receipt("!r:x.test", "m.read", "@a:x.test"))) == 1
    assert per_user_edus(receipt("!r\x00:x.test", "m.read", "@a:x.test")) == []
    assert per_user_edus(receipt("!r:x.test", "m.re\x00ad", "@a:x.test")) == []
    assert per_user_edus(receipt("!r:x.test", "m.read", "@a\x00:x.test")) == []


async def test_an_unexpected_error_in_a_nursery_is_a_500_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Not re-raised (the server would log it a second time), answered in Matrix JSON."""

    async def boom(request: Request) -> Response:
        async def fail() -> None:
            raise ValueError("a bug of ours")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(fail)
        return Response()

    app = Starlette(routes=[Route("/boom", boom)], exception_handlers=exception_handlers())
    transport = httpx.ASGITransport(app=app)  # raises what the app raises
    with caplog.at_level(logging.ERROR, logger="peekproxy.api.errors"):
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            answer = await http.get("/boom")
    assert answer.status_code == 500
    assert answer.json() == {"errcode": "M_UNKNOWN", "error": "Internal server error"}
    assert len([r for r in caplog.records if r.name == "peekproxy.api.errors"]) == 1
