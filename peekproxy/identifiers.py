"""Typed, validated Matrix identifiers.

Grammar from the Matrix spec appendices (§Server Name, §Common Identifier Format).
Malformed input raises :class:`InvalidIdentifier`, which the API layers turn into
``400 M_INVALID_PARAM``.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

__all__ = ["InvalidIdentifier", "ServerName"]

_DNS_NAME = re.compile(r"^[A-Za-z0-9.\-]{1,255}$")
_PORT = re.compile(r"^[0-9]{1,5}$")


class InvalidIdentifier(ValueError):
    """A Matrix identifier did not match the spec's grammar."""


@dataclass(frozen=True, slots=True)
class ServerName:
    """A server name: ``hostname [":" port]`` (spec appendix §Server Name).

    ``host`` is a DNS name, a dotted-quad IPv4 address, or an IPv6 literal *without*
    brackets; ``port`` is ``None`` when the name carries no explicit port.
    """

    host: str
    port: int | None = None

    @classmethod
    def parse(cls, value: str) -> ServerName:
        """Parse and validate a server name.

        Raises:
            InvalidIdentifier: the value does not follow the grammar.
        """
        if not isinstance(value, str) or not value:
            raise InvalidIdentifier("server name must be a non-empty string")
        if len(value.encode()) > 255:
            raise InvalidIdentifier(f"server name is longer than 255 bytes: {value[:40]!r}...")
        host: str
        port_text: str | None = None
        if value.startswith("["):
            end = value.find("]")
            if end == -1:
                raise InvalidIdentifier(f"unterminated IPv6 literal in server name {value!r}")
            host = value[1:end]
            rest = value[end + 1 :]
            try:
                ipaddress.IPv6Address(host)
            except ValueError as e:
                raise InvalidIdentifier(f"bad IPv6 literal in server name {value!r}") from e
            if rest:
                if not rest.startswith(":"):
                    raise InvalidIdentifier(f"unexpected text after IPv6 literal in {value!r}")
                port_text = rest[1:]
        else:
            host, sep, port_part = value.partition(":")
            if sep:
                port_text = port_part
            if not _DNS_NAME.match(host):
                raise InvalidIdentifier(
                    f"bad hostname in server name {value!r}: "
                    "only letters, digits, '-' and '.' are allowed"
                )
        port: int | None = None
        if port_text is not None:
            if not _PORT.match(port_text) or not 0 < int(port_text) <= 65535:
                raise InvalidIdentifier(f"bad port in server name {value!r}")
            port = int(port_text)
        return cls(host, port)

    @property
    def is_ip_literal(self) -> bool:
        """True when the host is an IPv4 or IPv6 address rather than a DNS name."""
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return False
        return True

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port is None else f"{host}:{self.port}"
