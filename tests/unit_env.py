"""systemd/peekproxy.service without systemd: start the daemon with the environment the unit
gives it, for machines where systemd cannot run as PID 1 (docs/testing.md, "The unit").

:func:`parse_unit` reads the unit file; :class:`UnitRun` lays out a root directory shaped
like the host the unit expects (``/etc/peekproxy/config.toml``, the root-owned 0600 files of
``/etc/peekproxy/credentials/``, ``/var/lib``), then does what systemd does before each
``Exec*=`` line: the credentials directory (``LoadCredential=``: a directory source gives
``ID_<file>``, symbolic links skipped, a missing source fails the start; files 0400 owned by
the service's user), ``StateDirectory=`` with its mode, the ``Environment=`` lines with
``%d`` / ``%S`` expanded, ``CREDENTIALS_DIRECTORY``, ``STATE_DIRECTORY``, ``NOTIFY_SOCKET``,
``WorkingDirectory=``, ``UMask=``, ``LimitNOFILE=``, ``NoNewPrivileges=``,
``MemoryDenyWriteExecute=`` (``prctl(PR_SET_MDWE)``, Linux >= 6.3) and a user ID of the
dynamic range that owns no file. Not reproduced: the seccomp filter, the mount namespace
(``ProtectSystem=`` etc.), ``PrivateUsers=``, ``CapabilityBoundingSet=`` (an unprivileged
user has no capabilities anyway).
"""

from __future__ import annotations

import ctypes
import os
import resource
import shlex
import shutil
import site
import stat
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio

from tests.dns import REQUIRE_ALL

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "systemd" / "peekproxy.service"
#: Where the unit expects the installed script (docs/quickstart.md).
INSTALLED_SCRIPT = "/opt/peekproxy/bin/peekproxy"
#: A user ID of systemd's dynamic range (61184-65519) that owns no file on this machine.
SERVICE_UID = 61184 + os.getpid() % 4000
PR_SET_NO_NEW_PRIVS, PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 38, 65, 1


def parse_unit(path: Path = UNIT) -> dict[str, dict[str, list[str]]]:
    """``{section: {key: [values in order]}}`` of a unit file (no line continuations)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def _world_searchable(path: Path) -> bool:
    return all(os.stat(p).st_mode & stat.S_IXOTH for p in (path, *path.parents) if p.is_dir())


def interpreter() -> tuple[list[str], dict[str, str]]:
    """The command standing for ``/opt/peekproxy/bin/peekproxy``, runnable by the service's
    user, and the environment it needs: this venv's python, or (when it lives under a
    directory others cannot enter, such as pyenv's ``/root/.pyenv``) the system python of
    the same version with this venv's packages on ``PYTHONPATH``."""
    own = Path(sys.executable).resolve()
    if _world_searchable(own.parent):
        return [sys.executable, "-m", "peekproxy"], {}
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    found = shutil.which(version, path="/usr/bin:/usr/local/bin")
    if found is None or not _world_searchable(Path(found).resolve().parent):
        message = f"no {version} that an unprivileged user may run ({own} is not)"
        if REQUIRE_ALL:
            pytest.fail(message)
        pytest.skip(message)
    return [found, "-m", "peekproxy"], {
        "PYTHONPATH": ":".join([str(REPO), *site.getsitepackages()])
    }


@dataclass
class UnitRun:
    """One start of the unit under ``root`` (a directory standing for ``/``)."""

    root: Path
    unit: dict[str, dict[str, list[str]]] = field(default_factory=parse_unit)
    uid: int = SERVICE_UID
    extra_env: dict[str, str] = field(default_factory=dict)
    mdwe: bool = False  # whether MemoryDenyWriteExecute= could be applied
    nofile: int = 0  # LimitNOFILE= as applied (open_files_limit()); 0: the unit's value

    def __post_init__(self) -> None:
        self.service = self.unit["Service"]
        self.credentials = self.root / "run" / "credentials" / "peekproxy.service"
        self.state_root = self.root / "var" / "lib"
        self.notify_path = self.root / "run" / "notify"

    def host(self, path: str) -> Path:
        """A path of the unit (``/etc/peekproxy/...``) under ``root``."""
        return self.root / path.lstrip("/")

    def one(self, key: str) -> str:
        values = self.service[key]
        assert len(values) == 1, (key, values)
        return values[0]

    def expand(self, value: str) -> str:
        """systemd's specifiers (systemd.unit(5), "Specifiers") that the unit uses."""
        for spec, replacement in (
            ("%d", str(self.credentials)),
            ("%S", str(self.state_root)),
            ("%n", "peekproxy.service"),
            ("%%", "%"),
        ):
            value = value.replace(spec, replacement)
        return value

    def setup(self) -> None:
        """What systemd prepares before the first ``Exec*=`` line (as root)."""
        self.credentials.mkdir(parents=True)
        for line in self.service.get("LoadCredential", []):
            cred_id, _, source = line.partition(":")
            source_path = self.host(source)
            if source_path.is_dir():
                for file in sorted(source_path.rglob("*")):
                    if file.is_file() and not file.is_symlink():
                        name = f"{cred_id}_{file.relative_to(source_path)}".replace("/", "_")
                        self._credential(name, file.read_bytes())
            elif source_path.is_file():
                self._credential(cred_id, source_path.read_bytes())
            else:  # systemd: 243/CREDENTIALS
                raise FileNotFoundError(f"LoadCredential={line}: {source} is missing")
        os.chown(self.credentials, self.uid, self.uid)
        self.credentials.chmod(0o500)
        for name in self.service.get("StateDirectory", []):
            state = self.state_root / name
            state.mkdir(parents=True)
            os.chown(state, self.uid, self.uid)
            state.chmod(int(self.service.get("StateDirectoryMode", ["0755"])[0], 8))

    def _credential(self, name: str, data: bytes) -> None:
        target = self.credentials / name
        target.write_bytes(data)
        target.chmod(0o400)
        os.chown(target, self.uid, self.uid)

    def environment(self) -> dict[str, str]:
        env = {
            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": "/",
            "USER": "peekproxy",
            "LOGNAME": "peekproxy",
            "CREDENTIALS_DIRECTORY": str(self.credentials),
            "STATE_DIRECTORY": ":".join(
                str(self.state_root / n) for n in self.service.get("StateDirectory", [])
            ),
            "NOTIFY_SOCKET": str(self.notify_path),
        }
        for line in self.service.get("Environment", []):
            for assignment in shlex.split(line):
                key, _, value = assignment.partition("=")
                env[key] = self.expand(value)
        env = {
            k: v.replace("/etc/peekproxy", str(self.host("/etc/peekproxy"))) for k, v in env.items()
        }
        return env | self.extra_env

    def command(self, key: str, *, mainpid: int | None = None) -> list[str]:
        """The argv of ``key`` (``ExecStart``, ``ExecStartPre``, ``ExecReload``)."""
        argv = shlex.split(self.expand(self.one(key)))
        if argv[0] == INSTALLED_SCRIPT:
            program, _ = interpreter()
            argv = [*program, *argv[1:]]
        if mainpid is not None:
            argv = [a.replace("$MAINPID", str(mainpid)) for a in argv]
        return argv

    def process_env(self) -> dict[str, str]:
        return self.environment() | interpreter()[1]

    def cwd(self) -> Path:
        return Path(self.expand(self.one("WorkingDirectory")))

    def preexec(self) -> Callable[[], None]:
        """Run in the child before exec: limits, umask, no_new_privs, MDWE, then the user."""
        nofile = self.nofile or int(self.one("LimitNOFILE"))
        umask = int(self.one("UMask"), 8)
        no_new_privs = self.service.get("NoNewPrivileges") == ["yes"]
        mdwe = self.service.get("MemoryDenyWriteExecute") == ["yes"] and self.mdwe
        uid = self.uid

        def apply() -> None:
            libc = ctypes.CDLL(None, use_errno=True)
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
            os.umask(umask)
            if no_new_privs and libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
                raise OSError(ctypes.get_errno(), "PR_SET_NO_NEW_PRIVS")
            if mdwe and libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
                raise OSError(ctypes.get_errno(), "PR_SET_MDWE")
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)

        return apply


def _works_in_a_child(action: Callable[[], object]) -> bool:
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            action()
        except BaseException:
            os._exit(1)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) == 0


def mdwe_supported() -> bool:
    """Whether this kernel has ``prctl(PR_SET_MDWE)`` (Linux >= 6.3), tried in a child."""

    def mdwe() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "PR_SET_MDWE")

    return _works_in_a_child(mdwe)


def open_files_limit(wanted: int) -> int:
    """``LimitNOFILE=wanted`` as this machine allows it: systemd (as root with
    CAP_SYS_RESOURCE) sets it as is; a container without that capability cannot raise the
    hard limit, and then gets its current hard limit."""
    if _works_in_a_child(lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, wanted))):
        return wanted
    return resource.getrlimit(resource.RLIMIT_NOFILE)[1]


def short_root() -> Path:
    """A fresh directory for the fake ``/`` that the service's user may enter (pytest's
    ``tmp_path`` is 0700) and whose notify socket path stays under 108 bytes."""
    root = Path(tempfile.mkdtemp(prefix="pp-unit-", dir="/tmp"))
    root.chmod(0o755)
    return root


class NotifySocket:
    """The ``$NOTIFY_SOCKET`` datagram socket; :meth:`wait_for` a state line."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.parent.chmod(0o755)
        self.sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_DGRAM)
        self.path = path
        self.messages: list[str] = []

    async def bind(self) -> None:
        await self.sock.bind(str(self.path))
        self.path.chmod(0o777)  # any process of the service may send (NotifyAccess= checks)

    async def wait_for(self, line: str, timeout: float = 30) -> list[str]:
        """Receive until a datagram holds ``line``; every datagram received so far."""
        with trio.fail_after(timeout):
            while not any(line in m.splitlines() for m in self.messages):
                data = await self.sock.recv(4096)
                self.messages.append(data.decode())
        return self.messages
