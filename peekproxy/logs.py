"""Logging to stderr: plain text (no timestamp under journald) or one JSON object per line.

Loggers: ``peekproxy.*`` for the daemon, ``peekproxy.access`` for the access log (one line
per request; path without query string, so access tokens never reach the log; a path
segment over 255 bytes, such as an over-long room ID, shows only its first 40 characters),
``peekproxy.http`` for hypercorn's own messages.

Fields (:data:`LOG_FIELDS`): a record carries ``room_id``, ``peek_id``, ``origin``,
``destination``, ``user_id`` and ``device_id`` where the code knows them, given with
``extra=`` or bound to the running task with :func:`bind_log_fields` / :func:`log_fields`
(a contextvar: a request's task, a room's subscription task, and the tasks they start
later). JSON lines have them as top-level keys; text lines end with ``key=value`` for each
one the message does not already show.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from collections.abc import Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from contextvars import ContextVar
from types import MappingProxyType
from typing import Literal

__all__ = [
    "ACCESS_LOG_FORMAT",
    "LOG_FIELDS",
    "JsonFormatter",
    "TextFormatter",
    "bind_log_fields",
    "log_fields",
    "set_level",
    "setup_logging",
    "short_path",
]

#: The structured fields a record may carry (docs/operations.md "Logs").
LOG_FIELDS = ("room_id", "peek_id", "origin", "destination", "user_id", "device_id")

_NONE: Mapping[str, str] = MappingProxyType({})
_bound: ContextVar[Mapping[str, str]] = ContextVar("peekproxy_log_fields", default=_NONE)


def _known(fields: Mapping[str, str | None]) -> dict[str, str]:
    unknown = set(fields) - set(LOG_FIELDS)
    if unknown:
        raise ValueError(f"not log fields: {sorted(unknown)}")
    return {k: v for k, v in fields.items() if v is not None}


def bind_log_fields(*, fresh: bool = False, **fields: str | None) -> None:
    """Put ``fields`` (names from :data:`LOG_FIELDS`; ``None`` values are skipped) on every
    record the current task logs from now on, and the tasks it starts later; ``fresh``:
    drop the fields bound before (a long-lived task must not keep those of the request
    that started it).

    Raises:
        ValueError: a name is not in :data:`LOG_FIELDS`.
    """
    _bound.set({**({} if fresh else _bound.get()), **_known(fields)})


@contextmanager
def log_fields(**fields: str | None) -> Iterator[None]:
    """:func:`bind_log_fields` for the ``with`` block only."""
    token = _bound.set({**_bound.get(), **_known(fields)})
    try:
        yield
    finally:
        _bound.reset(token)


class _BoundFields(logging.Filter):
    """Copies the fields bound to the task onto each record that lacks them."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name, value in _bound.get().items():
            if getattr(record, name, None) is None:
                setattr(record, name, value)
        return True


def _fields_of(record: logging.LogRecord) -> dict[str, str]:
    return {
        name: str(value)
        for name in LOG_FIELDS
        if (value := getattr(record, name, None)) is not None
    }


#: hypercorn access-log atoms: client, "METHOD PATH PROTO" (no query), status, bytes, seconds.
ACCESS_LOG_FORMAT = '%(h)s "%(m)s %(U)s HTTP/%(H)s" %(s)s %(b)s %(L)ss'


#: A path segment longer than this many UTF-8 bytes (the spec's limit on identifiers) is
#: logged by its first ``SHOWN_CHARS`` characters only.
MAX_SEGMENT_BYTES = 255
SHOWN_CHARS = 40


def short_path(path: str) -> str:
    """``path`` (decoded, as ASGI gives it) with every segment over 255 bytes cut to its
    first 40 characters plus ``…[<n> bytes]``: an identifier that long is invalid, and is
    never logged in full."""
    segments = path.split("/")
    for i, segment in enumerate(segments):
        size = len(segment.encode("utf-8", "surrogatepass"))
        if size > MAX_SEGMENT_BYTES:
            segments[i] = f"{segment[:SHOWN_CHARS]}…[{size} bytes]"
    return "/".join(segments)


class _ShortPaths(logging.Filter):
    """Applies :func:`short_path` to the path atoms of hypercorn's access-log records."""

    def filter(self, record: logging.LogRecord) -> bool:
        atoms = record.args
        if isinstance(atoms, MutableMapping):
            for key in ("U", "r"):
                value = atoms.get(key)
                if isinstance(value, str):
                    atoms[key] = short_path(value)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``ts`` (s since the epoch), ``level``, ``logger``, ``msg``,
    then each field of :data:`LOG_FIELDS` the record carries, and ``exc`` (a traceback)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": round(record.created, 3),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
            **_fields_of(record),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """``[time] LEVEL logger: message``, then `` key=value`` for each field of
    :data:`LOG_FIELDS` the record carries and the message does not show already."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        shown = record.message
        extra = [
            f"{k}={v}"
            for k, v in _fields_of(record).items()
            if not re.search(rf"(?<!\w){re.escape(v)}(?!\w)", shown)
        ]
        return " ".join([line, *extra])


def setup_logging(
    level: str = "INFO", fmt: Literal["text", "json"] = "text", *, access_log: bool = True
) -> None:
    """Configure the root logger once for the daemon process."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_BoundFields())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    elif os.environ.get("JOURNAL_STREAM"):  # journald stamps each line itself
        handler.setFormatter(TextFormatter("%(levelname)s %(name)s: %(message)s"))
    else:
        handler.setFormatter(TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    access = logging.getLogger("peekproxy.access")
    if not any(isinstance(f, _ShortPaths) for f in access.filters):
        access.addFilter(_ShortPaths())
    set_level(level, access_log=access_log)


def set_level(level: str, *, access_log: bool) -> None:
    """Apply ``logging.level`` and ``logging.access_log`` (at start-up, and again on each
    reload): the root logger's level, the access log on or off, and the floors below."""
    root = logging.getLogger()
    root.setLevel(level)
    logging.getLogger("peekproxy.access").disabled = not access_log
    # hypercorn's own start-up chatter ("Running on ...") duplicates our ready line.
    logging.getLogger("peekproxy.http").setLevel(max(logging.WARNING, root.level))
    # httpx logs full request URLs at INFO; the HTTP libraries log headers at DEBUG (hpack
    # every decoded header of an HTTP/2 request, Authorization included): never below
    # WARNING, whatever the level, so tokens and secrets cannot reach the log.
    for name in ("httpx", "httpcore", "hpack", "h2", "h11"):
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))
