"""peekproxy/outage.py: one WARNING per database outage, background work retried after a
store error once the store answers again, StoreUnavailable found inside exception groups;
and the API's mapping of it to 503 M_UNKNOWN (a Starlette app over the real handlers)."""

from __future__ import annotations

import logging

import httpx
import pytest
import trio
import trio.testing
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from peekproxy import outage
from peekproxy.api.errors import exception_handlers
from peekproxy.outage import OUTAGE_QUIET_S, StoreOutage, retry_store_errors, store_unavailable_in
from peekproxy.store import StoreError, StoreUnavailable


def test_one_warning_per_outage(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    seen = StoreOutage(clock=lambda: now[0])
    caplog.set_level(logging.DEBUG, logger="peekproxy.store")
    for _ in range(5):
        seen.failed("a task", StoreUnavailable("down"))
        now[0] += 1
    seen.recovered()
    seen.failed("a task", StoreUnavailable("down again"))
    now[0] += OUTAGE_QUIET_S + 1  # no recovery seen, but long quiet: a new outage
    seen.failed("a request", StoreUnavailable("down later"))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 3 and "down again" in warnings[1]
    assert [r.levelno for r in caplog.records].count(logging.INFO) == 1  # "answers again"


def test_store_unavailable_found_in_groups() -> None:
    inner = StoreUnavailable("x")
    group = ExceptionGroup("a", [ValueError(), ExceptionGroup("b", [inner])])
    assert store_unavailable_in(group) is inner
    assert store_unavailable_in(inner) is inner
    assert store_unavailable_in(ExceptionGroup("c", [ValueError()])) is None
    assert store_unavailable_in(StoreError("not transient")) is None


async def test_retry_waits_for_the_store_then_runs_again(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(outage, "OUTAGE", StoreOutage())
    down = [True]
    runs, pings = [], []

    async def ping() -> None:
        pings.append(trio.current_time())
        if down[0]:
            raise StoreUnavailable("still down")

    async def loop(name: str) -> str:
        runs.append(trio.current_time())
        if len(runs) == 1:
            raise StoreUnavailable("down")
        return name

    async def heal() -> None:
        await trio.sleep(10)
        down[0] = False

    async with trio.open_nursery() as nursery:
        nursery.start_soon(heal)
        assert await retry_store_errors(ping, "a loop", loop, "done") == "done"
    assert len(runs) == 2 and runs[1] >= 10
    gaps = [b - a for a, b in zip([0.0, *pings], pings, strict=False)]
    assert 0.4 <= gaps[0] < 0.6 and gaps[1] > gaps[0]  # back-off grows, with jitter


async def test_retry_lets_other_errors_through() -> None:
    async def broken() -> None:
        raise ValueError("a bug")

    with pytest.raises(ValueError):
        await retry_store_errors(None, "a loop", broken)


async def test_store_unavailable_is_503_also_from_a_nursery() -> None:
    async def direct(request: Request) -> Response:
        raise StoreUnavailable("down")

    async def nursery(request: Request) -> Response:
        async def fail() -> None:
            raise StoreUnavailable("down")

        async with trio.open_nursery() as n:
            n.start_soon(fail)
        return Response()

    app = Starlette(
        routes=[Route("/direct", direct), Route("/nursery", nursery)],
        exception_handlers=exception_handlers(),
    )
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
        for path in ("/direct", "/nursery"):
            response = await http.get(path)
            assert response.status_code == 503, path
            assert response.json() == {
                "errcode": "M_UNKNOWN",
                "error": "the database is unavailable; retry later",
            }
            assert response.headers["Retry-After"] == "5"
