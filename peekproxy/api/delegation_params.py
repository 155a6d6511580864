"""Input of the delegation API, parsed and checked at the edge (``docs/delegation-api.md``).

The device a call is for (``user_id`` / ``device_id``), server hints, request bodies,
``/sync`` and ``/messages`` query parameters, the shared secret file, and the per-user
:class:`TokenBucket` that limits how fast peeks are started. Everything here is pure (no
store, no service): it turns request values into typed values or raises
:class:`peekproxy.api.errors.MatrixError` (400 ``M_MISSING_PARAM`` / ``M_INVALID_PARAM`` /
``M_BAD_JSON``).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from peekproxy.api.errors import MatrixError
from peekproxy.core import paging
from peekproxy.core.identifiers import (
    MAX_IDENTIFIER_BYTES,
    InvalidIdentifier,
    RoomId,
    ServerName,
    UserId,
)
from peekproxy.core.sync import InvalidToken

__all__ = [
    "DEFAULT_TIMELINE_LIMIT",
    "MAX_ID_BYTES",
    "MAX_SYNC_TIMEOUT_MS",
    "MessagesParams",
    "PeekBody",
    "PeekRoomBody",
    "SecretFileError",
    "SyncParams",
    "TokenBucket",
    "check_hints",
    "device_params",
    "messages_params",
    "peek_body",
    "peek_room_body",
    "read_secret",
    "room_id_param",
    "sync_params",
    "timeline_limit",
]

MAX_SYNC_TIMEOUT_MS = 300_000
#: Longest ``user_id`` / ``device_id`` accepted, in UTF-8 bytes (spec appendix §User
#: Identifiers: 255 bytes; device IDs get the same bound).
MAX_ID_BYTES = MAX_IDENTIFIER_BYTES
DEFAULT_TIMELINE_LIMIT = 10


def timeline_limit(filter_param: str | None) -> int:
    """The timeline limit of an inline filter (``room.timeline.limit``), default 10.

    Raises:
        MatrixError: 400 M_INVALID_PARAM for a filter ID (only inline JSON filters are
            supported) or a malformed filter.
    """
    if filter_param is None:
        return DEFAULT_TIMELINE_LIMIT
    if not filter_param.lstrip().startswith("{"):
        raise MatrixError(400, "M_INVALID_PARAM", "only inline JSON filters are supported")
    try:
        limit = (
            json.loads(filter_param)
            .get("room", {})
            .get("timeline", {})
            .get("limit", DEFAULT_TIMELINE_LIMIT)
        )
    except (ValueError, AttributeError):
        raise MatrixError(400, "M_INVALID_PARAM", "filter is not a JSON object") from None
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        raise MatrixError(400, "M_INVALID_PARAM", "room.timeline.limit must be a positive integer")
    return min(limit, 100)


def _shown(value: str) -> str:
    """``value`` as error messages and logs quote it: at most 40 characters, repr-escaped."""
    return repr(value[:40]) + ("..." if len(value) > 40 else "")


def device_params(getlist: Callable[[str], list[str]]) -> tuple[str, str]:
    """(user ID, device ID) from the ``user_id`` and ``device_id`` query parameters
    (``getlist`` gives every value of a parameter, in order).

    Each must be given exactly once: a repeated parameter is ambiguous (which one did the
    homeserver authenticate?), so it is refused rather than "the last one wins". Both are at
    most 255 bytes of UTF-8 (the spec's limit on user IDs, applied to device IDs too). Error
    messages quote at most the first 40 characters of a value.

    Raises:
        MatrixError: 400 ``M_MISSING_PARAM`` (missing or empty), 400 ``M_INVALID_PARAM``
            (given twice, over 255 bytes, or ``user_id`` not a user ID).
    """
    values = {name: getlist(name) for name in ("user_id", "device_id")}
    for name, given in values.items():
        if len(given) > 1:
            raise MatrixError(400, "M_INVALID_PARAM", f"{name} is given {len(given)} times")
    user_id = values["user_id"][0] if values["user_id"] else ""
    device_id = values["device_id"][0] if values["device_id"] else ""
    if not user_id or not device_id:
        raise MatrixError(400, "M_MISSING_PARAM", "user_id and device_id are required")
    for name, value in (("user_id", user_id), ("device_id", device_id)):
        size = len(value.encode("utf-8", "surrogatepass"))
        if size > MAX_ID_BYTES:
            raise MatrixError(
                400,
                "M_INVALID_PARAM",
                f"{name} is {size} bytes long, more than {MAX_ID_BYTES}: {_shown(value)}",
            )
    try:
        UserId.parse(user_id)
    except InvalidIdentifier as e:
        raise MatrixError(400, "M_INVALID_PARAM", f"user_id: {e}") from None
    return user_id, device_id


def check_hints(hints: Sequence[str]) -> None:
    """Refuse server hints (``server_name`` query parameters, body ``servers``) that are
    not server names (spec appendix §Server Name), before anything is looked up or stored.

    Raises:
        MatrixError: 400 ``M_INVALID_PARAM`` naming the first bad hint.
    """
    for hint in hints:
        try:
            ServerName.parse(hint)
        except InvalidIdentifier:
            raise MatrixError(
                400,
                "M_INVALID_PARAM",
                f"server hint {_shown(hint)} is not a valid server name "
                "(hostname or IP literal, optional :port)",
            ) from None


class SecretFileError(ValueError):
    """``delegation.shared_secret_file`` cannot give a secret; the message says why."""


def read_secret(path: Path | None) -> str | None:
    """A secret kept in a file (the delegation shared secret, the upstream access token):
    the first line, without surrounding whitespace. ``None`` when no file is configured
    (what the key enables is off).

    Raises:
        SecretFileError: the file cannot be read, is not UTF-8, or its first line is empty
            (an empty secret would be a configuration mistake, not "off").
    """
    if path is None:
        return None
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise SecretFileError(f"{path} is not UTF-8 text") from None
    except OSError as e:
        raise SecretFileError(f"cannot read {path}: {e.strerror or e}") from None
    secret = text.split("\n", 1)[0].strip()
    if not secret:
        raise SecretFileError(
            f"{path}: the first line (the secret or token) is empty; write it there, or "
            "unset the key to turn off what it enables"
        )
    return secret


class PeekBody(BaseModel):
    model_config = ConfigDict(extra="allow")
    servers: list[str] = Field(default_factory=list)


class PeekRoomBody(BaseModel):
    model_config = ConfigDict(extra="allow")
    room: str
    servers: list[str] = Field(default_factory=list)


def peek_body(raw: Any) -> PeekBody:
    """The body of ``POST /peek/{roomIdOrAlias}`` (``{}`` when none was sent).

    Raises:
        MatrixError: 400 ``M_BAD_JSON`` when ``servers`` is not a list of strings.
    """
    try:
        return PeekBody.model_validate(raw)
    except ValidationError as e:
        raise MatrixError(400, "M_BAD_JSON", f"servers: {e.errors()[0]['msg']}") from None


def peek_room_body(raw: Any) -> PeekRoomBody:
    """The body of ``POST /peek_room``: ``{"room": ..., "servers": [...]}``.

    Raises:
        MatrixError: 400 ``M_MISSING_PARAM`` without ``room``; 400 ``M_BAD_JSON`` naming
            the first field of the wrong shape.
    """
    if isinstance(raw, dict) and "room" not in raw:
        raise MatrixError(400, "M_MISSING_PARAM", "room is required")
    try:
        return PeekRoomBody.model_validate(raw)
    except ValidationError as e:
        error = e.errors()[0]
        where = ".".join(str(p) for p in error["loc"]) or "body"
        raise MatrixError(400, "M_BAD_JSON", f"{where}: {error['msg']}") from None


@dataclass(frozen=True)
class SyncParams:
    """The query parameters of ``GET /sync`` (MSC2753)."""

    since: str | None
    #: How long to long-poll, ms (0 to :data:`MAX_SYNC_TIMEOUT_MS`).
    timeout_ms: int
    full_state: bool
    timeline_limit: int


def sync_params(params: Mapping[str, str]) -> SyncParams:
    """``since``, ``timeout`` (ms, clamped to 0-300,000), ``full_state`` and ``filter``.

    Raises:
        MatrixError: 400 ``M_INVALID_PARAM`` for a ``timeout`` that is not an integer,
            a ``full_state`` other than ``true`` / ``false``, or a bad filter
            (:func:`timeline_limit`).
    """
    try:
        timeout_ms = int(params.get("timeout", "0"))
    except ValueError:
        raise MatrixError(400, "M_INVALID_PARAM", "timeout must be an integer (ms)") from None
    full_state = params.get("full_state", "false")
    if full_state not in ("true", "false"):
        raise MatrixError(400, "M_INVALID_PARAM", "full_state must be true or false")
    limit = timeline_limit(params.get("filter"))
    return SyncParams(
        since=params.get("since"),
        timeout_ms=max(0, min(timeout_ms, MAX_SYNC_TIMEOUT_MS)),
        full_state=full_state == "true",
        timeline_limit=limit,
    )


def room_id_param(value: str) -> str:
    """A ``{roomId}`` path parameter, checked to be a room ID.

    Raises:
        MatrixError: 400 ``M_INVALID_PARAM`` otherwise.
    """
    try:
        RoomId.parse(value)
    except InvalidIdentifier as e:
        raise MatrixError(400, "M_INVALID_PARAM", str(e)) from None
    return value


@dataclass(frozen=True)
class MessagesParams:
    """The query parameters of ``GET /rooms/{roomId}/messages``."""

    direction: paging.Direction
    from_point: paging.Point | None
    to_point: paging.Point | None
    limit: int


def _point_param(params: Mapping[str, str], name: str) -> paging.Point | None:
    value = params.get(name)
    if value is None:
        return None
    try:
        return paging.parse_point(value)
    except InvalidToken:
        raise MatrixError(400, "M_INVALID_PARAM", f"unknown {name} token {value!r}") from None


def messages_params(params: Mapping[str, str]) -> MessagesParams:
    """``dir`` (``b`` by default), ``from`` / ``to`` tokens and ``limit`` (default 10, at
    most 100), checked in that order.

    Raises:
        MatrixError: 400 ``M_INVALID_PARAM`` for a ``dir`` other than ``b`` / ``f``, a token
            this server did not issue, or a ``limit`` that is not a positive integer.
    """
    direction = params.get("dir", "b")
    if direction not in ("b", "f"):
        raise MatrixError(400, "M_INVALID_PARAM", "dir must be b or f")
    from_point, to_point = _point_param(params, "from"), _point_param(params, "to")
    try:
        limit = paging.parse_limit(params.get("limit"))
    except paging.InvalidLimit as e:
        raise MatrixError(400, "M_INVALID_PARAM", str(e)) from None
    return MessagesParams(
        direction="b" if direction == "b" else "f",
        from_point=from_point,
        to_point=to_point,
        limit=limit,
    )


class TokenBucket:
    """A token bucket per key: ``burst`` tokens, refilled at ``rate`` per second.

    :meth:`take` spends one token of a key and answers ``None``, or, when the key's bucket
    is empty, the milliseconds until a token is back (nothing is spent then).
    """

    #: Full buckets are forgotten once this many keys are held.
    PRUNE_AT = 10_000

    def __init__(
        self, rate: float, burst: int, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.clock = clock
        self.set_limits(rate, burst)
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)

    def set_limits(self, rate: float, burst: int) -> None:
        """Refill at ``rate`` tokens per second up to ``burst`` from now on (a reload);
        each key keeps the tokens it has, never more than ``burst``.

        Raises:
            ValueError: ``rate`` not > 0 or ``burst`` < 1.
        """
        if not rate > 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        self.rate, self.burst = float(rate), int(burst)

    def take(self, key: str) -> int | None:
        now = self.clock()
        tokens, at = self._buckets.get(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + max(0.0, now - at) * self.rate)
        if tokens < 1.0:
            self._buckets[key] = (tokens, now)
            return max(1, math.ceil((1.0 - tokens) / self.rate * 1000))
        self._buckets[key] = (tokens - 1.0, now)
        if len(self._buckets) > self.PRUNE_AT:
            self._prune(now)
        return None

    def _prune(self, now: float) -> None:
        for key, (tokens, at) in list(self._buckets.items()):
            if tokens + (now - at) * self.rate >= self.burst:
                del self._buckets[key]
