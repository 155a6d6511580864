"""The Grafana dashboard (contrib/grafana/peekproxy.json) is importable as shipped, and the
checker that compares its queries with a daemon's series (tests/dashboard_check.py; run
against a real daemon in tests/test_metrics_e2e.py) catches typos. No process is started."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from tests.dashboard_check import dashboard_queries, exported_series, problems, query_uses

DASHBOARD = Path(__file__).resolve().parent.parent / "contrib" / "grafana" / "peekproxy.json"

EXPOSITION = """\
# HELP peekproxy_send_pdus_total PDUs
# TYPE peekproxy_send_pdus_total counter
peekproxy_send_pdus_total{outcome="stored"} 3.0
# HELP peekproxy_wake_latency_seconds wake
# TYPE peekproxy_wake_latency_seconds histogram
peekproxy_wake_latency_seconds_bucket{le="0.01"} 1.0
peekproxy_wake_latency_seconds_bucket{le="+Inf"} 1.0
peekproxy_wake_latency_seconds_count 1.0
peekproxy_wake_latency_seconds_sum 0.004
"""


def load() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return dashboard


def test_dashboard_is_importable() -> None:
    dashboard = load()
    # The data source is chosen on import (an input), and every panel and target uses it.
    assert [i["name"] for i in dashboard["__inputs"]] == ["DS_PROMETHEUS"]
    rows = [p["title"] for p in dashboard["panels"] if p["type"] == "row"]
    assert rows == [
        "Traffic",
        "Subscriptions",
        "Devices",
        "Federation in (/send)",
        "Federation out",
        "Long-polls and wake latency",
        "Store latency",
        "Errors",
    ]
    graphs = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    for panel in graphs:
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}"
    queries = list(dashboard_queries(dashboard))
    assert len(queries) >= 30
    for title, expr in queries:
        assert query_uses(expr), f"{title}: {expr}"  # parses, and selects a metric


def test_query_uses_reads_matchers_and_grouping() -> None:
    [use] = query_uses(
        "histogram_quantile(0.99, sum by (le, kind) (rate(peekproxy_store_operation_duration_"
        'seconds_bucket{instance=~"$instance", operation!="x"}[$__rate_interval])))'
    )
    assert use.metric == "peekproxy_store_operation_duration_seconds_bucket"
    assert use.labels == {"le", "kind", "instance", "operation"}
    uses = query_uses("sum(rate(a_total[5m])) / clamp_min(sum without (x) (b), 1)")
    assert [(u.metric, u.labels) for u in uses] == [("a_total", set()), ("b", {"x"})]


def _with_expr(expr: str) -> dict[str, Any]:
    dashboard = copy.deepcopy(load())
    dashboard["panels"] = [{"type": "timeseries", "title": "T", "targets": [{"expr": expr}]}]
    dashboard["templating"] = {"list": []}
    return dashboard


@pytest.mark.parametrize(
    ("expr", "problem"),
    [
        ('sum by (outcome) (rate(peekproxy_send_pdus_total{instance=~"$instance"}[5m]))', None),
        (
            "histogram_quantile(0.5, sum by (le) "
            "(rate(peekproxy_wake_latency_seconds_bucket[5m])))",
            None,
        ),
        # A typo in a metric name, a label, a grouping label, a histogram suffix:
        ("sum(rate(peekproxy_send_pdu_total[5m]))", "peekproxy_send_pdu_total is not exported"),
        ("peekproxy_send_pdus_total{outcom='stored'}", "has no label outcom"),
        ("sum by (result) (peekproxy_send_pdus_total)", "has no label result"),
        ("peekproxy_wake_latency_seconds_buckets", "is not exported"),
        ("peekproxy_wake_latency_seconds", "is not exported"),  # a histogram's base name
        ("sum(rate(peekproxy_send_pdus_total[5m]", "not PromQL"),
    ],
)
def test_problems_catch_typos(expr: str, problem: str | None) -> None:
    found = problems(_with_expr(expr), exported_series(EXPOSITION))
    if problem is None:
        assert found == []
    else:
        assert len(found) == 1 and problem in found[0], found


def test_template_variable_metric_is_checked() -> None:
    dashboard = _with_expr("peekproxy_send_pdus_total")
    dashboard["templating"] = {
        "list": [{"name": "instance", "query": {"query": "label_values(peekproxy_nope, instance)"}}]
    }
    assert problems(dashboard, exported_series(EXPOSITION)) == [
        "variable instance: peekproxy_nope is not exported"
    ]
