"""systemd/peekproxy.service: systemd-analyze's verdicts, and the daemon started with the
environment the unit gives it (tests/unit_env.py), peeking a testbed room end to end."""

from __future__ import annotations

import re
import resource
import shutil
import signal
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import trio
import trustme

from peekproxy.cli import render_config
from tests.conftest import Spawn
from tests.dns import REQUIRE_ALL
from tests.peek_world import SECRET, TESTBED, build_world
from tests.support import READY, DaemonProcess, run_cli, write_config
from tests.unit_env import (
    INSTALLED_SCRIPT,
    UNIT,
    NotifySocket,
    UnitRun,
    mdwe_supported,
    open_files_limit,
    parse_unit,
    short_root,
)

#: What the test installs in /etc/peekproxy/credentials/.
CREDENTIAL_FILES = ("signing.key", "delegation.secret", "tls.crt", "tls.key")
#: The highest overall exposure accepted from `systemd-analyze security` (0-10, "OK" <= 2.0).
MAX_EXPOSURE = 2.0


def systemd_analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        message = "systemd-analyze is not installed (apt-get install systemd)"
        if REQUIRE_ALL:
            pytest.fail(message)
        pytest.skip(message)
    return found


def resolved_unit(directory: Path) -> Path:
    """A copy of the unit whose ExecStart= path is this venv's script (verify checks it)."""
    script = Path(sys.executable).parent / "peekproxy"
    copy = directory / "peekproxy.service"
    copy.write_text(UNIT.read_text().replace(INSTALLED_SCRIPT, str(script)))
    return copy


def test_unit_is_rated_ok_by_systemd_analyze_security(tmp_path: Path) -> None:
    # --threshold is in tenths: 20 means an exposure of 2.0.
    result = subprocess.run(
        [
            systemd_analyze(),
            "security",
            "--offline=yes",
            f"--threshold={int(MAX_EXPOSURE * 10)}",
            "--no-pager",
            str(resolved_unit(tmp_path)),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    match = re.search(r"Overall exposure level for \S+: ([0-9.]+) (\w+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= MAX_EXPOSURE, result.stdout
    assert result.returncode == 0, result.stdout + result.stderr


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    result = subprocess.run(
        [systemd_analyze(), "verify", "--man=no", str(resolved_unit(tmp_path))],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "peekproxy.service" not in result.stderr, result.stderr  # no warning about it


def test_unit_settings_an_admin_relies_on() -> None:
    service = parse_unit()["Service"]
    assert service["Type"] == ["notify"] and service["NotifyAccess"] == ["main"]
    assert service["ExecReload"] == ["kill -HUP $MAINPID"]
    assert service["RestartPreventExitStatus"] == ["2"]
    assert service["ExecStartPre"] == [f"{INSTALLED_SCRIPT} check-config"]
    assert int(service["LimitNOFILE"][0]) >= 65536
    # Above the longest drain the config allows (server.shutdown_grace <= 60 s) + a margin.
    assert int(service["TimeoutStopSec"][0]) >= 70
    # One credentials directory: optional secrets are files present or not, never a line
    # that fails the start when its file is missing.
    assert service["LoadCredential"] == ["peekproxy:/etc/peekproxy/credentials"]


async def test_run_raises_its_soft_open_files_limit(server_dir: Path, spawn: Spawn) -> None:
    # A plain `peekproxy run` started with the usual low soft limit under a higher hard one.
    soft, hard = 256, resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    assert hard > soft

    def low_soft_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    daemon = await spawn(
        write_config(server_dir),
        env={"PEEKPROXY_LOGGING__LEVEL": "DEBUG"},
        preexec_fn=low_soft_limit,
    )
    limits = await trio.Path(f"/proc/{daemon.process.pid}/limits").read_text()
    assert re.search(rf"Max open files\s+{hard}\s+{hard}\s", limits), limits
    assert f"open files limit raised from {soft} to {hard}" in daemon.log


@pytest.fixture
def unit_root() -> Iterator[Path]:
    root = short_root()
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
async def test_the_daemon_runs_and_peeks_with_the_units_environment(
    nursery: trio.Nursery, tls_ca: trustme.CA, tmp_path: Path, unit_root: Path
) -> None:
    """The unit's environment (tests/unit_env.py) as an unprivileged user that owns no file,
    under PR_SET_MDWE (MemoryDenyWriteExecute=yes) where the kernel has it (Linux >= 6.3);
    ExecStartPre=, then ExecStart= with TLS, the delegation secret and the signing key
    handed over as credentials; READY=1, a peek of a testbed room end to end, private
    files, the open-files limit, ExecReload= (once SIGHUP reloads), STOPPING=1 and exit 0."""
    nofile = open_files_limit(int(parse_unit()["Service"]["LimitNOFILE"][0]))
    run = UnitRun(unit_root, mdwe=mdwe_supported(), nofile=nofile)
    notify = NotifySocket(run.notify_path)
    await notify.bind()
    started: list[DaemonProcess] = []

    async def start_as_the_unit(config: Path, *, env: dict[str, str]) -> DaemonProcess:
        """build_world's daemon, installed as docs/quickstart.md says and started as
        systemd would: secrets only in /etc/peekproxy/credentials (root, 0600)."""
        await trio.to_thread.run_sync(install_like_the_quickstart, run, config, env)
        check = await trio.run_process(
            run.command("ExecStartPre"),
            env=run.process_env(),
            cwd=run.cwd(),
            preexec_fn=run.preexec(),
            capture_stderr=True,
            check=False,
        )
        assert check.returncode == 0, check.stderr
        process = await trio.lowlevel.open_process(
            run.command("ExecStart"),
            env=run.process_env(),
            cwd=run.cwd(),
            preexec_fn=run.preexec(),
            stderr=subprocess.PIPE,
        )
        daemon = DaemonProcess(process)
        nursery.start_soon(daemon._pump)
        started.append(daemon)
        await notify.wait_for("READY=1")
        match = await daemon.wait_for_log(READY.pattern, timeout=5)
        for name in ("client", "federation", "metrics", "key"):
            setattr(daemon, name, match.group(name).decode())
        return daemon

    try:
        world = await build_world(nursery, tls_ca, tmp_path, start_as_the_unit)
        daemon = world.daemon
        assert daemon.federation.startswith("https://")  # TLS from the credentials
        room_id = world.create_room("10", name="Unit room")
        world.send(room_id, "sent before the peek")

        # A peek end to end with the command line alone (no config file), as root.
        admin = tmp_path / "admin"  # not tmp_path: its peekproxy/ would shadow the package
        admin.mkdir()
        secret = run.host("/etc/peekproxy/credentials/delegation.secret")
        assert secret.read_text().strip() == SECRET
        peek = await trio.to_thread.run_sync(
            lambda: run_cli(
                "peek",
                "--once",
                "--url",
                daemon.client,
                "--secret-file",
                str(secret),
                "--via",
                TESTBED,
                room_id,
                cwd=admin,
            )
        )
        assert peek.returncode == 0, peek.stderr
        assert f"peeking {room_id}" in peek.stdout
        assert "sent before the peek" in peek.stdout and f"unpeeked {room_id}" in peek.stdout

        # The config directory is left as installed (peekproxy never writes there).
        installed = {p.relative_to(unit_root) for p in run.host("/etc/peekproxy").rglob("*")}
        assert installed == {
            Path("etc/peekproxy", name)
            for name in (
                "config.toml",
                "federation-ca.pem",
                "credentials",
                *(f"credentials/{f}" for f in CREDENTIAL_FILES),
            )
        }
        # What the service created is its own and private (UMask=0077).
        state = run.state_root / "peekproxy"
        assert stat_mode(state) == 0o700
        created = [p for p in state.rglob("*")]
        assert any(p.name == "peekproxy.db" for p in created)
        for path in created:
            assert path.stat().st_uid == run.uid, path
            assert stat_mode(path) == (0o700 if path.is_dir() else 0o600), path
        limits = await trio.Path(f"/proc/{daemon.process.pid}/limits").read_text()
        assert re.search(rf"Max open files\s+{nofile}\s+{nofile}\s", limits), limits

        # ExecReload=: once SIGHUP reloads (issue 15 part A), the daemon says so and serves on.
        if handles_sighup():
            reload = await trio.run_process(
                run.command("ExecReload", mainpid=daemon.process.pid),
                preexec_fn=run.preexec(),
                capture_stderr=True,
                check=False,
            )
            assert reload.returncode == 0, reload.stderr
            messages = await notify.wait_for("RELOADING=1")
            count = sum("READY=1" in m.splitlines() for m in messages)
            with trio.fail_after(30):
                while sum("READY=1" in m.splitlines() for m in notify.messages) == count:
                    notify.messages.append((await notify.sock.recv(4096)).decode())
            async with httpx.AsyncClient() as http:
                assert (await http.get(f"{daemon.client}/health")).status_code == 200

        # KillSignal=SIGTERM: STOPPING=1, exit 0 well within TimeoutStopSec=.
        daemon.signal(getattr(signal, parse_unit()["Service"]["KillSignal"][0]))
        await notify.wait_for("STOPPING=1")
        with trio.fail_after(int(run.one("TimeoutStopSec"))):
            assert await daemon.wait() == 0, daemon.log
        assert "Traceback" not in daemon.log, daemon.log
    finally:
        for daemon in started:
            if daemon.process.returncode is None:
                daemon.process.kill()
        notify.sock.close()


def install_like_the_quickstart(run: UnitRun, config: Path, env: dict[str, str]) -> None:
    """/etc/peekproxy under ``run.root`` from a build_world config: its signing key,
    delegation secret and TLS files in credentials/ (root, 0600), the generated config with
    the test's ports and no secret file named, the test CA readable by the service; then
    what systemd prepares (credentials, state directory)."""
    test_config = tomllib.loads(config.read_text())
    federation = test_config["listeners"]["federation"]
    etc = run.host("/etc/peekproxy")
    credentials = etc / "credentials"
    credentials.mkdir(parents=True, mode=0o700)
    etc.chmod(0o755)
    sources = {
        "signing.key": config.parent / "signing.key",
        "delegation.secret": config.parent / "delegation.secret",
        "tls.crt": Path(federation["tls_certificate_file"]),
        "tls.key": Path(federation["tls_private_key_file"]),
    }
    assert set(sources) == set(CREDENTIAL_FILES)
    for name, source in sources.items():
        shutil.copyfile(source, credentials / name)
        (credentials / name).chmod(0o600)
    text = render_config(test_config["server"]["server_name"])
    for default, bind in (
        ("127.0.0.1:8008", "127.0.0.1:0"),
        ("127.0.0.1:9108", "127.0.0.1:0"),
        ("127.0.0.1:8448", federation["bind"]),
    ):
        text = text.replace(f'bind = "{default}"', f'bind = "{bind}"')
    (etc / "config.toml").write_text(text)
    ca = etc / "federation-ca.pem"
    shutil.copyfile(env["PEEKPROXY_FEDERATION__TLS_CA_FILE"], ca)
    ca.chmod(0o644)
    run.extra_env = env | {"PEEKPROXY_FEDERATION__TLS_CA_FILE": str(ca)}
    run.setup()


def stat_mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def handles_sighup() -> bool:
    """Whether this peekproxy reloads on SIGHUP (issue 15 part A) rather than dying of it."""
    import peekproxy.serving.signals as signals

    return "SIGHUP" in Path(signals.__file__).read_text()
