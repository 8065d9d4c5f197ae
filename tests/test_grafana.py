"""The Grafana dashboard, packaging/grafana/vmtide.json.

Grafana itself is not installed here, so the JSON is checked twice: for its
structure (panels, targets, the datasource and guest variables, unique ids, a
layout without overlaps, only metrics vmtide defines), and for its queries: every
panel's PromQL, with the dashboard's variables filled in as Grafana would, runs
against a real Prometheus scraping a real agent and broker (tests/prom_helpers.py)
whose simulated guest has just grown, and each query must be valid and return
series for that guest.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prom_helpers import (
    IDLE,
    SCRAPED_SECONDS,
    MiB,
    Stack,
    StackConfig,
    http_get,
    populated_agent_metrics,
    promql,
    promql_range,
    running_prometheus,
    running_stack,
    tool,
    wait_for,
)
from prometheus_client import CollectorRegistry

from broker.metrics import BrokerMetrics
from vmtide.fakesys import Load

REPO = Path(__file__).resolve().parent.parent
DASHBOARD = REPO / "packaging" / "grafana" / "vmtide.json"
GRID_COLUMNS = 24  # Grafana's grid
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
# What Grafana puts for $__rate_interval with a 1 s scrape interval and a short
# range is a few seconds; a minute holds enough scrapes for every rate here.
RATE_INTERVAL = "1m"
# The guest grows soon after its load rises (a policy cycle, a grant, a hot-plug).
GROW_SECONDS = 60.0
BUSY = Load(cpus=2.6, memory_bytes=600 * MiB)  # more than its 2 boot CPUs
BUSY_AFTER_SECONDS = 2.0


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def all_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from all_panels(panel.get("panels", []))  # a collapsed row holds its own


def query_panels() -> list[dict[str, Any]]:
    return [p for p in all_panels(dashboard()["panels"]) if p["type"] != "row"]


@dataclass(frozen=True)
class Query:
    panel: str
    ref: str
    expr: str  # as in the dashboard

    @property
    def id(self) -> str:
        return f"{self.panel} [{self.ref}]"

    def filled(self, guest: str) -> str:
        """The expression as Grafana sends it: variables replaced."""
        expr = self.expr.replace("$__rate_interval", RATE_INTERVAL).replace("$guest", guest)
        assert "$" not in expr, f"{self.id}: a variable this test does not fill: {expr}"
        return expr


QUERIES = [
    Query(panel["title"], target["refId"], target["expr"])
    for panel in query_panels()
    for target in panel["targets"]
]


# ---------------------------------------------------------------- structure


def test_dashboard_identity_and_variables() -> None:
    data = dashboard()
    assert data["title"] and data["uid"] and data["schemaVersion"] >= 36
    variables = {v["name"]: v for v in data["templating"]["list"]}
    assert set(variables) == {"datasource", "guest"}
    datasource = variables["datasource"]
    assert datasource["type"] == "datasource" and datasource["query"] == "prometheus"
    guest = variables["guest"]
    assert guest["type"] == "query" and guest["datasource"] == DATASOURCE
    assert guest["multi"] and guest["includeAll"]
    assert guest["query"]["query"] == guest["definition"]
    assert guest["definition"] == "label_values(vmtide_broker_guest_connected, guest)"
    rows = [p for p in all_panels(data["panels"]) if p["type"] == "row"]
    assert [r.get("repeat") for r in rows].count("guest") == 1  # one row per guest


def test_panels_have_unique_ids_targets_and_the_datasource_variable() -> None:
    panels = list(all_panels(dashboard()["panels"]))
    ids = [p["id"] for p in panels]
    assert all(isinstance(i, int) for i in ids) and len(ids) == len(set(ids)), ids
    assert all(p["type"] in {"row", "timeseries", "stat"} for p in panels)
    for panel in query_panels():
        name = panel["title"]
        assert panel["datasource"] == DATASOURCE, name
        assert panel.get("description"), f"{name}: no description"
        targets = panel["targets"]
        assert targets, f"{name}: no targets"
        refs = [t["refId"] for t in targets]
        assert len(refs) == len(set(refs)), f"{name}: duplicate refIds {refs}"
        for target in targets:
            assert target["datasource"] == DATASOURCE, name
            assert target["expr"].strip(), name
            assert "legendFormat" in target, name


def test_layout_fits_the_grid_without_overlaps() -> None:
    boxes = []
    for panel in all_panels(dashboard()["panels"]):
        grid = panel["gridPos"]
        x, y, w, h = grid["x"], grid["y"], grid["w"], grid["h"]
        assert x >= 0 and w > 0 and x + w <= GRID_COLUMNS and y >= 0 and h > 0, panel["title"]
        boxes.append((panel["title"], x, y, w, h))
    for i, (name, x, y, w, h) in enumerate(boxes):
        for other, ox, oy, ow, oh in boxes[i + 1 :]:
            overlap = x < ox + ow and ox < x + w and y < oy + oh and oy < y + h
            assert not overlap, f"{name!r} overlaps {other!r}"


def defined_series(tmp_path: Path) -> set[str]:
    """Every series name the agent and the broker can expose."""
    agent_registry, broker_registry = CollectorRegistry(), CollectorRegistry()
    populated_agent_metrics(agent_registry, tmp_path / "guest")
    BrokerMetrics(broker_registry)
    suffixes = {
        "counter": ("_total",),
        "histogram": ("_bucket", "_count", "_sum"),
        "gauge": ("",),
    }
    return {
        family.name + suffix
        for registry in (agent_registry, broker_registry)
        for family in registry.collect()
        for suffix in suffixes[family.type]
    }


def test_queries_name_only_metrics_vmtide_defines(tmp_path: Path) -> None:
    defined = defined_series(tmp_path)
    used = {name for q in QUERIES for name in re.findall(r"\bvmtide_\w+", q.expr)}
    variables = dashboard()["templating"]["list"]
    used |= {
        name for v in variables for name in re.findall(r"\bvmtide_\w+", v.get("definition", ""))
    }
    assert used - defined == set(), "not defined by agent/metrics.py or broker/metrics.py"
    # Every resource the dashboard promises shows: pressure, pool, resize events,
    # demand against limits.
    for name in (
        "vmtide_agent_pressure_ratio",
        "vmtide_broker_pool_allocated",
        "vmtide_broker_pool_capacity",
        "vmtide_broker_grants_total",
        "vmtide_broker_reclaims_total",
        "vmtide_broker_failures_total",
        "vmtide_agent_target_cpus",
        "vmtide_agent_target_memory_bytes",
        "vmtide_agent_limit_cpus",
        "vmtide_agent_limit_memory_bytes",
    ):
        assert name in used, name


def test_the_limits_show_beside_online_and_demand() -> None:
    """Each resource's panel draws its limits with what is online and what the policy wants."""
    for metric, unit in (("cpus", "short"), ("memory_bytes", "bytes")):
        panels = [
            p
            for p in query_panels()
            if any(f"vmtide_agent_limit_{metric}" in t["expr"] for t in p["targets"])
        ]
        assert len(panels) == 1, (metric, [p["title"] for p in panels])
        (panel,) = panels
        exprs = " ".join(t["expr"] for t in panel["targets"])
        assert f"vmtide_agent_target_{metric}" in exprs, panel["title"]
        assert 'state="online"' in exprs, panel["title"]
        assert panel["fieldConfig"]["defaults"]["unit"] == unit, panel["title"]
        (limits,) = (t for t in panel["targets"] if "vmtide_agent_limit" in t["expr"])
        # One line per bound, each with its own style.
        styled = {o["matcher"]["options"] for o in panel["fieldConfig"]["overrides"]}
        for bound in ("minimum", "maximum", "burst"):
            assert limits["legendFormat"].replace("{{bound}}", bound) in styled, bound


# ------------------------------------------------------------- live queries


def load(seconds: float) -> Load:
    return IDLE if seconds < BUSY_AFTER_SECONDS else BUSY


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tool("prometheus")
    with running_stack(tmp_path_factory.mktemp("stack"), StackConfig(load=load)) as result:
        yield result


@pytest.fixture(scope="module")
def prometheus(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Scraping the agent labelled with its guest id, as docs/metrics.md says to, once the
    guest has grown (so the grow-latency histogram has series) and rates have data."""
    with running_prometheus(
        tmp_path_factory.mktemp("prometheus"), stack, agent_labels={"guest": stack.guest_id}
    ) as base:
        wait_for(
            lambda: promql(base, 'vmtide_agent_grow_latency_seconds_count{resource="cpus"}'),
            lambda got: len(got) == 1,
            GROW_SECONDS,
            "the guest to grow a CPU",
        )
        wait_for(  # rate() needs two samples of each target in its window
            lambda: promql(base, f"count_over_time(up[{RATE_INTERVAL}]) >= 3"),
            lambda got: len(got) == 2,
            SCRAPED_SECONDS,
            "three scrapes of both daemons",
        )
        yield base


def test_the_guest_variable_lists_the_guest(stack: Stack, prometheus: str) -> None:
    # label_values(metric, label), as Grafana asks Prometheus for it.
    reply = json.loads(
        http_get(f"{prometheus}/api/v1/label/guest/values?match[]=vmtide_broker_guest_connected")
    )
    assert reply["data"] == [stack.guest_id]


@pytest.mark.parametrize("query", QUERIES, ids=lambda q: q.id)
def test_every_query_is_valid_and_returns_the_guests_series(
    stack: Stack, prometheus: str, query: Query
) -> None:
    expr = query.filled(stack.guest_id)
    instant = promql(prometheus, expr)  # asserts Prometheus accepted it
    assert instant, f"{query.id}: no series for {expr}"
    if "$guest" in query.expr:  # the variable selects this guest's series
        assert all(s["metric"].get("guest") == stack.guest_id for s in instant), instant
    found = [float(s["value"][1]) for s in instant]
    # histogram_quantile is NaN until a second grow lands inside the window.
    if "histogram_quantile" not in expr:
        assert all(math.isfinite(v) for v in found), f"{query.id}: {found}"
    # Grafana runs a range query: the same expression over the last minute.
    end = float(
        json.loads(http_get(f"{prometheus}/api/v1/query?query=time()"))["data"]["result"][1]
    )
    ranged = promql_range(prometheus, expr, end - 60, end, 5)
    assert ranged, f"{query.id}: no series over the last minute"
