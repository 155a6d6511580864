"""Signals: SIGINT/SIGTERM ask a server for a graceful shutdown, a second stops it at once;
SIGHUP runs a reload callback."""

from __future__ import annotations

import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable

import trio

__all__ = ["watch_signals"]

log = logging.getLogger("peekproxy")

#: What a SIGHUP runs (the daemon's config reload); it must not raise.
Reload = Callable[[], Awaitable[None]]


async def watch_signals(
    shutdown: trio.Event, cancel_scope: trio.CancelScope, reload: Reload | None = None
) -> None:
    """Until cancelled: the first SIGINT or SIGTERM sets ``shutdown`` (logged at info:
    ``SIGTERM received: shutting down``); one more cancels ``cancel_scope`` (logged as a
    warning: ``second SIGINT: stopping now``) and returns.

    SIGHUP runs ``reload`` in a task of its own, one reload at a time: a SIGHUP that comes
    while one runs makes one more run after it (any number of them, one more), so signals
    are never lost and never pile up. Without ``reload``, or once ``shutdown`` is set, a
    SIGHUP is logged and ignored (it never ends the process).

    Run it with ``nursery.start_soon(watch_signals, shutdown, nursery.cancel_scope, ...)``;
    it must run in the main thread (:func:`trio.open_signal_receiver`).
    """
    wanted, pending = trio.open_memory_channel[None](1)
    async with trio.open_nursery() as nursery:
        if reload is not None:
            nursery.start_soon(_reload_each, pending, reload)
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
            async for signum in signals:
                name = signal.Signals(signum).name
                if signum == signal.SIGHUP:
                    if reload is None or shutdown.is_set():
                        log.info("SIGHUP ignored: %s", "shutting down" if reload else "no reload")
                        continue
                    with contextlib.suppress(trio.WouldBlock):  # one is queued already
                        wanted.send_nowait(None)
                    continue
                if shutdown.is_set():
                    log.warning("second %s: stopping now", name)
                    cancel_scope.cancel()
                    nursery.cancel_scope.cancel()
                    return
                log.info("%s received: shutting down", name)
                shutdown.set()


async def _reload_each(pending: trio.MemoryReceiveChannel[None], reload: Reload) -> None:
    async for _ in pending:
        await reload()
