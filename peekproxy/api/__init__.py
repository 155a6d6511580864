"""HTTP edge: ASGI apps for the client, federation and metrics listeners.

Routes only route: a handler parses and authenticates its request (X-Matrix, the delegation
secret, or a client access token), calls one service method, and shapes the answer; errors
are :class:`peekproxy.api.errors.MatrixError` or a service's
:class:`peekproxy.services.errors.PeekError`, turned into Matrix error JSON by
:func:`peekproxy.api.errors.exception_handlers`.

May import: Starlette, hypercorn, httpx (``upstream_auth``), ``peekproxy.core``,
``peekproxy.services`` (and, until the peek services are split, ``peekproxy.peeks``), the
federation shell's keyring and signing key, ``peekproxy.metrics``. Must not reach the store's
tables itself: reads go through a service.
"""
