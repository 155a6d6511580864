"""The error every service raises for a request it cannot serve.

The API turns a :class:`PeekError` into Matrix error JSON (``{"errcode", "error", ...}``,
client-server API §Standard error response) with its HTTP status.
"""

from __future__ import annotations

from typing import Any

__all__ = ["PeekError"]


class PeekError(Exception):
    """A peek request failed; ``status``/``errcode``/``error`` go to the client as is.

    ``extra`` holds more fields of the error JSON, e.g. ``retry_after_ms`` (int, ms) of an
    ``M_LIMIT_EXCEEDED`` (HTTP 429).
    """

    def __init__(self, status: int, errcode: str, error: str, **extra: Any) -> None:
        super().__init__(f"{status} {errcode}: {error}")
        self.status, self.errcode, self.error, self.extra = status, errcode, error, extra
