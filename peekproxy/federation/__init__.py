"""The outbound federation shell: everything peekproxy needs to talk to other servers.

* :mod:`~peekproxy.federation.client`: :class:`~peekproxy.federation.client.FederationClient`,
  which sends one federation request (SSAPI §Server discovery, §Request authentication):
  resolve, filter the addresses, sign with X-Matrix, connect, read a capped answer;
* :mod:`~peekproxy.federation.discovery`: server name → targets, TLS name and ``Host``
  (well-known, SRV, addresses; DNS behind the ``DnsLookup`` interface);
* :mod:`~peekproxy.federation.transport`: the httpx transport pinned to the resolved
  addresses, verifying TLS for the name discovery chose;
* :mod:`~peekproxy.federation.ip_policy`: ``IpFilter``, the outbound IP policy
  (``federation.ip_range_blacklist`` / ``ip_range_whitelist``);
* :mod:`~peekproxy.federation.destinations`: ``Backoff``, the per-destination back-off;
* :mod:`~peekproxy.federation.keyring`: other servers' signing keys (SSAPI §Retrieving server
  keys), fetched directly or through notaries, cached and persisted in the store;
* :mod:`~peekproxy.federation.signing_key`: our signing key file and our key document;
* :mod:`~peekproxy.federation.pdu_cli`: ``peekproxy pdu check``.

The Matrix rules these use (X-Matrix headers, PDU checks, federation error values) are pure
code in :mod:`peekproxy.core`.

May import: ``peekproxy.core``, the store interface (``peekproxy.store``:
:class:`~peekproxy.store.Storage` and its row types, for the keyring's persisted keys; never an
implementation module) and, in ``pdu_cli`` only, ``peekproxy.config`` (its ``[federation]``
section). Must not import: ``peekproxy.services``, ``peekproxy.api``, ``peekproxy.daemon``,
``peekproxy.serving``.
"""
