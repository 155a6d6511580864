"""The outbound client-API shell: peekproxy talking to the homeserver it fronts.

* :mod:`~peekproxy.homeserver.client`: :class:`~peekproxy.homeserver.client.HomeserverClient`,
  one client-server API request to the fronted homeserver (``upstream.homeserver_url``), with
  the caller's access token, bounded as a whole by a timeout.

Front mode (docs/front.md) uses it to check access tokens (``whoami``), to forward ``/sync``
and the reads of rooms a device does not peek, and to follow world_readable rooms hosted on
the homeserver itself through its client API.

May import: ``peekproxy.core``. Must not import: ``peekproxy.store``, ``peekproxy.services``,
``peekproxy.api``, ``peekproxy.federation``, ``peekproxy.daemon``, ``peekproxy.serving``.
"""
