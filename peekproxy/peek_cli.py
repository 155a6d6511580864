"""``peekproxy peek``: a command-line client of the delegation API, for admins to check that
peeking works. It peeks a room, prints its name, topic, member count and latest messages,
then prints live events until Ctrl-C, and unpeeks on the way out."""

from __future__ import annotations

import argparse
import signal
import sys
import time
from typing import Any, TextIO
from urllib.parse import quote

__all__ = ["add_peek_parser", "describe_room", "format_event"]


def format_event(event: dict[str, Any]) -> str:
    """One line for a timeline event: ``[HH:MM:SS] sender: text``."""
    stamp = time.strftime("%H:%M:%S", time.localtime(event.get("origin_server_ts", 0) / 1000))
    content = event.get("content") or {}
    kind = event.get("type")
    if kind == "m.room.message":
        text = str(content.get("body", ""))
    elif kind == "m.room.member":
        text = f"* {event.get('state_key')} {content.get('membership', '?')}"
    elif kind == "m.room.topic":
        text = f"* topic: {content.get('topic', '')}"
    elif kind == "m.room.name":
        text = f"* name: {content.get('name', '')}"
    else:
        text = f"* {kind}"
    return f"[{stamp}] {event.get('sender')}: {text}"


def describe_room(room_id: str, room: dict[str, Any]) -> list[str]:
    """Name, topic, member count and latest messages of a room from its first sync entry."""
    events = [*room.get("state", {}).get("events", []), *room.get("timeline", {}).get("events", [])]
    state: dict[tuple[str, str], dict[str, Any]] = {}
    for event in events:
        if "state_key" in event:
            state[(event["type"], event["state_key"])] = event.get("content") or {}
    members = sum(
        1
        for (kind, _), content in state.items()
        if kind == "m.room.member" and content.get("membership") == "join"
    )
    lines = [
        f"room:    {room_id}",
        f"name:    {state.get(('m.room.name', ''), {}).get('name', '(none)')}",
        f"topic:   {state.get(('m.room.topic', ''), {}).get('topic', '(none)')}",
        f"members: {members}",
        "latest messages:",
    ]
    messages = [
        e for e in room.get("timeline", {}).get("events", []) if e.get("type") == "m.room.message"
    ]
    lines += [f"  {format_event(e)}" for e in messages] or ["  (none in the latest batch)"]
    return lines


async def _peek(args: argparse.Namespace, out: TextIO) -> int:
    import httpx
    import trio

    url, secret, user, device = _settings(args)
    params = {"user_id": user, "device_id": device}
    headers = {"Authorization": f"Bearer {secret}"}
    async with httpx.AsyncClient(
        base_url=f"{url}/_peekproxy/v1", headers=headers, timeout=args.timeout_ms / 1000 + 30
    ) as http:
        response = await http.post(
            f"/peek/{quote(args.room, safe='')}",
            params=[*params.items(), *(("server_name", v) for v in args.via)],
            json={},
        )
        if response.status_code != 200:
            print(f"peek: {response.status_code} {_error(response)}", file=sys.stderr)
            return 1
        room_id = response.json()["room_id"]
        print(
            f"peeking {room_id}" + (f" ({args.room})" if args.room != room_id else ""),
            file=out,
            flush=True,
        )
        try:
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async with trio.open_nursery() as nursery:

                    async def stop_on_signal() -> None:
                        async for _ in signals:
                            nursery.cancel_scope.cancel()
                            return

                    nursery.start_soon(stop_on_signal)
                    await _follow(http, params, room_id, args, out)
                    nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(10):
                done = await http.post(
                    f"/rooms/{quote(room_id, safe='')}/unpeek", params=params, json={}
                )
                print(
                    f"unpeeked {room_id}"
                    if done.status_code == 200
                    else f"unpeek: {done.status_code} {_error(done)}",
                    file=out,
                    flush=True,
                )
    return 0


async def _follow(
    http: Any, params: dict[str, str], room_id: str, args: argparse.Namespace, out: TextIO
) -> None:
    first = await http.get("/sync", params={**params, "timeout": "0"})
    first.raise_for_status()
    body = first.json()
    room = body["rooms"]["peek"].get(room_id)
    if room is not None:
        print("\n".join(describe_room(room_id, room)), file=out, flush=True)
    if args.once:
        return
    print("live events (Ctrl-C to stop):", file=out, flush=True)
    token = body["next_batch"]
    while True:
        response = await http.get(
            "/sync", params={**params, "since": token, "timeout": str(args.timeout_ms)}
        )
        response.raise_for_status()
        body = response.json()
        token = body["next_batch"]
        for event in body["rooms"]["peek"].get(room_id, {}).get("timeline", {}).get("events", []):
            print(f"  {format_event(event)}", file=out, flush=True)
        if room_id in body["rooms"]["leave"]:
            print(
                f"the peek of {room_id} ended (the room is no longer peekable)",
                file=out,
                flush=True,
            )
            return


def _error(response: Any) -> str:
    try:
        data = response.json()
        return f"{data.get('errcode')}: {data.get('error')}"
    except ValueError:
        return str(response.text)[:200]


def _settings(args: argparse.Namespace) -> tuple[str, str, str, str]:
    from peekproxy.config import ConfigError, load_config

    try:
        config = load_config(args.config, check_files=False)
    except ConfigError as e:
        raise SystemExit("\n".join(e.problems)) from None
    url = args.url
    if url is None:
        host, _, port = config.listeners.client.bind.rpartition(":")
        host = {"0.0.0.0": "127.0.0.1", "[::]": "[::1]"}.get(host, host)
        url = f"http://{host}:{port}"
    secret_file = config.delegation.shared_secret_file
    if secret_file is None or not secret_file.exists():
        raise SystemExit(
            "peek: delegation.shared_secret_file is not set (or missing) in "
            f"{args.config}; the peek command talks to the delegation API"
        )
    secret = secret_file.read_text().strip()
    user = args.user or f"@peekproxy-admin:{config.server.server_name}"
    return url.rstrip("/"), secret, user, args.device


def _run(args: argparse.Namespace) -> int:
    import trio

    try:
        code: int = trio.run(_peek, args, sys.stdout)
    except OSError as e:  # e.g. connection refused: the daemon is not running
        print(f"peek: cannot reach peekproxy: {e}", file=sys.stderr)
        return 1
    except Exception as e:
        if type(e).__module__.startswith(("httpx", "httpcore")):
            print(f"peek: cannot reach peekproxy: {e}", file=sys.stderr)
            return 1
        raise
    return code


def add_peek_parser(commands: Any) -> None:
    """Register ``peekproxy peek``."""
    import os

    parser = commands.add_parser(
        "peek",
        help="peek a room through the running daemon and print its events",
        description="Peek ROOM (a room ID or #alias:server) through the daemon's delegation "
        "API, print its name, topic, member count and latest messages, then live events "
        "until Ctrl-C; unpeek on exit.",
    )
    parser.add_argument("room", help="room ID or alias")
    parser.add_argument(
        "--via",
        action="append",
        default=[],
        metavar="SERVER",
        help="server to peek through (repeatable)",
    )
    parser.add_argument("--user", help="user ID to peek as (default @peekproxy-admin:<name>)")
    parser.add_argument("--device", default="PEEKPROXY_CLI", help="device ID to peek as")
    parser.add_argument("-c", "--config", default=os.environ.get("PEEKPROXY_CONFIG", "config.toml"))
    parser.add_argument("--url", help="client listener URL (default: from the config)")
    parser.add_argument("--timeout-ms", type=int, default=30_000, help="long-poll timeout")
    parser.add_argument(
        "--once",
        action="store_true",
        help="print the room and its latest messages, then unpeek and exit",
    )
    parser.set_defaults(func=_run)
