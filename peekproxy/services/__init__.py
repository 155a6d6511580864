"""The I/O services: one concern each, over the store, the federation client and the core.

* :mod:`~peekproxy.services.subscriptions`: remote subscriptions (a task per followed room),
  followed through the :class:`~peekproxy.services.following.RoomFollower` seam, whose one
  implementation today is the MSC2444 peek (:mod:`~peekproxy.services.msc2444`);
* :mod:`~peekproxy.services.directory`: room IDs and aliases resolved over federation;
* :mod:`~peekproxy.services.ingest`: inbound ``/send`` transactions and typing expiry;
* :mod:`~peekproxy.services.syncing`: device peeks, ``/sync`` long-polls, the idle reaper;
* :mod:`~peekproxy.services.missing_events`: signer keys and ``get_missing_events``;
* :mod:`~peekproxy.services.backfill`: ``/backfill`` (a new peek's first view, gap fills);
* :mod:`~peekproxy.services.reads`: history reads (``/messages`` with remote backfill,
  ``/state``, ``/event``);
* :mod:`~peekproxy.services.notifier`: wake-ups of waiting syncs;
* :mod:`~peekproxy.services.errors`: :class:`PeekError`, turned into Matrix errors by the API.

:func:`peekproxy.services.assembly.build_services` assembles them into one
:class:`~peekproxy.services.assembly.Services` record, which the daemon runs
(:meth:`~peekproxy.services.assembly.Services.run`) and the API calls. This ``__init__``
imports nothing, so that importing one light module (``services.errors``, as the API's
error handlers do) does not load every service.

May import: ``peekproxy.core``, ``peekproxy.store``, ``peekproxy.federation``,
``peekproxy.metrics`` and each other (no cycles: subscriptions ← ingest, syncing;
directory ← syncing). Must not import: ``peekproxy.api``, ``peekproxy.daemon``, HTTP servers.
"""
