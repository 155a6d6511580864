"""The federation routes a member of a room answers (server-server API), X-Matrix verified.

For the rooms peekproxy is joined to as the observer (docs/observer-join.md), every other
room's request answered as Synapse answers a server not in the room (403 ``Host not in
room.``); the rules are :class:`peekproxy.services.member_reads.MemberReads`'s:

* ``GET /_matrix/federation/v1/event/{eventId}`` → ``{"origin", "origin_server_ts",
  "pdus": [pdu]}`` (SSAPI §Retrieving events).
* ``GET /state/{roomId}?event_id=`` → ``{"pdus", "auth_chain"}``; ``GET
  /state_ids/{roomId}?event_id=`` → ``{"pdu_ids", "auth_chain_ids"}``: the state *before* the
  event (404 ``M_NOT_FOUND`` where it cannot be told); no ``event_id`` → 400
  ``M_MISSING_PARAM``.
* ``GET /backfill/{roomId}?v=&limit=`` → ``{"origin", "origin_server_ts", "pdus"}``, newest
  first (``limit`` at most 100; no ``v`` or ``limit`` → 400 ``M_MISSING_PARAM``).
* ``POST /get_missing_events/{roomId}`` ``{"earliest_events", "latest_events", "limit",
  "min_depth"}`` → ``{"events"}``, oldest first (``limit`` at most 20).
* ``GET /event_auth/{roomId}/{eventId}`` → ``{"auth_chain"}``.

And the observer user's (:class:`peekproxy.services.observer_queries.ObserverQueries`):
``GET /user/devices/{userId}``, ``POST /user/keys/query``, ``POST /user/keys/claim``,
``GET /query/profile?user_id=&field=``.

Malformed input is 400 (``M_INVALID_PARAM`` for bad IDs and numbers, ``M_BAD_JSON`` for a
body of the wrong shape), never 500.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from peekproxy.api.delegation_params import room_id_param
from peekproxy.api.errors import MatrixError
from peekproxy.api.federation_auth import AuthenticatedRequest, authenticate
from peekproxy.core import paging
from peekproxy.core.identifiers import EventId, InvalidIdentifier, UserId
from peekproxy.federation.keyring import Keyring
from peekproxy.services.member_reads import MemberReads, RoomState
from peekproxy.services.observer_queries import ObserverQueries

__all__ = ["MAX_EVENT_LISTS", "MemberRoutes"]

PREFIX = "/_matrix/federation/v1"
#: ``v``, ``earliest_events``, ``latest_events``: at most this many event IDs each.
MAX_EVENT_LISTS = 100
#: Users in one key query or claim.
MAX_KEY_USERS = 1000


def event_id_param(value: str, name: str = "event_id") -> str:
    """An event ID (path or query parameter), checked. Raises: MatrixError 400
    ``M_INVALID_PARAM``."""
    try:
        EventId.parse(value)
    except InvalidIdentifier as e:
        raise MatrixError(400, "M_INVALID_PARAM", f"{name}: {e}") from None
    return value


def user_id_param(value: str) -> str:
    """A user ID, checked. Raises: MatrixError 400 ``M_INVALID_PARAM``."""
    try:
        UserId.parse(value)
    except InvalidIdentifier as e:
        raise MatrixError(400, "M_INVALID_PARAM", f"user_id: {e}") from None
    return value


def required_query(request: Request, name: str) -> str:
    """A query parameter Synapse requires (``parse_string_from_args(required=True)``).
    Raises: MatrixError 400 ``M_MISSING_PARAM``."""
    value = request.query_params.get(name)
    if value is None:
        raise MatrixError(400, "M_MISSING_PARAM", f"Missing string query parameter '{name}'")
    return value


def _event_list(content: Mapping[str, Any], name: str) -> list[str]:
    value = content.get(name, [])
    if not isinstance(value, list) or not all(isinstance(e, str) for e in value):
        raise MatrixError(400, "M_BAD_JSON", f"{name} must be a list of event IDs")
    if len(value) > MAX_EVENT_LISTS:
        raise MatrixError(400, "M_BAD_JSON", f"{name}: at most {MAX_EVENT_LISTS} event IDs")
    return value


def _int_field(content: Mapping[str, Any], name: str, default: int) -> int:
    value = content.get(name, default)
    if not isinstance(value, int) or isinstance(value, bool):
        raise MatrixError(400, "M_BAD_JSON", f"{name} must be an integer")
    return value


def _object_body(auth: AuthenticatedRequest) -> Mapping[str, Any]:
    if not isinstance(auth.content, dict):
        raise MatrixError(400, "M_BAD_JSON", "the request body must be a JSON object")
    return auth.content


def _users_of(content: Mapping[str, Any], name: str) -> list[str]:
    """The user IDs keying ``content[name]`` (an object of user ID → anything)."""
    value = content.get(name)
    if not isinstance(value, dict):
        raise MatrixError(400, "M_BAD_JSON", f"{name} must be an object keyed by user ID")
    if len(value) > MAX_KEY_USERS:
        raise MatrixError(400, "M_BAD_JSON", f"{name}: at most {MAX_KEY_USERS} users")
    return [user_id_param(user_id) for user_id in value]


class MemberRoutes:
    """The routes in the module docstring.

    Args:
        server_name: ours (X-Matrix destination; the ``origin`` of answers).
        keyring: verify keys of other servers.
        members: other servers' reads of observed rooms.
        observer: questions about the observer user.
        clock_ms: the wall clock in ms since the epoch (``origin_server_ts``).
    """

    def __init__(
        self,
        *,
        server_name: str,
        keyring: Keyring,
        members: MemberReads,
        observer: ObserverQueries,
        clock_ms: Callable[[], int],
    ) -> None:
        self.server_name = server_name
        self.keyring = keyring
        self.members = members
        self.observer = observer
        self.clock_ms = clock_ms

    async def _auth(self, request: Request) -> AuthenticatedRequest:
        return await authenticate(request, server_name=self.server_name, keyring=self.keyring)

    def _transaction(self, pdus: list[dict[str, Any]]) -> Response:
        """PDUs in the shape of a transaction, as Synapse answers ``/event`` and
        ``/backfill``."""
        return JSONResponse(
            {"origin": self.server_name, "origin_server_ts": self.clock_ms(), "pdus": pdus}
        )

    async def event(self, request: Request) -> Response:
        auth = await self._auth(request)
        event_id = event_id_param(request.path_params["event_id"])
        return self._transaction([await self.members.event(auth.origin, event_id)])

    async def _state_of(self, request: Request) -> RoomState:
        auth = await self._auth(request)
        room_id = room_id_param(request.path_params["room_id"])
        event_id = event_id_param(required_query(request, "event_id"))
        return await self.members.state(auth.origin, room_id, event_id)

    async def state(self, request: Request) -> Response:
        found = await self._state_of(request)
        return JSONResponse(
            {
                "pdus": [pdu for _, pdu in found.state],
                "auth_chain": [pdu for _, pdu in found.auth_chain],
            }
        )

    async def state_ids(self, request: Request) -> Response:
        found = await self._state_of(request)
        return JSONResponse(
            {
                "pdu_ids": [event_id for event_id, _ in found.state],
                "auth_chain_ids": [event_id for event_id, _ in found.auth_chain],
            }
        )

    async def backfill(self, request: Request) -> Response:
        auth = await self._auth(request)
        room_id = room_id_param(request.path_params["room_id"])
        starts = request.query_params.getlist("v")
        if not starts:
            raise MatrixError(400, "M_MISSING_PARAM", "Missing string query parameter 'v'")
        if len(starts) > MAX_EVENT_LISTS:
            raise MatrixError(400, "M_INVALID_PARAM", f"v: at most {MAX_EVENT_LISTS} event IDs")
        try:
            limit = paging.parse_limit(required_query(request, "limit"))
        except paging.InvalidLimit as e:
            raise MatrixError(400, "M_INVALID_PARAM", str(e)) from None
        starts = [event_id_param(v, "v") for v in starts]
        return self._transaction(await self.members.backfill(auth.origin, room_id, starts, limit))

    async def missing_events(self, request: Request) -> Response:
        auth = await self._auth(request)
        room_id = room_id_param(request.path_params["room_id"])
        content = _object_body(auth)
        events = await self.members.missing_events(
            auth.origin,
            room_id,
            earliest=_event_list(content, "earliest_events"),
            latest=_event_list(content, "latest_events"),
            limit=_int_field(content, "limit", 10),
            min_depth=_int_field(content, "min_depth", 0),
        )
        return JSONResponse({"events": events})

    async def event_auth(self, request: Request) -> Response:
        auth = await self._auth(request)
        room_id = room_id_param(request.path_params["room_id"])
        event_id = event_id_param(request.path_params["event_id"])
        chain = await self.members.event_auth(auth.origin, room_id, event_id)
        return JSONResponse({"auth_chain": chain})

    async def user_devices(self, request: Request) -> Response:
        await self._auth(request)
        user_id = user_id_param(request.path_params["user_id"])
        return JSONResponse(self.observer.user_devices(user_id))

    async def keys_query(self, request: Request) -> Response:
        content = _object_body(await self._auth(request))
        return JSONResponse(self.observer.keys_query(_users_of(content, "device_keys")))

    async def keys_claim(self, request: Request) -> Response:
        content = _object_body(await self._auth(request))
        return JSONResponse(self.observer.keys_claim(_users_of(content, "one_time_keys")))

    async def profile(self, request: Request) -> Response:
        await self._auth(request)
        user_id = user_id_param(required_query(request, "user_id"))
        field = request.query_params.get("field")
        return JSONResponse(self.observer.profile(user_id, field))

    def routes(self) -> list[Route]:
        return [
            Route(f"{PREFIX}/event/{{event_id:path}}", self.event, methods=["GET"]),
            Route(f"{PREFIX}/state/{{room_id}}", self.state, methods=["GET"]),
            Route(f"{PREFIX}/state_ids/{{room_id}}", self.state_ids, methods=["GET"]),
            Route(f"{PREFIX}/backfill/{{room_id}}", self.backfill, methods=["GET"]),
            Route(
                f"{PREFIX}/get_missing_events/{{room_id}}", self.missing_events, methods=["POST"]
            ),
            Route(
                f"{PREFIX}/event_auth/{{room_id}}/{{event_id:path}}",
                self.event_auth,
                methods=["GET"],
            ),
            Route(f"{PREFIX}/user/devices/{{user_id:path}}", self.user_devices, methods=["GET"]),
            Route(f"{PREFIX}/user/keys/query", self.keys_query, methods=["POST"]),
            Route(f"{PREFIX}/user/keys/claim", self.keys_claim, methods=["POST"]),
            Route(f"{PREFIX}/query/profile", self.profile, methods=["GET"]),
        ]
