"""deploy/grafana/nextbest.json: it loads, has the dashboard fields Grafana reads
(schemaVersion, panels with type, gridPos, targets and a Prometheus datasource
reference through the `datasource` variable), and every metric its PromQL names is one
the API or the stream actually exports: both are scraped live (the API's /metrics and
a real stream process's endpoint)."""

import json
import re
from typing import Any

import httpx
import pytest
from litestar.testing import TestClient
from prometheus_client.parser import text_string_to_metric_families

from nextbest.settings import Settings
from nextbest.spec.loader import load_spec
from pipelines.metrics import stream_endpoints
from serving.app import create_app
from storage.bootstrap import init_stores
from tests.support.common import ROOT
from tests.support.stream_helpers import start_stream
from tests.support.waiting import wait_until

DASHBOARD = ROOT / "deploy" / "grafana" / "nextbest.json"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
PANEL_TYPES = {"timeseries", "stat", "row"}
SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "gauge": ("",),
}
PROMQL_WORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan", "le"}


def load() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def exprs(dashboard: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def metric_names(expr: str) -> set[str]:
    """The series names a PromQL expression selects (not functions, labels, keywords)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # label values
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # range selectors
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    text = re.sub(r"\b\d+(\.\d+)?([eE][-+]?\d+)?\b", "0", text)  # numbers like 1e-9
    names = set()
    for match in re.finditer(r"[a-zA-Z_:][a-zA-Z0-9_:]*", text):
        if text[match.end() :].lstrip().startswith("("):
            continue  # a function or an aggregation
        if match.group(0).lower() not in PROMQL_WORDS:
            names.add(match.group(0))
    return names


def exported(text: str) -> set[str]:
    """Series names an exposition offers, labelled families without samples included."""
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.update(family.name + s for s in SUFFIXES.get(family.type, ("",)))
        names.update(s.name for s in family.samples)
    return names


def test_the_dashboard_has_the_schema_fields_grafana_reads() -> None:
    dashboard = load()
    assert dashboard["title"] and dashboard["uid"]
    assert isinstance(dashboard["schemaVersion"], int) and dashboard["schemaVersion"] >= 30
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)) and all(isinstance(i, int) for i in ids)
    for panel in dashboard["panels"]:
        assert panel["type"] in PANEL_TYPES, panel["title"]
        grid = panel["gridPos"]
        assert all(isinstance(grid[k], int) for k in ("h", "w", "x", "y")), panel["title"]
        assert grid["w"] > 0 and grid["h"] > 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["targets"], panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE and target["expr"].strip(), panel["title"]
    # The panels the dashboard is for.
    names = set().union(*map(metric_names, exprs(dashboard)))
    for wanted in (
        "nextbest_http_request_duration_seconds_bucket",  # decide latency p50/p99
        "nextbest_decision_fallbacks_total",
        "nextbest_events_accepted_total",
        "nextbest_events_rejected_total",
        "nextbest_stream_lag_records",
        "nextbest_stream_epoch_duration_seconds_bucket",
        "nextbest_stream_dead_letters_written_total",
    ):
        assert wanted in names, wanted


def test_metric_names_are_read_from_promql() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le) (rate(a_bucket{route="/v1/x", s=~"5.."}[5m])))'
        " / clamp_min(sum(rate(b_total[$__rate_interval])), 1e-9) - time() + c"
    )
    assert metric_names(expr) == {"a_bucket", "b_total", "c"}


@pytest.mark.slow
def test_every_metric_the_dashboard_uses_is_exported(settings: Settings) -> None:
    spec = load_spec(settings.spec)
    list(init_stores(settings, spec))
    with TestClient(app=create_app(settings, spec=spec, require_keys=False)) as client:
        api = exported(client.get("/metrics").text)
    proc = start_stream(settings)
    try:

        def endpoint() -> str | None:
            assert proc.poll() is None, (settings.home_dir / "logs" / "stream.log").read_text()
            found = stream_endpoints(settings)
            return str(found[0]["url"]) if found else None

        url = wait_until(endpoint, timeout=60, what="the stream's metrics endpoint", every=0.2)
        stream = exported(httpx.get(url, timeout=5).text)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    used = set().union(*map(metric_names, exprs(load())))
    assert all(name.startswith("nextbest_") for name in used), sorted(used)
    assert not used - (api | stream), sorted(used - (api | stream))
    assert used & api and used & stream  # the dashboard covers both
    assert not api & stream, sorted(api & stream)  # one name, one meaning: no query sums both
