"""httpx transport for federation: connect to addresses chosen by discovery, verify TLS for
the name discovery chose.

Every request carries a :class:`Route` in ``request.extensions["peekproxy.route"]``: the
already-resolved (and IP-filtered) addresses, the port and the TLS name. The request URL's
host is the TLS name, so httpcore checks the certificate against it and sends it as SNI
(Python's ssl sends no SNI for an IP address). Connection pools are kept per route, never
shared between routes, which avoids the pitfall of a pooled connection verified for one
name being reused for another that shares the IP and port (federation.md §1.5).
"""

from __future__ import annotations

import ssl
import typing
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

import httpcore
import httpx

__all__ = ["ROUTE_EXTENSION", "FederationTransport", "Route"]

ROUTE_EXTENSION = "peekproxy.route"


@dataclass(frozen=True, slots=True)
class Route:
    """Where a request goes: try ``addresses`` in order at ``port``; TLS for ``tls_name``."""

    addresses: tuple[str, ...]
    port: int
    tls_name: str


class _PinnedBackend(httpcore.AsyncNetworkBackend):
    """Ignores the URL host and connects to the route's addresses, first that answers."""

    def __init__(self, addresses: tuple[str, ...]) -> None:
        self._addresses = addresses
        self._inner = httpcore.TrioBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[typing.Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        error: Exception | None = None
        for address in self._addresses:
            try:
                return await self._inner.connect_tcp(
                    address, port, timeout, local_address, socket_options
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as e:
                error = e
        raise error or httpcore.ConnectError("no address to connect to")

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[typing.Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:  # pragma: no cover - federation never uses unix sockets
        raise httpcore.ConnectError("unix sockets are not used for federation")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class FederationTransport(httpx.AsyncBaseTransport):
    """One httpcore connection pool per :class:`Route` (the most recent ``max_routes`` kept)."""

    def __init__(self, ssl_context: ssl.SSLContext, *, max_routes: int = 256) -> None:
        self._ssl_context = ssl_context
        self._pools: OrderedDict[Route, httpcore.AsyncConnectionPool] = OrderedDict()
        self._max_routes = max_routes

    def _pool(self, route: Route) -> httpcore.AsyncConnectionPool:
        pool = self._pools.get(route)
        if pool is None:
            pool = httpcore.AsyncConnectionPool(
                ssl_context=self._ssl_context,
                max_connections=20,
                keepalive_expiry=60.0,
                http2=False,
                network_backend=_PinnedBackend(route.addresses),
            )
            self._pools[route] = pool
            while len(self._pools) > self._max_routes:
                # Dropped pools' idle sockets are closed when garbage-collected.
                self._pools.popitem(last=False)
        self._pools.move_to_end(route)
        return pool

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        route = request.extensions.get(ROUTE_EXTENSION)
        if not isinstance(route, Route):
            raise httpx.UnsupportedProtocol("federation requests need a resolved route")
        assert isinstance(request.stream, typing.AsyncIterable)
        core_request = httpcore.Request(
            method=request.method,
            url=httpcore.URL(
                scheme=request.url.raw_scheme,
                host=request.url.raw_host,
                port=request.url.port,
                target=request.url.raw_path,
            ),
            headers=request.headers.raw,
            content=request.stream,
            extensions={k: v for k, v in request.extensions.items() if k != ROUTE_EXTENSION},
        )
        response = await self._pool(route).handle_async_request(core_request)
        assert isinstance(response.stream, typing.AsyncIterable)
        return httpx.Response(
            status_code=response.status,
            headers=response.headers,
            stream=_ResponseStream(response.stream),
            extensions=response.extensions,
        )

    async def aclose(self) -> None:
        for pool in self._pools.values():
            await pool.aclose()
        self._pools.clear()


class _ResponseStream(httpx.AsyncByteStream):
    def __init__(self, stream: typing.AsyncIterable[bytes]) -> None:
        self._stream = stream

    async def __aiter__(self) -> typing.AsyncIterator[bytes]:
        async for chunk in self._stream:
            yield chunk

    async def aclose(self) -> None:
        if hasattr(self._stream, "aclose"):
            await self._stream.aclose()
