"""The testbed's federation listener: the MSC2444 R3 peek endpoints (plus the R4 renew), the
read endpoints R4 opens for world_readable rooms, the alias query and the key server.

Routes parse and answer: each authenticates the request (X-Matrix, Server-Server API
§Authentication), reads its path and body, and calls the :class:`Testbed`.
"""

from __future__ import annotations

from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from peekproxy import __version__
from peekproxy.api.errors import MatrixError, exception_handlers
from peekproxy.api.federation_auth import authenticate
from peekproxy.federation.signing_key import server_key_document
from peekproxy.testbed.host import Testbed, now_ms
from peekproxy.testbed.parsing import raw_segments
from peekproxy.testbed.peek_rules import PeekRequest

__all__ = ["federation_app"]


def federation_app(testbed: Testbed) -> Starlette:
    """The testbed's federation listener."""
    server_name = testbed.server_name

    async def auth(request: Request) -> tuple[str, Any]:
        verified = await authenticate(request, server_name=server_name, keyring=testbed.keyring)
        return verified.origin, verified.content

    async def key_server(request: Request) -> Response:
        return JSONResponse(
            server_key_document(
                server_name, testbed.signing_key, now_ms=now_ms(), valid_for_ms=86_400_000
            )
        )

    async def version(request: Request) -> Response:
        return JSONResponse({"server": {"name": "peekproxy-testbed", "version": __version__}})

    async def query_directory(request: Request) -> Response:
        await auth(request)
        alias = request.query_params.get("room_alias", "")
        room_id = testbed.aliases.get(alias)
        if room_id is None:
            raise MatrixError(404, "M_NOT_FOUND", "Room alias not found.")
        return JSONResponse({"room_id": room_id, "servers": [server_name]})

    async def peek(request: Request) -> Response:
        # Room and peek ID come from the raw path, segment by segment, so that a peek ID
        # holding "/" (sent as %2F) is one segment: PUT/DELETE .../peek/{roomId}/{peekId},
        # POST .../peek/{roomId}/{peekId}/renew.
        segments = raw_segments(request, f"{prefix}/peek/")
        renewing = len(segments) == 3 and segments[2] == "renew"
        if not (len(segments) == 2 or renewing) or (request.method == "POST") != renewing:
            raise MatrixError(404, "M_UNRECOGNIZED", "Unrecognized request")
        origin, content = await auth(request)
        room_id, peek_id = segments[0], segments[1]
        status = 500
        try:
            if renewing:
                answer = testbed.renew_peek(origin, room_id, peek_id)
            elif request.method == "DELETE":
                answer = testbed.delete_peek(origin, room_id, peek_id)
            elif not isinstance(content, dict):
                raise MatrixError(400, "M_BAD_JSON", "the peek request body must be a JSON object")
            else:
                versions = request.query_params.getlist("ver") or ["1"]
                answer = testbed.put_peek(origin, room_id, peek_id, versions)
            status = 200
            return JSONResponse(answer)
        except MatrixError as e:
            status = e.status
            raise
        finally:
            testbed.peek_requests.append(
                PeekRequest(request.method, origin, room_id, peek_id, status, now_ms())
            )

    async def event(request: Request) -> Response:
        origin, _ = await auth(request)
        pdu = testbed.reads.event(request.path_params["event_id"], origin)
        return JSONResponse({"origin": server_name, "origin_server_ts": now_ms(), "pdus": [pdu]})

    async def event_auth(request: Request) -> Response:
        origin, _ = await auth(request)
        room = testbed.reads.readable_room(request.path_params["room_id"], origin)
        chain = testbed.reads.event_auth(room, request.path_params["event_id"])
        return JSONResponse({"auth_chain": chain})

    async def state(request: Request) -> Response:
        origin, _ = await auth(request)
        room = testbed.reads.readable_room(request.path_params["room_id"], origin)
        return JSONResponse(testbed.reads.state(room, request.query_params.get("event_id")))

    async def state_ids(request: Request) -> Response:
        origin, _ = await auth(request)
        room = testbed.reads.readable_room(request.path_params["room_id"], origin)
        return JSONResponse(testbed.reads.state_ids(room, request.query_params.get("event_id")))

    async def backfill(request: Request) -> Response:
        origin, _ = await auth(request)
        room = testbed.reads.readable_room(request.path_params["room_id"], origin)
        starts = request.query_params.getlist("v")
        try:
            limit = max(1, min(int(request.query_params.get("limit", "10")), 1000))
        except ValueError:
            raise MatrixError(400, "M_INVALID_PARAM", "limit must be an integer") from None
        pdus = await testbed.reads.backfill(room, starts, limit)
        return JSONResponse({"origin": server_name, "origin_server_ts": now_ms(), "pdus": pdus})

    async def missing_events(request: Request) -> Response:
        origin, content = await auth(request)
        room = testbed.reads.readable_room(request.path_params["room_id"], origin)
        if not isinstance(content, dict):
            raise MatrixError(400, "M_BAD_JSON", "body must be an object")
        earliest = content.get("earliest_events", [])
        latest = content.get("latest_events", [])
        limit, min_depth = content.get("limit", 10), content.get("min_depth", 0)
        if not (
            isinstance(earliest, list)
            and isinstance(latest, list)
            and isinstance(limit, int)
            and isinstance(min_depth, int)
        ):
            raise MatrixError(
                400, "M_BAD_JSON", "earliest_events/latest_events lists, limit/min_depth integers"
            )
        limit = max(0, min(limit, 1000))
        events = testbed.reads.missing_events(room, earliest, latest, limit, min_depth)
        return JSONResponse({"events": events})

    prefix = "/_matrix/federation/v1"
    app = Starlette(
        routes=[
            Route("/_matrix/key/v2/server", key_server, methods=["GET"]),
            Route(f"{prefix}/version", version, methods=["GET"]),
            Route(f"{prefix}/query/directory", query_directory, methods=["GET"]),
            Route(f"{prefix}/peek/{{rest:path}}", peek, methods=["PUT", "DELETE", "POST"]),
            Route(f"{prefix}/event/{{event_id}}", event, methods=["GET"]),
            Route(f"{prefix}/event_auth/{{room_id}}/{{event_id}}", event_auth, methods=["GET"]),
            Route(f"{prefix}/state/{{room_id}}", state, methods=["GET"]),
            Route(f"{prefix}/state_ids/{{room_id}}", state_ids, methods=["GET"]),
            Route(f"{prefix}/backfill/{{room_id}}", backfill, methods=["GET"]),
            Route(f"{prefix}/get_missing_events/{{room_id}}", missing_events, methods=["POST"]),
        ],
        exception_handlers=exception_handlers(),
    )
    app.router.redirect_slashes = False
    return app
