"""Checks a Grafana dashboard's PromQL against the series a running daemon exports.

:func:`dashboard_queries` takes every ``expr`` of a dashboard (and the metric of each
``label_values(...)`` template query); :func:`query_uses` parses one with ``promql_parser``
(Grafana's variables replaced by values PromQL accepts) and says which metric names it
selects and which labels it uses on each (``{label=...}`` matchers, and the ``by``/``without``
labels of the aggregations above a selector); :func:`problems` compares that with
:func:`exported_series` (sample name → label names, from the Prometheus text exposition).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import promql_parser
from prometheus_client.parser import text_string_to_metric_families

__all__ = [
    "TARGET_LABELS",
    "Use",
    "dashboard_queries",
    "exported_series",
    "problems",
    "query_uses",
]

#: Labels Prometheus attaches to every series it scrapes: not the daemon's to export.
TARGET_LABELS = frozenset({"instance", "job"})

#: Grafana's variables in a query, and what stands for them while parsing.
_VARIABLES = {
    "$__rate_interval": "5m",
    "$__interval": "1m",
    "$__range": "1h",
}
_VARIABLE = re.compile(r"\$\{?(\w+)(?::\w+)?\}?")
_LABEL_VALUES = re.compile(r"label_values\(\s*([a-zA-Z_:][a-zA-Z0-9_:]*)\s*,\s*(\w+)\s*\)")


@dataclass
class Use:
    """A metric selected by a query and the labels the query uses on it."""

    metric: str
    labels: set[str] = field(default_factory=set)


def dashboard_queries(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(panel title, PromQL) for every target of every panel, rows' panels included; a
    ``label_values(metric, label)`` template query gives ``metric{label=""}``."""

    def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for item in items:
            yield item
            yield from panels(item.get("panels", []))

    for panel in panels(dashboard.get("panels", [])):
        for target in panel.get("targets", []):
            if target.get("expr"):
                yield panel.get("title", "?"), target["expr"]
    for variable in dashboard.get("templating", {}).get("list", []):
        query = variable.get("query")
        text = query.get("query", "") if isinstance(query, dict) else str(query or "")
        for metric, label in _LABEL_VALUES.findall(text):
            yield f"variable {variable.get('name')}", f'{metric}{{{label}=""}}'


def _substitute(expr: str) -> str:
    for name, value in _VARIABLES.items():
        expr = expr.replace(name, value)
    return _VARIABLE.sub("x", expr)  # other variables only appear in label values


def query_uses(expr: str) -> list[Use]:
    """The metrics ``expr`` selects, each with the labels used on it.

    Raises:
        ValueError: ``expr`` is not PromQL (after Grafana's variables are replaced).
    """
    tree = promql_parser.parse(_substitute(expr))
    uses: list[Use] = []
    grouping: list[list[str]] = []  # the by/without labels of the aggregations above

    def enter(node: Any) -> None:
        if isinstance(node, promql_parser.AggregateExpr):
            modifier = node.modifier
            grouping.append(list(modifier.labels) if modifier is not None else [])
        elif isinstance(node, promql_parser.VectorSelector):
            labels = {m.name for m in node.matchers.matchers} - {"__name__"}
            for group in grouping:
                labels.update(group)
            uses.append(Use(node.name or "", labels))

    def leave(node: Any) -> None:
        if isinstance(node, promql_parser.AggregateExpr):
            grouping.pop()

    promql_parser.walk(tree, enter, leave)
    return uses


def exported_series(exposition: str) -> dict[str, set[str]]:
    """Sample name (``_total``, ``_bucket``, ``_sum``, ``_count`` ... included) → the label
    names of its series, from a Prometheus text exposition."""
    series: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            series.setdefault(sample.name, set()).update(sample.labels)
    return series


def problems(dashboard: dict[str, Any], exported: dict[str, set[str]]) -> list[str]:
    """What in ``dashboard`` does not match ``exported``: queries that do not parse, metrics
    not exported, labels a metric does not have (Prometheus' target labels allowed)."""
    found = []
    for title, expr in dashboard_queries(dashboard):
        try:
            uses = query_uses(expr)
        except ValueError as e:
            found.append(f"{title}: not PromQL ({e}): {expr}")
            continue
        if not uses:
            found.append(f"{title}: selects no metric: {expr}")
        for use in uses:
            if use.metric not in exported:
                found.append(f"{title}: {use.metric} is not exported")
                continue
            unknown = use.labels - exported[use.metric] - TARGET_LABELS
            if unknown:
                found.append(f"{title}: {use.metric} has no label {', '.join(sorted(unknown))}")
    return found
