"""The admin API on the client listener, behind the delegation secret.

* ``GET /_peekproxy/v1/admin/subscriptions[?room_id=]`` — the status view of the remote
  subscriptions (:meth:`peekproxy.services.status.SubscriptionStatus.report`; the shape is
  in docs/operations.md "Status" and docs/delegation-api.openapi.yaml).

Authenticated as the delegation API is (``Authorization: Bearer <secret>``, checked by
:meth:`peekproxy.api.delegation.DelegationApi.check_secret`): 401 ``M_UNKNOWN_TOKEN`` for a
missing or wrong secret; without a configured secret the endpoint does not exist (404
``M_UNRECOGNIZED``, as any unknown path).
"""

from __future__ import annotations

from collections.abc import Callable

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from peekproxy.api.delegation_params import room_id_param
from peekproxy.services.status import SubscriptionStatus

__all__ = ["AdminApi"]


class AdminApi:
    """The admin routes (see the module docstring). ``authenticate`` raises
    :class:`~peekproxy.api.errors.MatrixError` unless the request carries the secret."""

    def __init__(self, status: SubscriptionStatus, authenticate: Callable[[Request], None]) -> None:
        self.status = status
        self.authenticate = authenticate

    async def subscriptions(self, request: Request) -> Response:
        self.authenticate(request)
        room_id = request.query_params.get("room_id")
        if room_id is not None:
            room_id = room_id_param(room_id)
        return JSONResponse(await self.status.report(room_id))

    def routes(self, prefix: str = "/_peekproxy/v1") -> list[Route]:
        return [Route(f"{prefix}/admin/subscriptions", self.subscriptions, methods=["GET"])]
