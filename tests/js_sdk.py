"""Element's SDK (matrix-js-sdk, run by node from tests/js) in tests: one run of
tests/js/sync_session.mjs is a client syncing for a scripted session, reporting what it saw."""

from __future__ import annotations

import json
import shutil
import subprocess
from typing import Any

import httpx
import pytest
import trio

from tests.dns import REQUIRE_ALL
from tests.synapse import REPO

JS_HARNESS = REPO / "tests" / "js"


def node_harness() -> str:
    """The node binary, with tests/js installed (``npm ci``); skips when missing (fails in CI)."""
    node = shutil.which("node")
    message = None
    if node is None:
        message = "node is not installed"
    elif not (JS_HARNESS / "node_modules" / "matrix-js-sdk").is_dir():
        message = "matrix-js-sdk is not installed: run `npm ci` in tests/js"
    if message is not None:
        if REQUIRE_ALL:
            pytest.fail(message)
        pytest.skip(message)
    assert node is not None
    return node


async def login(http: httpx.AsyncClient, user: str) -> dict[str, str]:
    """A new device of ``user``: its access_token, user_id and device_id."""
    response = await http.post(
        "/_matrix/client/v3/login",
        json={
            "type": "m.login.password",
            "identifier": {"type": "m.id.user", "user": user},
            "password": "interop-password",
        },
    )
    assert response.status_code == 200, response.text
    body: dict[str, str] = response.json()
    return body


class JsSession:
    """One run of tests/js/sync_session.mjs: its PREPARED signal and its final report."""

    def __init__(self, node: str, base_url: str, device: dict[str, str], until: str) -> None:
        self.args = [
            node,
            str(JS_HARNESS / "sync_session.mjs"),
            *("--base-url", base_url, "--token", device["access_token"]),
            *("--user-id", device["user_id"], "--device-id", device["device_id"]),
            *("--syncs", "2", "--until-body", until, "--deadline-ms", "60000"),
        ]
        self.prepared = trio.Event()
        self.report: dict[str, Any] = {}
        self.output = b""

    async def run(self) -> None:
        process = await trio.lowlevel.open_process(
            self.args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=JS_HARNESS
        )
        assert process.stdout is not None
        try:
            while chunk := await process.stdout.receive_some(65536):
                self.output += chunk
                for line in self.output.decode(errors="replace").splitlines():
                    if line.startswith("@@ "):
                        value = json.loads(line[3:])
                        if value.get("state") == "PREPARED":
                            self.prepared.set()
                        elif "rooms" in value:
                            self.report = value
            await process.wait()
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
        assert process.returncode == 0, self.output.decode(errors="replace")[-4000:]
