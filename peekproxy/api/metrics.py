"""The metrics listener's app: Prometheus ``GET /metrics`` and nothing else."""

from __future__ import annotations

from collections.abc import Callable

from starlette.types import Receive, Scope, Send

from peekproxy.api.errors import matrix_error_response
from peekproxy.metrics import metrics_app

__all__ = ["MetricsOnly"]


class MetricsOnly:
    """ASGI app: ``GET``/``HEAD /metrics`` is the Prometheus text exposition
    (:func:`peekproxy.metrics.metrics_app`); another method on ``/metrics`` is
    ``405 M_UNRECOGNIZED``, any other path ``404 M_UNRECOGNIZED`` (Matrix error JSON).
    ``before_scrape`` sets the gauges read at scrape time
    (:class:`peekproxy.services.gauges.ScrapeGauges`)."""

    def __init__(self, before_scrape: Callable[[], None] | None = None) -> None:
        self._metrics = metrics_app(before_scrape)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                kind = message["type"].removeprefix("lifespan.")
                await send({"type": f"lifespan.{kind}.complete"})
                if kind == "shutdown":
                    return
        if scope["type"] == "http" and scope["path"] == "/metrics":
            if scope["method"] in ("GET", "HEAD"):
                await self._metrics(scope, receive, send)
                return
            response = matrix_error_response(405, "M_UNRECOGNIZED", "Unrecognized request")
            await response(scope, receive, send)
            return
        response = matrix_error_response(404, "M_UNRECOGNIZED", "Unrecognized request")
        await response(scope, receive, send)
