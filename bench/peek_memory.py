"""Memory per device peek (bench/fanout.py's second part), on SQLite or PostgreSQL.

In this process, the peek services over a fresh database holding R rooms (subscriptions) and
D device peeks are started, and every device is loaded into the live window as its first
sync would; the resident-memory growth divided by D is the cost per device peek (goal
≤ 2 KiB). On PostgreSQL the database itself lives in the server's processes: the figure is
peekproxy's own memory (live window, services, the connection pool), as on SQLite.
"""

from __future__ import annotations

import gc
import re
import resource
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import trio

__all__ = ["memory", "memory_figures"]

#: Every device peek, in pages of 2,000, by primary key (SQL both engines run).
_PAGE = (
    "SELECT user_id, device_id, room_id, state, changed_pos FROM device_peeks "
    "WHERE (user_id, device_id, room_id) > (?, ?, ?) "
    "ORDER BY user_id, device_id, room_id LIMIT 2000"
)


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(re.findall(r"\d+", line)[0])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


async def memory(rooms: int, peeks: int, directory: Path, dsn: str | None) -> float:
    """Fill a fresh database (SQLite in ``directory``, or the empty PostgreSQL database
    ``dsn``), start the peek services over it, load every device into the live window;
    prints the figures and returns the bytes per device peek."""
    import logging

    logging.disable(logging.WARNING)  # renewals to the made-up remote fail: not the point
    from peekproxy.core.subscription import Subscription, SubState
    from peekproxy.core.sync import DevicePeek
    from peekproxy.federation.client import FederationClient, build_ssl_context
    from peekproxy.federation.discovery import DnspythonLookup
    from peekproxy.federation.ip_policy import IpFilter
    from peekproxy.federation.keyring import Keyring
    from peekproxy.services.assembly import PeekSettings, build_services
    from peekproxy.services.settings import LiveSettings
    from peekproxy.store import Storage, WriteTransaction
    from peekproxy.store.postgres import open_postgres
    from peekproxy.store.sqlite import open_sqlite

    store: Storage
    if dsn is None:
        store = await open_sqlite(directory / "memory.db", "localhost:1")
    else:
        store = await open_postgres(dsn, "localhost:1")
    now = int(time.time() * 1000)

    def fill(tx: WriteTransaction) -> None:
        for r in range(rooms):
            tx.save_subscription(
                Subscription(
                    room_id=f"!room{r}:remote.test",
                    state=SubState.ACTIVE,
                    candidates=("remote.test",),
                    room_version="10",
                    server="remote.test",
                    peek_id=f"p{r:07d}",
                    remote_interval_ms=3_600_000,
                    last_renewed_ms=now,
                    renew_at_ms=now + 1_800_000,
                ),
            )
        for p in range(peeks):
            tx.set_device_peek(
                f"@user{p // 10}:local.test",
                f"D{p % 10}",
                f"!room{p % rooms}:remote.test",
                "active",
                now,
            )

    await store.write(fill)
    client = FederationClient(
        server_name=None,
        signing_key=None,
        dns=DnspythonLookup(),
        ip_filter=IpFilter([]),
        ssl_context=build_ssl_context(),
    )
    gc.collect()
    before = _rss_kib()
    service = build_services(
        store=store,
        client=client,
        keyring=Keyring(client),
        settings=PeekSettings(
            linger_ms=60_000,
            renewal_max_ms=1_800_000,
            live=LiveSettings(max_remote_peeks=rooms + 1),
        ),
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(service.run)
        # Every device has synced once: the live window knows its peeks, as in steady state.
        # Read in chunks, as syncs would: one big temporary list would stay resident.
        upto = service.syncing.live.watermark
        assert upto is not None
        after_key: tuple[str, str, str] = ("", "", "")
        while True:
            chunk: list[Any] = await store.read(
                partial(lambda tx, key: tx._conn.execute(_PAGE, key).fetchall(), key=after_key)
            )
            if not chunk:
                break
            after_key = tuple(chunk[-1][:3])
            for user_id, device_id, room_id, state, changed_pos in chunk:
                service.syncing.live.load_device(
                    (user_id, device_id), [DevicePeek(room_id, state, changed_pos)], upto
                )
        devices = service.syncing.live.known_devices()
        gc.collect()
        after = _rss_kib()
        nursery.cancel_scope.cancel()
    per_peek = (after - before) * 1024 / peeks
    backend = "sqlite" if dsn is None else "postgres"
    print(
        f"memory on {backend}: {peeks:,} device peeks over {rooms:,} rooms: "
        f"+{after - before:,} KiB resident, {per_peek:,.0f} bytes per device peek (goal <= 2048: "
        f"{'PASS' if per_peek <= 2048 else 'BELOW GOAL'}; "
        f"{devices:,} devices known to the live window)"
    )
    await client.aclose()
    await store.aclose()
    return per_peek


def memory_figures(rooms: int, peeks: int, backends: list[str]) -> None:
    """This script once per backend (``"sqlite"``, ``"postgres"``), each in its own
    process; prints each figure and, for both, their ratio."""
    per_peek: dict[str, float] = {}
    for backend in backends:
        result = subprocess.run(
            [
                sys.executable,
                __file__,
                f"--rooms={rooms}",
                f"--peeks={peeks}",
                f"--backend={backend}",
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode:
            raise RuntimeError(f"peek_memory.py on {backend} failed:\n{result.stderr[-3000:]}")
        print(result.stdout, end="", flush=True)
        per_peek[backend] = float(
            re.findall(r"([\d,]+) bytes per device peek", result.stdout)[0].replace(",", "")
        )
    if len(per_peek) == 2:
        print(f"memory ratio postgres/sqlite: {per_peek['postgres'] / per_peek['sqlite']:.2f}")


def main() -> int:
    """One backend per process (``--backend sqlite|postgres``): freed memory of one run
    would flatter the next one's figure."""
    import argparse
    import tempfile

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from throwaway_pg import throwaway_database

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rooms", type=int, default=10_000)
    parser.add_argument("--peeks", type=int, default=100_000)
    parser.add_argument("--backend", default="sqlite", choices=["sqlite", "postgres"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="peek-memory-") as directory:
        if args.backend == "sqlite":
            trio.run(memory, args.rooms, args.peeks, Path(directory), None)
        else:
            with throwaway_database() as dsn:
                trio.run(memory, args.rooms, args.peeks, Path(directory), dsn)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
