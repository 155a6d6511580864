"""Client access tokens in front mode: the homeserver peekproxy fronts says whose they are.

A request's token (``Authorization: Bearer`` or the ``access_token`` query parameter) is
checked with the homeserver's ``GET /_matrix/client/v3/account/whoami`` (client-server API
§Current account information); answers are cached for a minute. Tokens are never logged.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx
from starlette.requests import Request

from peekproxy.api.errors import MatrixError

__all__ = ["UpstreamAuth"]

CACHE_S = 60.0


class UpstreamAuth:
    """Resolves access tokens to (user ID, device ID) through ``homeserver_url``."""

    def __init__(self, homeserver_url: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.homeserver_url = homeserver_url.rstrip("/")
        self._clock = clock
        self._cache: dict[str, tuple[float, str, str]] = {}
        self._http = httpx.AsyncClient(timeout=10)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __call__(self, request: Request) -> tuple[str, str]:
        """(user ID, device ID) of the request's access token.

        Raises:
            MatrixError: 401 ``M_MISSING_TOKEN`` / ``M_UNKNOWN_TOKEN``; 502 when the
                homeserver cannot be asked.
        """
        header = request.headers.get("authorization", "")
        token = header[7:].strip() if header.lower().startswith("bearer ") else ""
        token = token or request.query_params.get("access_token", "")
        if not token:
            raise MatrixError(401, "M_MISSING_TOKEN", "Missing access token")
        now = self._clock()
        cached = self._cache.get(token)
        if cached is not None and cached[0] > now:
            return cached[1], cached[2]
        try:
            response = await self._http.get(
                f"{self.homeserver_url}/_matrix/client/v3/account/whoami",
                headers={"Authorization": f"Bearer {token}"},
            )
        except httpx.HTTPError as e:
            raise MatrixError(502, "M_UNKNOWN", f"cannot reach the homeserver: {e}") from None
        if response.status_code in (401, 403):
            raise MatrixError(401, "M_UNKNOWN_TOKEN", "Unknown access token")
        try:
            answer = response.json()
            user_id, device_id = answer["user_id"], answer.get("device_id")
        except (ValueError, KeyError, TypeError):
            raise MatrixError(
                502, "M_UNKNOWN", f"the homeserver's whoami answered HTTP {response.status_code}"
            ) from None
        if not isinstance(user_id, str) or not isinstance(device_id, str):
            raise MatrixError(403, "M_FORBIDDEN", "peeking needs a token bound to a device")
        self._cache[token] = (now + CACHE_S, user_id, device_id)
        if len(self._cache) > 100_000:
            self._cache = {k: v for k, v in self._cache.items() if v[0] > now}
        return user_id, device_id
