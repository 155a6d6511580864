"""Client access tokens in front mode: the homeserver peekproxy fronts says whose they are.

A request's token (``Authorization: Bearer`` or the ``access_token`` query parameter) is
checked with the homeserver's ``GET /_matrix/client/v3/account/whoami`` (client-server API
§Current account information) through :class:`~peekproxy.homeserver.HomeserverClient`.
Answers are cached by the token's sha256 (never the token itself): a known token for
``CACHE_S`` seconds, a refused one for ``REFUSED_CACHE_S`` (bad tokens must not turn into
one homeserver request each). Tokens are never logged.

Errors (Matrix error JSON, never a 500): no token → 401 ``M_MISSING_TOKEN``; the homeserver
refuses it → 401 ``M_UNKNOWN_TOKEN`` (with the homeserver's ``soft_logout`` when it sent
one); the homeserver cannot be reached or answers nonsense → 502 ``M_UNKNOWN``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request

from peekproxy.api.errors import MatrixError
from peekproxy.core.front_sync import is_token_shape, json_object, token_hash
from peekproxy.homeserver.client import HomeserverClient, HomeserverUnavailable
from peekproxy.metrics import TOKEN_CHECKS

__all__ = ["AccessToken", "UpstreamAuth", "access_token", "forwarded_headers"]

#: Seconds a resolved token is trusted without asking the homeserver again.
CACHE_S = 60.0
#: Seconds a refused token is refused without asking again.
REFUSED_CACHE_S = 10.0
#: Seconds one whoami may take (at most; less when ``upstream.timeout`` is less).
WHOAMI_TIMEOUT_S = 10.0
#: Cache entries kept before expired ones are swept.
_SWEEP_AT = 100_000


@dataclass(frozen=True)
class AccessToken:
    """A request's access token and where it came from (``in_header``: the
    ``Authorization`` header, else the ``access_token`` query parameter)."""

    token: str
    in_header: bool


def access_token(request: Request) -> AccessToken:
    """The request's access token (client-server API §Using access tokens).

    Raises:
        MatrixError: 401 ``M_MISSING_TOKEN`` when there is none.
    """
    header = request.headers.get("authorization", "")
    if header.lower().startswith("bearer ") and header[7:].strip():
        return AccessToken(header[7:].strip(), True)
    token = request.query_params.get("access_token", "")
    if not token:
        raise MatrixError(401, "M_MISSING_TOKEN", "Missing access token")
    return AccessToken(token, False)


def forwarded_headers(request: Request) -> dict[str, bytes]:
    """What the homeserver should learn of the client behind a request peekproxy passes on:
    ``X-Forwarded-For`` (the client's, with the address it came from added),
    ``X-Forwarded-Proto`` (as the reverse proxy said, else the request's scheme) and the
    client's ``User-Agent`` (Synapse keeps both per device: an admin's and a user's session
    lists show the client, not peekproxy). Values are the bytes as they came (latin-1 gives
    them back unchanged): a client's may hold any of them."""
    headers: dict[str, bytes] = {}
    forwarded = request.headers.get("x-forwarded-for")
    peer = request.client.host if request.client else None
    if peer:
        forwarded = f"{forwarded}, {peer}" if forwarded else peer
    if forwarded:
        headers["X-Forwarded-For"] = forwarded.encode("latin-1")
    proto = request.headers.get("x-forwarded-proto") or request.url.scheme
    headers["X-Forwarded-Proto"] = proto.encode("latin-1")
    user_agent = request.headers.get("user-agent")
    if user_agent:
        headers["User-Agent"] = user_agent.encode("latin-1")
    return headers


class UpstreamAuth:
    """Resolves access tokens to (user ID, device ID) through the fronted homeserver.

    Args:
        homeserver: the client for ``upstream.homeserver_url``.
        clock: monotonic seconds (tests pass their own).
    """

    def __init__(
        self, homeserver: HomeserverClient, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.homeserver = homeserver
        self._clock = clock
        #: sha256(token) -> (expires at, (user ID, device ID)), or for a refused token
        #: (expires at, the extra fields of its 401: ``soft_logout``).
        self._cache: dict[str, tuple[float, tuple[str, str] | dict[str, Any]]] = {}
        #: How many whoami requests were sent (metrics, tests).
        self.asked = 0

    async def __call__(self, request: Request) -> tuple[str, str]:
        """(user ID, device ID) of the request's access token. Raises as :meth:`whoami`."""
        return await self.whoami(access_token(request).token, forwarded_headers(request))

    async def whoami(
        self, token: str, headers: Mapping[str, bytes] | None = None
    ) -> tuple[str, str]:
        """(user ID, device ID) of ``token``, from the cache or the homeserver (asked with
        ``headers``: :func:`forwarded_headers`).

        Raises:
            MatrixError: 401 ``M_UNKNOWN_TOKEN`` (``soft_logout`` passed through; also, without
                asking, for a token that is not visible ASCII: :func:`is_token_shape`); 403
                ``M_FORBIDDEN`` for a token without a device; 502 ``M_UNKNOWN`` when the
                homeserver cannot be reached or its answer makes no sense.
        """
        if not is_token_shape(token):
            raise _refused({})  # no homeserver issues it; it cannot be sent in a header
        key = token_hash(token)
        now = self._clock()
        cached = self._cache.get(key)
        if cached is not None and cached[0] > now:
            TOKEN_CHECKS.labels("cached").inc()
            if isinstance(cached[1], dict):
                raise _refused(cached[1])
            return cached[1]
        self.asked += 1
        TOKEN_CHECKS.labels("asked").inc()
        try:
            response = await self.homeserver.request(
                "GET",
                "/_matrix/client/v3/account/whoami",
                token=token,
                headers=headers,
                timeout_s=min(WHOAMI_TIMEOUT_S, self.homeserver.timeout_s),
            )
        except HomeserverUnavailable as e:
            raise MatrixError(502, "M_UNKNOWN", f"the homeserver cannot be reached: {e}") from None
        answer = json_object(response.content)
        if response.status_code in (401, 403):
            extra = {}
            if isinstance(answer, dict) and isinstance(answer.get("soft_logout"), bool):
                extra["soft_logout"] = answer["soft_logout"]
            self._remember(key, now + REFUSED_CACHE_S, extra)
            raise _refused(extra)
        user_id = answer.get("user_id") if isinstance(answer, dict) else None
        device_id = answer.get("device_id") if isinstance(answer, dict) else None
        if response.status_code != 200 or not isinstance(user_id, str):
            raise MatrixError(
                502, "M_UNKNOWN", f"the homeserver's whoami answered HTTP {response.status_code}"
            )
        if not isinstance(device_id, str):
            raise MatrixError(403, "M_FORBIDDEN", "peeking needs a token bound to a device")
        self._remember(key, now + CACHE_S, (user_id, device_id))
        return user_id, device_id

    def _remember(self, key: str, expires: float, value: tuple[str, str] | dict[str, Any]) -> None:
        self._cache[key] = (expires, value)
        if len(self._cache) > _SWEEP_AT:
            now = self._clock()
            self._cache = {k: v for k, v in self._cache.items() if v[0] > now}


def _refused(extra: dict[str, Any]) -> MatrixError:
    return MatrixError(401, "M_UNKNOWN_TOKEN", "Unknown access token", **extra)
