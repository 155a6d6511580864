"""I/O services, one concern each: the logic between the API and the store.

A service holds the logic of one concern (history reads; remote subscriptions, ``/send``
ingest and device syncing come here too) and knows no HTTP: it takes typed values, reads and
writes through the store, asks remote servers through the federation shell, and raises
:class:`peekproxy.services.errors.PeekError` for what the client should be told.

May import: the standard library, ``trio``, ``peekproxy.core``, ``peekproxy.store``,
``peekproxy.federation``, ``peekproxy.metrics`` and other ``peekproxy.services`` modules.
Must not import: ``peekproxy.api`` (the API calls services, never the other way), Starlette,
hypercorn.
"""
