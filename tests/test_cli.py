"""The command line as an admin uses it (``python -m peekproxy ...`` in a child process)."""

from __future__ import annotations

import stat
from pathlib import Path

from peekproxy import __version__
from peekproxy.federation.signing_key import load_signing_key
from tests.support import run_cli, write_config


def test_version() -> None:
    result = run_cli("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"peekproxy {__version__}"


def test_check_config_reports_each_problem_naming_its_key(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(
        '[server]\nserver_name = "example.org"\nsigning_key_file = "nowhere.key"\n'
        'flavour = "mint"\n[peeks]\nmax_peeks_per_device = "many"\n'
    )
    result = run_cli("check-config", "-c", str(config))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 3, result.stderr
    assert any(ln.startswith("server.flavour: unknown key") for ln in lines)
    assert any(
        ln.startswith("peeks.max_peeks_per_device: Input should be a valid integer") for ln in lines
    )
    assert any(ln.startswith("server.signing_key_file: file not found") for ln in lines)


def test_check_config_accepts_a_good_config_and_reads_env(server_dir: Path) -> None:
    config = write_config(server_dir)
    assert run_cli("check-config", "-c", str(config)).returncode == 0
    # The config path can come from $PEEKPROXY_CONFIG; overrides from PEEKPROXY_<S>__<K>.
    result = run_cli(
        "check-config", env={"PEEKPROXY_CONFIG": str(config), "PEEKPROXY_PEEKS__LINGER": "x"}
    )
    assert result.returncode == 2
    assert "peeks.linger:" in result.stderr and "PEEKPROXY_PEEKS__LINGER" in result.stderr


def test_run_with_bad_config_exits_2_naming_the_key(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('[server]\nserver_name = "a:b:c"\nsigning_key_file = "k"\n')
    result = run_cli("run", "-c", str(config))
    assert result.returncode == 2
    assert "server.server_name: bad port" in result.stderr
    assert "Traceback" not in result.stderr


def test_generate_config_writes_a_valid_config_and_never_overwrites(tmp_path: Path) -> None:
    target = tmp_path / "config.toml"
    assert (
        run_cli(
            "generate-config", "--server-name", "peek.example.org", "-o", str(target)
        ).returncode
        == 0
    )
    text = target.read_text()
    assert 'server_name = "peek.example.org"' in text
    assert text.count("\n# ") > 20  # commented for admins
    again = run_cli("generate-config", "--server-name", "other.org", "-o", str(target))
    assert again.returncode == 1
    assert "refusing to overwrite" in again.stderr
    assert target.read_text() == text
    assert run_cli("generate-signing-key", str(tmp_path / "signing.key")).returncode == 0
    assert run_cli("check-config", "-c", str(target)).returncode == 0
    stdout = run_cli("generate-config", "--server-name", "x.org")
    assert stdout.returncode == 0 and 'server_name = "x.org"' in stdout.stdout
    bad = run_cli("generate-config", "--server-name", "not a name")
    assert bad.returncode == 2 and bad.stderr.startswith("--server-name:")


def test_generate_signing_key_is_private_and_never_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "signing.key"
    result = run_cli("generate-signing-key", str(path))
    assert result.returncode == 0
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    algorithm, version, seed = path.read_text().split()
    assert algorithm == "ed25519" and version.startswith("a_") and len(seed) == 43
    key = load_signing_key(path)
    assert f"{key.alg}:{key.version}" == f"ed25519:{version}"
    assert seed not in result.stderr + result.stdout  # the secret is never printed
    before = path.read_text()
    again = run_cli("generate-signing-key", str(path))
    assert again.returncode == 1 and "refusing to overwrite" in again.stderr
    assert path.read_text() == before


def test_problems_found_only_when_the_config_is_used(server_dir: Path) -> None:
    config = write_config(
        server_dir, binds={"client": "127.0.0.1:7001", "metrics": "127.0.0.1:7001"}
    )
    (server_dir / "data").write_text("a file where the data directory should be")
    for command in ("check-config", "run"):
        result = run_cli(command, "-c", str(config))
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert any(ln.startswith("server.data_dir:") and "not a directory" in ln for ln in lines)
        assert any(
            ln.startswith("listeners.metrics.bind: 127.0.0.1:7001 is already used") for ln in lines
        )


def test_an_empty_delegation_secret_is_a_config_error(server_dir: Path) -> None:
    """An empty secret file used to start with the delegation API off (403 "the delegation
    API is off"); a configured but empty secret is a mistake (issue 10 item 17)."""
    secret = server_dir / "delegation.secret"
    config = write_config(server_dir, extra={"delegation": f'shared_secret_file = "{secret}"'})
    for content in ("", "\n", "  \nsecret-on-the-second-line\n"):
        secret.write_text(content)
        for command in ("check-config", "run"):
            result = run_cli(command, "-c", str(config))
            assert result.returncode == 2, (command, content, result.stderr)
            [line] = result.stderr.strip().splitlines()
            assert line.startswith("delegation.shared_secret_file: ")
            assert "the first line (the secret or token) is empty" in line
    secret.write_text("s3cret\n")
    assert run_cli("check-config", "-c", str(config)).returncode == 0


def test_tls_pair_and_values_are_checked(
    server_dir: Path, tls_files: tuple[Path, Path, Path]
) -> None:
    cert, _key, ca = tls_files
    config = write_config(
        server_dir,
        extra={
            "listeners.federation": f'tls_certificate_file = "{cert}"\n'
            f'tls_private_key_file = "{ca}"',  # not the key: a certificate
        },
    )
    result = run_cli(
        "check-config",
        "-c",
        str(config),
        env={
            "PEEKPROXY_FEDERATION__VERIFY_TLS": '"off"',
            "PEEKPROXY_SERVER__KEY_VALID_FOR": "inf",
        },
    )
    assert result.returncode == 2
    problems = result.stderr
    assert "listeners.federation: cannot use tls_certificate_file/tls_private_key_file" in problems
    assert "federation.verify_tls: Input should be a valid boolean" in problems
    assert "server.key_valid_for: expected a duration" in problems
    binary = server_dir / "binary.toml"
    binary.write_bytes(b"\xff\xfe[server]")
    result = run_cli("check-config", "-c", str(binary))
    assert result.returncode == 2 and "not UTF-8" in result.stderr
    assert "Traceback" not in result.stderr
