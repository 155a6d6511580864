"""Outbound federation HTTP: discovery, IP filtering, X-Matrix signing, back-off, size caps.

:class:`FederationClient` is the I/O shell every outbound federation request goes through:

1. resolve the destination server name (:mod:`peekproxy.federation.discovery`);
2. resolve each target host to addresses and drop those in ``ip_range_blacklist`` (unless in
   ``ip_range_whitelist``; :class:`~peekproxy.federation.ip_policy.IpFilter`) *before*
   connecting;
3. sign the request with X-Matrix (origin, destination, key, sig) unless it is a key fetch;
4. connect through :class:`~peekproxy.federation.transport.FederationTransport` with the
   TLS name discovery chose, trying the next target on connection failures;
5. read at most ``max_response_bytes`` of the answer.

Failures are typed (:class:`FederationError` subclasses) and say whether retrying later may
help (``retryable``). Connection failures, timeouts and 5xx answers put the destination in
exponential back-off with jitter (:class:`~peekproxy.federation.destinations.Backoff`).
"""

from __future__ import annotations

import json
import logging
import ssl
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode, urljoin, urlsplit

import canonicaljson
import httpcore
import httpx
import trio
from signedjson.types import SigningKey

from peekproxy.core.federation_errors import (
    BadResponse,
    DestinationBackingOff,
    DestinationBlocked,
    DestinationUnreachable,
    FederationError,
    RemoteError,
)
from peekproxy.core.identifiers import InvalidIdentifier, ServerName
from peekproxy.core.xmatrix import authorization_header
from peekproxy.federation.destinations import Backoff
from peekproxy.federation.discovery import (
    WELL_KNOWN_MAX_BYTES,
    DnsError,
    DnsLookup,
    DnspythonLookup,
    FederationNotOffered,
    Resolution,
    ServerResolver,
    WellKnownCache,
    WellKnownInvalid,
    parse_well_known,
    well_known_cache_period,
)
from peekproxy.federation.ip_policy import IpFilter
from peekproxy.federation.transport import ROUTE_EXTENSION, FederationTransport, Route
from peekproxy.metrics import outbound_request

__all__ = [
    "BadResponse",
    "DestinationBackingOff",
    "DestinationBlocked",
    "DestinationUnreachable",
    "FederationClient",
    "FederationError",
    "FederationResponse",
    "RemoteError",
    "build_ssl_context",
    "path_segment",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FederationResponse:
    """A successful (2xx) answer."""

    status: int
    headers: Mapping[str, str]
    body: bytes
    destination: str

    def json(self) -> Any:
        """The body parsed as JSON. Raises BadResponse when it is not JSON."""
        try:
            return json.loads(self.body)
        except (ValueError, UnicodeDecodeError):
            raise BadResponse(self.destination, "response body is not JSON") from None


def build_ssl_context(verify: bool = True, ca_file: Path | None = None) -> ssl.SSLContext:
    """TLS client context: system CAs plus ``ca_file``; no checks at all when not ``verify``."""
    context = ssl.create_default_context()
    if ca_file is not None:
        context.load_verify_locations(cafile=str(ca_file))
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def path_segment(value: str) -> str:
    """Percent-encode one path segment (room IDs, event IDs, peek IDs, txn IDs)."""
    return quote(value, safe="")


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


class FederationClient:
    """Sends federation requests as ``server_name`` (signed with ``signing_key``).

    Args:
        server_name: our server name (X-Matrix origin); ``None`` for an unsigned client
            (key fetches only).
        signing_key: our key; ``None`` with ``server_name=None``.
        dns: SRV and address lookups.
        ip_filter: outbound address policy.
        ssl_context: verifies remote certificates.
        default_port: port when discovery finds none (8448).
        connect_timeout, request_timeout: seconds; ``request_timeout`` bounds a whole
            request, discovery included.
        max_response_bytes: cap on any response body.
        backoff: per-destination back-off (``None``: none).
        well_known_port: port of ``/.well-known/matrix/server`` fetches (443 per the spec).
        well_known_timeout: seconds for one whole well-known fetch: redirects, connects,
            headers and body together (default: ``connect_timeout``).
    """

    def __init__(
        self,
        *,
        server_name: str | None,
        signing_key: SigningKey | None,
        dns: DnsLookup,
        ip_filter: IpFilter,
        ssl_context: ssl.SSLContext,
        default_port: int = 8448,
        connect_timeout: float = 10.0,
        request_timeout: float = 60.0,
        max_response_bytes: int = 64 * 1024 * 1024,
        backoff: Backoff | None = None,
        well_known_port: int = 443,
        well_known_timeout: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if (server_name is None) != (signing_key is None):
            raise ValueError("server_name and signing_key go together")
        self.server_name = server_name
        self._signing_key = signing_key
        self._dns = dns
        self._ip_filter = ip_filter
        self._connect_timeout = connect_timeout
        self._request_timeout = request_timeout
        self._max_response_bytes = max_response_bytes
        self._backoff = backoff
        self._well_known_port = well_known_port
        self._well_known_timeout = well_known_timeout or connect_timeout
        self._transport = FederationTransport(ssl_context)
        self._http = httpx.AsyncClient(transport=self._transport, follow_redirects=False)
        self.resolver = ServerResolver(
            dns=dns,
            well_known=WellKnownCache(self.fetch_well_known, clock),
            clock=clock,
            default_port=default_port,
        )

    @classmethod
    def from_config(
        cls,
        federation: Any,
        *,
        server_name: str | None = None,
        signing_key: SigningKey | None = None,
    ) -> FederationClient:
        """Build from a :class:`~peekproxy.config.FederationSection`."""
        return cls(
            server_name=server_name,
            signing_key=signing_key,
            dns=DnspythonLookup(federation.dns_nameservers, lifetime=federation.connect_timeout),
            ip_filter=IpFilter(federation.ip_range_blacklist, federation.ip_range_whitelist),
            ssl_context=build_ssl_context(federation.verify_tls, federation.tls_ca_file),
            default_port=federation.default_port,
            connect_timeout=federation.connect_timeout,
            request_timeout=federation.request_timeout,
            max_response_bytes=federation.max_response_size,
            backoff=Backoff(federation.backoff_initial, federation.backoff_max, time.monotonic),
        )

    async def aclose(self) -> None:
        await self._http.aclose()
        await self._transport.aclose()

    # -- requests ---------------------------------------------------------------------------

    async def request(
        self, method: str, destination: str, path: str, **kwargs: Any
    ) -> FederationResponse:
        """:meth:`_request`, counted (``peekproxy_federation_requests_total``); raises as it."""
        with outbound_request(method, path):
            return await self._request(method, destination, path, **kwargs)

    async def _request(
        self,
        method: str,
        destination: str,
        path: str,
        *,
        query: Mapping[str, str | Sequence[str]] | None = None,
        content: Any = None,
        signed: bool = True,
        timeout: float | None = None,
    ) -> FederationResponse:
        """Send one request and return its 2xx answer.

        Args:
            method: HTTP method.
            destination: the server name (pre-delegation; it is the X-Matrix destination).
            path: percent-encoded path (use :func:`path_segment` for IDs).
            query: query parameters; a sequence value repeats the parameter.
            content: JSON body (PUT/POST); ``None`` for no body.
            signed: add X-Matrix authentication.
            timeout: seconds for the whole request, resolving the server name (well-known,
                SRV, addresses) included (default: request_timeout).

        Raises:
            RemoteError: the remote answered with status ≥ 300.
            DestinationUnreachable, DestinationBlocked, DestinationBackingOff, BadResponse.
        """
        if signed and self._signing_key is None:
            raise ValueError("this client has no signing key")
        try:
            ServerName.parse(destination)
        except InvalidIdentifier as e:
            raise DestinationUnreachable(
                destination, f"not a server name: {e}", "invalid_destination"
            ) from None
        if self._backoff is not None:
            self._backoff.check(destination)
        target = path
        encoded = urlencode(query or {}, doseq=True, quote_via=quote)
        if encoded:
            target += "?" + encoded
        body = canonicaljson.encode_canonical_json(content) if content is not None else None
        budget = timeout or self._request_timeout
        phase = "resolving the server name"
        # One deadline for everything: discovery (well-known, SRV, addresses) included.
        with trio.move_on_after(budget) as scope:
            try:
                resolution = await self.resolver.resolve(destination)
            except (DnsError, FederationNotOffered) as e:
                self._failed(destination)
                raise DestinationUnreachable(destination, str(e), "dns_error") from None
            phase = "connecting or waiting for the answer"
            try:
                response = await self._send_to_targets(
                    method, resolution, target, body, content, signed
                )
            except DestinationUnreachable:
                self._failed(destination)
                self.resolver.forget(destination)
                raise
        if scope.cancelled_caught:
            self._failed(destination)
            raise DestinationUnreachable(
                destination, f"request timed out after {budget:g} s while {phase}", "timeout"
            )
        if response.status >= 500:
            self._failed(destination)  # the remote is there but failing: back off too
        elif self._backoff is not None:
            self._backoff.succeeded(destination)
        if response.status >= 300:
            raise RemoteError(destination, response.status, response.body)
        return response

    async def get_json(self, destination: str, path: str, **kwargs: Any) -> Any:
        """GET and parse the JSON answer (see :meth:`request`)."""
        return await self._json("GET", destination, path, **kwargs)

    async def put_json(self, destination: str, path: str, content: Any, **kwargs: Any) -> Any:
        return await self._json("PUT", destination, path, content=content, **kwargs)

    async def post_json(self, destination: str, path: str, content: Any, **kwargs: Any) -> Any:
        return await self._json("POST", destination, path, content=content, **kwargs)

    async def _json(self, method: str, destination: str, path: str, **kwargs: Any) -> Any:
        # Counted once, as bad_response when the answer is not JSON.
        with outbound_request(method, path):
            return (await self._request(method, destination, path, **kwargs)).json()

    def heard_from(self, destination: str) -> None:
        """``destination`` just sent us an authenticated request (a ``/send``): it is up,
        so its back-off ends (as Synapse does on inbound traffic). A fetch that this very
        request needs, such as ``get_missing_events``, must not be refused locally."""
        if self._backoff is not None:
            self._backoff.succeeded(destination)

    def _failed(self, destination: str) -> None:
        if self._backoff is not None:
            self._backoff.failed(destination)

    async def _addresses(self, destination: str, host: str) -> tuple[str, ...]:
        try:
            found = await self._dns.addresses(host)
        except DnsError as e:
            raise DestinationUnreachable(destination, str(e), "dns_error") from None
        if not found:
            raise DestinationUnreachable(destination, f"{host} has no address", "dns_error")
        allowed = tuple(a for a in found if self._ip_filter.allowed(a))
        if not allowed:
            raise DestinationBlocked(
                destination,
                f"{host} resolves only to blocked addresses ({', '.join(found)}); "
                "see federation.ip_range_blacklist / ip_range_whitelist",
            )
        return allowed

    async def _send_to_targets(
        self,
        method: str,
        resolution: Resolution,
        target: str,
        body: bytes | None,
        content: Any,
        signed: bool,
    ) -> FederationResponse:
        destination = resolution.server_name
        failures: list[str] = []
        blocked: DestinationBlocked | None = None
        for host, port in resolution.targets:
            try:
                addresses = await self._addresses(destination, host)
            except DestinationBlocked as e:
                blocked = e
                continue
            except DestinationUnreachable as e:
                failures.append(e.reason)
                continue
            route = Route(addresses, port, resolution.tls_name)
            url = f"https://{_url_host(resolution.tls_name)}:{port}{target}"
            request = self._http.build_request(
                method,
                url,
                content=body,
                headers={"Host": resolution.host_header, "Accept": "application/json"}
                | ({"Content-Type": "application/json"} if body is not None else {}),
                extensions={
                    ROUTE_EXTENSION: route,
                    "timeout": {
                        "connect": self._connect_timeout,
                        "read": self._request_timeout,
                        "write": self._request_timeout,
                        "pool": self._connect_timeout,
                    },
                },
            )
            if signed:
                assert self._signing_key is not None and self.server_name is not None
                request.headers["Authorization"] = authorization_header(
                    self._signing_key,
                    origin=self.server_name,
                    destination=destination,
                    method=method,
                    uri=request.url.raw_path.decode("ascii"),
                    content=content,
                )
            try:
                return await self._exchange(destination, request, self._max_response_bytes)
            except _ConnectFailed as e:
                failures.append(f"{host}:{port}: {e}")
        if blocked is not None and not failures:
            raise blocked
        raise DestinationUnreachable(destination, "; ".join(failures) or "no target")

    async def _exchange(
        self, destination: str, request: httpx.Request, cap: int
    ) -> FederationResponse:
        try:
            response = await self._http.send(request, stream=True)
        except (httpcore.ConnectError, httpcore.ConnectTimeout, ssl.SSLError, OSError) as e:
            raise _ConnectFailed(_describe(e)) from None
        except (httpcore.TimeoutException, httpcore.NetworkError, httpcore.ProtocolError) as e:
            raise DestinationUnreachable(destination, _describe(e), _kind(e)) from None
        try:
            body = await self._read_capped(destination, response, cap)
        except (httpcore.TimeoutException, httpcore.NetworkError, httpcore.ProtocolError) as e:
            raise DestinationUnreachable(destination, _describe(e), _kind(e)) from None
        finally:
            await response.aclose()
        return FederationResponse(response.status_code, dict(response.headers), body, destination)

    @staticmethod
    async def _read_capped(destination: str, response: httpx.Response, cap: int) -> bytes:
        declared = response.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > cap:
            raise BadResponse(destination, f"response of {declared} bytes exceeds {cap}")
        chunks, size = [], 0
        async for chunk in response.aiter_raw():
            size += len(chunk)
            if size > cap:
                raise BadResponse(destination, f"response exceeds {cap} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    # -- well-known -------------------------------------------------------------------------

    async def fetch_well_known(self, hostname: str) -> tuple[ServerName, float]:
        """GET ``https://<hostname>/.well-known/matrix/server`` (redirects followed, no loops,
        body capped at 50 KiB), all of it within ``well_known_timeout`` seconds: a server
        that trickles its answer cannot hold discovery longer than that.

        Returns:
            The delegated server name and how long to cache it (seconds).

        Raises:
            WellKnownInvalid: no usable delegation (status, JSON, ``m.server``, loop, size).
            FederationError: the host could not be reached, or the fetch took too long.
        """
        with trio.move_on_after(self._well_known_timeout):
            return await self._fetch_well_known(hostname)
        raise DestinationUnreachable(
            hostname,
            f"https://{hostname}/.well-known/matrix/server did not answer in full within "
            f"{self._well_known_timeout:g} s",
        )

    async def _fetch_well_known(self, hostname: str) -> tuple[ServerName, float]:
        port = self._well_known_port
        url = f"https://{_url_host(hostname)}:{port}/.well-known/matrix/server"
        seen: set[str] = set()
        for _ in range(10):
            if url in seen:
                raise WellKnownInvalid(f"redirect loop at {url}")
            seen.add(url)
            parts = urlsplit(url)
            if parts.scheme != "https" or not parts.hostname:
                raise WellKnownInvalid(f"redirect to a non-https URL {url}")
            host = parts.hostname
            addresses = await self._addresses(hostname, host)
            request = self._http.build_request(
                "GET",
                url,
                headers={"Accept": "application/json"},
                extensions={
                    ROUTE_EXTENSION: Route(addresses, parts.port or 443, host),
                    "timeout": {
                        "connect": self._connect_timeout,
                        "read": self._connect_timeout,
                        "write": self._connect_timeout,
                        "pool": self._connect_timeout,
                    },
                },
            )
            try:
                response = await self._exchange(hostname, request, WELL_KNOWN_MAX_BYTES)
            except _ConnectFailed as e:
                raise DestinationUnreachable(hostname, str(e)) from None
            except BadResponse as e:
                raise WellKnownInvalid(e.reason) from None
            if response.status in (301, 302, 303, 307, 308) and "location" in response.headers:
                url = urljoin(url, response.headers["location"])
                continue
            delegated = parse_well_known(response.status, response.body)
            return delegated, well_known_cache_period(response.headers, time.time())
        raise WellKnownInvalid("too many redirects")


def _kind(error: Exception) -> str:
    return "timeout" if isinstance(error, httpcore.TimeoutException) else "connect_error"


class _ConnectFailed(Exception):
    """Could not connect to one target (try the next)."""


def _describe(error: BaseException) -> str:
    """A one-line reason from an exception and its causes (TLS errors hide a few levels down)."""
    parts: list[str] = []
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, BaseExceptionGroup) and current.exceptions:
            current = current.exceptions[0]
            continue
        text = str(current).strip()
        if isinstance(current, ssl.SSLCertVerificationError):
            text = f"TLS certificate check failed: {current.verify_message}"
        elif isinstance(current, ssl.SSLError):
            text = f"TLS error: {current.reason or current}"
        if text and not any(text in p or p in text for p in parts):
            parts.append(text)
        current = current.__cause__ or current.__context__
    return ("; ".join(parts) or type(error).__name__).replace("\n", " ")[:300]
