"""SIGINT/SIGTERM: the first asks a server for a graceful shutdown, a second stops it at once."""

from __future__ import annotations

import logging
import signal

import trio

__all__ = ["watch_signals"]

log = logging.getLogger("peekproxy")


async def watch_signals(shutdown: trio.Event, cancel_scope: trio.CancelScope) -> None:
    """Until cancelled: the first SIGINT or SIGTERM sets ``shutdown`` (logged at info:
    ``SIGTERM received: shutting down``); one more cancels ``cancel_scope`` (logged as a
    warning: ``second SIGINT: stopping now``) and returns. Run it with
    ``nursery.start_soon(watch_signals, shutdown, nursery.cancel_scope)``; it must run in
    the main thread (:func:`trio.open_signal_receiver`).
    """
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            if shutdown.is_set():
                log.warning("second %s: stopping now", signal.Signals(signum).name)
                cancel_scope.cancel()
                return
            log.info("%s received: shutting down", signal.Signals(signum).name)
            shutdown.set()
