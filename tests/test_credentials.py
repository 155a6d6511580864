"""systemd credentials (``$CREDENTIALS_DIRECTORY``) fill the ``*_file`` keys left unset."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from peekproxy.api.delegation_params import read_secret
from peekproxy.config import ConfigError, load_config
from peekproxy.credentials import CREDENTIAL_KEYS
from tests.support import run_cli

#: The generated config's sections, secrets named nowhere; front mode on so that the
#: upstream token may be used.
CONFIG = (
    '[server]\nserver_name = "example.org"\n[upstream]\nhomeserver_url = "http://127.0.0.1:8080"\n'
)


@pytest.fixture
def credentials(tmp_path: Path, tls_files: tuple[Path, Path, Path], server_dir: Path) -> Path:
    """A credentials directory as the unit's LoadCredential= line makes it: every file of
    /etc/peekproxy/credentials as peekproxy_<name>."""
    directory = tmp_path / "credentials"
    directory.mkdir()
    chain, key, _ = tls_files
    shutil.copyfile(server_dir / "signing.key", directory / "peekproxy_signing.key")
    (directory / "peekproxy_delegation.secret").write_text("s3cret\n")
    (directory / "peekproxy_upstream.token").write_text("syt_token\n")
    (directory / "peekproxy_store_password").write_text("s3cret\n")
    shutil.copyfile(chain, directory / "peekproxy_tls.crt")
    shutil.copyfile(key, directory / "peekproxy_tls.key")
    return directory


def test_every_secret_comes_from_the_credentials_directory(
    tmp_path: Path, credentials: Path
) -> None:
    config = load_config(_config(tmp_path), {"CREDENTIALS_DIRECTORY": str(credentials)})
    assert config.server.signing_key_file == credentials / "peekproxy_signing.key"
    assert config.delegation.shared_secret_file == credentials / "peekproxy_delegation.secret"
    assert config.upstream.access_token_file == credentials / "peekproxy_upstream.token"
    federation = config.listeners.federation
    assert federation.tls_certificate_file == credentials / "peekproxy_tls.crt"
    assert federation.tls_private_key_file == credentials / "peekproxy_tls.key"
    assert federation.tls
    assert read_secret(config.store.password_file) == "s3cret"
    assert {k[-1] for k in CREDENTIAL_KEYS} == {
        "password_file",
        "signing_key_file",
        "shared_secret_file",
        "access_token_file",
        "tls_certificate_file",
        "tls_private_key_file",
    }


def test_absent_credentials_leave_their_keys_unset(tmp_path: Path, credentials: Path) -> None:
    for name in ("delegation.secret", "upstream.token", "tls.crt", "tls.key"):
        (credentials / f"peekproxy_{name}").unlink()
    config = load_config(_config(tmp_path), {"CREDENTIALS_DIRECTORY": str(credentials)})
    assert config.delegation.shared_secret_file is None
    assert config.upstream.access_token_file is None
    assert not config.listeners.federation.tls
    # Without $CREDENTIALS_DIRECTORY nothing is looked up: the signing key is then missing.
    with pytest.raises(ConfigError) as error:
        load_config(_config(tmp_path), {})
    assert error.value.problems == ["server.signing_key_file: required key is missing"]


def test_the_file_and_the_environment_win_over_credentials(
    tmp_path: Path, credentials: Path, server_dir: Path
) -> None:
    (server_dir / "mine.secret").write_text("from the file\n")
    path = _config(
        tmp_path,
        f'[delegation]\nshared_secret_file = "{server_dir / "mine.secret"}"\n',
    )
    environ = {
        "CREDENTIALS_DIRECTORY": str(credentials),
        "PEEKPROXY_SERVER__SIGNING_KEY_FILE": str(server_dir / "signing.key"),
    }
    config = load_config(path, environ)
    assert config.delegation.shared_secret_file == server_dir / "mine.secret"
    assert config.server.signing_key_file == server_dir / "signing.key"
    assert config.upstream.access_token_file == credentials / "peekproxy_upstream.token"


def test_a_bad_credential_is_named(tmp_path: Path, credentials: Path) -> None:
    (credentials / "peekproxy_tls.key").write_text("not a key\n")
    with pytest.raises(ConfigError) as error:
        load_config(_config(tmp_path), {"CREDENTIALS_DIRECTORY": str(credentials)})
    (problem,) = error.value.problems
    assert problem.startswith("listeners.federation: cannot use tls_certificate_file")
    assert "(from credential peekproxy_tls." in problem  # the pair: either file is named


def test_check_config_reads_credentials(tmp_path: Path, credentials: Path) -> None:
    config = _config(tmp_path)
    env = {"CREDENTIALS_DIRECTORY": str(credentials)}
    assert run_cli("check-config", "-c", str(config), env=env).returncode == 0
    (credentials / "peekproxy_delegation.secret").write_text("\n")
    empty = run_cli("check-config", "-c", str(config), env=env)
    assert empty.returncode == 2
    assert empty.stderr.startswith("delegation.shared_secret_file: ")
    assert "peekproxy_delegation.secret" in empty.stderr


def _config(directory: Path, extra: str = "") -> Path:
    path = directory / "config.toml"
    path.write_text(CONFIG + extra)
    return path
