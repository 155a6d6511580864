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

from peekproxy.daemon_target import answer_error
from peekproxy.terminal import terminal_safe

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
    return terminal_safe(f"[{stamp}] {event.get('sender')}: {text}")  # a remote's text


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
    return [terminal_safe(line) for line in lines]  # names and topics are a remote's text


async def _peek(args: argparse.Namespace, settings: tuple[str, str, str, str], out: TextIO) -> int:
    import httpx
    import trio

    url, secret, user, device = settings
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
            print(f"peek: {response.status_code} {answer_error(response)}", file=sys.stderr)
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
                    else f"unpeek: {done.status_code} {answer_error(done)}",
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


class UsageError(Exception):
    """A usage mistake: ``peek`` prints it as one line and exits 2."""


def _settings(args: argparse.Namespace) -> tuple[str, str, str, str]:
    """(client listener URL, delegation secret, user ID, device ID) of a ``peek`` run.

    The daemon is found by :func:`peekproxy.daemon_target.daemon_target`: the config is
    read only when ``-c`` or ``$PEEKPROXY_CONFIG`` names one, or when ``--url`` or
    ``--secret-file`` is missing (then ``./config.toml``). The user ID defaults to
    ``@peekproxy-admin:<server_name>``, or, without a config, to
    ``@peekproxy-admin:<the URL's host>``.

    Raises:
        UsageError: no config where one is needed, an invalid one, no readable secret, a
            bad ``--url``, ROOM or ``--user``.
    """
    import os
    from urllib.parse import urlsplit

    from peekproxy.core.identifiers import InvalidIdentifier, RoomAlias, RoomId, UserId
    from peekproxy.daemon_target import TargetError, daemon_target

    try:
        target = daemon_target(
            url=args.url,
            secret_file=args.secret_file,
            config=args.config or os.environ.get("PEEKPROXY_CONFIG"),
        )
    except TargetError as e:
        raise UsageError(str(e)) from None
    host = urlsplit(target.url).hostname or ""
    server_name = target.server_name or (f"[{host}]" if ":" in host else host)
    user = args.user or f"@peekproxy-admin:{server_name}"
    for what, value, kind in (
        ("ROOM", args.room, RoomAlias if args.room.startswith("#") else RoomId),
        ("--user", user, UserId),
    ):
        try:
            kind.parse(value)
        except InvalidIdentifier as e:
            raise UsageError(f"{what}: {e}") from None
    return target.url, target.secret, user, args.device


def _run(args: argparse.Namespace) -> int:
    import trio

    try:
        settings = _settings(args)
    except UsageError as e:
        print(f"peek: {e}", file=sys.stderr)
        return 2
    try:
        code: int = trio.run(_peek, args, settings, sys.stdout)
    except OSError as e:  # e.g. connection refused: the daemon is not running
        print(f"peek: cannot reach peekproxy: {e}", file=sys.stderr)
        return 1
    except Exception as e:
        if type(e).__module__.startswith(("httpx", "httpcore")):
            print(f"peek: cannot reach peekproxy: {e}", file=sys.stderr)
            return 1
        raise
    return code


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number of milliseconds, got {text!r}")
    return value


def add_peek_parser(commands: Any) -> None:
    """Register ``peekproxy peek``."""
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
    parser.add_argument(
        "--user",
        help="user ID to peek as (default @peekproxy-admin:<server_name>; without a config, "
        "@peekproxy-admin:<the --url host>)",
    )
    parser.add_argument("--device", default="PEEKPROXY_CLI", help="device ID to peek as")
    parser.add_argument(
        "-c",
        "--config",
        help="config file (default: $PEEKPROXY_CONFIG or ./config.toml; not read when "
        "--url and --secret-file are given and neither names one)",
    )
    parser.add_argument("--url", help="client listener URL (default: from the config)")
    parser.add_argument(
        "--secret-file",
        metavar="FILE",
        help="file holding the delegation API secret (default: delegation.shared_secret_file)",
    )
    parser.add_argument(
        "--timeout-ms", type=_non_negative, default=30_000, help="long-poll timeout, ms"
    )
    parser.add_argument(
        "--once",
        action="store_true",
        help="print the room and its latest messages, then unpeek and exit",
    )
    parser.set_defaults(func=_run)
