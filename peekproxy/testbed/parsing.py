"""Request parsing for the testbed's HTTP apps: the admin API's JSON bodies as typed,
strict pydantic models (unknown fields refused), and path segments read from the raw path.
"""

from __future__ import annotations

from typing import Any, TypeVar
from urllib.parse import unquote_to_bytes

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import Request

from peekproxy.api.errors import MatrixError

__all__ = [
    "ConfigBody",
    "CreateRoomBody",
    "IllegalBody",
    "MembershipBody",
    "ReceiptBody",
    "RemoteServerBody",
    "SendBody",
    "TypingBody",
    "parse_body",
    "raw_segments",
]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class CreateRoomBody(_Body):
    """``POST /_testbed/v1/rooms``: see :meth:`Testbed.create_room`."""

    room_version: str = "10"
    creator: str = "admin"
    alias: str | None = None
    history_visibility: str = "world_readable"
    join_rule: str = "public"
    encrypted: bool = False
    name: str | None = None
    topic: str | None = None
    initial_state: list[dict[str, Any]] = Field(default_factory=list)


class SendBody(_Body):
    """``POST /rooms/{roomId}/send`` and ``/state`` (``state_key`` defaults to ``""``)."""

    sender: str = "admin"
    type: str = "m.room.message"
    content: dict[str, Any]
    state_key: str | None = None


class MembershipBody(_Body):
    """``POST /rooms/{roomId}/members/{join,leave,invite}``."""

    user: str
    sender: str | None = None  # the inviter (invite only; default "admin")


class IllegalBody(_Body):
    """``POST /rooms/{roomId}/illegal``: see :meth:`Testbed.relay_illegal`."""

    kind: str
    sender: str | None = None
    target: str | None = None


class TypingBody(_Body):
    """``POST /rooms/{roomId}/typing``: an ``m.typing`` EDU."""

    user: str
    typing: bool = True


class ReceiptBody(_Body):
    """``POST /rooms/{roomId}/receipt``: an ``m.receipt`` EDU."""

    user: str
    event_id: str
    receipt_type: str = "m.read"


class RemoteServerBody(_Body):
    """``POST /remote_servers``: a simulated remote server to add."""

    server_name: str


class ConfigBody(_Body):
    """``PUT /config``: the renewal interval (ms, at least 100) peeks are answered with."""

    renewal_interval_ms: int = Field(ge=100)


M = TypeVar("M", bound=BaseModel)


def parse_body(model: type[M], data: Any) -> M:
    """``data`` (a JSON body; ``None`` counts as ``{}``) validated as ``model``.

    Raises:
        MatrixError: 400 ``M_BAD_JSON`` ``<field>: <problem>; ...``.
    """
    try:
        return model.model_validate(data if data is not None else {})
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}" for err in e.errors()
        )
        raise MatrixError(400, "M_BAD_JSON", problems) from None


def raw_segments(request: Request, prefix: str) -> list[str]:
    """The path after ``prefix``, split on ``/`` in the raw (still percent-encoded) request
    path and then percent-decoded segment by segment, so ``%2F`` stays inside a segment.

    Raises:
        MatrixError: 404 ``M_UNRECOGNIZED`` when the raw path does not start with
            ``prefix``; 400 ``M_INVALID_PARAM`` for a segment that is not UTF-8.
    """
    raw: bytes = request.scope.get("raw_path") or request.scope["path"].encode()
    if not raw.startswith(prefix.encode()):
        raise MatrixError(404, "M_UNRECOGNIZED", "Unrecognized request")
    try:
        return [
            unquote_to_bytes(segment).decode("utf-8") for segment in raw[len(prefix) :].split(b"/")
        ]
    except UnicodeDecodeError:
        raise MatrixError(400, "M_INVALID_PARAM", "a path segment is not UTF-8") from None
