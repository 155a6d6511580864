"""The federation listener: key server and version (server-server API).

* ``GET /_matrix/key/v2/server`` — our signed key document (SSAPI §Publishing Keys).
* ``GET /_matrix/federation/v1/version`` — ``{"server": {"name", "version"}}``.
* ``GET /_matrix/federation/v1/query/directory?room_alias=`` — X-Matrix verified; peekproxy
  hosts no aliases, so a well-formed alias gets ``404 M_NOT_FOUND`` (SSAPI §Room Aliases).
* ``PUT /_matrix/federation/v1/send/{txnId}`` — X-Matrix verified; events of peeked rooms
  (see :meth:`peekproxy.services.ingest.Ingest.receive`).
* What a member of a room answers, for the rooms joined as the observer (``/event``,
  ``/state``, ``/state_ids``, ``/backfill``, ``/get_missing_events``, ``/event_auth``), and
  the observer user's devices, keys and profile — :mod:`peekproxy.api.federation_member`.
* Anything else — ``404``/``405`` ``M_UNRECOGNIZED`` (SSAPI §Unsupported endpoints).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from signedjson.types import SigningKey
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from peekproxy import __version__
from peekproxy.api.errors import MatrixError, exception_handlers
from peekproxy.api.federation_auth import authenticate
from peekproxy.api.federation_member import MemberRoutes
from peekproxy.core.identifiers import InvalidIdentifier, RoomAlias
from peekproxy.federation.keyring import Keyring
from peekproxy.federation.signing_key import server_key_document
from peekproxy.metrics import SEND_TRANSACTIONS, RequestMetrics
from peekproxy.services.ingest import Ingest
from peekproxy.services.member_reads import MemberReads
from peekproxy.services.observer_queries import ObserverQueries

__all__ = ["FederationApi", "federation_app"]

log = logging.getLogger("peekproxy.federation")


class AnswerThen(JSONResponse):
    """A JSON answer that calls ``then()`` once it is sent, or once sending it failed or was
    cancelled (the peer went away): never left uncalled."""

    def __init__(self, content: Any, *, then: Callable[[], None]) -> None:
        super().__init__(content)
        self._then = then

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._then()


class FederationApi:
    """The handlers of our federation listener (server-server API).

    Args:
        server_name: our server name, as published in the key document.
        signing_key: our current signing key.
        key_valid_for_ms: lifetime of a served key document (``valid_until_ts - now``), ms.
        old_verify_keys: retired keys: key ID → (base64 public key, ``expired_ts`` ms).
        keyring: verify keys of other servers, for X-Matrix checks.
        ingest: takes ``/send`` transactions (``None``: ``/send`` answers 404).
        members / observer: answer what other servers ask of a member of the rooms joined
            as the observer, and about the observer user (``None``: those routes answer 404
            ``M_UNRECOGNIZED``).
        clock_ms: the wall clock in ms since the epoch.
    """

    def __init__(
        self,
        *,
        server_name: str,
        signing_key: SigningKey,
        key_valid_for_ms: int,
        old_verify_keys: Mapping[str, tuple[str, int]],
        keyring: Keyring,
        ingest: Ingest | None,
        members: MemberReads | None = None,
        observer: ObserverQueries | None = None,
        clock_ms: Callable[[], int],
    ) -> None:
        self.server_name = server_name
        self.signing_key = signing_key
        self.key_valid_for_ms = key_valid_for_ms
        self.old_verify_keys = old_verify_keys
        self.keyring = keyring
        self.ingest = ingest
        self.clock_ms = clock_ms
        self.member_routes = (
            MemberRoutes(
                server_name=server_name,
                keyring=keyring,
                members=members,
                observer=observer,
                clock_ms=clock_ms,
            )
            if members is not None and observer is not None
            else None
        )

    async def key_server(self, request: Request) -> Response:
        """``GET /_matrix/key/v2/server``: our key document, signed (spec §Publishing Keys)."""
        document = server_key_document(
            self.server_name,
            self.signing_key,
            now_ms=self.clock_ms(),
            valid_for_ms=self.key_valid_for_ms,
            old_verify_keys=self.old_verify_keys,
        )
        return JSONResponse(document)

    async def version(self, request: Request) -> Response:
        return JSONResponse({"server": {"name": "peekproxy", "version": __version__}})

    async def query_directory(self, request: Request) -> Response:
        """``GET .../query/directory``: we host no aliases, so every well-formed query is 404."""
        auth = await authenticate(request, server_name=self.server_name, keyring=self.keyring)
        alias_text = request.query_params.get("room_alias")
        if alias_text is None:
            raise MatrixError(400, "M_MISSING_PARAM", "room_alias is required")
        try:
            alias = RoomAlias.parse(alias_text)
        except InvalidIdentifier as e:
            raise MatrixError(400, "M_INVALID_PARAM", f"room_alias: {e}") from None
        log.info("directory query from %s for %s: not found", auth.origin, alias)
        raise MatrixError(404, "M_NOT_FOUND", "Room alias not found.")

    async def send(self, request: Request) -> Response:
        """``PUT /send/{txnId}``: a transaction, answered once it is stored."""
        try:
            auth = await authenticate(request, server_name=self.server_name, keyring=self.keyring)
        except MatrixError as e:
            SEND_TRANSACTIONS.labels("unauthenticated" if e.status == 401 else "malformed").inc()
            raise
        txn_id = request.path_params["txn_id"]
        if self.ingest is None:
            raise MatrixError(404, "M_UNRECOGNIZED", "Unrecognized request")
        # The devices this transaction wakes are woken once its answer is out (issue 17).
        with self.ingest.notifier.holding() as held:
            answer = await self.ingest.receive(auth.origin, txn_id, auth.content)
        return AnswerThen(answer, then=held.release)

    def routes(self) -> list[Route]:
        return [
            Route("/_matrix/federation/v1/send/{txn_id}", self.send, methods=["PUT"]),
            Route("/_matrix/key/v2/server", self.key_server, methods=["GET"]),
            Route("/_matrix/federation/v1/version", self.version, methods=["GET"]),
            Route("/_matrix/federation/v1/query/directory", self.query_directory, methods=["GET"]),
            *(self.member_routes.routes() if self.member_routes is not None else ()),
        ]


def federation_app(
    *,
    server_name: str,
    signing_key: SigningKey,
    key_valid_for_ms: int,
    old_verify_keys: Mapping[str, tuple[str, int]],
    keyring: Keyring,
    ingest: Ingest | None = None,
    members: MemberReads | None = None,
    observer: ObserverQueries | None = None,
    clock_ms: Callable[[], int] = lambda: int(time.time() * 1000),
) -> RequestMetrics:
    """The federation ASGI app: :class:`FederationApi`'s routes (arguments as there), with
    Matrix error JSON and request metrics."""
    api = FederationApi(
        server_name=server_name,
        signing_key=signing_key,
        key_valid_for_ms=key_valid_for_ms,
        old_verify_keys=old_verify_keys,
        keyring=keyring,
        ingest=ingest,
        members=members,
        observer=observer,
        clock_ms=clock_ms,
    )
    app = Starlette(routes=api.routes(), exception_handlers=exception_handlers())
    app.router.redirect_slashes = False
    return RequestMetrics(app, "federation")
