"""Config schema: defaults, unknown keys, types, files, env overrides, the shipped example."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from peekproxy.api.delegation_params import read_secret
from peekproxy.cli import render_config
from peekproxy.config import ConfigError, load_config, parse_duration
from peekproxy.daemon import open_store
from peekproxy.serving import ServingError

REPO = Path(__file__).resolve().parent.parent


def _write(directory: Path, text: str) -> Path:
    path = directory / "config.toml"
    path.write_text(text)
    return path


MINIMAL = '[server]\nserver_name = "example.org"\nsigning_key_file = "signing.key"\n'


def test_minimal_config_gets_documented_defaults(server_dir: Path) -> None:
    config = load_config(_write(server_dir, MINIMAL), {})
    assert config.server.signing_key_file == server_dir / "signing.key"
    assert config.sqlite_path == server_dir / "data" / "peekproxy.db"
    assert config.listeners.client.bind == "127.0.0.1:8008"
    assert config.listeners.federation.tls is False
    assert config.peeks.idle_timeout == 600.0
    assert config.peeks.max_peeks_per_device == 100
    assert config.peeks.sync_section == "peek"
    assert ipaddress.ip_network("127.0.0.0/8") in config.federation.ip_range_blacklist
    assert ipaddress.ip_network("10.0.0.0/8") in config.federation.ip_range_blacklist
    assert config.federation.ip_range_whitelist == []


def test_every_problem_is_reported_on_its_own_line_naming_the_key(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        '[server]\nserver_name = "bad name!"\nsigning_key_file = "missing.key"\ncolour = 1\n'
        '[peeks]\nmax_peeks_per_device = "lots"\nidle_timeout = "soon"\n'
        '[listeners.federation]\ntls_certificate_file = "missing.crt"\n'
        'tls_private_key_file = "missing.pem"\n',
    )
    with pytest.raises(ConfigError) as caught:
        load_config(path, {})
    problems = caught.value.problems
    keys = sorted(p.split(":", 1)[0] for p in problems)
    assert keys == sorted(
        [
            "server.server_name",
            "server.signing_key_file",
            "server.colour",
            "peeks.max_peeks_per_device",
            "peeks.idle_timeout",
            "listeners.federation.tls_certificate_file",
            "listeners.federation.tls_private_key_file",
        ]
    )
    assert any("unknown key" in p for p in problems if p.startswith("server.colour"))
    assert any(str(tmp_path / "missing.key") in p for p in problems)


def test_missing_required_key_and_section(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(_write(tmp_path, '[logging]\nlevel = "INFO"\n'), {})
    assert caught.value.problems == ["server: required key is missing"]
    with pytest.raises(ConfigError) as caught:
        load_config(_write(tmp_path, '[server]\nserver_name = "a.org"\n'), {})
    assert caught.value.problems == ["server.signing_key_file: required key is missing"]


def test_env_overrides_take_precedence_and_are_named_in_errors(server_dir: Path) -> None:
    path = _write(server_dir, MINIMAL)
    config = load_config(
        path,
        {
            "PEEKPROXY_PEEKS__IDLE_TIMEOUT": "30s",
            "PEEKPROXY_LISTENERS__CLIENT__BIND": "0.0.0.0:9000",
            "PEEKPROXY_FEDERATION__IP_RANGE_WHITELIST": '["127.0.0.0/8"]',
            "PEEKPROXY_FEDERATION__VERIFY_TLS": "false",
            "PEEKPROXY_CONFIG": "ignored.toml",
        },
    )
    assert config.peeks.idle_timeout == 30.0
    assert config.listeners.client.bind == "0.0.0.0:9000"
    assert config.federation.ip_range_whitelist == [ipaddress.ip_network("127.0.0.0/8")]
    assert config.federation.verify_tls is False
    with pytest.raises(ConfigError) as caught:
        load_config(path, {"PEEKPROXY_PEEKS__LINGER": "forever", "PEEKPROXY_NOPE__X": "1"})
    assert sorted(caught.value.problems) == [
        "nope: unknown key (from PEEKPROXY_NOPE__X)",
        'peeks.linger: expected a duration such as 30, "30s", "10m" or "500ms" '
        "(from PEEKPROXY_PEEKS__LINGER)",
    ]


def test_the_config_file_is_never_rewritten(server_dir: Path) -> None:
    path = _write(server_dir, MINIMAL)
    load_config(path, {"PEEKPROXY_PEEKS__IDLE_TIMEOUT": "30s"})
    assert path.read_text() == MINIMAL


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        (30, 30.0),
        (1.5, 1.5),
        ("500ms", 0.5),
        ("30s", 30.0),
        ("10m", 600.0),
        ("2h", 7200.0),
        ("1d", 86400.0),
        ("45", 45.0),
    ],
)
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "ten", "-1", -1, True, "5 weeks", None])
def test_bad_durations(text: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def test_postgres_needs_a_dsn(server_dir: Path) -> None:
    path = _write(server_dir, MINIMAL + '[store]\nbackend = "postgres"\n')
    with pytest.raises(ConfigError) as caught:
        load_config(path, {})
    assert "store.dsn is required" in caught.value.problems[0]


def test_postgres_store_settings(server_dir: Path) -> None:
    (server_dir / "db.password").write_text("s3cret\n")
    path = _write(
        server_dir,
        MINIMAL + '[store]\nbackend = "postgres"\ndsn = "host=db dbname=peekproxy"\n'
        'password_file = "db.password"\npool_size = 4\n',
    )
    store = load_config(path, {}).store
    assert (store.backend, store.dsn, store.pool_size) == (
        "postgres",
        "host=db dbname=peekproxy",
        4,
    )
    assert read_secret(store.password_file) == "s3cret"
    assert load_config(_write(server_dir, MINIMAL), {}).store.backend == "sqlite"


@pytest.mark.parametrize(
    "dsn",
    [
        "host=db password=x",
        "host=db PASSWORD = x",
        "postgresql://peekproxy:URISECRET@127.0.0.1:5432/peekproxy",
        "postgres://peekproxy:s@db1,db2/peekproxy",
        "postgresql://db/peekproxy?password=x",
    ],
)
def test_postgres_dsn_must_not_hold_the_password(server_dir: Path, dsn: str) -> None:
    path = _write(server_dir, MINIMAL + f'[store]\nbackend = "postgres"\ndsn = "{dsn}"\n')
    with pytest.raises(ConfigError) as caught:
        load_config(path, {})
    assert "store.dsn" in caught.value.problems[0]
    assert "use store.password_file" in caught.value.problems[0]
    assert "URISECRET" not in str(caught.value.problems)


@pytest.mark.parametrize(
    "dsn",
    [
        "host=db dbname=password_vault user=passwordless",
        "postgresql://peekproxy@db:5432/password_vault",
        "postgresql:///peekproxy?host=/run/postgresql",
    ],
)
def test_postgres_dsn_naming_a_password_is_accepted(server_dir: Path, dsn: str) -> None:
    path = _write(server_dir, MINIMAL + f'[store]\nbackend = "postgres"\ndsn = "{dsn}"\n')
    assert load_config(path, {}).store.dsn == dsn


def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path, "[server\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path, {})
    assert caught.value.problems[0].startswith(f"{path}: invalid TOML")


@pytest.mark.parametrize(
    "name", ["example.org", "example.org:8448", "1.2.3.4", "1.2.3.4:80", "[::1]", "[::1]:8448"]
)
def test_generated_config_is_valid(server_dir: Path, name: str) -> None:
    config = load_config(_write(server_dir, render_config(name)), {})
    assert config.server.server_name == name


def test_shipped_example_is_the_generated_config() -> None:
    assert (REPO / "config.toml").read_text() == render_config("localhost:8448")


def test_the_upstream_token_file_needs_front_mode(server_dir: Path) -> None:
    (server_dir / "upstream.token").write_text("syt_token\n")
    token = '[upstream]\naccess_token_file = "upstream.token"\n'
    with pytest.raises(ConfigError) as caught:
        load_config(_write(server_dir, MINIMAL + token), {})
    assert caught.value.problems == [
        "upstream: access_token_file needs homeserver_url (front mode)"
    ]
    config = load_config(
        _write(server_dir, MINIMAL + token + 'homeserver_url = "http://127.0.0.1:8080"\n'), {}
    )
    assert config.upstream.access_token_file == server_dir / "upstream.token"


def test_an_observer_user_id_over_255_bytes_is_refused(server_dir: Path) -> None:
    path = _write(server_dir, render_config("example.org"))
    with pytest.raises(ConfigError) as caught:
        load_config(path, {"PEEKPROXY_PEEKS__OBSERVER_LOCALPART": "o" * 250})
    assert "peeks.observer_localpart" in str(caught.value)
    assert "at most 255" in str(caught.value)


async def test_an_empty_store_password_file_stops_the_start_naming_the_key(
    server_dir: Path,
) -> None:
    """The PostgreSQL password file is read as the other secret files are: an empty first
    line is a configuration mistake, named before any connection is tried."""
    (server_dir / "db.password").write_text("\n")
    path = _write(
        server_dir,
        MINIMAL + '[store]\nbackend = "postgres"\ndsn = "host=db.invalid dbname=peekproxy"\n'
        'password_file = "db.password"\n',
    )
    with pytest.raises(ServingError, match=r"^store\.password_file: .*first line .* empty"):
        await open_store(load_config(path, {}))
