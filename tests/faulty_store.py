"""A :class:`~peekproxy.store.Storage` whose database can be "taken away" (issue 16): it
delegates to a real :class:`~peekproxy.store.sqlite.SqliteStorage` and, while ``down``,
raises :class:`~peekproxy.store.StoreUnavailable` from every ``read``, ``write`` and
``ping`` before the call reaches the database (nothing of it is committed), as the
PostgreSQL engine does while its server is stopped. ``InProcessDaemons`` runs
``run_daemon`` in the test's own process over such a store, on real sockets."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import trio

from peekproxy.config import load_config
from peekproxy.daemon import Listening, run_daemon
from peekproxy.store import ReadTransaction, Storage, StoreUnavailable, WriteTransaction
from peekproxy.store.sqlite import open_sqlite

T = TypeVar("T")
H = TypeVar("H")


class FaultyStorage:
    """``inner``, failing with StoreUnavailable while ``down``; counts the calls refused.
    ``fail_write`` (when set) also refuses each write whose ``fn`` it says yes to (its
    ``__qualname__`` names the service step), reads going on."""

    def __init__(self, inner: Storage) -> None:
        self.inner = inner
        self.down = False
        self.refused = 0
        self.fail_write: Callable[[Callable[..., object]], bool] | None = None

    def _check(self) -> None:
        if self.down:
            self.refused += 1
            raise StoreUnavailable("injected: the database is down")

    async def read(self, fn: Callable[[ReadTransaction], T]) -> T:
        self._check()
        return await self.inner.read(fn)

    async def write(self, fn: Callable[[WriteTransaction], T]) -> T:
        self._check()
        if self.fail_write is not None and self.fail_write(fn):
            self.refused += 1
            raise StoreUnavailable("injected: the database went away during this write")
        return await self.inner.write(fn)

    def set_commit_hook(
        self, read: Callable[[ReadTransaction], H], apply: Callable[[H], None]
    ) -> None:
        self.inner.set_commit_hook(read, apply)

    async def record_server_name(self) -> None:
        self._check()
        await self.inner.record_server_name()

    async def server_info(self) -> dict[str, str]:
        self._check()
        return await self.inner.server_info()

    async def ping(self) -> None:
        self._check()
        await self.inner.ping()

    async def aclose(self) -> None:
        await self.inner.aclose()


@dataclass
class InProcessDaemon:
    """A daemon run by ``run_daemon`` in this process: its listeners' URLs and its store."""

    client: str
    federation: str
    store: FaultyStorage
    shutdown: trio.Event = field(default_factory=trio.Event)


class InProcessDaemons:
    """``await daemons.spawn(config, env=...)`` (as the ``spawn`` fixture's, for
    ``build_world``): ``peekproxy run`` as ``run_daemon`` in ``nursery``, its store a
    :class:`FaultyStorage` (``peekproxy.daemon.open_sqlite`` patched by the fixture with
    :meth:`open_sqlite`). ``env`` holds the ``PEEKPROXY_*`` overrides, as for a child."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self.nursery = nursery
        self.started: list[InProcessDaemon] = []
        self._stores: list[FaultyStorage] = []
        self._real_open = open_sqlite

    async def open_sqlite(self, *args: Any, **kwargs: Any) -> FaultyStorage:
        store = FaultyStorage(await self._real_open(*args, **kwargs))
        self._stores.append(store)
        return store

    async def spawn(self, config: Path, *, env: dict[str, str] | None = None) -> Any:
        shutdown = trio.Event()
        run = functools.partial(
            run_daemon, load_config(config, env or {}), shutdown=shutdown, handle_signals=False
        )
        listening: Listening = await self.nursery.start(run)
        daemon = InProcessDaemon(listening.client, listening.federation, self._stores[-1], shutdown)
        self.started.append(daemon)
        return daemon
