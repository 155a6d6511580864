"""Typed, validated Matrix identifiers.

Grammar from the Matrix spec appendices (§Server Name, §Common Identifier Format).
Malformed input raises :class:`InvalidIdentifier`, which the API layers turn into
``400 M_INVALID_PARAM``.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

__all__ = [
    "MAX_IDENTIFIER_BYTES",
    "EventId",
    "InvalidIdentifier",
    "RoomAlias",
    "RoomId",
    "ServerName",
    "UserId",
]

_DNS_NAME = re.compile(r"^[A-Za-z0-9.\-]{1,255}\Z")
_PORT = re.compile(r"^[0-9]{1,5}\Z")


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


# --- Sigil identifiers (APPX §Common Identifier Format, §Room IDs, §Room Aliases,
# --- §Event IDs, §User Identifiers) ----------------------------------------------------

#: The whole identifier, sigil and server name included, is at most this many UTF-8 bytes.
MAX_IDENTIFIER_BYTES = 255

#: Code points no opaque part may contain: NUL (APPX §Common Identifier Format).
_FORBIDDEN_OPAQUE = re.compile(r"[\x00\ud800-\udfff]")
_COMPLIANT_USER_LOCALPART = re.compile(r"^[a-z0-9._=\-/+]+\Z")
#: v12 room ID: "!" + unpadded URL-safe base64 of a sha256 reference hash (43 characters).
_HASH_ROOM_ID = re.compile(r"^[A-Za-z0-9_\-]{43}\Z")


def _check_length(value: object, sigil: str, what: str) -> str:
    if not isinstance(value, str):
        raise InvalidIdentifier(f"{what} must be a string")
    if not value.startswith(sigil):
        raise InvalidIdentifier(f"{what} must start with {sigil!r}: {value[:40]!r}")
    if _FORBIDDEN_OPAQUE.search(value):
        raise InvalidIdentifier(f"{what} contains NUL or a lone surrogate: {value[:40]!r}")
    if len(value.encode()) > MAX_IDENTIFIER_BYTES:
        raise InvalidIdentifier(f"{what} is longer than 255 bytes: {value[:40]!r}...")
    return value


def _split_server(value: str, what: str) -> tuple[str, ServerName]:
    """``<sigil>localpart:server`` → (localpart, server); the localpart has no ``:``."""
    localpart, sep, server = value[1:].partition(":")
    if not sep:
        raise InvalidIdentifier(f"{what} has no ':server' part: {value[:40]!r}")
    if not localpart:
        raise InvalidIdentifier(f"{what} has an empty localpart: {value[:40]!r}")
    try:
        return localpart, ServerName.parse(server)
    except InvalidIdentifier as e:
        raise InvalidIdentifier(f"{what} {value[:60]!r}: {e}") from None


@dataclass(frozen=True, slots=True)
class RoomId:
    """A room ID (APPX §Room IDs).

    Two forms:

    * ``!opaque:server`` (room versions 1-11): ``server_name`` is the namespacing server,
      which implies nothing about who is in the room;
    * ``!<43 URL-safe base64 chars>`` (room version 12): the create event's reference hash,
      ``server_name`` is ``None``.

    Room IDs are opaque and case-sensitive. ``str(room_id)`` gives back the input, except
    that the server name is written as :class:`ServerName` writes it (e.g. no leading zeros
    in a port): use the original string wherever bytes matter (hashing, signing).
    """

    opaque: str
    server_name: ServerName | None = None

    @classmethod
    def parse(cls, value: str) -> RoomId:
        """Parse ``!opaque:server`` or the room-version-12 ``!<reference hash>`` form.

        Raises:
            InvalidIdentifier: wrong sigil, over 255 bytes, NUL, empty opaque part, a bad
                server name, or a server-less ID that is not 43 URL-safe base64 characters.
        """
        _check_length(value, "!", "room ID")
        if ":" not in value:
            if not _HASH_ROOM_ID.match(value[1:]):
                raise InvalidIdentifier(
                    f"room ID without ':server' must be '!' + 43 URL-safe base64 characters "
                    f"(room version 12): {value[:60]!r}"
                )
            return cls(value[1:], None)
        opaque, server = _split_server(value, "room ID")
        return cls(opaque, server)

    @property
    def is_hash_form(self) -> bool:
        """True for the room-version-12 form (the create event's reference hash)."""
        return self.server_name is None

    def __str__(self) -> str:
        if self.server_name is None:
            return f"!{self.opaque}"
        return f"!{self.opaque}:{self.server_name}"


@dataclass(frozen=True, slots=True)
class RoomAlias:
    """A room alias ``#localpart:server`` (APPX §Room Aliases)."""

    localpart: str
    server_name: ServerName

    @classmethod
    def parse(cls, value: str) -> RoomAlias:
        """Parse ``#localpart:server``; the localpart is any code point but ``:`` and NUL.

        Raises:
            InvalidIdentifier: wrong sigil, over 255 bytes, no or empty localpart, bad server.
        """
        _check_length(value, "#", "room alias")
        return cls(*_split_server(value, "room alias"))

    def __str__(self) -> str:
        return f"#{self.localpart}:{self.server_name}"


@dataclass(frozen=True, slots=True)
class UserId:
    """A user ID ``@localpart:server`` (APPX §User Identifiers).

    Parsing is lenient about the localpart, as federation must be for historical users:
    any code point but ``:`` and NUL is accepted. ``is_compliant`` says whether it keeps to
    the current grammar (``a-z 0-9 . _ = - / +``).
    """

    localpart: str
    server_name: ServerName

    @classmethod
    def parse(cls, value: str) -> UserId:
        """Parse ``@localpart:server``.

        Raises:
            InvalidIdentifier: wrong sigil, over 255 bytes, no ``:server``, empty localpart,
                or a bad server name.
        """
        _check_length(value, "@", "user ID")
        return cls(*_split_server(value, "user ID"))

    @property
    def is_compliant(self) -> bool:
        """True when the localpart uses only ``a-z 0-9 . _ = - / +``."""
        return bool(_COMPLIANT_USER_LOCALPART.match(self.localpart))

    def __str__(self) -> str:
        return f"@{self.localpart}:{self.server_name}"


@dataclass(frozen=True, slots=True)
class EventId:
    """An event ID ``$opaque`` (APPX §Event IDs), at most 255 bytes.

    Room versions 1-2 use ``$localpart:server``; from version 3 the opaque part is the
    event's reference hash in base64 (see ``room_versions``). The whole ID is kept verbatim
    in ``opaque`` (without the ``$``) because its format depends on the room version.
    """

    opaque: str

    @classmethod
    def parse(cls, value: str) -> EventId:
        """Parse ``$opaque``: non-empty, no NUL, at most 255 bytes.

        Raises:
            InvalidIdentifier: the value breaks one of those rules.
        """
        _check_length(value, "$", "event ID")
        if len(value) == 1:
            raise InvalidIdentifier("event ID is empty after '$'")
        return cls(value[1:])

    @property
    def server_name(self) -> ServerName | None:
        """The server of a room-version-1/2 ID ``$local:server``; ``None`` if there is none
        or it is not a valid server name."""
        _, sep, server = self.opaque.partition(":")
        if not sep:
            return None
        try:
            return ServerName.parse(server)
        except InvalidIdentifier:
            return None

    def __str__(self) -> str:
        return f"${self.opaque}"
