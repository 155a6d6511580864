"""The status view (issue 15): ``GET /_peekproxy/v1/admin/subscriptions`` and ``peekproxy
status``. Unit tests of the pure parts, the store reads and the CLI's table; end to end, a
daemon peeking testbed rooms whose renewals fail (the testbed's ``peek_count`` fault)."""

from __future__ import annotations

import argparse
import io
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trustme

from peekproxy.core.status import (
    Failure,
    RecentFailures,
    backoff_until_ms,
    by_urgency,
    subscription_entry,
)
from peekproxy.core.subscription import Subscription, SubState
from peekproxy.daemon_target import TargetError, client_url_of_bind, daemon_target
from peekproxy.services.errors import PeekError
from peekproxy.services.follower_choice import transport_of
from peekproxy.services.following import FollowFailed, RenewalFailed
from peekproxy.services.status import FailureRecorder
from peekproxy.status_cli import ago, format_status, run_status
from tests.conftest import OpenStore, Spawn
from tests.peek_world import SECRET, TESTBED, PeekWorld, build_world
from tests.support import run_cli, write_config
from tests.synapse import free_tcp_port

NOW = 1_700_000_000_000
PATH = "/_peekproxy/v1/admin/subscriptions"


# -- the pure parts ---------------------------------------------------------------------------


def test_recent_failures_keep_the_newest_of_the_rooms_that_failed_last() -> None:
    record = RecentFailures(per_room=2, rooms=2)
    for i in range(3):
        record.record("!a:x", Failure(i, "renew", "x", f"a{i}"))
    record.record("!b:x", Failure(10, "peek", None, "b"))
    assert [f.error for f in record.of("!a:x")] == ["a1", "a2"]  # the newest two, oldest first
    record.record("!a:x", Failure(11, "delete", "x", "a3"))  # !a:x failed last now
    record.record("!c:x", Failure(12, "delete", "x", "c"))  # a third room: !b:x is forgotten
    assert record.of("!b:x") == [] and len(record) == 2
    assert [f.error for f in record.of("!a:x")] == ["a2", "a3"]
    assert record.of("!c:x")[0].to_json() == {
        "ts": 12,
        "action": "delete",
        "server": "x",
        "error": "c",
    }


def test_backoff_until_is_the_wait_still_ahead() -> None:
    sub = Subscription(room_id="!r:x", state=SubState.ACTIVE, server="x", renew_at_ms=NOW + 5)
    assert backoff_until_ms(sub, NOW) is None  # a plain renewal is no back-off
    assert backoff_until_ms(replace(sub, failures=2), NOW) == NOW + 5  # a renewal retried
    lapsed = replace(sub, state=SubState.LAPSED, retry_at_ms=NOW + 9, failures=1)
    assert backoff_until_ms(lapsed, NOW) == NOW + 9
    assert backoff_until_ms(lapsed, NOW + 10) is None  # over
    assert backoff_until_ms(replace(sub, delete_retry_at_ms=NOW + 7), NOW) == NOW + 7


def test_entries_failing_rooms_first_then_wanted_then_by_room() -> None:
    ok = Subscription(room_id="!a:x", state=SubState.ACTIVE, server="x", peek_id="p")
    unwanted = replace(ok, room_id="!0:x", wanted=False)
    failing = replace(ok, room_id="!z:x", failures=1)
    lapsed = replace(ok, room_id="!y:x", state=SubState.LAPSED, server=None, peek_id=None)

    def entry(sub: Subscription) -> tuple[Subscription, dict[str, Any]]:
        return sub, {"room_id": sub.room_id}

    ordered = by_urgency(entry(s) for s in (unwanted, ok, failing, lapsed))
    assert [e["room_id"] for e in ordered] == ["!y:x", "!z:x", "!a:x", "!0:x"]


def test_entry_shape() -> None:
    sub = Subscription(
        room_id="!r:x",
        state=SubState.ACTIVE,
        server="x",
        peek_id="abc",
        room_version="10",
        remote_interval_ms=60_000,
        last_renewed_ms=NOW - 1_000,
        renew_at_ms=NOW + 29_000,
        pending_deletes=(("y", "old"),),
    )
    entry = subscription_entry(
        sub,
        now_ms=NOW,
        transport="msc2444",
        devices=(2, 1),
        last_event=("$e", NOW - 500),
        failures=[Failure(NOW - 9, "renew", "x", "boom")],
    )
    assert entry == {
        "room_id": "!r:x",
        "transport": "msc2444",
        "target": "x",
        "peek_id": "abc",
        "state": "active",
        "wanted": True,
        "room_version": "10",
        "last_renewal_ts": NOW - 1_000,
        "renewal_interval_ms": 60_000,
        "next_renewal_ts": NOW + 29_000,
        "last_event_ts": NOW - 500,
        "last_event_id": "$e",
        "devices": {"active": 2, "dormant": 1},
        "failures_in_a_row": 0,
        "backoff_until_ts": None,
        "ended_reason": None,
        "pending_deletes": 1,
        "recent_failures": [{"ts": NOW - 9, "action": "renew", "server": "x", "error": "boom"}],
        "follower": None,
    }
    joined = subscription_entry(
        replace(sub, peek_id="join:$j", state=SubState.LAPSED),
        now_ms=NOW,
        transport="observer_join",
        devices=(0, 0),
        last_event=None,
        failures=[],
    )
    assert joined["peek_id"] is None and joined["next_renewal_ts"] is None
    assert joined["last_event_id"] is None and joined["last_event_ts"] is None


class _Failing:
    """A room follower whose every call fails."""

    async def follow(self, room_id: str, candidates: Any) -> Any:
        error = PeekError(502, "M_UNKNOWN", f"could not peek {room_id}: a.x: unreachable")
        raise FollowFailed(error, rate_limited=False, abandoned=())

    async def renew(self, room_id: str, server: str, handle: str) -> Any:
        return RenewalFailed(refused=False, at_ms=1, error=f"{server}: HTTP 500 M_UNKNOWN")

    async def stop(self, room_id: str, server: str, handle: str) -> bool:
        return False


async def test_failure_recorder_passes_calls_on_and_records_failures() -> None:
    failures = RecentFailures()
    recorder = FailureRecorder(_Failing(), failures, clock_ms=lambda: NOW)
    with pytest.raises(FollowFailed):
        await recorder.follow("!r:x", ["a.x"])
    renewal = await recorder.renew("!r:x", "a.x", "P1")
    assert isinstance(renewal, RenewalFailed) and not renewal.refused
    assert await recorder.stop("!r:x", "b.x", "P0") is False
    assert [f.to_json() for f in failures.of("!r:x")] == [
        {
            "ts": NOW,
            "action": "peek",
            "server": None,
            "error": "could not peek !r:x: a.x: unreachable",
        },
        {"ts": NOW, "action": "renew", "server": "a.x", "error": "a.x: HTTP 500 M_UNKNOWN"},
        {"ts": NOW, "action": "delete", "server": "b.x", "error": "P0 not stopped; will retry"},
    ]


def test_transport_of_handles() -> None:
    assert transport_of(None) is None
    assert transport_of("aBcD1234") == "msc2444"
    assert transport_of("join:$event") == "observer_join"
    assert transport_of("client-api:7") == "client_api"


async def test_store_reads_newest_events_and_device_counts(open_store: OpenStore) -> None:
    store = await open_store("a.example")
    try:

        def write(tx: Any) -> None:
            for room, event_id, ts in (("!a:x", "$1", 5), ("!a:x", "$2", 7), ("!b:x", "$3", 9)):
                tx.append_event(
                    room, event_id, {"type": "m.room.message"}, redacted=False, now_ms=ts
                )
            tx.add_gap("!a:x", 11)  # a gap is not an event
            for user, device, room, state in (
                ("@u:x", "D1", "!a:x", "active"),
                ("@u:x", "D2", "!a:x", "dormant"),
                ("@v:x", "D1", "!a:x", "active"),
                ("@v:x", "D1", "!b:x", "ended"),
            ):
                tx.set_device_peek(user, device, room, state, 1)

        await store.write(write)
        newest = await store.read(lambda tx: tx.newest_events())
        assert newest == {"!a:x": ("$2", 7), "!b:x": ("$3", 9)}
        assert await store.read(lambda tx: tx.newest_events("!b:x")) == {"!b:x": ("$3", 9)}
        assert await store.read(lambda tx: tx.device_peek_counts()) == {"!a:x": (2, 1)}
        assert await store.read(lambda tx: tx.device_peek_counts("!b:x")) == {}
    finally:
        await store.aclose()


# -- the command line, without a daemon ---------------------------------------------------------


def test_ago() -> None:
    assert ago(None, NOW) == "-"
    assert ago(NOW - 4_999, NOW) == "4s ago"
    assert ago(NOW - 3 * 60_000 - 5, NOW) == "3m ago"
    assert ago(NOW - 5 * 3_600_000, NOW) == "5h ago"
    assert ago(NOW - 3 * 86_400_000, NOW) == "3d ago"
    assert ago(NOW + 5, NOW) == "0s ago"


def test_table_shows_each_room_and_its_last_failure() -> None:
    answer = {
        "now_ts": NOW,
        "subscriptions": [
            {
                "room_id": "!failing:x",
                "transport": "msc2444",
                "target": "x",
                "state": "active",
                "wanted": True,
                "last_renewal_ts": NOW - 180_000,
                "last_event_ts": NOW - 2_000,
                "devices": {"active": 2, "dormant": 1},
                "failures_in_a_row": 2,
                "backoff_until_ts": NOW + 4_000,
                "recent_failures": [
                    {"ts": NOW - 60_000, "action": "renew", "server": "x", "error": "old"},
                    {"ts": NOW - 1_000, "action": "renew", "server": "x", "error": "HTTP 500"},
                ],
            },
            {"room_id": "!quiet:x", "state": "dormant", "wanted": False, "devices": {}},
        ],
    }
    lines = format_status(answer)
    assert lines[0].split() == [
        "ROOM",
        "TRANSPORT",
        "TARGET",
        "STATE",
        "RENEWED",
        "LAST",
        "EVENT",
        "DEVICES",
        "FAILURES",
    ]
    assert lines[1].split() == [
        "!failing:x",
        "msc2444",
        "x",
        "active",
        "3m",
        "ago",
        "2s",
        "ago",
        "2/1",
        "2",
    ]
    assert lines[2] == "  last failure 1s ago: renew at x: HTTP 500"
    assert lines[3] == "  backing off for 4s more (2 in a row)"
    assert lines[4].split() == ["!quiet:x", "-", "-", "dormant", "(unwanted)", "-", "-", "0/0", "-"]
    assert format_status({"now_ts": NOW, "subscriptions": []}) == ["no subscriptions"]


def test_target_from_arguments_or_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PEEKPROXY_CONFIG", raising=False)
    (tmp_path / "secret").write_text("s3cret\n")
    # Both given: no config file needed at all.
    target = daemon_target(url="http://h:1/", secret_file="secret")
    assert (target.url, target.secret, target.server_name) == ("http://h:1", "s3cret", None)
    with pytest.raises(TargetError, match=r"config\.toml: config file not found"):
        daemon_target(url="http://h:1", secret_file=None)
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(TargetError, match=r"--secret-file: .*empty"):
        daemon_target(url="http://h:1", secret_file="empty")
    config = write_config(tmp_path, binds={"client": "0.0.0.0:8118"})
    with pytest.raises(TargetError, match=r"delegation\.shared_secret_file is not set"):
        daemon_target(url=None, secret_file=None, config=str(config))
    assert daemon_target(url=None, secret_file="secret").url == "http://127.0.0.1:8118"
    write_config(tmp_path, extra={"delegation": 'shared_secret_file = "secret"'})
    from_config = daemon_target(url=None, secret_file=None)
    assert from_config.secret == "s3cret" and from_config.server_name == "localhost:8448"
    assert client_url_of_bind("[::]:8008") == "http://[::1]:8008"
    assert client_url_of_bind("10.0.0.1:8008") == "http://10.0.0.1:8008"


def test_cli_usage_errors_exit_2(tmp_path: Path) -> None:
    no_config = run_cli("status", cwd=tmp_path)
    assert no_config.returncode == 2
    assert no_config.stderr.strip().endswith("(or give --url and --secret-file)")
    assert len(no_config.stderr.strip().splitlines()) == 1
    bad_room = run_cli("status", "--room", "nope", cwd=tmp_path)
    assert bad_room.returncode == 2 and "--room" in bad_room.stderr
    unknown = run_cli("status", "--bogus", cwd=tmp_path)
    assert unknown.returncode == 2


def test_cli_unreachable_daemon_exits_1(tmp_path: Path) -> None:
    (tmp_path / "secret").write_text("s\n")
    port = free_tcp_port()  # nothing listens there
    down = run_cli(
        "status", "--url", f"http://127.0.0.1:{port}", "--secret-file", "secret", cwd=tmp_path
    )
    assert down.returncode == 1
    assert down.stderr.startswith(f"status: cannot reach peekproxy at http://127.0.0.1:{port}")
    assert len(down.stderr.strip().splitlines()) == 1


# -- end to end ------------------------------------------------------------------------------


@pytest.fixture
async def world(
    nursery: trio.Nursery, tls_ca: trustme.CA, tmp_path: Path, spawn: Spawn
) -> PeekWorld:
    return await build_world(
        nursery, tls_ca, tmp_path, spawn, peeks_env={"PEEKPROXY_PEEKS__LINGER": "0.2"}
    )


async def _status(world: PeekWorld, **params: str) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=world.daemon.client, timeout=20) as http:
        response = await http.get(
            PATH, params=params, headers={"Authorization": f"Bearer {SECRET}"}
        )
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer


async def test_status_shows_subscriptions_and_failed_renewals(world: PeekWorld) -> None:
    world.testbed.renewal_interval_ms = 2_000  # renewed every second
    quiet = world.create_room("10")
    busy = world.create_room("11")
    for room_id, device in ((quiet, "D1"), (busy, "D1"), (busy, "D2")):
        response = await world.peek(room_id, device=device, hints=[TESTBED])
        assert response.status_code == 200, response.text
    event_id = world.send(busy, "hello")
    await world.wait_delivered(event_id)
    answer = await _status(world)
    assert abs(answer["now_ts"] - world.testbed.clock_ms()) < 5_000
    by_room = {e["room_id"]: e for e in answer["subscriptions"]}
    assert set(by_room) == {quiet, busy}
    entry = by_room[busy]
    sub = world.subscription(busy)
    assert entry["transport"] == "msc2444" and entry["target"] == TESTBED
    assert entry["state"] == "active" and entry["wanted"] is True
    assert entry["peek_id"] == sub["peek_id"]
    assert entry["renewal_interval_ms"] == 2_000
    assert entry["devices"] == {"active": 2, "dormant": 0}
    assert entry["last_event_id"] == event_id
    assert answer["now_ts"] - 10_000 < entry["last_event_ts"] <= answer["now_ts"]
    assert entry["recent_failures"] == [] and entry["backoff_until_ts"] is None

    # Renewals fail (HTTP 500 from the testbed): the room's failures fill, at most 5 kept,
    # and failing rooms come first.
    world.testbed.faults.update({"peek_count": 1_000, "peek_status": 500})
    with trio.fail_after(30):
        while True:  # the daemon is a process: poll it
            failed = _failures(await _status(world))
            if failed:
                break
            await trio.sleep(0.1)
    # The first: the testbed's answer. (Later ones, to either room, may say only that
    # the testbed is being backed off from: the federation client's per-server back-off.)
    assert failed[0]["action"] == "renew" and failed[0]["server"] == TESTBED
    assert "500" in failed[0]["error"]
    with trio.fail_after(30):
        while True:
            answer = await _status(world)
            failing = [e for e in answer["subscriptions"] if len(e["recent_failures"]) == 5]
            # (backoff_until_ts is None for the moment a retry is due or in flight)
            if len(failing) == 2 and answer["subscriptions"][0]["backoff_until_ts"]:
                break
            await trio.sleep(0.3)
    first = answer["subscriptions"][0]
    assert first["failures_in_a_row"] >= 1 and first["backoff_until_ts"] > answer["now_ts"]
    # Renewals failed until the peek lapsed (its 2 s interval passed), then re-peeks
    # (through the candidates: no one server), and DELETEs of the lapsed peek.
    for failure in first["recent_failures"]:
        assert failure["action"] in {"renew", "peek", "delete"}, failure
        assert failure["server"] == (None if failure["action"] == "peek" else TESTBED)
        assert failure["error"]
        assert answer["now_ts"] - 20_000 < failure["ts"] <= answer["now_ts"]
    stamps = [f["ts"] for f in first["recent_failures"]]
    assert stamps == sorted(stamps)

    # One room only.
    only = await _status(world, room_id=quiet)
    assert [e["room_id"] for e in only["subscriptions"]] == [quiet]
    assert (await _status(world, room_id=f"!never:{TESTBED}"))["subscriptions"] == []

    # The command line: the table, then --json, against the running daemon.
    args = dict(url=world.daemon.client, secret_file=str(world.config.parent / "delegation.secret"))
    out = io.StringIO()
    assert run_status(_args(**args), out) == 0
    table = out.getvalue().splitlines()
    assert table[0].startswith("ROOM")
    rows = [line.split() for line in table[1:] if not line.startswith("  ")]
    assert {row[0] for row in rows} == {quiet, busy}
    assert all(row[-1] == "5" for row in rows)  # five failures kept each
    # Under each room, its last failure (a line of its own).
    notes = [line for line in table if line.startswith("  last failure ")]
    assert len(notes) == 2
    assert all(
        any(f"{a}{w}: " in line for a, w in (("renew", f" at {TESTBED}"), ("peek", "")))
        or "delete at" in line
        for line in notes
    )
    out = io.StringIO()
    assert run_status(_args(json=True, room=busy, **args), out) == 0
    assert [e["room_id"] for e in json.loads(out.getvalue())["subscriptions"]] == [busy]
    # From the config alone (its client bind, as overridden for the daemon, and its secret
    # file), as a separate process.
    bind = world.daemon.client.removeprefix("http://")
    by_config = run_cli(
        "status", "-c", str(world.config), env={"PEEKPROXY_LISTENERS__CLIENT__BIND": bind}
    )
    assert by_config.returncode == 0, by_config.stderr
    assert busy in by_config.stdout and quiet in by_config.stdout
    with_url = run_cli("status", "-c", str(world.config), "--url", world.daemon.client, "--json")
    assert with_url.returncode == 0, with_url.stderr
    assert {e["room_id"] for e in json.loads(with_url.stdout)["subscriptions"]} == {busy, quiet}


def _failures(answer: dict[str, Any]) -> list[dict[str, Any]]:
    """Every room's recent failures, oldest first."""
    every = [f for entry in answer["subscriptions"] for f in entry["recent_failures"]]
    return sorted(every, key=lambda f: int(f["ts"]))


def _args(**given: Any) -> argparse.Namespace:
    defaults = dict(url=None, secret_file=None, config=None, json=False, room=None, timeout=10.0)
    return argparse.Namespace(**(defaults | given))


async def test_status_needs_the_secret(world: PeekWorld, tmp_path: Path) -> None:
    async with httpx.AsyncClient(base_url=world.daemon.client, timeout=20) as http:
        missing = await http.get(PATH)
        wrong = await http.get(PATH, headers={"Authorization": "Bearer nope"})
        bad_room = await http.get(
            PATH, params={"room_id": "nope"}, headers={"Authorization": f"Bearer {SECRET}"}
        )
    for response in (missing, wrong):
        assert response.status_code == 401
        assert response.json()["errcode"] == "M_UNKNOWN_TOKEN"
    assert bad_room.status_code == 400 and bad_room.json()["errcode"] == "M_INVALID_PARAM"
    (tmp_path / "wrong.secret").write_text("nope\n")
    refused = run_cli(
        "status", "--url", world.daemon.client, "--secret-file", str(tmp_path / "wrong.secret")
    )
    assert refused.returncode == 1
    assert refused.stderr.strip() == (
        f"status: {world.daemon.client} answered 401 M_UNKNOWN_TOKEN: "
        "missing or wrong delegation secret"
    )
