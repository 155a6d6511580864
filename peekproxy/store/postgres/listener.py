"""Other instances' commits, heard through ``LISTEN peekproxy_stream``.

One thread per engine holds its own connection (outside the pool), waits for notifications
and, for each from another instance (its payload is not ours), runs the engine's catch-up in
the trio thread (:func:`trio.from_thread.run`). On every (re)connect it catches up too: what
was committed while it was not listening is read then. A lost connection is retried every
:data:`POLL_S` (0.5 s) until :meth:`StreamListener.stop`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg
import trio

__all__ = ["CHANNEL", "StreamListener"]

log = logging.getLogger(__name__)

#: The notification channel of stream-writing commits; the payload is the writer's instance ID.
CHANNEL = "peekproxy_stream"
#: Seconds between checks of ``stop`` while waiting, and between reconnection attempts.
POLL_S = 0.5
#: Seconds a (re)connect of the LISTEN connection may take (libpq's ``connect_timeout``):
#: a server that does not answer at all (a dropped route) must not hold the thread, and so
#: a stop of the daemon, for the operating system's TCP timeout.
CONNECT_TIMEOUT = 5


class StreamListener:
    """The ``LISTEN`` thread of one engine. ``conninfo``: :func:`psycopg.connect` keyword
    arguments; ``catch_up``: the engine's async catch-up, run in the trio thread of ``token``."""

    def __init__(
        self,
        conninfo: dict[str, Any],
        instance_id: str,
        catch_up: Callable[[], Awaitable[None]],
        token: trio.lowlevel.TrioToken,
    ) -> None:
        self._conninfo = conninfo
        self._instance_id = instance_id
        self._catch_up = catch_up
        self._token = token
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="peekproxy-listen", daemon=True)
        #: Set once the first LISTEN is in place (for tests).
        self.listening = threading.Event()

    def start(self) -> None:
        """Start the thread."""
        self._thread.start()

    def stop(self, wake: Callable[[], None] | None = None) -> None:
        """Stop the thread and wait for it (blocking: call from a worker thread). ``wake``
        sends this instance a notification, so that the thread ends at once rather than at
        its next check (up to ``POLL_S``); its errors are ignored."""
        self._stopping.set()
        if wake is not None:
            try:
                wake()
            except Exception:  # the database is away: the thread ends within POLL_S
                log.debug("could not wake the LISTEN thread", exc_info=True)
        self._thread.join()

    def _run_catch_up(self) -> bool | None:
        """Run the catch-up in the trio thread: True done, False failed (a store error: the
        caller retries it every ``POLL_S`` until it succeeds), None once trio has gone (stop
        then)."""
        try:
            trio.from_thread.run(self._catch_up, trio_token=self._token)
        except trio.RunFinishedError:
            return None
        except Exception:
            log.warning("catching up with other instances' commits failed", exc_info=True)
            return False
        return True

    def _loop(self) -> None:
        failed = False
        while not self._stopping.is_set():
            try:
                with psycopg.connect(**self._conninfo, connect_timeout=CONNECT_TIMEOUT) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    if failed:
                        log.info("listening for other instances' commits again")
                    failed = False
                    self.listening.set()
                    # Other instances' rows committed while this one was not listening
                    # (and any catch-up that failed since) are caught up now, or retried
                    # every POLL_S until the store answers: none is left for a later commit.
                    pending = True
                    while not self._stopping.is_set():
                        if pending:
                            done = self._run_catch_up()
                            if done is None:
                                return
                            pending = not done
                        # Back at the first notification (not at the end of POLL_S), then
                        # whatever else is queued already: one catch-up for a burst.
                        notes = list(conn.notifies(timeout=POLL_S, stop_after=1))
                        if notes:
                            notes += conn.notifies(timeout=0)
                        pending = pending or any(n.payload != self._instance_id for n in notes)
            except psycopg.Error as e:
                if not failed:
                    log.warning("LISTEN connection lost (%s); reconnecting every %ss", e, POLL_S)
                failed = True
                self._stopping.wait(POLL_S)
