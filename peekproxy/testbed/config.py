"""Testbed configuration: a TOML file (same rules as peekproxy's) or command-line flags.

Sections: ``[server]`` (server_name, data_dir, signing_key_file — created when missing),
``[listeners.federation]`` (bind, TLS files), ``[listeners.admin]`` (bind, token_file —
created when missing), ``[federation]`` (as in peekproxy's config), ``[peeks]``
(renewal_interval, renew_reply, rate limit), ``[logging]``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, ValidationError

from peekproxy.config import (
    Bind,
    ConfigError,
    ConfigPath,
    Duration,
    FederationListener,
    FederationSection,
    LoggingSection,
    Section,
    apply_override,
    check_server_name,
    describe_error,
    env_overrides,
    read_toml,
)

__all__ = ["TestbedConfig", "load_testbed_config", "testbed_config_from_flags"]

ENV_PREFIX = "PEEKPROXY_TESTBED_"


class TestbedServer(Section):
    server_name: Annotated[str, AfterValidator(check_server_name)]
    data_dir: ConfigPath = Path("testbed-data")
    signing_key_file: ConfigPath | None = None

    @property
    def key_file(self) -> Path:
        """The signing key (``<data_dir>/signing.key`` unless set); created when missing."""
        return self.signing_key_file or self.data_dir / "signing.key"


class AdminListener(Section):
    bind: Bind = "127.0.0.1:8009"
    token_file: ConfigPath | None = None


class TestbedListeners(Section):
    federation: FederationListener = FederationListener(bind="127.0.0.1:8448")
    admin: AdminListener = AdminListener()


class TestbedPeeks(Section):
    renewal_interval: Duration = Field(default=3600.0, ge=0.1)
    renew_reply: Literal["empty", "full"] = "empty"
    rate_limit_per_second: float = Field(default=20.0, gt=0)
    rate_limit_burst: int = Field(default=50, ge=1)


class TestbedConfig(Section):
    """The testbed's validated configuration."""

    server: TestbedServer
    listeners: TestbedListeners = TestbedListeners()
    federation: FederationSection = FederationSection()
    peeks: TestbedPeeks = TestbedPeeks()
    logging: LoggingSection = LoggingSection()

    @property
    def token_file(self) -> Path:
        return self.listeners.admin.token_file or self.server.data_dir / "admin.token"


def _validate(data: dict[str, Any], base_dir: Path, env_names: Mapping[Any, str]) -> TestbedConfig:
    try:
        return TestbedConfig.model_validate(
            data, context={"base_dir": base_dir, "check_files": True}
        )
    except ValidationError as e:
        raise ConfigError([describe_error(err, env_names) for err in e.errors()]) from None


def _apply_environment(data: dict[str, Any], environ: Mapping[str, str] | None) -> dict[Any, str]:
    """Apply ``PEEKPROXY_TESTBED_<SECTION>__<KEY>`` overrides to ``data`` (``None``: the
    process environment); returns the variable names by key path, for error messages.

    Raises:
        ConfigError: an override goes through a key that is not a table.
    """
    env = {
        "PEEKPROXY_" + k.removeprefix(ENV_PREFIX): v
        for k, v in (os.environ if environ is None else environ).items()
        if k.startswith(ENV_PREFIX)
    }
    names: dict[tuple[str, ...], str] = {}
    problems = []
    for parts, (name, value) in env_overrides(env).items():
        original = name.replace("PEEKPROXY_", ENV_PREFIX, 1)
        problem = apply_override(data, parts, value)
        if problem is not None:
            problems.append(f"{problem} (from {original})")
        names[parts] = original
    if problems:
        raise ConfigError(problems)
    return names


def load_testbed_config(
    path: str | os.PathLike[str], environ: Mapping[str, str] | None = None
) -> TestbedConfig:
    """Read and validate a testbed TOML file; ``PEEKPROXY_TESTBED_<SECTION>__<KEY>`` overrides
    (from ``environ``, else the process environment) win over the file.

    Raises:
        ConfigError: one line per problem, each naming the key.
    """
    file = Path(path)
    data = read_toml(file)
    names = _apply_environment(data, environ)
    return _validate(data, file.resolve().parent, names)


def testbed_config_from_flags(
    *,
    server_name: str,
    federation_bind: str | None = None,
    admin_bind: str | None = None,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    data_dir: str | None = None,
    ip_range_whitelist: Sequence[str] | None = None,
    tls_ca_file: str | None = None,
    dns_nameservers: Sequence[str] | None = None,
    extra: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> TestbedConfig:
    """Build a config from command-line flags (paths relative to the working directory).

    ``ip_range_whitelist``, ``tls_ca_file`` and ``dns_nameservers`` go to ``[federation]``;
    ``extra`` is merged into the sections it names (over the flags). Then the
    ``PEEKPROXY_TESTBED_<SECTION>__<KEY>`` overrides of ``environ`` (``None``: the process
    environment; pass ``{}`` for none) win over both, as they do over a file.

    Raises:
        ConfigError: one line per problem.
    """
    listener: dict[str, Any] = {}
    if federation_bind:
        listener["bind"] = federation_bind
    if tls_cert:
        listener["tls_certificate_file"] = tls_cert
    if tls_key:
        listener["tls_private_key_file"] = tls_key
    federation: dict[str, Any] = {}
    if ip_range_whitelist:
        federation["ip_range_whitelist"] = list(ip_range_whitelist)
    if tls_ca_file:
        federation["tls_ca_file"] = tls_ca_file
    if dns_nameservers:
        federation["dns_nameservers"] = list(dns_nameservers)
    data: dict[str, Any] = {
        "server": {"server_name": server_name} | ({"data_dir": data_dir} if data_dir else {}),
        "listeners": {"federation": listener}
        | ({"admin": {"bind": admin_bind}} if admin_bind else {}),
    }
    if federation:
        data["federation"] = federation
    for section, values in (extra or {}).items():
        data.setdefault(section, {}).update(values)
    names = _apply_environment(data, environ)
    return _validate(data, Path.cwd(), names)
