"""X-Matrix request authentication (server-server API §Request Authentication).

Pure functions: build the ``Authorization`` header for an outbound request, parse an inbound
header (RFC 9110 auth-params, as the spec requires since v1.11), and check the signature over
``{"method", "uri", "origin", "destination", "content"}``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from signedjson.key import decode_verify_key_bytes
from signedjson.sign import SignatureVerifyException, sign_json, verify_signed_json
from signedjson.types import SigningKey, VerifyKey

from peekproxy.core.identifiers import InvalidIdentifier, ServerName

__all__ = [
    "XMatrixAuth",
    "XMatrixError",
    "authorization_header",
    "parse_authorization",
    "signed_request_json",
    "verify_request",
]


class XMatrixError(Exception):
    """The request's X-Matrix authentication is missing, malformed or invalid."""


@dataclass(frozen=True, slots=True)
class XMatrixAuth:
    """One parsed ``Authorization: X-Matrix ...`` header."""

    origin: str
    destination: str | None
    key: str
    sig: str


def signed_request_json(
    method: str,
    uri: str,
    origin: str,
    destination: str,
    content: Any = None,
) -> dict[str, Any]:
    """The object whose signature authenticates a request.

    ``uri`` is the request target as sent on the wire: path and query string, percent-encoded,
    no scheme or host. ``content`` is the parsed JSON body, or ``None`` for no body (then the
    key is omitted, not null).
    """
    request: dict[str, Any] = {
        "method": method.upper(),
        "uri": uri,
        "origin": origin,
        "destination": destination,
    }
    if content is not None:
        request["content"] = content
    return request


def authorization_header(
    signing_key: SigningKey,
    *,
    origin: str,
    destination: str,
    method: str,
    uri: str,
    content: Any = None,
) -> str:
    """``X-Matrix origin="..",destination="..",key="ed25519:..",sig=".."`` for a request."""
    signed = sign_json(
        signed_request_json(method, uri, origin, destination, content), origin, signing_key
    )
    key_id = f"{signing_key.alg}:{signing_key.version}"
    sig = signed["signatures"][origin][key_id]
    return (
        f'X-Matrix origin="{_quote(origin)}",destination="{_quote(destination)}",'
        f'key="{key_id}",sig="{sig}"'
    )


def _quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')


_TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z:]+"  # RFC 9110 token, plus ':' for compatibility
_PARAM = re.compile(
    rf'[ \t]*(?P<name>{_TOKEN})[ \t]*=[ \t]*(?:"(?P<quoted>(?:[^"\\]|\\.)*)"|(?P<token>{_TOKEN}))'
    r"[ \t]*(?:,|$)"
)


def parse_authorization(header: str) -> XMatrixAuth:
    """Parse an ``Authorization`` header value of scheme ``X-Matrix``.

    Parameter names are case-insensitive, order does not matter, values are quoted strings
    (backslash escapes) or tokens, unknown parameters are ignored.

    Raises:
        XMatrixError: not X-Matrix, malformed, or missing ``origin``/``key``/``sig``, or an
            ``origin``/``destination`` that is not a valid server name.
    """
    scheme, _, rest = header.strip().partition(" ")
    if scheme.lower() != "x-matrix":
        raise XMatrixError("Authorization header is not of the X-Matrix scheme")
    params: dict[str, str] = {}
    position, rest = 0, rest.strip()
    while position < len(rest):
        match = _PARAM.match(rest, position)
        if not match or match.end() == position:
            raise XMatrixError(f"malformed X-Matrix header near {rest[position:][:30]!r}")
        quoted = match.group("quoted")
        value = re.sub(r"\\(.)", r"\1", quoted) if quoted is not None else match.group("token")
        params.setdefault(match.group("name").lower(), value)
        position = match.end()
    missing = [name for name in ("origin", "key", "sig") if not params.get(name)]
    if missing:
        raise XMatrixError(f"X-Matrix header lacks {', '.join(missing)}")
    for name in ("origin", "destination"):
        if name in params:
            try:
                ServerName.parse(params[name])
            except InvalidIdentifier as e:
                raise XMatrixError(f"X-Matrix {name} is not a server name: {e}") from None
    return XMatrixAuth(params["origin"], params.get("destination"), params["key"], params["sig"])


def verify_request(
    auth: XMatrixAuth,
    *,
    method: str,
    uri: str,
    our_server_name: str,
    content: Any,
    verify_key: VerifyKey,
) -> None:
    """Check the signature of ``auth`` over the request as received.

    Raises:
        XMatrixError: ``destination`` names another server, or the signature is invalid.
    """
    if auth.destination is not None and auth.destination != our_server_name:
        raise XMatrixError(
            f"request is for destination {auth.destination!r}, not this server "
            f"({our_server_name!r})"
        )
    signed = signed_request_json(method, uri, auth.origin, our_server_name, content)
    signed["signatures"] = {auth.origin: {auth.key: auth.sig}}
    try:
        verify_signed_json(signed, auth.origin, verify_key)
    except SignatureVerifyException:
        raise XMatrixError(f"invalid X-Matrix signature from {auth.origin} ({auth.key})") from None


def decode_verify_key(key_id: str, key_base64: str) -> VerifyKey:
    """A signedjson verify key from its ID (``ed25519:ver``) and unpadded base64 bytes.

    Raises:
        ValueError: unsupported algorithm or bad key bytes.
    """
    from unpaddedbase64 import decode_base64

    try:
        key: VerifyKey = decode_verify_key_bytes(key_id, decode_base64(key_base64))
    except Exception as e:
        raise ValueError(f"bad verify key {key_id}: {e}") from None
    return key


def header_values(headers: Mapping[str, str] | list[tuple[str, str]]) -> list[str]:
    """All ``Authorization`` header values of scheme X-Matrix in ``headers``."""
    items = headers.items() if isinstance(headers, Mapping) else headers
    return [
        v for k, v in items if k.lower() == "authorization" and v.lower().startswith("x-matrix")
    ]
