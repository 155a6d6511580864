"""Text from remote servers made safe to print on an admin's terminal."""

from __future__ import annotations

import re

__all__ = ["terminal_safe"]

#: C0 and C1 control characters and DEL, but not tab: what a terminal may act on (escape
#: sequences, carriage returns that overwrite a line).
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f]")


def terminal_safe(text: str) -> str:
    """``text`` with every control character but tab shown as ``\\xNN`` (or ``\\uNNNN``)
    escapes: room messages, server names and error texts that remote servers choose, and
    that ``peekproxy peek`` and ``peekproxy status`` print, cannot move the cursor, change
    colours or rewrite the admin's screen."""
    return _CONTROL.sub(lambda m: repr(m.group(0))[1:-1], text)
