"""``peekproxy status``: the remote subscriptions of the running daemon, as a table.

Asks ``GET /_peekproxy/v1/admin/subscriptions`` (docs/operations.md "Status") with the
delegation secret, found by :func:`peekproxy.daemon_target.daemon_target`. One row per room
(room, transport, target server, state, last renewal, last event, device peeks
active/dormant, recent failures), failing rooms first; under a room with failures, its last
one. ``--json`` prints the endpoint's answer as is.

Exit codes: 0 shown; 1 the daemon cannot be reached or refused the request (one line on
stderr); 2 usage (bad arguments, no secret or config to find the daemon with).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any, TextIO

from peekproxy.terminal import terminal_safe

__all__ = ["add_status_parser", "ago", "format_status", "run_status"]

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
PATH = "/_peekproxy/v1/admin/subscriptions"
HEADER = ("ROOM", "TRANSPORT", "TARGET", "STATE", "RENEWED", "LAST EVENT", "DEVICES", "FAILURES")


def ago(ts: int | None, now_ts: int) -> str:
    """``"3m ago"`` for a moment ``ts`` before ``now_ts`` (both ms since the epoch): in
    seconds under a minute, minutes under an hour, hours under two days, then days;
    ``"-"`` for ``None``."""
    if ts is None:
        return "-"
    seconds = max(0, now_ts - ts) // 1000
    for unit, size, below in (("s", 1, 60), ("m", 60, 3600), ("h", 3600, 172_800)):
        if seconds < below:
            return f"{seconds // size}{unit} ago"
    return f"{seconds // 86_400}d ago"


def _row(entry: dict[str, Any], now_ts: int) -> tuple[str, ...]:
    devices = entry.get("devices") or {}
    failures = entry.get("recent_failures") or []
    return (
        str(entry.get("room_id")),
        entry.get("transport") or "-",
        entry.get("target") or "-",
        str(entry.get("state")) + ("" if entry.get("wanted") else " (unwanted)"),
        ago(entry.get("last_renewal_ts"), now_ts),
        ago(entry.get("last_event_ts"), now_ts),
        f"{devices.get('active', 0)}/{devices.get('dormant', 0)}",
        str(len(failures)) if failures else "-",
    )


def _notes(entry: dict[str, Any], now_ts: int) -> list[str]:
    notes = []
    failures = entry.get("recent_failures") or []
    if failures:
        last = failures[-1]
        where = f" at {last['server']}" if last.get("server") else ""
        when = ago(last.get("ts"), now_ts)
        notes.append(f"  last failure {when}: {last.get('action')}{where}: {last.get('error')}")
    if entry.get("backoff_until_ts"):
        wait = max(0, int(entry["backoff_until_ts"]) - now_ts) // 1000
        notes.append(f"  backing off for {wait}s more ({entry.get('failures_in_a_row')} in a row)")
    if entry.get("ended_reason"):
        notes.append(f"  ended: {entry['ended_reason']}")
    if entry.get("follower"):
        notes.append(f"  followed by instance {entry['follower']}")
    return notes


def format_status(answer: dict[str, Any]) -> list[str]:
    """The table's lines for the endpoint's ``answer`` (times relative to its ``now_ts``)."""
    now_ts = int(answer.get("now_ts", 0))
    entries = answer.get("subscriptions") or []
    if not entries:
        return ["no subscriptions"]
    rows = [(_row(e, now_ts), _notes(e, now_ts)) for e in entries]
    widths = [max(len(r[i]) for r in [HEADER, *(row for row, _ in rows)]) for i in range(8)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    lines = [line(HEADER)]
    for row, notes in rows:
        lines += [line(row), *notes]
    return [terminal_safe(text) for text in lines]  # errors and names come from remotes


def run_status(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """``peekproxy status`` (see the module docstring) printing to ``out`` (default
    stdout); returns the exit code."""
    import httpx

    from peekproxy.core.identifiers import InvalidIdentifier, RoomId
    from peekproxy.daemon_target import TargetError, answer_error, daemon_target

    params = {}
    if args.room is not None:
        try:
            RoomId.parse(args.room)
        except InvalidIdentifier as e:
            print(f"status: --room: {e}", file=sys.stderr)
            return EXIT_USAGE
        params["room_id"] = args.room
    try:
        target = daemon_target(url=args.url, secret_file=args.secret_file, config=args.config)
    except TargetError as e:
        print(f"status: {e}", file=sys.stderr)
        return EXIT_USAGE
    try:
        response = httpx.get(
            target.url + PATH,
            params=params,
            headers={"Authorization": f"Bearer {target.secret}"},
            timeout=args.timeout,
        )
    except httpx.HTTPError as e:
        print(f"status: cannot reach peekproxy at {target.url}: {e}", file=sys.stderr)
        return EXIT_FAILURE
    try:
        answer = response.json()
    except ValueError:
        answer = None
    if response.status_code != 200 or not isinstance(answer, dict):
        error = answer_error(response)
        print(f"status: {target.url} answered {response.status_code} {error}", file=sys.stderr)
        return EXIT_FAILURE
    text = json.dumps(answer, indent=2) if args.json else "\n".join(format_status(answer))
    print(text, file=out or sys.stdout)
    return EXIT_OK


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError(f"expected seconds above 0 (at most 3600), got {text!r}")
    return value


def add_status_parser(commands: Any) -> None:
    """Register ``peekproxy status``."""
    parser = commands.add_parser(
        "status",
        help="list the running daemon's remote subscriptions and their recent failures",
        description="List the remote subscriptions of the running daemon (GET "
        f"{PATH}): room, transport, target server, state, last renewal, last event, device "
        "peeks active/dormant and recent failures, failing rooms first. The daemon is found "
        "from --url and --secret-file, or else from the config file.",
    )
    parser.add_argument("--url", help="client listener URL (default: from the config)")
    parser.add_argument(
        "--secret-file", help="file holding the delegation secret (default: from the config)"
    )
    parser.add_argument(
        "-c",
        "--config",
        help="config file, when --url or --secret-file is missing "
        "(default: $PEEKPROXY_CONFIG or ./config.toml)",
    )
    parser.add_argument("--json", action="store_true", help="print the endpoint's JSON answer")
    parser.add_argument("--room", metavar="ROOM_ID", help="only this room")
    parser.add_argument(
        "--timeout",
        type=_positive_seconds,
        default=10.0,
        help="seconds to wait for the daemon (default 10)",
    )
    parser.set_defaults(func=run_status)
