"""Client requests passed to the fronted homeserver as they came (front mode, docs/front.md).

:class:`Passthrough` sends a client's request (its method, raw path and query string, access
token, the client's ``X-Forwarded-*`` and ``User-Agent``) to the homeserver through
:class:`~peekproxy.homeserver.HomeserverClient` and keeps the answer's status, body and
``Content-Type``: ``/sync`` (the homeserver's part of it) and the history reads of rooms the
device does not peek go this way. :meth:`Passthrough.homeserver_answers` is ``/ready``'s
check.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from peekproxy.homeserver.client import HomeserverClient, HomeserverUnavailable

__all__ = ["ClientRequest", "Passthrough", "UpstreamAnswer"]

#: Seconds ``/ready`` waits for the homeserver's ``/versions``.
READY_TIMEOUT_S = 3.0


@dataclass(frozen=True)
class ClientRequest:
    """A client's request as it reached peekproxy.

    ``path``: the raw path as sent (percent-encoding kept); ``query``: the raw query string
    without ``?``; ``token``: the access token; ``token_in_header``: it came as
    ``Authorization: Bearer`` (else it is in ``query`` as ``access_token`` and is not sent
    twice: the homeserver refuses both at once); ``headers``: what the homeserver should
    learn of the client (``X-Forwarded-For``, ``X-Forwarded-Proto``, ``User-Agent``), as the
    bytes they came as."""

    method: str
    path: str
    query: str
    token: str
    token_in_header: bool
    headers: Mapping[str, bytes] = field(default_factory=dict)


@dataclass(frozen=True)
class UpstreamAnswer:
    """An HTTP answer for the client: ``status``, ``body`` bytes and ``content_type``
    (``None``: the homeserver sent none; its bytes as latin-1 characters)."""

    status: int
    body: bytes
    content_type: str | None


class Passthrough:
    """Forwards client requests to the homeserver (``homeserver``)."""

    def __init__(self, homeserver: HomeserverClient) -> None:
        self.homeserver = homeserver

    async def forward(
        self, request: ClientRequest, *, query: str | None = None, timeout_s: float | None = None
    ) -> UpstreamAnswer:
        """The homeserver's answer to ``request`` (``query``: another query string to send
        instead of the request's; ``timeout_s``: the bound of the whole request, seconds,
        default the client's). Any status comes back as is.

        Raises:
            HomeserverUnavailable: no connection, or no whole answer within ``timeout_s``.
        """
        sent_query = request.query if query is None else query
        response = await self.homeserver.request(
            request.method,
            request.path + (f"?{sent_query}" if sent_query else ""),
            token=request.token if request.token_in_header else None,
            headers=request.headers,
            timeout_s=timeout_s,
        )
        # The header's bytes as sent (latin-1 gives them back unchanged): httpx's decoded
        # str may hold characters (UTF-8) that an answer's header cannot carry.
        content_type = next(
            (v.decode("latin-1") for k, v in response.headers.raw if k.lower() == b"content-type"),
            None,
        )
        return UpstreamAnswer(response.status_code, response.content, content_type)

    async def homeserver_answers(self) -> str | None:
        """``None`` when the homeserver answers ``GET /_matrix/client/versions`` with 200
        within ``READY_TIMEOUT_S``; else why not (for ``/ready``'s 503)."""
        try:
            response = await self.homeserver.request(
                "GET", "/_matrix/client/versions", token=None, timeout_s=READY_TIMEOUT_S
            )
        except HomeserverUnavailable as e:
            return f"the homeserver cannot be reached: {e}"
        if response.status_code != 200:
            return f"the homeserver's /versions answered HTTP {response.status_code}"
        return None
