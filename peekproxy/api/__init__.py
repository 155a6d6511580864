"""HTTP edge: ASGI apps for the client, federation and metrics listeners.

Routes only route: a handler parses and authenticates its request (X-Matrix, the delegation
secret, or a client access token), calls one service method, and shapes the answer; errors
are :class:`peekproxy.api.errors.MatrixError` or a service's
:class:`peekproxy.services.errors.PeekError`, turned into Matrix error JSON by
:func:`peekproxy.api.errors.exception_handlers`.

May import: Starlette, hypercorn, httpx (``upstream_auth``), ``peekproxy.core``,
``peekproxy.services``, the federation shell's keyring and signing key, ``peekproxy.metrics``,
and the store's interface (``peekproxy.store.Storage``: ``/ready`` pings it). Must not import
a store implementation (the SQLite package under ``store/``): reads go through a service.
"""
