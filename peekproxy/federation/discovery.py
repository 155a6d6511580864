"""Server discovery: a server name → where to connect, which ``Host`` header, which TLS name.

Follows the server-server API §Resolving server names table step by step:

1. IP literal → that IP, the given port or the default (8448); Host = the server name; the
   certificate is checked for the IP (no SNI).
2. Hostname with explicit port → its A/AAAA at that port; Host = server name with port.
3. ``https://<hostname>/.well-known/matrix/server`` → ``m.server`` delegation, then
   3.1 IP literal, 3.2 delegated host with port, 3.3 SRV ``_matrix-fed._tcp.<delegated>``,
   3.4 SRV ``_matrix._tcp.<delegated>`` (deprecated), 3.5 delegated host at the default port.
4./5. No valid well-known: SRV ``_matrix-fed._tcp.<hostname>``, then ``_matrix._tcp``.
6. The hostname at the default port.

An SRV answer whose only target is ``.`` means the service is "decidedly not available"
(RFC 2782): resolution stops there with :class:`FederationNotOffered`, without falling
through to the deprecated ``_matrix._tcp`` record or the default port.

With SRV the certificate and Host use the *queried* name, never the SRV target. The DNS and
the well-known fetch are behind small interfaces (:class:`DnsLookup`, a fetch callable) so
the table itself is tested with real DNS (dnsmasq) and real HTTPS in the end-to-end tests.
"""

from __future__ import annotations

import email.utils
import ipaddress
import json
import logging
import random
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import dns.asyncbackend
import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.rdatatype
import dns.resolver

from peekproxy.core.identifiers import InvalidIdentifier, ServerName

__all__ = [
    "DnsError",
    "DnsLookup",
    "DnspythonLookup",
    "FederationNotOffered",
    "Resolution",
    "ServerResolver",
    "SrvRecord",
    "WellKnownCache",
    "WellKnownInvalid",
    "order_srv",
    "parse_well_known",
    "well_known_cache_period",
]

log = logging.getLogger(__name__)

WELL_KNOWN_MAX_BYTES = 50 * 1024
WELL_KNOWN_DEFAULT_CACHE_S = 24 * 3600.0
WELL_KNOWN_MIN_CACHE_S = 5 * 60.0
WELL_KNOWN_MAX_CACHE_S = 48 * 3600.0
WELL_KNOWN_ERROR_CACHE_MIN_S = 2 * 60.0
WELL_KNOWN_ERROR_CACHE_MAX_S = 3600.0


class DnsError(Exception):
    """A DNS lookup failed (as opposed to answering that there is no such record)."""


class FederationNotOffered(Exception):
    """DNS says the server offers no federation: its SRV record (``_matrix-fed._tcp``, or
    the deprecated ``_matrix._tcp``) has the target ``.`` and no other (RFC 2782: the
    service is "decidedly not available at this domain"). The message names the record."""


class WellKnownInvalid(Exception):
    """The ``/.well-known/matrix/server`` answer is unusable (the reason is the message)."""


@dataclass(frozen=True, slots=True)
class SrvRecord:
    priority: int
    weight: int
    port: int
    target: str


@dataclass(frozen=True, slots=True)
class Resolution:
    """How to reach a server: try ``targets`` (host, port) in order.

    ``host_header`` goes in the ``Host`` header; ``tls_name`` is the name the certificate must
    be valid for (an IP address string for IP literals, in which case no SNI is sent).
    ``step`` names the resolution-table row used, for logs and tests.
    """

    server_name: str
    targets: tuple[tuple[str, int], ...]
    host_header: str
    tls_name: str
    step: str

    @property
    def tls_name_is_ip(self) -> bool:
        return _is_ip(self.tls_name)


class DnsLookup(Protocol):
    async def srv(self, name: str) -> list[SrvRecord]:
        """SRV records for ``name`` (``[]`` when there are none). Raises DnsError on failure."""

    async def addresses(self, host: str) -> list[str]:
        """IPv6 and IPv4 addresses of ``host`` (``[]`` when none). Raises DnsError."""


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _host_for_header(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def order_srv(records: Sequence[SrvRecord], rng: random.Random | None = None) -> list[SrvRecord]:
    """RFC 2782 order: lowest priority first; within a priority a weighted random order.

    Records whose target is ``.`` (service not offered) are dropped.
    """
    rng = rng or random.Random()
    usable = [r for r in records if r.target not in (".", "")]
    ordered: list[SrvRecord] = []
    for priority in sorted({r.priority for r in usable}):
        group = [r for r in usable if r.priority == priority]
        # Zero-weight records first so they get a small chance, as RFC 2782 describes.
        group.sort(key=lambda r: r.weight != 0)
        while group:
            total = sum(r.weight for r in group)
            pick = rng.uniform(0, total) if total else 0
            running = 0
            for index, record in enumerate(group):
                running += record.weight
                if running >= pick:
                    ordered.append(group.pop(index))
                    break
    return ordered


def parse_well_known(status: int, body: bytes) -> ServerName:
    """Validate a ``/.well-known/matrix/server`` answer (parsed as JSON whatever its type).

    Raises:
        WellKnownInvalid: non-200 status, oversized or non-JSON body, missing or invalid
            ``m.server``.
    """
    if status != 200:
        raise WellKnownInvalid(f"HTTP {status}")
    if len(body) > WELL_KNOWN_MAX_BYTES:
        raise WellKnownInvalid(f"body larger than {WELL_KNOWN_MAX_BYTES} bytes")
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise WellKnownInvalid("body is not JSON") from None
    if not isinstance(document, dict) or not isinstance(document.get("m.server"), str):
        raise WellKnownInvalid("no m.server string in the body")
    try:
        return ServerName.parse(document["m.server"])
    except InvalidIdentifier as e:
        raise WellKnownInvalid(f"m.server is not a server name: {e}") from None


def well_known_cache_period(headers: Mapping[str, str], now: float | None = None) -> float:
    """Seconds to cache a valid well-known answer: Cache-Control ``max-age`` (or ``Expires``),
    default 24 h, clamped to [5 min, 48 h]; ``no-store``/``no-cache`` give the minimum."""
    lowered = {k.lower(): v for k, v in headers.items()}
    period = WELL_KNOWN_DEFAULT_CACHE_S
    control = lowered.get("cache-control", "").lower()
    max_age = re.search(r"max-age\s*=\s*(\d+)", control)
    if "no-store" in control or "no-cache" in control:
        period = 0.0
    elif max_age:
        period = float(max_age.group(1))
    elif "expires" in lowered and now is not None:
        try:
            expires = email.utils.parsedate_to_datetime(lowered["expires"]).timestamp()
            period = expires - now
        except (TypeError, ValueError):
            pass
    return min(max(period, WELL_KNOWN_MIN_CACHE_S), WELL_KNOWN_MAX_CACHE_S)


@dataclass
class _CacheEntry:
    value: ServerName | None
    expires: float
    failures: int = 0


@dataclass
class WellKnownCache:
    """Caches well-known results per hostname, successes and failures alike.

    ``fetch(hostname)`` returns the delegated server name, or raises WellKnownInvalid (or any
    exception for network failures); ``fetch_headers`` are not needed here because the fetch
    returns the cache period along with the value. Failures are cached with exponential
    back-off from 2 min up to 1 h.
    """

    fetch: Callable[[str], Awaitable[tuple[ServerName, float]]]
    clock: Callable[[], float]
    entries: dict[str, _CacheEntry] = field(default_factory=dict)

    async def get(self, hostname: str) -> ServerName | None:
        now = self.clock()
        entry = self.entries.get(hostname)
        if entry is not None and entry.expires > now:
            return entry.value
        try:
            value, period = await self.fetch(hostname)
        except Exception as e:
            log.info("no delegation from https://%s/.well-known/matrix/server: %s", hostname, e)
            failures = (entry.failures + 1) if entry is not None and entry.value is None else 1
            period = min(
                WELL_KNOWN_ERROR_CACHE_MIN_S * 2 ** (failures - 1), WELL_KNOWN_ERROR_CACHE_MAX_S
            )
            self.entries[hostname] = _CacheEntry(None, now + period, failures)
            return None
        self.entries[hostname] = _CacheEntry(value, now + period)
        return value


@dataclass
class ServerResolver:
    """Resolves server names with the spec's table; results are cached for ``cache_s``."""

    dns: DnsLookup
    well_known: WellKnownCache
    clock: Callable[[], float]
    default_port: int = 8448
    cache_s: float = 300.0
    rng: random.Random = field(default_factory=random.Random)
    _cache: dict[str, tuple[Resolution, float]] = field(default_factory=dict)

    async def resolve(self, server_name: str) -> Resolution:
        """Resolve ``server_name``.

        Raises:
            InvalidIdentifier: not a server name.
            DnsError: an SRV lookup failed (not "no record": that falls through the table).
            FederationNotOffered: the SRV record consulted has only the target ``.``.
        """
        cached = self._cache.get(server_name)
        if cached is not None and cached[1] > self.clock():
            return cached[0]
        resolution = await self._resolve(ServerName.parse(server_name))
        self._cache[server_name] = (resolution, self.clock() + self.cache_s)
        return resolution

    def forget(self, server_name: str) -> None:
        """Drop a cached resolution (e.g. after every target failed to connect)."""
        self._cache.pop(server_name, None)

    async def _resolve(self, name: ServerName) -> Resolution:
        text = str(name)
        if name.is_ip_literal:
            port = name.port or self.default_port
            return Resolution(text, ((name.host, port),), text, name.host, "1 ip-literal")
        if name.port is not None:
            return Resolution(text, ((name.host, name.port),), text, name.host, "2 explicit-port")
        delegated = await self.well_known.get(name.host)
        if delegated is not None:
            if delegated.is_ip_literal:
                port = delegated.port or self.default_port
                header = str(delegated)
                return Resolution(
                    text,
                    ((delegated.host, port),),
                    header,
                    delegated.host,
                    "3.1 well-known ip-literal",
                )
            if delegated.port is not None:
                return Resolution(
                    text,
                    ((delegated.host, delegated.port),),
                    str(delegated),
                    delegated.host,
                    "3.2 well-known explicit-port",
                )
            return await self._srv_or_default(text, delegated.host, "3")
        return await self._srv_or_default(text, name.host, "")

    async def _srv_or_default(self, server_name: str, host: str, prefix: str) -> Resolution:
        steps = ("3.3", "3.4", "3.5") if prefix else ("4", "5", "6")
        header = _host_for_header(host)
        for service, step in (("_matrix-fed._tcp", steps[0]), ("_matrix._tcp", steps[1])):
            found = await self.dns.srv(f"{service}.{host}")
            records = order_srv(found, self.rng)
            if found and not records:  # only "." targets: no federation here, stop
                raise FederationNotOffered(
                    f"the SRV record {service}.{host} has the target '.': "
                    f"{host} offers no Matrix federation"
                )
            if records:
                targets = tuple((r.target.rstrip("."), r.port) for r in records)
                return Resolution(server_name, targets, header, host, f"{step} srv {service}")
        return Resolution(
            server_name, ((host, self.default_port),), header, host, f"{steps[2]} default-port"
        )


class DnspythonLookup:
    """DNS through dnspython's trio backend.

    With ``nameservers`` (``"ip:port"`` or ``"ip"``) every lookup goes to them; without,
    SRV uses the system's resolv.conf and addresses use the system resolver (getaddrinfo,
    so ``/etc/hosts`` and ``localhost`` work).
    """

    def __init__(self, nameservers: Sequence[str] = (), lifetime: float = 5.0) -> None:
        self._custom = bool(nameservers)
        if nameservers:
            resolver = dns.asyncresolver.Resolver(configure=False)
            resolver.nameservers = [_nameserver(n) for n in nameservers]
        else:
            resolver = dns.asyncresolver.Resolver()
        resolver.lifetime = lifetime
        self._resolver = resolver
        self._backend = dns.asyncbackend.get_backend("trio")

    async def srv(self, name: str) -> list[SrvRecord]:
        answer = await self._query(name, "SRV")
        return [
            SrvRecord(r.priority, r.weight, r.port, r.target.to_text(omit_final_dot=True))
            for r in answer
        ]

    async def addresses(self, host: str) -> list[str]:
        if _is_ip(host):
            return [host]
        if not self._custom:
            import socket

            import trio

            try:
                infos = await trio.socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
            except OSError as e:
                if getattr(e, "errno", None) in (
                    socket.EAI_NONAME,
                    getattr(socket, "EAI_NODATA", -5),
                ):
                    return []
                raise DnsError(f"cannot resolve {host}: {e}") from None
            found: list[str] = []
            for info in infos:
                address = str(info[4][0])
                if address not in found:
                    found.append(address)
            return found
        result: list[str] = []
        for rdtype in ("AAAA", "A"):
            result.extend(r.address for r in await self._query(host, rdtype))
        return result

    async def _query(self, name: str, rdtype: str) -> list[Any]:
        try:
            answer = await self._resolver.resolve(name, rdtype, backend=self._backend, search=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return []
        except dns.exception.DNSException as e:
            raise DnsError(f"{rdtype} lookup for {name} failed: {e}") from None
        return list(answer)


def _nameserver(text: str) -> dns.nameserver.Do53Nameserver:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or host.count(":") == 1:
        host, port = text, "53"
    return dns.nameserver.Do53Nameserver(host.strip("[]"), int(port))
