"""Configuration: a TOML file validated by a strict schema, with environment overrides.

* The file is read with :mod:`tomllib` and never rewritten.
* Unknown keys are errors; every problem is reported as ``<dotted.key>: <message>``.
* ``PEEKPROXY_<SECTION>__<KEY>=value`` (more ``__`` for deeper tables) overrides a key.
  The value is read as a TOML value when it parses as one (``8448``, ``true``,
  ``["a", "b"]``) and as a plain string otherwise.
* Relative paths are resolved against the directory of the config file.
* Durations are a number of seconds or a string with a unit: ``"500ms"``, ``"30s"``,
  ``"10m"``, ``"2h"``, ``"1d"``. In the parsed config they are ``float`` seconds.
* Secrets are never in the file itself: they are read from ``*_file`` keys.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import ssl
import tomllib
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from peekproxy.core.identifiers import InvalidIdentifier, ServerName
from peekproxy.credentials import credentials_for_unset_keys

__all__ = [
    "DEFAULT_IP_RANGE_BLACKLIST",
    "ENV_PREFIX",
    "Config",
    "ConfigError",
    "Section",
    "apply_override",
    "check_server_name",
    "describe_error",
    "env_overrides",
    "load_config",
    "parse_duration",
    "read_toml",
]

ENV_PREFIX = "PEEKPROXY_"

#: Ranges refused for outbound federation by default: the private, loopback,
#: link-local, CGNAT, multicast and documentation ranges Synapse blocks.
DEFAULT_IP_RANGE_BLACKLIST: tuple[str, ...] = (
    "0.0.0.0/8",
    "127.0.0.0/8",
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "100.64.0.0/10",
    "192.0.0.0/24",
    "169.254.0.0/16",
    "192.88.99.0/24",
    "198.18.0.0/15",
    "192.0.2.0/24",
    "198.51.100.0/24",
    "203.0.113.0/24",
    "224.0.0.0/4",
    "::1/128",
    "fe80::/10",
    "fc00::/7",
    "2001:db8::/32",
    "ff00::/8",
    "fec0::/10",
)

MAX_DURATION_S = 10 * 365 * 86400.0
_DURATION = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


class ConfigError(Exception):
    """The configuration is unusable. ``problems`` holds one line per problem,
    each starting with the dotted key (or the file) it concerns."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def parse_duration(value: object) -> float:
    """Parse a duration into seconds.

    Accepts a non-negative number (seconds) or a string ``<number><unit>`` with unit
    ``ms``, ``s``, ``m``, ``h`` or ``d`` (no unit means seconds).

    Raises:
        ValueError: anything else.
    """
    message = 'expected a duration such as 30, "30s", "10m" or "500ms"'
    seconds: float | None = None
    if isinstance(value, bool):
        raise ValueError(message)
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        seconds = float(value)
    elif isinstance(value, str):
        match = _DURATION.match(value)
        if match:
            seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    if seconds is None or not math.isfinite(seconds):
        raise ValueError(message)
    if seconds > MAX_DURATION_S:
        raise ValueError("a duration cannot exceed 10 years")
    return seconds


def _resolve_path(value: Path, info: ValidationInfo) -> Path:
    base = (info.context or {}).get("base_dir")
    path = value.expanduser()
    if not path.is_absolute() and base is not None:
        path = Path(base) / path
    return path


def _existing_file(value: Path, info: ValidationInfo) -> Path:
    if (info.context or {}).get("check_files", True) and not value.is_file():
        raise ValueError(f"file not found: {value}")
    return value


def check_server_name(value: str) -> str:
    """Validator: ``value`` unchanged if it is a server name (spec: appendix, server name).

    Raises:
        ValueError: not a server name (the message says why).
    """
    try:
        ServerName.parse(value)
    except InvalidIdentifier as e:
        raise ValueError(str(e)) from e
    return value


def _bind(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535 or not host:
        raise ValueError(f"expected HOST:PORT, e.g. 127.0.0.1:8008 or [::1]:8008, got {value!r}")
    if host.startswith("["):
        if not host.endswith("]"):
            raise ValueError(f"unterminated IPv6 literal in {value!r}")
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError as e:
            raise ValueError(f"bad IPv6 address in {value!r}") from e
    return value


Duration = Annotated[float, BeforeValidator(parse_duration)]
ConfigPath = Annotated[Path, Field(strict=False), AfterValidator(_resolve_path)]
ExistingFile = Annotated[
    Path, Field(strict=False), AfterValidator(_resolve_path), AfterValidator(_existing_file)
]
Bind = Annotated[str, AfterValidator(_bind)]
IPNetwork = Annotated[
    ipaddress.IPv4Network | ipaddress.IPv6Network,
    BeforeValidator(lambda v: ipaddress.ip_network(v, strict=False) if isinstance(v, str) else v),
]


class Section(BaseModel):
    """Base of every config section (peekproxy's and the testbed's): unknown keys are
    errors, values are strict and the result is frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, strict=True)


class OldVerifyKey(Section):
    """A retired public key still published in ``old_verify_keys``."""

    key: str = Field(description="unpadded base64 ed25519 public key")
    expired_ts: int = Field(ge=0, description="ms since the epoch when the key was retired")

    @field_validator("key")
    @classmethod
    def _ed25519(cls, value: str) -> str:
        from unpaddedbase64 import decode_base64

        try:
            raw = decode_base64(value)
        except Exception:
            raw = b""
        if len(raw) != 32:
            raise ValueError("expected the unpadded base64 of a 32-byte ed25519 public key")
        return value


class ServerSection(Section):
    server_name: Annotated[str, AfterValidator(check_server_name)]
    signing_key_file: ExistingFile
    data_dir: ConfigPath = Path("data")
    key_valid_for: Duration = Field(default=86400.0, gt=3600.0, le=30 * 86400.0)
    old_verify_keys: dict[str, OldVerifyKey] = Field(default_factory=dict)
    shutdown_grace: Duration = Field(default=3.0, le=60.0)

    @field_validator("old_verify_keys")
    @classmethod
    def _key_ids(cls, value: dict[str, OldVerifyKey]) -> dict[str, OldVerifyKey]:
        for key_id in value:
            if not re.fullmatch(r"ed25519:[a-zA-Z0-9_]+", key_id):
                raise ValueError(f"key ID {key_id!r} is not of the form ed25519:<version>")
        return value


class ClientListener(Section):
    bind: Bind = "127.0.0.1:8008"


class FederationListener(Section):
    bind: Bind = "127.0.0.1:8448"
    tls_certificate_file: ExistingFile | None = None
    tls_private_key_file: ExistingFile | None = None

    @model_validator(mode="after")
    def _both_or_neither(self, info: ValidationInfo) -> FederationListener:
        if (self.tls_certificate_file is None) != (self.tls_private_key_file is None):
            raise ValueError("tls_certificate_file and tls_private_key_file must be set together")
        checking = (info.context or {}).get("check_files", True)
        if checking and self.tls_certificate_file and self.tls_private_key_file:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            try:
                context.load_cert_chain(self.tls_certificate_file, self.tls_private_key_file)
            except (ssl.SSLError, OSError) as e:
                raise ValueError(
                    "cannot use tls_certificate_file/tls_private_key_file: "
                    f"{getattr(e, 'reason', None) or e}"
                ) from None
        return self

    @property
    def tls(self) -> bool:
        return self.tls_certificate_file is not None


class MetricsListener(Section):
    enabled: bool = True
    bind: Bind = "127.0.0.1:9108"


class ListenersSection(Section):
    client: ClientListener = ClientListener()
    federation: FederationListener = FederationListener()
    metrics: MetricsListener = MetricsListener()


#: A libpq key=value conninfo's ``password`` key (libpq allows spaces around ``=``).
_CONNINFO_PASSWORD = re.compile(r"(?:^|\s)password\s*=", re.IGNORECASE)


def _dsn_holds_password(dsn: str) -> bool:
    """Whether a libpq DSN carries a password: the ``user:password@`` of a
    ``postgresql://``/``postgres://`` URI or its ``password=`` query parameter, or the
    ``password`` key of a key=value conninfo (not a user or database merely named so)."""
    if re.match(r"^postgres(?:ql)?://", dsn, re.IGNORECASE):
        parts = urllib.parse.urlsplit(dsn)
        query = urllib.parse.parse_qs(parts.query)
        return ":" in parts.netloc.rpartition("@")[0] or "password" in query
    return _CONNINFO_PASSWORD.search(dsn) is not None


class StoreSection(Section):
    """``[store]``: SQLite (one instance, the default) or PostgreSQL (one or several
    instances of one server name; docs/postgresql.md)."""

    backend: Literal["sqlite", "postgres"] = "sqlite"
    sqlite_path: ConfigPath | None = None
    #: libpq conninfo string or URI, without the password (``backend = "postgres"``).
    dsn: str | None = None
    #: A file holding the PostgreSQL password (read at start), or the systemd credential
    #: ``peekproxy_store_password``.
    password_file: ExistingFile | None = None
    #: Connections in the pool (reads run on all but one at once; writes one at a time).
    pool_size: int = Field(default=10, ge=2, le=1000)

    @model_validator(mode="after")
    def _dsn_for_postgres(self) -> StoreSection:
        if self.backend == "postgres" and not self.dsn:
            raise ValueError('store.dsn is required with backend = "postgres"')
        if self.dsn and _dsn_holds_password(self.dsn):
            raise ValueError("store.dsn must not hold the password: use store.password_file")
        return self


class TrustedKeyServer(Section):
    """A notary asked for other servers' keys when they cannot be fetched directly."""

    server_name: Annotated[str, AfterValidator(check_server_name)]
    verify_keys: dict[str, str] = Field(
        default_factory=dict,
        description="key ID -> unpadded base64 public key; empty: fetch from the notary itself",
    )


class FederationSection(Section):
    ip_range_blacklist: list[IPNetwork] = Field(
        default_factory=lambda: [ipaddress.ip_network(n) for n in DEFAULT_IP_RANGE_BLACKLIST]
    )
    ip_range_whitelist: list[IPNetwork] = Field(default_factory=list)
    dns_nameservers: list[Bind] = Field(default_factory=list)
    default_port: int = Field(default=8448, ge=1, le=65535)
    connect_timeout: Duration = Field(default=10.0, gt=0)
    request_timeout: Duration = Field(default=60.0, gt=0)
    verify_tls: bool = True
    tls_ca_file: ExistingFile | None = None
    max_response_size: int = Field(default=64 * 1024 * 1024, ge=65536)
    backoff_initial: Duration = Field(default=2.0, gt=0)
    backoff_max: Duration = Field(default=600.0, gt=0)
    trusted_key_servers: list[TrustedKeyServer] = Field(default_factory=list)


class PeeksSection(Section):
    idle_timeout: Duration = Field(default=600.0, gt=0)
    linger: Duration = Field(default=60.0, ge=0)
    renewal_interval_max: Duration = Field(default=1800.0, ge=1.0)
    max_peeks_per_device: int = Field(default=100, ge=1)
    max_remote_peeks: int = Field(default=10000, ge=1)
    rate_limit_per_second: float = Field(default=1.0, gt=0)
    rate_limit_burst: int = Field(default=10, ge=1)
    sync_section: Literal["peek", "peeking"] = "peek"
    #: When every candidate server lacks MSC2444: "none" (the peek fails, naming them) or
    #: "observer_join" (join world_readable rooms as the observer user; docs/observer-join.md).
    fallback: Literal["none", "observer_join"] = "none"
    #: The observer user's localpart (@<localpart>:<server_name>) and display name.
    observer_localpart: str = Field(default="peekproxy", pattern=r"^[a-z0-9._=/+-]+$")
    observer_displayname: str = Field(default="peekproxy observer", max_length=256)
    #: How long an observed room nobody peeks stays joined before the observer leaves.
    observer_linger: Duration = Field(default=3600.0, ge=0)
    #: Most rooms the observer is joined to at once.
    max_observed_rooms: int = Field(default=100, ge=1)


class ClusterSection(Section):
    """Several instances on one database (docs/cluster.md)."""

    #: Turn the subscription leases on: required for several instances on one database.
    #: Unset: on with ``store.backend = "postgres"`` (which several instances may share),
    #: off with SQLite (one process only); see :meth:`Config.cluster_enabled`.
    enabled: bool | None = None
    #: This instance's name in the leases and logs (default ``<hostname>-<pid>``: set it,
    #: unique per instance, for logs that stay the same across restarts).
    instance_name: str | None = Field(default=None, min_length=1, max_length=128)
    #: Seconds a room's lease lasts unless renewed (renewed every third of it): how long a
    #: dead owner's rooms wait before another instance takes them over.
    lease: Duration = Field(default=15.0, ge=1.0)


class UpstreamSection(Section):
    homeserver_url: str | None = None

    @field_validator("homeserver_url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^https?://[^/\s]+", value):
            raise ValueError(f"expected an http:// or https:// URL, got {value!r}")
        return value

    #: The access token of peekproxy's own local account on the homeserver, read by the
    #: daemon: world_readable rooms of the homeserver itself are followed as that account.
    access_token_file: ExistingFile | None = None
    #: Seconds peekproxy waits for the homeserver: a request as a whole, and a /sync
    #: beyond the client's own ``timeout``; then the client gets a 502.
    timeout: Duration = Field(default=60.0, gt=0)

    @model_validator(mode="after")
    def _token_needs_url(self) -> UpstreamSection:
        if self.access_token_file is not None and self.homeserver_url is None:
            raise ValueError("access_token_file needs homeserver_url (front mode)")
        return self


class DelegationSection(Section):
    shared_secret_file: ExistingFile | None = None


class LoggingSection(Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["text", "json"] = "text"
    access_log: bool = True


class Config(Section):
    """The whole validated configuration (one attribute per TOML section)."""

    server: ServerSection
    listeners: ListenersSection = ListenersSection()
    store: StoreSection = StoreSection()
    federation: FederationSection = FederationSection()
    peeks: PeeksSection = PeeksSection()
    upstream: UpstreamSection = UpstreamSection()
    delegation: DelegationSection = DelegationSection()
    logging: LoggingSection = LoggingSection()
    cluster: ClusterSection = ClusterSection()

    @model_validator(mode="after")
    def _observer_user_id_fits(self) -> Config:
        user_id = f"@{self.peeks.observer_localpart}:{self.server.server_name}"
        if len(user_id.encode()) > 255:
            raise ValueError(
                f"peeks.observer_localpart: the observer's user ID {user_id[:40]}… is "
                f"{len(user_id.encode())} bytes; a user ID has at most 255"
            )
        return self

    @property
    def sqlite_path(self) -> Path:
        """The SQLite database file (``store.sqlite_path``, else ``<data_dir>/peekproxy.db``)."""
        return self.store.sqlite_path or self.server.data_dir / "peekproxy.db"

    @property
    def cluster_enabled(self) -> bool:
        """Whether the subscription leases are on (docs/cluster.md): ``cluster.enabled``,
        else on exactly when ``store.backend`` is ``"postgres"``."""
        if self.cluster.enabled is not None:
            return self.cluster.enabled
        return self.store.backend == "postgres"


def env_overrides(environ: Mapping[str, str]) -> dict[tuple[str, ...], tuple[str, Any]]:
    """The ``PEEKPROXY_<SECTION>__<KEY>`` variables of ``environ``, by lower-case key path:
    ``(variable name, value)``, the value parsed as a TOML value when it is one, else the
    raw string. A name with an empty part is kept under the path ``("(NAME)",)``, so that
    validation names it."""
    overrides: dict[tuple[str, ...], tuple[str, Any]] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        parts = tuple(p.lower() for p in name[len(ENV_PREFIX) :].split("__"))
        if not all(parts):
            parts = (f"({name})",)
        try:
            value: Any = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        overrides[parts] = (name, value)
    return overrides


def apply_override(data: dict[str, Any], parts: tuple[str, ...], value: Any) -> str | None:
    """Set the key path ``parts`` of the parsed TOML ``data`` to ``value``, creating tables
    on the way; returns ``None``, or the problem (``"a.b is not a table"``) when the path
    goes through a value that is not a table."""
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            return ".".join(parts[: i + 1]) + " is not a table"
        node = child
    node[parts[-1]] = value
    return None


def describe_error(error: Mapping[str, Any], env_names: Mapping[tuple[str, ...], str]) -> str:
    """One pydantic validation error as one line ``<key.path>: <problem>``, with
    ``(from <VARIABLE>)`` when an environment override (``env_names``: variable names by
    key path) set that key or a table around it."""
    loc = tuple(str(p) for p in error["loc"])
    key = ".".join(loc) or "(top level)"
    kind = error["type"]
    if kind == "extra_forbidden":
        message = "unknown key"
    elif kind == "missing":
        message = "required key is missing"
    else:
        message = str(error["msg"]).removeprefix("Value error, ")
        if kind not in ("value_error", "assertion_error") and "input" in error:
            shown = repr(error["input"])
            message += f" (got {shown[:60]})"
    source = env_names.get(loc) or next(
        (
            name
            for parts, name in env_names.items()
            if parts[: len(loc)] == loc or loc[: len(parts)] == parts
        ),
        None,
    )
    return f"{key}: {message}" + (f" (from {source})" if source else "")


def read_toml(file: Path) -> dict[str, Any]:
    """The parsed TOML of a config file.

    Raises:
        ConfigError: missing or unreadable file, not UTF-8, or not TOML (one line naming
            the file).
    """
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([f"{file}: config file not found"]) from None
    except UnicodeDecodeError as e:
        raise ConfigError([f"{file}: not UTF-8 text (byte {e.start})"]) from None
    except OSError as e:
        raise ConfigError([f"{file}: cannot read config file: {e.strerror}"]) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError([f"{file}: invalid TOML: {e}"]) from None


def load_federation_section(
    path: str | os.PathLike[str], environ: Mapping[str, str] | None = None
) -> FederationSection:
    """Only the ``[federation]`` section of a config file (other sections may be absent),
    with ``PEEKPROXY_FEDERATION__*`` overrides; used by tools such as ``pdu check``.

    Raises:
        ConfigError: one line per problem, each naming the key.
    """
    file = Path(path)
    data = read_toml(file)
    section = {"federation": data.get("federation", {})}
    env_names: dict[tuple[str, ...], str] = {}
    for parts, (name, value) in env_overrides(os.environ if environ is None else environ).items():
        if parts[0] == "federation":
            apply_override(section, parts, value)
            env_names[parts] = name

    class _Only(Section):
        federation: FederationSection = FederationSection()

    try:
        return _Only.model_validate(
            section, context={"base_dir": file.resolve().parent, "check_files": True}
        ).federation
    except ValidationError as e:
        raise ConfigError([describe_error(err, env_names) for err in e.errors()]) from None


def load_config(
    path: str | os.PathLike[str],
    environ: Mapping[str, str] | None = None,
    *,
    check_files: bool = True,
) -> Config:
    """Read, override and validate the config file at ``path``.

    Args:
        path: the TOML file.
        environ: where ``PEEKPROXY_*`` overrides and ``CREDENTIALS_DIRECTORY`` (systemd
            credentials filling unset ``*_file`` keys, :mod:`peekproxy.credentials`) come
            from (default ``os.environ``).
        check_files: also require that every configured file exists.

    Raises:
        ConfigError: with one line per problem, each naming the key.
    """
    file = Path(path)
    data = read_toml(file)

    env_names: dict[tuple[str, ...], str] = {}
    problems: list[str] = []
    environ = os.environ if environ is None else environ
    for parts, (name, value) in env_overrides(environ).items():
        trouble = apply_override(data, parts, value)
        if trouble:
            problems.append(f"{'.'.join(parts)}: {trouble} (from {name})")
        env_names[parts] = name
    for parts, (credential, label) in credentials_for_unset_keys(data, environ).items():
        apply_override(data, parts, str(credential))
        env_names[parts] = label
    try:
        config = Config.model_validate(
            data, context={"base_dir": file.resolve().parent, "check_files": check_files}
        )
    except ValidationError as e:
        problems.extend(describe_error(err, env_names) for err in e.errors())
        raise ConfigError(problems) from None
    if problems:
        raise ConfigError(problems)
    return config
