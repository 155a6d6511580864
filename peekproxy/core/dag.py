"""Topological order of events: by ``prev_events`` (the room DAG), for appending a batch of
events each after its parents; and by any references (:func:`topological_order`: receipt
checks judge each event after the events it cites). Pure."""

from __future__ import annotations

import graphlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from peekproxy.core.events import event_refs

__all__ = ["dag_order", "topological_order"]


def topological_order(
    events: Mapping[str, Mapping[str, Any]], refs: Callable[[Mapping[str, Any]], Iterable[str]]
) -> list[str]:
    """The IDs of ``events`` (event ID → PDU), each after those of ``events`` that its
    ``refs(pdu)`` name; among events ready together, lower ``depth`` first, then as given.
    A cycle (only forged events make one) falls back to that order alone."""
    index = {event_id: i for i, event_id in enumerate(events)}

    def key(event_id: str) -> tuple[int, int]:
        depth = events[event_id].get("depth")
        return (depth if isinstance(depth, int) else 0, index[event_id])

    sorter: graphlib.TopologicalSorter[str] = graphlib.TopologicalSorter()
    for event_id, pdu in events.items():
        sorter.add(event_id, *(r for r in refs(pdu) if r in events and r != event_id))
    try:
        sorter.prepare()
    except graphlib.CycleError:
        return sorted(events, key=key)
    ordered: list[str] = []
    while sorter.is_active():
        ready = sorted(sorter.get_ready(), key=key)
        ordered.extend(ready)
        sorter.done(*ready)
    return ordered


def dag_order(
    events: Sequence[tuple[str, Mapping[str, Any], bool]],
) -> list[tuple[str, Mapping[str, Any], bool]]:
    """``events`` sorted topologically by ``prev_events`` (parents first; among events
    ready together, lower ``depth`` first, then as given). Duplicates are dropped."""
    by_id: dict[str, tuple[str, Mapping[str, Any], bool]] = {}
    for item in events:
        by_id.setdefault(item[0], item)
    pdus = {event_id: item[1] for event_id, item in by_id.items()}
    return [by_id[e] for e in topological_order(pdus, lambda p: event_refs(p.get("prev_events")))]
