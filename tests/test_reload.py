"""The reload's parts without a process: which keys changed and which are live
(:mod:`peekproxy.core.config_changes`), the Reloader applying a re-read config, the token
bucket retuned, the notifier's drain, and SIGHUP handling in :func:`watch_signals`."""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

import pytest
import trio
import trio.testing

from peekproxy.api.delegation_params import TokenBucket
from peekproxy.config import Config, ConfigError, load_config
from peekproxy.core.config_changes import LIVE_KEYS, changed_keys, flatten, split_changes
from peekproxy.reload import Reloader, live_settings, monotonic_usec
from peekproxy.services.notifier import Notifier
from peekproxy.serving import hypercorn_config, watch_signals
from tests.support import write_config


def test_flatten_and_changed_keys() -> None:
    old = flatten({"peeks": {"rate_limit_burst": 10, "sync_section": "peek"}, "a": {}, "l": [1]})
    assert old == {"peeks.rate_limit_burst": 10, "peeks.sync_section": "peek", "a": {}, "l": [1]}
    new = dict(old, **{"peeks.rate_limit_burst": 5, "l": [1, 2], "b.c": None})
    assert changed_keys(old, new) == ["b.c", "l", "peeks.rate_limit_burst"]
    assert changed_keys(old, dict(old)) == []


def test_split_changes_live_and_restart_only() -> None:
    old = {
        "peeks.rate_limit_burst": 10,
        "peeks.max_remote_peeks": 1,
        "server.server_name": "a",
        "listeners.client.bind": "127.0.0.1:1",
        "logging.format": "text",
        "delegation.shared_secret_file": "/s",
    }
    new = {
        "peeks.rate_limit_burst": 5,
        "peeks.max_remote_peeks": 2,
        "server.server_name": "b",
        "listeners.client.bind": "127.0.0.1:2",
        "logging.format": "json",
        "delegation.shared_secret_file": "/t",
    }
    changes = split_changes(old, new)
    assert changes.live == (
        "delegation.shared_secret_file",
        "peeks.max_remote_peeks",
        "peeks.rate_limit_burst",
    )
    assert changes.restart == ("listeners.client.bind", "logging.format", "server.server_name")
    assert {"server.server_name", "server.signing_key_file", "listeners.client.bind"}.isdisjoint(
        LIVE_KEYS
    )


def test_tls_pair_is_live_only_while_tls_stays_on() -> None:
    cert, key = (
        "listeners.federation.tls_certificate_file",
        "listeners.federation.tls_private_key_file",
    )
    on = {cert: "/a.crt", key: "/a.key"}
    other = {cert: "/b.crt", key: "/b.key"}
    off = {cert: None, key: None}
    assert split_changes(on, other).live == (cert, key)
    assert split_changes(off, on).restart == (cert, key)  # turning TLS on: a restart
    assert split_changes(on, off).restart == (cert, key)


def test_token_bucket_set_limits_applies_from_now_on() -> None:
    now = [0.0]
    bucket = TokenBucket(0.001, 2, clock=lambda: now[0])
    assert [bucket.take("u") for _ in range(2)] == [None, None]
    assert bucket.take("u") is not None
    bucket.set_limits(1000.0, 5)  # refilled at the new rate
    now[0] += 0.01
    assert bucket.take("u") is None
    assert [bucket.take("new") for _ in range(6)][-1] is not None  # a new key: burst 5
    bucket.set_limits(1.0, 1)  # "u" holds 4 tokens: capped at the new burst
    assert [bucket.take("u"), bucket.take("u")] == [None, 1000]
    with pytest.raises(ValueError):
        bucket.set_limits(0, 1)


def _config(directory: Path, **peeks: str) -> Path:
    path = write_config(directory)
    text = path.read_text()
    for key, value in peeks.items():
        text = text.replace(f"\n{key} = ", f"\n{key} = {value}\n#", 1)
    path.write_text(text)
    return path


def _reloader(path: Path, live_secret: str | None = None) -> tuple[Config, Reloader]:
    config = load_config(path)
    live = live_settings(config, live_secret)
    http = [hypercorn_config("127.0.0.1:0", grace=3.0, access_log=True)]
    return config, Reloader(config, lambda: load_config(path), live, listeners=http)


async def test_reloader_applies_live_keys_and_warns_once_about_the_rest(
    server_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    path = _config(server_dir)
    _, reloader = _reloader(path)
    live = reloader._live
    _config(server_dir, rate_limit_burst="3", max_peeks_per_device="7", sync_section='"peeking"')
    (server_dir / "s").write_text("the-secret\n")
    path.write_text(
        path.read_text()
        .replace("# shared_secret_file = ", "shared_secret_file = ")
        .replace('"delegation.secret"', f'"{server_dir / "s"}"')
        .replace('shutdown_grace = "3s"', 'shutdown_grace = "9s"')
    )
    await reloader.reload()
    assert (live.rate_limit_burst, live.max_peeks_per_device) == (3, 7)
    assert live.delegation_secret == "the-secret"
    assert reloader._listeners[0].graceful_timeout == 9.0
    assert caplog.text.count("peeks.sync_section changed: takes effect after a restart") == 1
    assert "the-secret" not in caplog.text
    await reloader.reload()  # the same pending change: not named again
    assert caplog.text.count("peeks.sync_section changed") == 1

    # A broken file: each problem at ERROR naming its key, nothing applied.
    caplog.clear()
    path.write_text(path.read_text().replace("rate_limit_burst = 3", "rate_limit_burst = 0"))
    (server_dir / "s").write_text("another\n")
    await reloader.reload()
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert errors and "peeks.rate_limit_burst" in errors[0].getMessage()
    assert (live.rate_limit_burst, live.delegation_secret) == (3, "the-secret")


async def test_reloader_refuses_an_unreadable_secret_without_applying_anything(
    server_dir: Path,
) -> None:
    secret = server_dir / "s"
    secret.write_text("one\n")
    path = write_config(server_dir, extra={"delegation": f'shared_secret_file = "{secret}"'})
    _, reloader = _reloader(path, "one")
    secret.write_text("\n")  # empty: a mistake, not "off"
    path.write_text(path.read_text().replace("rate_limit_burst = 10", "rate_limit_burst = 4"))
    with pytest.raises(ConfigError, match=r"delegation\.shared_secret_file: "):
        reloader.apply(load_config(path, check_files=True))
    assert (reloader._live.delegation_secret, reloader._live.rate_limit_burst) == ("one", 10)


async def test_a_secret_replaced_in_place_is_reported(server_dir: Path) -> None:
    """The same path with new contents changes no key of the file, yet the reload applied
    something: its status says so (and never the secret itself)."""
    secret = server_dir / "s"
    secret.write_text("one\n")
    path = write_config(server_dir, extra={"delegation": f'shared_secret_file = "{secret}"'})
    _, reloader = _reloader(path, "one")
    assert reloader.apply(load_config(path)) == "reloaded: nothing changed"
    secret.write_text("two\n")
    status = reloader.apply(load_config(path))
    assert status == "reloaded: delegation secret replaced"
    assert reloader._live.delegation_secret == "two"


def test_monotonic_usec_is_clock_monotonic() -> None:
    import time

    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert before <= monotonic_usec() <= before + 5_000_000


async def test_drain_wakes_every_waiter_and_every_later_one() -> None:
    notifier = Notifier()
    waiting = notifier.register(["!r:x"], ("@u:x", "D"))
    assert not waiting.is_set() and not notifier.draining
    notifier.drain()
    assert waiting.is_set() and notifier.draining
    later = notifier.register(["!r:x"], ("@u:x", "D"))
    assert later.is_set()
    with trio.fail_after(1):
        await notifier.wait_drain()


async def test_sighup_runs_the_reload_one_at_a_time() -> None:
    """Three SIGHUPs while a reload runs: one more reload after it, not three; SIGHUP never
    sets the shutdown event."""
    shutdown = trio.Event()
    release = trio.Event()
    entered_send, entered = trio.open_memory_channel[None](10)

    async def reload() -> None:
        await entered_send.send(None)
        await release.wait()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch_signals, shutdown, nursery.cancel_scope, reload)
        await trio.testing.wait_all_tasks_blocked()
        os.kill(os.getpid(), signal.SIGHUP)
        with trio.fail_after(5):
            await entered.receive()  # the first reload runs, and waits
        for _ in range(3):
            os.kill(os.getpid(), signal.SIGHUP)
            await trio.testing.wait_all_tasks_blocked()
        release.set()
        with trio.fail_after(5):
            await entered.receive()  # one more
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(trio.WouldBlock):
            entered.receive_nowait()  # and no third
        assert not shutdown.is_set()
        nursery.cancel_scope.cancel()
