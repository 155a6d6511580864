"""Front mode's client routes beside the MSC2753 ones (docs/front.md).

* ``GET /_matrix/client/{r0,v3}/sync`` — the homeserver's ``/sync`` with the device's peeked
  rooms merged in (``rooms.peek``, ``rooms.leave``; MSC2753), by
  :meth:`peekproxy.services.front_sync.FrontSync.sync`.
* ``GET /_matrix/client/{r0,v3}/rooms/{roomId}/messages``, ``.../state``,
  ``.../event/{eventId}`` — answered by peekproxy (the delegation API's handlers) when the
  token's device peeks the room; else passed to the homeserver verbatim (query, token,
  status, body, ``Content-Type``), so joined rooms' history keeps working.

Access tokens are checked by :class:`~peekproxy.api.upstream_auth.UpstreamAuth`. Errors are
Matrix error JSON: 401 ``M_MISSING_TOKEN`` / ``M_UNKNOWN_TOKEN``, 502 ``M_UNKNOWN`` when the
homeserver cannot be reached; the homeserver's own errors come back as it sent them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from peekproxy.api.delegation import DelegationApi
from peekproxy.api.errors import MatrixError
from peekproxy.api.upstream_auth import UpstreamAuth, access_token, forwarded_headers
from peekproxy.core.identifiers import InvalidIdentifier, RoomId
from peekproxy.homeserver.client import HomeserverUnavailable
from peekproxy.logs import bind_log_fields
from peekproxy.services.front_sync import FrontSync, FrontSyncRequest
from peekproxy.services.passthrough import ClientRequest, Passthrough, UpstreamAnswer

__all__ = ["FRONT_PREFIXES", "FrontApi"]

#: The client-server prefixes whose ``/sync`` and history reads the front serves.
FRONT_PREFIXES = ("/_matrix/client/r0", "/_matrix/client/v3")

Handler = Callable[[Request], Awaitable[Response]]
#: A read of a room the request's device peeks: (request, room ID) → answer.
RoomRead = Callable[[Request, str], Awaitable[Response]]


def _client_request(request: Request, token: str, in_header: bool) -> ClientRequest:
    """The request as it came: raw path (percent-encoding kept) and query string, and the
    headers that tell the homeserver about the client (:func:`forwarded_headers`)."""
    raw_path = request.scope.get("raw_path")
    path = raw_path.decode("latin-1") if raw_path else request.url.path
    query = request.scope.get("query_string", b"").decode("latin-1")
    return ClientRequest(request.method, path, query, token, in_header, forwarded_headers(request))


def _response(answer: UpstreamAnswer) -> Response:
    headers = {"content-type": answer.content_type} if answer.content_type else None
    return Response(answer.body, status_code=answer.status, headers=headers)


def _unavailable(e: HomeserverUnavailable) -> MatrixError:
    return MatrixError(502, "M_UNKNOWN", f"the homeserver cannot be reached: {e}")


class FrontApi:
    """The handlers of the front's ``/sync`` and history reads.

    Args:
        auth: resolves access tokens (whoami, cached).
        front: the merged ``/sync``.
        passthrough: forwards requests to the homeserver.
        delegation: the MSC2753 handlers (their ``reads`` say whether a device peeks a room).
    """

    def __init__(
        self,
        *,
        auth: UpstreamAuth,
        front: FrontSync,
        passthrough: Passthrough,
        delegation: DelegationApi,
    ) -> None:
        self.auth = auth
        self.front = front
        self.passthrough = passthrough
        self.delegation = delegation

    async def sync(self, request: Request) -> Response:
        token = access_token(request)
        user_id, device_id = await self.auth.whoami(token.token, forwarded_headers(request))
        bind_log_fields(user_id=user_id, device_id=device_id)
        params = request.query_params
        try:
            timeout_ms = int(params.get("timeout", "0"))
        except ValueError:
            timeout_ms = 0  # the homeserver answers the client's mistake
        try:
            answer = await self.front.sync(
                FrontSyncRequest(
                    client=_client_request(request, token.token, token.in_header),
                    user_id=user_id,
                    device_id=device_id,
                    since=params.get("since"),
                    timeout_ms=timeout_ms,
                    full_state=params.get("full_state") == "true",
                    filter=params.get("filter"),
                )
            )
        except HomeserverUnavailable as e:
            raise _unavailable(e) from None
        return _response(answer)

    def history(self, peeked: RoomRead) -> Handler:
        """A history read: ``peeked`` (peekproxy's read of the room) when the token's device
        peeks the room (checked once, here), else the homeserver's answer."""

        async def handle(request: Request) -> Response:
            token = access_token(request)
            user_id, device_id = await self.auth.whoami(token.token, forwarded_headers(request))
            bind_log_fields(user_id=user_id, device_id=device_id)
            room_id = request.path_params["room_id"]
            try:
                RoomId.parse(room_id)
                peeking = await self.delegation.reads.is_peeking(user_id, device_id, room_id)
            except InvalidIdentifier:
                peeking = False  # the homeserver answers the client's mistake
            if peeking:
                return await peeked(request, room_id)
            try:
                answer = await self.passthrough.forward(
                    _client_request(request, token.token, token.in_header)
                )
            except HomeserverUnavailable as e:
                raise _unavailable(e) from None
            return _response(answer)

        return handle

    def routes(self, prefixes: Sequence[str] = FRONT_PREFIXES) -> list[Route]:
        """The routes under each of ``prefixes``; mount them before the MSC2753 routes of
        the same prefixes (the first match wins)."""
        api = self.delegation
        routes = []
        for prefix in prefixes:
            rooms = f"{prefix}/rooms/{{room_id}}"
            routes += [
                Route(f"{prefix}/sync", self.sync, methods=["GET"]),
                Route(f"{rooms}/messages", self.history(api.messages_of), methods=["GET"]),
                Route(f"{rooms}/state", self.history(api.state_of), methods=["GET"]),
                Route(
                    f"{rooms}/event/{{event_id:path}}",
                    self.history(api.event_of),
                    methods=["GET"],
                ),
            ]
        return routes
