"""The federation listener: key server and version (server-server API).

* ``GET /_matrix/key/v2/server`` — our signed key document (SSAPI §Publishing Keys).
* ``GET /_matrix/federation/v1/version`` — ``{"server": {"name", "version"}}``.
* ``GET /_matrix/federation/v1/query/directory?room_alias=`` — X-Matrix verified; peekproxy
  hosts no aliases, so a well-formed alias gets ``404 M_NOT_FOUND`` (SSAPI §Room Aliases).
* ``PUT /_matrix/federation/v1/send/{txnId}`` — X-Matrix verified; events of peeked rooms
  (see :meth:`peekproxy.services.ingest.Ingest.receive`).
* Anything else — ``404``/``405`` ``M_UNRECOGNIZED`` (SSAPI §Unsupported endpoints).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping

from signedjson.types import SigningKey
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from peekproxy import __version__
from peekproxy.api.errors import MatrixError, exception_handlers
from peekproxy.api.federation_auth import authenticate
from peekproxy.core.identifiers import InvalidIdentifier, RoomAlias
from peekproxy.federation.keyring import Keyring
from peekproxy.federation.signing_key import server_key_document
from peekproxy.metrics import RequestMetrics
from peekproxy.services.assembly import Services

__all__ = ["federation_app"]

log = logging.getLogger("peekproxy.federation")


def federation_app(
    *,
    server_name: str,
    signing_key: SigningKey,
    key_valid_for_ms: int,
    old_verify_keys: Mapping[str, tuple[str, int]],
    keyring: Keyring,
    peeks: Services | None = None,
    clock_ms: Callable[[], int] = lambda: int(time.time() * 1000),
) -> RequestMetrics:
    """Build the federation ASGI app.

    Args:
        server_name: our server name, as published in the key document.
        signing_key: our current signing key.
        key_valid_for_ms: lifetime of a served key document (``valid_until_ts - now``), ms.
        old_verify_keys: retired keys: key ID → (base64 public key, ``expired_ts`` ms).
        keyring: verify keys of other servers, for X-Matrix checks.
        peeks: the peek service that takes ``/send`` transactions.
        clock_ms: the wall clock in ms since the epoch.
    """

    async def key_server(request: Request) -> Response:
        document = server_key_document(
            server_name,
            signing_key,
            now_ms=clock_ms(),
            valid_for_ms=key_valid_for_ms,
            old_verify_keys=old_verify_keys,
        )
        return JSONResponse(document)

    async def version(request: Request) -> Response:
        return JSONResponse({"server": {"name": "peekproxy", "version": __version__}})

    async def query_directory(request: Request) -> Response:
        auth = await authenticate(request, server_name=server_name, keyring=keyring)
        alias_text = request.query_params.get("room_alias")
        if alias_text is None:
            raise MatrixError(400, "M_MISSING_PARAM", "room_alias is required")
        try:
            alias = RoomAlias.parse(alias_text)
        except InvalidIdentifier as e:
            raise MatrixError(400, "M_INVALID_PARAM", f"room_alias: {e}") from None
        log.info("directory query from %s for %s: not found", auth.origin, alias)
        raise MatrixError(404, "M_NOT_FOUND", "Room alias not found.")

    async def send(request: Request) -> Response:
        auth = await authenticate(request, server_name=server_name, keyring=keyring)
        txn_id = request.path_params["txn_id"]
        if peeks is None:
            raise MatrixError(404, "M_UNRECOGNIZED", "Unrecognized request")
        return JSONResponse(await peeks.ingest.receive(auth.origin, txn_id, auth.content))

    app = Starlette(
        routes=[
            Route("/_matrix/federation/v1/send/{txn_id}", send, methods=["PUT"]),
            Route("/_matrix/key/v2/server", key_server, methods=["GET"]),
            Route("/_matrix/federation/v1/version", version, methods=["GET"]),
            Route("/_matrix/federation/v1/query/directory", query_directory, methods=["GET"]),
        ],
        exception_handlers=exception_handlers(),
    )
    app.router.redirect_slashes = False
    return RequestMetrics(app, "federation")
