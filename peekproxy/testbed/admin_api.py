"""The testbed's admin API (``/_testbed/v1``, bearer token, on its own loopback listener):
create rooms, send events, memberships and EDUs, simulate remote servers, list and expire
peeks, inject faults, read the outbox and set the renewal interval.

Routes parse and answer: each checks the token, parses its body
(:mod:`~peekproxy.testbed.parsing`) and calls the :class:`Testbed`.
"""

from __future__ import annotations

import secrets
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from peekproxy.api.errors import MatrixError, exception_handlers
from peekproxy.api.federation_auth import read_json_body
from peekproxy.federation.signing_key import server_key_document
from peekproxy.testbed.host import NOT_STATE, Testbed
from peekproxy.testbed.parsing import (
    ConfigBody,
    CreateRoomBody,
    IllegalBody,
    MembershipBody,
    ReceiptBody,
    RemoteServerBody,
    SendBody,
    TypingBody,
    parse_body,
    raw_segments,
)
from peekproxy.testbed.rooms import TestbedRoom

__all__ = ["admin_app"]


def admin_app(testbed: Testbed, token: str) -> Starlette:
    """The admin API (``/_testbed/v1``), bearer-token protected."""

    def check(request: Request) -> None:
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {token}".encode()):
            raise MatrixError(401, "M_UNKNOWN_TOKEN", "missing or wrong admin token")

    async def body(request: Request) -> Any:
        return await read_json_body(request)

    def summary(room: TestbedRoom) -> dict[str, Any]:
        latest_id, _ = room.latest()
        return {
            "room_id": room.room_id,
            "room_version": room.rules.identifier,
            "alias": room.canonical_alias(),
            "history_visibility": room.history_visibility(),
            "encrypted": room.is_encrypted(),
            "joined": room.joined_users(),
            "latest_event_id": latest_id,
            "event_count": len(room.events),
        }

    async def rooms(request: Request) -> Response:
        check(request)
        if request.method == "GET":
            return JSONResponse({"rooms": [summary(r) for r in testbed.rooms.values()]})
        spec = parse_body(CreateRoomBody, await body(request))
        room = testbed.create_room(**spec.model_dump())
        return JSONResponse(summary(room))

    async def room(request: Request) -> Response:
        check(request)
        return JSONResponse(summary(testbed.room(request.path_params["room_id"])))

    async def events(request: Request) -> Response:
        check(request)
        target = testbed.room(request.path_params["room_id"])
        return JSONResponse(
            {
                "room_version": target.rules.identifier,
                "events": [
                    {"event_id": e, "pdu": p}
                    | ({"rejected": target.rejected[e]} if e in target.rejected else {})
                    for e, p in zip(target.event_ids, target.events, strict=True)
                ],
            }
        )

    async def send(request: Request) -> Response:
        check(request)
        kind = request.path_params["kind"]
        if kind not in ("send", "state"):
            raise MatrixError(404, "M_UNRECOGNIZED", "Unrecognized request")
        spec = parse_body(SendBody, await body(request))
        if kind == "state" and spec.state_key is None:
            spec = spec.model_copy(update={"state_key": ""})
        if kind == "send" and spec.state_key is not None:
            raise MatrixError(400, "M_INVALID_PARAM", "use /state for state events")
        if spec.state_key is not None and spec.type in NOT_STATE:
            raise MatrixError(400, "M_INVALID_PARAM", NOT_STATE[spec.type])
        event_id = testbed.send(
            request.path_params["room_id"],
            sender=spec.sender,
            type=spec.type,
            content=spec.content,
            state_key=spec.state_key,
        )
        return JSONResponse({"event_id": event_id})

    async def illegal(request: Request) -> Response:
        check(request)
        spec = parse_body(IllegalBody, await body(request))
        event_id, reason = testbed.relay_illegal(
            request.path_params["room_id"], spec.kind, sender=spec.sender, target=spec.target
        )
        return JSONResponse({"event_id": event_id, "reason": reason})

    async def membership(request: Request) -> Response:
        check(request)
        spec = parse_body(MembershipBody, await body(request))
        kind = request.path_params["membership"]
        if spec.sender is not None and kind != "invite":
            raise MatrixError(400, "M_INVALID_PARAM", f"{kind} is sent by the user; no sender")
        event_id = testbed.membership(
            request.path_params["room_id"], spec.user, kind, sender=spec.sender
        )
        return JSONResponse({"event_id": event_id})

    async def typing(request: Request) -> Response:
        check(request)
        spec = parse_body(TypingBody, await body(request))
        sent = testbed.typing(request.path_params["room_id"], spec.user, spec.typing)
        return JSONResponse({"destinations": sent})

    async def receipt(request: Request) -> Response:
        check(request)
        spec = parse_body(ReceiptBody, await body(request))
        sent = testbed.receipt(
            request.path_params["room_id"], spec.user, spec.event_id, spec.receipt_type
        )
        return JSONResponse({"destinations": sent})

    async def remote_servers(request: Request) -> Response:
        check(request)
        if request.method == "POST":
            testbed.add_remote_server(parse_body(RemoteServerBody, await body(request)).server_name)
        now = testbed.clock_ms()
        return JSONResponse(
            {
                "remote_servers": {
                    name: server_key_document(name, key, now_ms=now, valid_for_ms=86_400_000)
                    for name, key in sorted(testbed.remote_keys.items())
                }
            }
        )

    async def peeks(request: Request) -> Response:
        check(request)
        active = testbed.peeks.active(testbed.clock_ms())
        return JSONResponse({"peeks": [p.to_json() for p in active]})

    async def peek_requests(request: Request) -> Response:
        check(request)
        return JSONResponse({"requests": [r.to_json() for r in testbed.peek_requests]})

    async def expire_peek(request: Request) -> Response:
        check(request)
        # Raw segments, so that peek IDs holding "/" (as %2F) can be named.
        segments = raw_segments(request, "/_testbed/v1/peeks/")
        if len(segments) != 3:
            raise MatrixError(404, "M_UNRECOGNIZED", "use DELETE /peeks/{origin}/{roomId}/{peekId}")
        origin, room_id, peek_id = segments
        return JSONResponse(testbed.expire_peek(origin, room_id, peek_id))

    async def faults(request: Request) -> Response:
        check(request)
        if request.method == "PUT":
            changes = await body(request)
            if not isinstance(changes, dict):
                raise MatrixError(400, "M_BAD_JSON", "body must be an object")
            try:
                testbed.faults.update(changes)
            except ValueError as e:
                raise MatrixError(400, "M_INVALID_PARAM", str(e)) from None
        return JSONResponse(testbed.faults.to_json())

    async def outbox(request: Request) -> Response:
        check(request)
        return JSONResponse(
            {
                destination: {
                    "pending": len(sender.pending),
                    "sending": None if sender.sending is None else sender.sending.to_json(),
                    "withheld": sender.withheld,
                    "transactions": [t.to_json() for t in sender.transactions],
                }
                for destination, sender in testbed.senders.items()
            }
        )

    async def settings(request: Request) -> Response:
        check(request)
        if request.method == "PUT":
            spec = parse_body(ConfigBody, await body(request))
            testbed.renewal_interval_ms = spec.renewal_interval_ms
        return JSONResponse({"renewal_interval_ms": testbed.renewal_interval_ms})

    prefix = "/_testbed/v1"
    app = Starlette(
        routes=[
            Route(f"{prefix}/rooms", rooms, methods=["GET", "POST"]),
            Route(f"{prefix}/rooms/{{room_id}}", room, methods=["GET"]),
            Route(f"{prefix}/rooms/{{room_id}}/events", events, methods=["GET"]),
            Route(f"{prefix}/rooms/{{room_id}}/typing", typing, methods=["POST"]),
            Route(f"{prefix}/rooms/{{room_id}}/receipt", receipt, methods=["POST"]),
            Route(f"{prefix}/rooms/{{room_id}}/illegal", illegal, methods=["POST"]),
            Route(f"{prefix}/rooms/{{room_id}}/{{kind:str}}", send, methods=["POST"]),
            Route(
                f"{prefix}/rooms/{{room_id}}/members/{{membership}}", membership, methods=["POST"]
            ),
            Route(f"{prefix}/remote_servers", remote_servers, methods=["GET", "POST"]),
            Route(f"{prefix}/peeks", peeks, methods=["GET"]),
            Route(f"{prefix}/peek_requests", peek_requests, methods=["GET"]),
            Route(f"{prefix}/peeks/{{rest:path}}", expire_peek, methods=["DELETE"]),
            Route(f"{prefix}/faults", faults, methods=["GET", "PUT"]),
            Route(f"{prefix}/outbox", outbox, methods=["GET"]),
            Route(f"{prefix}/config", settings, methods=["GET", "PUT"]),
        ],
        exception_handlers=exception_handlers(),
    )
    app.router.redirect_slashes = False
    return app
