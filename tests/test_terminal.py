"""Remote servers' text printed by the CLIs cannot drive the admin's terminal."""

from __future__ import annotations

from peekproxy.peek_cli import describe_room, format_event
from peekproxy.status_cli import format_status
from peekproxy.terminal import terminal_safe

ESCAPE = "\x1b]0;owned\x07\x1b[2J\rfake line\n"


def test_control_characters_are_shown_escaped() -> None:
    assert terminal_safe(ESCAPE) == "\\x1b]0;owned\\x07\\x1b[2J\\rfake line\\n"
    assert terminal_safe("tab\tand ünïcode \u202e stay") == "tab\tand ünïcode \u202e stay"
    assert terminal_safe("c1 \x9b31m") == "c1 \\x9b31m"


def test_status_and_peek_output_carry_no_control_characters() -> None:
    answer = {
        "now_ts": 10_000,
        "subscriptions": [
            {
                "room_id": "!r:a.example",
                "transport": "msc2444",
                "target": "a.example",
                "state": "lapsed",
                "recent_failures": [
                    {"ts": 9_000, "action": "renew", "server": "a.example", "error": ESCAPE}
                ],
            }
        ],
    }
    event = {
        "type": "m.room.message",
        "sender": "@m:a.example",
        "origin_server_ts": 0,
        "content": {"body": ESCAPE},
    }
    room = {
        "state": {"events": [{"type": "m.room.name", "state_key": "", "content": {"name": ESCAPE}}]}
    }
    lines = [*format_status(answer), format_event(event), *describe_room("!r:a.example", room)]
    assert not any(c in line for line in lines for c in "\x1b\x07\r\n\x9b")
    assert any("\\x1b[2J" in line for line in lines)
