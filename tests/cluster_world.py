"""Several real peekproxy processes on one PostgreSQL database (docs/cluster.md): the world
of tests/peek_world.py (DNS, the testbed as the remote) with N instances of one server name
and one signing key, each its own process, its own listeners and ``cluster.instance_name``.

``plain_federation=True``: the instances' federation listeners speak plain HTTP (a reverse
proxy in front terminates TLS, as contrib/nginx/peekproxy-cluster.conf does) and none of
them is where the SRV record of peekproxy.test points (``world.federation_port`` is left for
the proxy); otherwise instance ``delivered_to`` binds that port (TLS), so the testbed's
transactions go to it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import psycopg
import trio
import trustme

from peekproxy.core.cluster import instance_of
from peekproxy.core.xmatrix import authorization_header
from tests.peek_world import PEEKPROXY, TESTBED, PeekWorld, build_world
from tests.support import DaemonProcess
from tests.synapse import free_tcp_port

if TYPE_CHECKING:
    from tests.conftest import Spawn


@dataclass
class Cluster:
    """``world`` (its ``daemon`` is instance 0) and the running instances by index."""

    world: PeekWorld
    dsn: str
    spawn: Spawn
    config: Path
    envs: list[dict[str, str]] = field(default_factory=list)
    daemons: list[DaemonProcess] = field(default_factory=list)

    def client(self, index: int) -> str:
        return self.daemons[index].client

    def rows(self, sql: str, *args: object) -> list[tuple[object, ...]]:
        """Rows of the shared database (``?`` placeholders, as the store's SQL)."""
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            return conn.execute(sql.replace("?", "%s"), args).fetchall()

    def owner(self, room_id: str) -> str | None:
        """The instance holding the room's lease, by its ``instance_name`` (the stored owner
        without its per-process suffix; None: nobody)."""
        rows = self.rows("SELECT owner FROM subscription_leases WHERE room_id = ?", room_id)
        return instance_of(str(rows[0][0])) if rows else None


async def build_cluster(
    nursery: trio.Nursery,
    ca: trustme.CA,
    tmp_path: Path,
    spawn: Spawn,
    dsn: str,
    *,
    instances: int = 2,
    lease: str = "2s",
    delivered_to: int = 0,
    plain_federation: bool = False,
    env: dict[str, str] | None = None,
) -> Cluster:
    """Start ``instances`` peekproxy processes (``pp0``, ``pp1``...) on the database ``dsn``,
    one after the other (the first applies the migrations)."""
    world = await build_world(nursery, ca, tmp_path, spawn, start=False)
    config = world.config
    if plain_federation:
        text = config.read_text()
        text = "\n".join(line for line in text.split("\n") if not line.startswith("tls_"))
        config = config.with_name("cluster.toml")
        config.write_text(text)
    world.env |= {
        "PEEKPROXY_STORE__BACKEND": "postgres",
        "PEEKPROXY_STORE__DSN": dsn,
        "PEEKPROXY_STORE__POOL_SIZE": "4",
        "PEEKPROXY_CLUSTER__LEASE": lease,
    } | (env or {})
    cluster = Cluster(world, dsn, spawn, config)
    for index in range(instances):
        port = (
            world.federation_port
            if index == delivered_to and not plain_federation
            else free_tcp_port()
        )
        cluster.envs.append(
            world.env
            | {
                "PEEKPROXY_CLUSTER__INSTANCE_NAME": f"pp{index}",
                "PEEKPROXY_LISTENERS__FEDERATION__BIND": f"127.0.0.1:{port}",
                "PEEKPROXY_LISTENERS__CLIENT__BIND": f"127.0.0.1:{free_tcp_port()}",
            }
        )
        cluster.daemons.append(await spawn(config, env=cluster.envs[index]))
    world.daemon = cluster.daemons[0]
    return cluster


async def put_transaction(
    world: PeekWorld, federation: str, txn_id: str, pdus: list[dict[str, Any]]
) -> httpx.Response:
    """``PUT /send/{txn_id}`` of ``pdus`` signed as the testbed, straight to one instance's
    federation listener (``federation``: its base URL; its certificate is not checked)."""
    uri = f"/_matrix/federation/v1/send/{txn_id}"
    body = {"origin": TESTBED, "origin_server_ts": int(time.time() * 1000), "pdus": pdus}
    auth = authorization_header(
        world.testbed.signing_key,
        origin=TESTBED,
        destination=PEEKPROXY,
        method="PUT",
        uri=uri,
        content=body,
    )
    async with httpx.AsyncClient(verify=False, timeout=30) as http:
        return await http.put(f"{federation}{uri}", json=body, headers={"Authorization": auth})
