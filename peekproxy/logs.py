"""Logging to stderr: plain text (no timestamp under journald) or one JSON object per line.

Loggers: ``peekproxy.*`` for the daemon, ``peekproxy.access`` for the access log (path
without query string, so access tokens never reach the log), ``peekproxy.http`` for
hypercorn's own messages.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Literal

__all__ = ["ACCESS_LOG_FORMAT", "JsonFormatter", "setup_logging"]

#: hypercorn access-log atoms: client, "METHOD PATH PROTO" (no query), status, bytes, seconds.
ACCESS_LOG_FORMAT = '%(h)s "%(m)s %(U)s HTTP/%(H)s" %(s)s %(b)s %(L)ss'


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
    root.setLevel(level)
    logging.getLogger("peekproxy.access").disabled = not access_log
    # hypercorn's own start-up chatter ("Running on ...") duplicates our ready line.
    logging.getLogger("peekproxy.http").setLevel(max(logging.WARNING, root.level))
    # httpx logs full request URLs at INFO; keep them at DEBUG-only.
    logging.getLogger("httpx").setLevel(max(logging.WARNING, root.level))
