"""Errors that services raise for the client: the API turns them into Matrix error JSON."""

from __future__ import annotations

from typing import Any

__all__ = ["PeekError"]


class PeekError(Exception):
    """A request to a service failed; ``status``/``errcode``/``error`` go to the client as is
    (client-server API §Standard error response), ``extra`` as more top-level JSON fields
    (e.g. ``retry_after_ms`` with a 429)."""

    def __init__(self, status: int, errcode: str, error: str, **extra: Any) -> None:
        super().__init__(f"{status} {errcode}: {error}")
        self.status, self.errcode, self.error, self.extra = status, errcode, error, extra
