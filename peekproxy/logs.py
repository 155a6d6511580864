"""Logging to stderr: plain text (no timestamp under journald) or one JSON object per line.

Loggers: ``peekproxy.*`` for the daemon, ``peekproxy.access`` for the access log (path
without query string, so access tokens never reach the log; a path segment over 255 bytes,
such as an over-long room ID, shows only its first 40 characters), ``peekproxy.http`` for
hypercorn's own messages.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import MutableMapping
from typing import Literal

__all__ = ["ACCESS_LOG_FORMAT", "JsonFormatter", "set_level", "setup_logging", "short_path"]

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
    """One JSON object per record: ``ts`` (s since the epoch), ``level``, ``logger``, ``msg``."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": round(record.created, 3),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def setup_logging(
    level: str = "INFO", fmt: Literal["text", "json"] = "text", *, access_log: bool = True
) -> None:
    """Configure the root logger once for the daemon process."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    elif os.environ.get("JOURNAL_STREAM"):
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
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
