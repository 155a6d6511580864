"""Synapse's authorization rules as a test oracle (the ``auth_oracle`` session fixture).

A long-lived subprocess in Synapse's venv (``tests/oracle/synapse_auth_oracle.py``) judges
PDUs with ``synapse.event_auth`` over JSON lines; :class:`AuthOracle` is its client. The
differential tests (tests/test_auth_rules_oracle.py) compare peekproxy's verdicts with it.
Start-up (importing Synapse) takes about a second; a round trip a few hundred µs.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest

from tests.synapse import REPO, synapse_python

ORACLE_SCRIPT = Path(__file__).resolve().parent / "oracle" / "synapse_auth_oracle.py"


def pinned_synapse_version() -> str:
    """``SYNAPSE_VERSION`` from the Makefile (the Synapse the oracle was written against)."""
    match = re.search(r"^SYNAPSE_VERSION\s*:=\s*(\S+)", (REPO / "Makefile").read_text(), re.M)
    assert match, "no SYNAPSE_VERSION in the Makefile"
    return match.group(1)


class AuthOracle:
    """Client of the oracle subprocess. :meth:`ask` sends a request and waits for its
    answer; :meth:`send` and :meth:`answers` pipeline a batch (send up to a few hundred
    requests, then read their answers: the answers must fit the 64 KiB pipe buffer)."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self._process = process
        self._stdin: IO[str] = process.stdin  # type: ignore[assignment]
        self._stdout: IO[str] = process.stdout  # type: ignore[assignment]

    def ask(self, request: dict[str, Any]) -> dict[str, Any]:
        """Send one request and return the answer (see the oracle script for both)."""
        self.send(request)
        return self.answers(1)[0]

    def send(self, request: dict[str, Any]) -> None:
        """Send a request without waiting for its answer."""
        self._stdin.write(json.dumps(request) + "\n")
        self._stdin.flush()

    def answers(self, count: int) -> list[dict[str, Any]]:
        """The answers to the ``count`` oldest requests not yet answered, in order."""
        answers = []
        for _ in range(count):
            line = self._stdout.readline()
            if not line:
                raise RuntimeError(f"the auth oracle exited (code {self._process.poll()})")
            answers.append(json.loads(line))
        return answers

    def judge(
        self, room_version: str, event: dict[str, Any], state: list[str] | None = None
    ) -> dict[str, Any]:
        """Synapse's verdict on ``event`` (auth events among those judged before) and, with
        ``state`` (event IDs judged before), against that state too."""
        self.send(judge_request(room_version, event, state))
        return self.answers(1)[0]

    def reset(self) -> None:
        """Forget every judged event (between generated rooms)."""
        self.ask({"reset": True})

    def close(self) -> None:
        self._stdin.close()
        try:
            self._process.wait(10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()


def judge_request(
    room_version: str, event: dict[str, Any], state: list[str] | None = None
) -> dict[str, Any]:
    """The oracle request that judges ``event`` (and, with ``state``, against it)."""
    request: dict[str, Any] = {"room_version": room_version, "event": event}
    if state is not None:
        request["state"] = state
    return request


@pytest.fixture(scope="session")
def auth_oracle() -> Iterator[AuthOracle]:
    """The Synapse auth-rules oracle; fails when Synapse's version is not the pinned one."""
    process = subprocess.Popen(
        [synapse_python(), str(ORACLE_SCRIPT)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        bufsize=1,
        cwd=ORACLE_SCRIPT.parent,
        # RUST_BACKTRACE=1 would append a backtrace to every Rust parser error.
        env={**os.environ, "RUST_BACKTRACE": "0"},
    )
    oracle = AuthOracle(process)
    try:
        installed = oracle.ask({"version": True})["synapse"].split()[0]
        pinned = pinned_synapse_version()
        if installed != pinned:
            pytest.fail(
                f"the auth oracle needs Synapse {pinned} (Makefile SYNAPSE_VERSION), "
                f"the Synapse venv has {installed}: run make test-deps"
            )
        yield oracle
    finally:
        oracle.close()
