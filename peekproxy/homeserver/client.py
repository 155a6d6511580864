"""One client-server API request to the fronted homeserver (``upstream.homeserver_url``).

Access tokens are sent as ``Authorization: Bearer`` and never logged. Every request is bounded
as a whole (connect, send, wait, read) by its timeout; a homeserver that cannot be reached or
answers too late raises :class:`HomeserverUnavailable` (the API turns it into 502).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import httpx
import trio

__all__ = ["HomeserverClient", "HomeserverRefused", "HomeserverUnavailable"]

#: Seconds a request may take as a whole unless the caller says otherwise.
DEFAULT_TIMEOUT_S = 30.0


class HomeserverUnavailable(Exception):
    """The homeserver could not be reached, or did not answer in time."""


class HomeserverRefused(Exception):
    """The homeserver answered with an error status (``status``; ``errcode`` and ``error``
    from its Matrix error JSON, ``M_UNKNOWN`` and the status line when it had none)."""

    def __init__(self, status: int, errcode: str, error: str) -> None:
        super().__init__(f"{status} {errcode}: {error}")
        self.status, self.errcode, self.error = status, errcode, error


class HomeserverClient:
    """Requests to the client-server API at ``base_url`` (e.g. ``http://127.0.0.1:8008``).

    Args:
        base_url: the homeserver's client API base URL, without a trailing path.
        timeout_s: the default bound of one request as a whole, in seconds.
        http: an ``httpx.AsyncClient`` to use (tests); else one is made and closed by
            :meth:`aclose`.
    """

    def __init__(
        self,
        base_url: str,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        http: httpx.AsyncClient | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self._own_http = http is None
        self._http = http or httpx.AsyncClient(
            timeout=httpx.Timeout(timeout_s), limits=httpx.Limits(max_connections=1000)
        )

    async def aclose(self) -> None:
        if self._own_http:
            await self._http.aclose()

    async def request(
        self,
        method: str,
        path: str,
        *,
        token: str | None,
        params: Mapping[str, str | Sequence[str]] | Sequence[tuple[str, str]] | None = None,
        json: Any = None,
        content: bytes | None = None,
        headers: Mapping[str, str | bytes] | None = None,
        timeout_s: float | None = None,
    ) -> httpx.Response:
        """Send ``method path`` (``path`` starts with ``/_matrix/``) and read the whole answer.

        ``token``: the access token to send (``None``: none); ``headers``: more headers, a
        ``bytes`` value sent as it is. ``timeout_s`` bounds the request
        as a whole (default: the client's); a long-poll passes its own ``timeout`` plus a
        margin. Any HTTP status is returned as is.

        Raises:
            HomeserverUnavailable: connection failed, or no whole answer within ``timeout_s``.
        """
        given = dict(headers or {})
        if token is not None:
            given["Authorization"] = f"Bearer {token}"
        # As bytes: a value passed on from a client (bytes) may hold any latin-1 byte.
        sent = {
            name.encode("ascii"): value if isinstance(value, bytes) else value.encode("latin-1")
            for name, value in given.items()
        }
        limit = self.timeout_s if timeout_s is None else timeout_s
        try:
            with trio.fail_after(limit):
                return await self._http.request(
                    method,
                    self.base_url + path,
                    params=params,  # type: ignore[arg-type]
                    json=json,
                    content=content,
                    headers=sent,
                    timeout=httpx.Timeout(limit),
                )
        except trio.TooSlowError:
            raise HomeserverUnavailable(f"no answer within {limit:g} s") from None
        except httpx.HTTPError as e:
            raise HomeserverUnavailable(f"{type(e).__name__}: {e}") from None

    async def get_json(
        self,
        path: str,
        *,
        token: str | None,
        params: Mapping[str, str | Sequence[str]] | None = None,
        timeout_s: float | None = None,
    ) -> Any:
        """``GET path`` and its JSON answer (bounded as :meth:`request`).

        Raises:
            HomeserverRefused: any status but 200 (its Matrix error, if it sent one).
            HomeserverUnavailable: as :meth:`request`; also a 200 whose body is not JSON.
        """
        response = await self.request("GET", path, token=token, params=params, timeout_s=timeout_s)
        try:
            body = response.json()
        except (ValueError, RecursionError):  # not JSON, or nested too deeply to parse
            body = None
        if response.status_code != 200:
            errcode = body.get("errcode") if isinstance(body, dict) else None
            error = body.get("error") if isinstance(body, dict) else None
            raise HomeserverRefused(
                response.status_code,
                errcode if isinstance(errcode, str) else "M_UNKNOWN",
                error if isinstance(error, str) else f"HTTP {response.status_code}",
            )
        if body is None:
            raise HomeserverUnavailable(f"{path} answered 200 without JSON")
        return body
