"""The testbed: a small federation server that tests use as an MSC2444 peek target.

* ``server.py``: the assembly (:func:`~peekproxy.testbed.server.run_testbed`,
  :class:`~peekproxy.testbed.server.TestbedListening`; re-exports ``Testbed``);
* ``host.py``: :class:`~peekproxy.testbed.host.Testbed`, the state and behaviour the HTTP
  apps serve (rooms, events, memberships, EDUs, peeks, delivery);
* ``federation_api.py`` and ``admin_api.py``: the two listeners' routes, which parse and
  answer; ``parsing.py``: their request bodies and raw path segments;
* the logic: ``rooms.py`` (pure: events, state, auth chains per room version), ``peeks.py``
  (pure: inbound peeks and their expiry), ``peek_rules.py`` (who may peek, rate limit, peeks
  a new event ends), ``reads.py`` (the read endpoints R4 opens: state, event, backfill,
  missing events), ``directory.py`` (the alias directory), ``users.py`` (user IDs),
  ``faults.py`` (injected faults), ``sender.py`` (outgoing ``/send`` per destination);
* ``files.py`` (the data directory: keys, admin token, saved rooms), ``config.py``,
  ``cli.py`` (``peekproxy testbed``).

May import: the standard library, trio, starlette, pydantic, signedjson; ``peekproxy.core``;
the federation shell (``peekproxy.federation``: client, keyring, signing key);
``peekproxy.serving``; ``peekproxy.config`` and ``peekproxy.logs`` (its config and CLI); and
two helpers of the API edge it reuses, ``peekproxy.api.errors`` (``MatrixError``,
``exception_handlers``) and ``peekproxy.api.federation_auth`` (``authenticate``,
``read_json_body``). The keyring brings the store's interface (``peekproxy.store``, no
implementation). Must not import the peek services, a store implementation or the daemon
(contract ``testbed-is-independent``); ``peekproxy.api.errors`` maps the services'
``PeekError`` and so loads ``peekproxy.services.errors`` alone (the services package's
``__init__`` imports nothing), which tests/test_import_rules.py checks at run time.
"""
