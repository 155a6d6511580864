"""Serving: how the daemon and the testbed run their HTTP listeners.

One public surface (import from ``peekproxy.serving``, not from its modules) for both
``peekproxy run`` (:mod:`peekproxy.daemon`) and ``peekproxy testbed``
(:mod:`peekproxy.testbed.server`, :mod:`peekproxy.testbed.cli`):

* :func:`hypercorn_config`: one listener's hypercorn settings (bind, backlog, TLS files,
  graceful drain in seconds, access and error logs), a :class:`ListenerConfig` whose TLS
  certificate can be replaced while it serves;
* :func:`open_listeners` / :class:`Listeners` and :func:`start_listener`: start listeners in
  a nursery, each returning the base URL it is bound to, or :class:`ServingError`
  ``<key>: cannot listen on <bind>: <reason>``; leaving :func:`open_listeners` is the
  graceful drain;
* :func:`install_guards` (:mod:`~peekproxy.serving.guards`): hypercorn 0.18 patched so that
  an HTTP/2 or connection error ends only its own connection, never a listener or the
  process (installed by every :func:`start_listener`);
* :func:`raise_open_files_limit`: the soft open-files limit raised to the hard one;
* :func:`watch_signals`: the first SIGINT/SIGTERM sets the shutdown event, a second stops
  at once; SIGHUP runs a reload callback, one at a time;
* :func:`exception_leaves` / :func:`failure_message`: exception groups flattened into the
  one-line ``cannot start: ...`` message.

Modules: ``listeners.py``, ``limits.py``, ``guards.py`` (hypercorn internals, pinned to
:data:`TESTED_HYPERCORN`), ``signals.py``, ``errors.py``.

May import: the standard library, trio, hypercorn (with h11/h2), starlette's ASGI types and
:mod:`peekproxy.logs`. Nothing here knows the apps it serves: no ``api/``, services,
store, federation or config.
"""

from peekproxy.serving.errors import ServingError, exception_leaves, failure_message
from peekproxy.serving.guards import TESTED_HYPERCORN, install_guards
from peekproxy.serving.limits import raise_open_files_limit
from peekproxy.serving.listeners import (
    LISTEN_BACKLOG,
    ListenerConfig,
    Listeners,
    hypercorn_config,
    open_listeners,
    start_listener,
)
from peekproxy.serving.signals import watch_signals

__all__ = [
    "LISTEN_BACKLOG",
    "TESTED_HYPERCORN",
    "ListenerConfig",
    "Listeners",
    "ServingError",
    "exception_leaves",
    "failure_message",
    "hypercorn_config",
    "install_guards",
    "open_listeners",
    "raise_open_files_limit",
    "start_listener",
    "watch_signals",
]
