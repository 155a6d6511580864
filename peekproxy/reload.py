"""The config reload of a running daemon (SIGHUP; docs/operations.md, "Signals").

:meth:`Reloader.reload` tells systemd ``RELOADING=1`` with ``MONOTONIC_USEC``, reads the
config file again (the callable the daemon was given: the same ``load_config`` and
preflight checks as ``peekproxy run``, environment overrides included), applies what can
change live, and tells systemd ``READY=1`` with a ``STATUS=`` line.

Applied at once (:data:`~peekproxy.core.config_changes.LIVE_KEYS`): ``logging.level`` and
``logging.access_log``; the caps and rate limits of ``[peeks]`` (:class:`LiveSettings`,
read at use time); ``delegation.shared_secret_file`` (read again: the old secret is refused
from then on); the federation listener's TLS certificate and key (loaded again, for new
connections); ``server.shutdown_grace``. Any other changed key is logged once at WARNING
(``<key> changed: takes effect after a restart``) and ignored.

A config that does not load (bad TOML, an invalid value, a preflight problem, a secret
file or TLS pair that cannot be read) changes nothing: each problem is logged at ERROR
naming its key, the running settings stay, and ``READY=1`` is still sent.
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Callable, Sequence
from typing import Any

from peekproxy.api.delegation_params import SecretFileError, read_secret
from peekproxy.config import Config, ConfigError
from peekproxy.core.config_changes import flatten, split_changes
from peekproxy.logs import set_level
from peekproxy.sdnotify import sd_notify
from peekproxy.services.settings import LiveSettings
from peekproxy.serving import ListenerConfig

__all__ = ["Reloader", "live_settings", "monotonic_usec"]

log = logging.getLogger("peekproxy")

#: Reads the config file again: a new Config, or ConfigError (one line per problem).
LoadConfig = Callable[[], Config]


def monotonic_usec() -> int:
    """``CLOCK_MONOTONIC`` in µs, as ``sd_notify``'s ``MONOTONIC_USEC=`` wants it."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def live_settings(config: Config, secret: str | None) -> LiveSettings:
    """The live settings of ``config`` (``secret``: the delegation secret, read already)."""
    peeks = config.peeks
    return LiveSettings(
        max_peeks_per_device=peeks.max_peeks_per_device,
        max_remote_peeks=peeks.max_remote_peeks,
        max_observed_rooms=peeks.max_observed_rooms,
        rate_limit_per_second=peeks.rate_limit_per_second,
        rate_limit_burst=peeks.rate_limit_burst,
        delegation_secret=secret,
    )


class Reloader:
    """Applies a re-read config to a running daemon (see the module docstring).

    Args:
        config: the config in force.
        load: reads the config file again (raises ConfigError).
        live: the daemon's :class:`LiveSettings`, updated in place.
        listeners: the hypercorn settings of every listener (``server.shutdown_grace``).
        federation: the federation listener's, whose TLS pair is loaded again.
    """

    def __init__(
        self,
        config: Config,
        load: LoadConfig,
        live: LiveSettings,
        *,
        listeners: Sequence[ListenerConfig] = (),
        federation: ListenerConfig | None = None,
    ) -> None:
        self._load = load
        self._live = live
        self._listeners = tuple(listeners)
        self._federation = federation
        #: The values in force: the start-up config's, with the live keys reloaded since.
        self._applied = flatten(config.model_dump(mode="json"))
        #: Restart-only keys already warned about, with the value warned about.
        self._warned: dict[str, Any] = {}
        #: Whether systemd was told READY=1 already (before: no RELOADING/READY).
        self.ready = False

    async def reload(self) -> None:
        """One reload: ``RELOADING=1``, read, apply (or keep everything on a problem),
        ``READY=1``. Never raises."""
        if self.ready:
            sd_notify(f"RELOADING=1\nMONOTONIC_USEC={monotonic_usec()}")
        log.info("SIGHUP received: reloading the config")
        try:
            status = self.apply(self._load())
        except ConfigError as e:
            for problem in e.problems:
                log.error("reload refused, the running settings stay: %s", problem)
            status = f"reload failed: {e.problems[0] if e.problems else 'unusable config'}"
        except Exception:  # a bug of ours must not end the daemon on a SIGHUP
            log.exception("reload failed, the running settings stay")
            status = "reload failed (see the log)"
        if self.ready:
            sd_notify(f"READY=1\nSTATUS={status}")

    def apply(self, config: Config) -> str:
        """Apply what changes live from ``config``; returns the ``STATUS=`` text.

        Raises:
            ConfigError: the delegation secret file or the TLS pair cannot be used (one
                line naming the key); nothing was changed then.
        """
        new = flatten(config.model_dump(mode="json"))
        changes = split_changes(self._applied, new)
        try:
            secret = read_secret(config.delegation.shared_secret_file)
        except SecretFileError as e:
            raise ConfigError([f"delegation.shared_secret_file: {e}"]) from None
        # What the file's keys do not show: the same paths, new contents.
        renewed = ["delegation secret replaced"] if secret != self._live.delegation_secret else []
        tls = config.listeners.federation
        tls_on = self._federation is not None and self._federation.ssl_enabled
        if tls_on and tls.tls_certificate_file and tls.tls_private_key_file:
            assert self._federation is not None
            try:
                self._federation.reload_certificate(
                    tls.tls_certificate_file, tls.tls_private_key_file
                )
            except (ssl.SSLError, OSError, ValueError) as e:
                reason = getattr(e, "reason", None) or e
                raise ConfigError(
                    [
                        "listeners.federation: cannot use "
                        f"tls_certificate_file/tls_private_key_file: {reason}"
                    ]
                ) from None
            renewed.append("TLS certificate and key read again")
        # Nothing below can fail: the reload is all or nothing.
        fresh = live_settings(config, secret)
        for name in LiveSettings.__dataclass_fields__:
            setattr(self._live, name, getattr(fresh, name))
        if {"logging.level", "logging.access_log"} & set(changes.live):
            set_level(config.logging.level, access_log=config.logging.access_log)
        for listener in self._listeners:
            listener.graceful_timeout = config.server.shutdown_grace
        for key in changes.live:
            self._applied[key] = new.get(key)
        warned = {}
        for key in changes.restart:
            warned[key] = new.get(key)
            if key not in self._warned or self._warned[key] != warned[key]:
                log.warning("%s changed: takes effect after a restart", key)
        self._warned = warned
        applied = ", ".join([*changes.live, *renewed]) or "nothing changed"
        log.info("config reloaded: %s", applied)
        return f"reloaded: {applied}"
