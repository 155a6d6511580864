"""The serving module (peekproxy/serving/) on its own: one listener's hypercorn settings, the
``cannot listen on`` error naming the config key, the graceful drain of a listener group,
the two-signal shutdown and the one-line message of an exception group.

The listeners' guards are tested in tests/test_http_robustness.py; the daemon and the
testbed as processes in tests/test_daemon.py and tests/test_testbed.py.
"""

from __future__ import annotations

import ast
import logging
import signal
import socket
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.testing

from peekproxy import serving
from peekproxy.serving import (
    LISTEN_BACKLOG,
    ServingError,
    exception_leaves,
    failure_message,
    hypercorn_config,
    open_listeners,
    start_listener,
    watch_signals,
)
from tests.support import JsonApp


def test_hypercorn_config_for_a_plain_and_a_tls_listener(tmp_path: Path) -> None:
    plain = hypercorn_config("127.0.0.1:8008", grace=2.5, access_log=False)
    assert plain.bind == ["127.0.0.1:8008"]
    assert plain.backlog == LISTEN_BACKLOG == 4096
    assert plain.graceful_timeout == 2.5
    assert plain.accesslog is None
    assert plain.errorlog is logging.getLogger("peekproxy.http")
    assert plain.include_server_header is False
    assert not plain.ssl_enabled

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    tls = hypercorn_config("[::1]:8448", grace=1.0, access_log=True, certfile=cert, keyfile=key)
    assert tls.accesslog is logging.getLogger("peekproxy.access")
    assert (tls.certfile, tls.keyfile) == (str(cert), str(key))
    half = hypercorn_config("127.0.0.1:8448", grace=1.0, access_log=False, certfile=cert)
    assert half.certfile is None  # TLS needs both files


def test_exception_groups_flatten_into_one_line() -> None:
    nested = ExceptionGroup(
        "outer",
        [ServingError("a: first"), ExceptionGroup("inner", [OSError("second")])],
    )
    assert [str(e) for e in exception_leaves(nested)] == ["a: first", "second"]
    assert failure_message(nested) == "a: first; second"
    assert failure_message(ServingError("alone")) == "alone"


async def test_a_taken_address_names_the_config_key() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        app: Any = JsonApp({})
        failure = None
        try:
            async with trio.open_nursery() as nursery:
                await start_listener(
                    nursery,
                    "listeners.client.bind",
                    app,
                    hypercorn_config(f"127.0.0.1:{port}", grace=0.1, access_log=False),
                    trio.Event(),
                )
        except* ServingError as group:
            failure = failure_message(group)
    assert failure == (
        f"listeners.client.bind: cannot listen on 127.0.0.1:{port}: Address already in use"
    )


async def test_leaving_open_listeners_waits_for_in_flight_requests() -> None:
    answered: list[float] = []
    arrived = trio.Event()

    async def slow(scope: Any, body: bytes) -> tuple[int, object]:
        arrived.set()
        await trio.sleep(0.3)
        answered.append(trio.current_time())
        return 200, {"slow": True}

    app: Any = JsonApp({("GET", "/slow"): slow})
    shutdown = trio.Event()
    replies: list[httpx.Response] = []
    async with trio.open_nursery() as clients:
        async with open_listeners(shutdown) as listeners:
            url = await listeners.start(
                "test", app, hypercorn_config("127.0.0.1:0", grace=5.0, access_log=False)
            )
            assert url.startswith("http://127.0.0.1:")

            async def request() -> None:
                async with httpx.AsyncClient(timeout=10) as http:
                    replies.append(await http.get(f"{url}/slow"))

            clients.start_soon(request)
            await arrived.wait()  # the request is in flight
            shutdown.set()
        drained = trio.current_time()
    assert [r.status_code for r in replies] == [200]
    assert answered and answered[0] <= drained


async def test_first_signal_asks_for_shutdown_and_a_second_stops_now(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "peekproxy")
    shutdown = trio.Event()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch_signals, shutdown, nursery.cancel_scope)
            await trio.testing.wait_all_tasks_blocked()  # the receiver is installed
            signal.raise_signal(signal.SIGINT)
            await shutdown.wait()
            assert not nursery.cancel_scope.cancel_called
            signal.raise_signal(signal.SIGINT)
            await trio.sleep_forever()  # until the second signal cancels the nursery
    assert nursery.cancel_scope.cancelled_caught
    assert "SIGINT received: shutting down" in caplog.text
    assert "second SIGINT: stopping now" in caplog.text


def test_serving_imports_no_app_service_store_or_config() -> None:
    """The package docstring's import rule: serving knows hypercorn and trio, not what it
    serves (so the daemon, the testbed and what comes next can all use it)."""
    package = Path(serving.__file__).parent
    imported = set()
    for module in package.glob("*.py"):
        for node in ast.walk(ast.parse(module.read_text("utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module)
            elif isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names)
    ours = {name for name in imported if name.split(".")[0] == "peekproxy"}
    assert ours <= {"peekproxy.logs"} | {
        f"peekproxy.serving.{m.stem}" for m in package.glob("*.py")
    }
