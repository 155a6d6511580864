"""Topological order of events by ``prev_events`` (the room DAG), for appending a batch of
events each after its parents. Pure."""

from __future__ import annotations

import graphlib
from collections.abc import Mapping, Sequence
from typing import Any

from peekproxy.core.events import event_refs

__all__ = ["dag_order"]


def dag_order(
    events: Sequence[tuple[str, Mapping[str, Any], bool]],
) -> list[tuple[str, Mapping[str, Any], bool]]:
    """``events`` sorted topologically by ``prev_events`` (parents first; among events
    ready together, lower ``depth`` first, then as given). Duplicates are dropped."""
    by_id: dict[str, tuple[int, tuple[str, Mapping[str, Any], bool]]] = {}
    for index, item in enumerate(events):
        by_id.setdefault(item[0], (index, item))
    sorter: graphlib.TopologicalSorter[str] = graphlib.TopologicalSorter()
    for event_id, (_, (_, pdu, _)) in by_id.items():
        sorter.add(event_id, *(p for p in event_refs(pdu.get("prev_events")) if p in by_id))
    try:
        sorter.prepare()
    except graphlib.CycleError:  # only forged events make a cycle: fall back to depth
        return [item for _, item in sorted(by_id.values(), key=lambda v: _depth_key(*v))]
    ordered: list[tuple[str, Mapping[str, Any], bool]] = []
    while sorter.is_active():
        ready = sorted(sorter.get_ready(), key=lambda e: _depth_key(*by_id[e]))
        ordered.extend(by_id[e][1] for e in ready)
        sorter.done(*ready)
    return ordered


def _depth_key(index: int, item: tuple[str, Mapping[str, Any], bool]) -> tuple[int, int]:
    depth = item[1].get("depth")
    return (depth if isinstance(depth, int) else 0, index)
