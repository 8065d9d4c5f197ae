"""Real Prometheus against the real daemons: the exposition passes `promtool check
metrics`, a real Prometheus server scrapes a running agent (its own process, on a
simulated guest) and broker and answers the queries docs/metrics.md promises with
the guest's true numbers, and the alerting rules pass `promtool check rules`, their
unit tests, and load and evaluate cleanly in the live server.

Debian's `prometheus` package ships both binaries (.ci/run installs it); without
them these tests skip. docs/metrics.md must list exactly the metrics the code
defines: that check needs no Prometheus.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prom_helpers import (
    EXAMPLE_LIMITS,
    SCRAPED_SECONDS,
    GiB,
    Stack,
    StackConfig,
    example_decisions,
    http_get,
    populated_agent_metrics,
    promql,
    running_prometheus,
    running_stack,
    samples,
    settled,
    tool,
    values,
    wait_for,
)
from prometheus_client import CollectorRegistry, generate_latest

from agent.kernel import Action, ItemResult, Kind, Outcome
from agent.metrics import AgentMetrics
from broker.metrics import BrokerMetrics

REPO = Path(__file__).resolve().parent.parent
RULES = REPO / "packaging" / "prometheus" / "vmtide.rules.yml"
RULES_TESTS = REPO / "packaging" / "prometheus" / "vmtide.rules.test.yml"
METRICS_DOC = REPO / "docs" / "metrics.md"

# The simulated guest (tests/prom_helpers.py): 2 of 4 possible CPUs and 8 blocks
# of 128 MiB online, a light load, nothing changes size while the tests look.
CONFIG = StackConfig()
POSSIBLE_CPUS = CONFIG.possible_cpus
BOOT_CPUS = CONFIG.boot_cpus
BOOT_BLOCKS = CONFIG.boot_blocks
BLOCK_SIZE = CONFIG.block_size
POOL_CPUS = CONFIG.pool_cpus
POOL_MEMORY = CONFIG.pool_memory
# Both agent.toml and broker.toml (tests/prom_helpers.py): minimum 1 CPU and
# 1 GiB, maximum every possible CPU and max_memory, no burst.
LIMIT_CPUS = {"minimum": 1, "maximum": POSSIBLE_CPUS, "burst": POSSIBLE_CPUS}
LIMIT_MEMORY = {"minimum": 1 * GiB, "maximum": CONFIG.max_memory, "burst": CONFIG.max_memory}
# The agent's one vocabulary for `resource` (docs/metrics.md); io only for PSI.
AGENT_RESOURCES = {"cpus", "memory", "io"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tool("promtool")  # no point in starting daemons nobody checks
    with running_stack(tmp_path_factory.mktemp("prom"), CONFIG) as result:
        yield result


@pytest.fixture(scope="module")
def prometheus(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Prometheus scraping the stack every second with vmtide's rules; its base URL."""
    with running_prometheus(tmp_path_factory.mktemp("prometheus"), stack, rules=RULES) as base:
        yield base


# ---------------------------------------------------------------------- tests


@pytest.mark.parametrize("daemon", ["agent", "broker"])
def test_promtool_check_metrics_passes_on_the_live_exposition(stack: Stack, daemon: str) -> None:
    address = stack.agent_address if daemon == "agent" else stack.broker_address
    text = stack.exposition(address)
    assert f"vmtide_{daemon}_" in text
    result = subprocess.run(
        [tool("promtool"), "check", "metrics"],
        input=text,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "", result.stdout


def test_promtool_check_rules() -> None:
    result = subprocess.run(
        [tool("promtool"), "check", "rules", str(RULES)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_rule_unit_tests() -> None:
    result = subprocess.run(
        [tool("promtool"), "test", "rules", RULES_TESTS.name],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        cwd=RULES_TESTS.parent,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_prometheus_sees_the_guest_as_it_is(stack: Stack, prometheus: str) -> None:
    guest = stack.guest
    online_cpus = len(guest.online_cpus())
    assert online_cpus == BOOT_CPUS
    # The agent's view of the guest.
    settled(prometheus, 'vmtide_agent_cpus{state="online"}', online_cpus)
    settled(prometheus, 'vmtide_agent_cpus{state="present"}', len(guest.present_cpus()))
    settled(prometheus, 'vmtide_agent_cpus{state="possible"}', POSSIBLE_CPUS)
    settled(prometheus, 'vmtide_agent_cpus{state="standby"}', 0)
    settled(
        prometheus,
        'sum(vmtide_agent_memory_bytes{state="online"})',
        guest.online_memory_bytes(),
    )
    settled(
        prometheus,
        'vmtide_agent_memory_bytes{state="online", zone="kernel"}',
        BOOT_BLOCKS * BLOCK_SIZE,
    )
    settled(prometheus, "vmtide_agent_memory_block_size_bytes", BLOCK_SIZE)
    settled(prometheus, "vmtide_agent_broker_connected", 1)
    assert values(promql(prometheus, "vmtide_agent_broker_sessions_total")) == [1.0]
    ok_cycles = wait_for(
        lambda: values(promql(prometheus, 'vmtide_agent_sensing_cycles_total{result="ok"}')),
        lambda got: len(got) == 1 and got[0] > 0,
        SCRAPED_SECONDS,
        "successful sensing cycles",
    )
    assert ok_cycles[0] > 0
    # Light load on 2 CPUs and 1 GiB: the policy wants no more than it has, and
    # no less than its minimum.
    cpu_target = values(promql(prometheus, "vmtide_agent_target_cpus"))
    assert len(cpu_target) == 1 and 1 <= cpu_target[0] <= online_cpus, cpu_target
    memory_target = values(promql(prometheus, "vmtide_agent_target_memory_bytes"))
    assert len(memory_target) == 1, memory_target
    assert 1 * GiB <= memory_target[0] <= guest.online_memory_bytes(), memory_target
    available = values(promql(prometheus, "vmtide_agent_memory_available_bytes"))
    assert len(available) == 1 and 0 < available[0] < guest.online_memory_bytes(), available
    busy = values(promql(prometheus, "vmtide_agent_cpu_busy_cpus"))
    assert len(busy) == 1 and 0 <= busy[0] <= online_cpus, busy
    pressure = values(promql(prometheus, "vmtide_agent_pressure_ratio"))
    assert len(pressure) == 5 and all(0 <= p <= 1 for p in pressure), pressure
    # The limits the policy works within: the configured ones, which the broker's equal.
    for bound, expected in LIMIT_CPUS.items():
        settled(prometheus, f'vmtide_agent_limit_cpus{{bound="{bound}"}}', expected)
    for bound, expected in LIMIT_MEMORY.items():
        settled(prometheus, f'vmtide_agent_limit_memory_bytes{{bound="{bound}"}}', expected)

    # The broker's view of the same guest and of its pool.
    settled(prometheus, 'vmtide_broker_guest_connected{guest="g1"}', 1)
    settled(prometheus, 'vmtide_broker_guest_online_cpus{guest="g1"}', online_cpus)
    settled(
        prometheus,
        'vmtide_broker_guest_online_memory_bytes{guest="g1"}',
        guest.online_memory_bytes(),
    )
    settled(prometheus, 'vmtide_broker_pool_capacity{resource="cpus"}', POOL_CPUS)
    settled(prometheus, 'vmtide_broker_pool_capacity{resource="memory_bytes"}', POOL_MEMORY)
    for resource in ("cpus", "memory_bytes"):
        allocated = values(
            promql(prometheus, f'vmtide_broker_pool_allocated{{resource="{resource}"}}')
        )
        capacity = POOL_CPUS if resource == "cpus" else POOL_MEMORY
        online = online_cpus if resource == "cpus" else guest.online_memory_bytes()
        # The one guest holds at least what it has online, the pool no more than it has.
        assert len(allocated) == 1 and online <= allocated[0] <= capacity, (resource, allocated)

    # Agent and broker agree, across the two jobs.
    settled(
        prometheus,
        'vmtide_agent_cpus{state="online"} - on() vmtide_broker_guest_online_cpus{guest="g1"}',
        0,
    )


def alert_expr(name: str) -> str:
    """An alert's expression as vmtide.rules.yml has it."""
    match = re.search(rf"- alert: {name}\n +expr: \|\n(.*?)\n +for: ", RULES.read_text(), re.DOTALL)
    assert match, name
    return match.group(1)


def loosened(expr: str, replacements: list[tuple[str, str]]) -> str:
    """The expression with its thresholds turned so that a healthy guest meets them."""
    for old, new in replacements:
        assert re.search(old, expr), (old, expr)
        expr = re.sub(old, new, expr)
    return expr


def test_rule_expressions_match_the_real_label_sets(stack: Stack, prometheus: str) -> None:
    """The joins in vmtide.rules.yml pair real series (a mismatch would silently never fire).

    Each alert's own expression runs against the live agent with its thresholds
    turned so that the idle guest meets them: every join must then return the
    guest's series, one per resource, with the resource named."""
    online_cpus, online_memory = len(stack.guest.online_cpus()), stack.guest.online_memory_bytes()
    cases: list[tuple[str, list[tuple[str, str]]]] = [
        # At its minimum instead of its maximum, and stalling at any PSI.
        (
            "VmtideGuestAtMaximum",
            [
                (r'\{bound="maximum"\}', '{bound="minimum"}'),
                (r">= 0\.10\)", ">= 0)"),
                (r">= 0\.05\)", ">= 0)"),
            ],
        ),
        # Wanting no more than it has instead of more: the light load.
        (
            "VmtideGuestGrowthStalled",
            [
                (r"(vmtide_agent_target_cpus\s+)>", r"\1<="),
                (r"(vmtide_agent_target_memory_bytes\s+)>", r"\1<="),
            ],
        ),
    ]
    for alert, replacements in cases:
        expr = loosened(alert_expr(alert), replacements)
        result = promql(prometheus, expr)
        by_resource = {item["metric"].get("resource"): item for item in result}
        assert sorted(by_resource) == ["cpus", "memory"], (alert, result)
        for item in result:
            labels = item["metric"]
            assert labels["job"] == "vmtide-agent" and labels["instance"] == stack.agent_address
        # The value is the target, which the annotations print.
        cpus, memory = (float(by_resource[r]["value"][1]) for r in ("cpus", "memory"))
        assert 1 <= cpus <= online_cpus, (alert, cpus)
        assert 1 * GiB <= memory <= online_memory, (alert, memory)
    pool = promql(prometheus, "vmtide_broker_pool_allocated <= vmtide_broker_pool_capacity")
    assert sorted(item["metric"]["resource"] for item in pool) == ["cpus", "memory_bytes"], pool


def test_rules_load_and_evaluate_in_prometheus(stack: Stack, prometheus: str) -> None:
    def rules() -> list[dict[str, Any]]:
        reply: dict[str, Any] = json.loads(http_get(f"{prometheus}/api/v1/rules"))
        return [rule for group in reply["data"]["groups"] for rule in group["rules"]]

    evaluated = wait_for(
        rules,
        lambda got: bool(got) and all(r["health"] == "ok" for r in got),
        SCRAPED_SECONDS,
        "every rule evaluated without error",
    )
    names = {rule["name"] for rule in evaluated}
    assert names == set(re.findall(r"^ *- alert: (\w+)$", RULES.read_text(), re.MULTILINE))
    # A healthy guest and broker: nothing is even pending.
    alerts = json.loads(http_get(f"{prometheus}/api/v1/alerts"))["data"]["alerts"]
    assert alerts == [], alerts


def documented_metrics() -> set[str]:
    """Names in the first column of docs/metrics.md's tables."""
    return set(re.findall(r"^\| `(vmtide_\w+)`", METRICS_DOC.read_text(), re.MULTILINE))


def exposed_name(name: str, kind: str) -> str:
    return f"{name}_total" if kind == "counter" else name


def test_docs_list_every_metric_and_no_other(tmp_path: Path) -> None:
    agent_registry, broker_registry = CollectorRegistry(), CollectorRegistry()
    populated_agent_metrics(agent_registry, tmp_path / "guest")
    BrokerMetrics(broker_registry)
    defined = {
        exposed_name(family.name, family.type)
        for registry in (agent_registry, broker_registry)
        for family in registry.collect()
    }
    assert "vmtide_agent_cpus" in defined and "vmtide_broker_pool_capacity" in defined
    documented = documented_metrics()
    assert documented - defined == set(), "documented but not defined"
    assert defined - documented == set(), "defined but not in docs/metrics.md"


# ------------------------------------------------- the agent's metrics, unit by unit


def test_targets_and_limits_are_one_unit_each(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    metrics = populated_agent_metrics(registry, tmp_path / "guest")
    metrics.observe_decisions(example_decisions(3, 1536 * 1024 * 1024))
    found = samples(generate_latest(registry).decode())
    assert found["vmtide_agent_target_cpus"] == 3
    assert found["vmtide_agent_target_memory_bytes"] == 1536 * 1024 * 1024
    for bound in ("minimum", "maximum", "burst"):
        cpus, memory = getattr(EXAMPLE_LIMITS.cpus, bound), getattr(EXAMPLE_LIMITS.memory, bound)
        assert found[f'vmtide_agent_limit_cpus{{bound="{bound}"}}'] == cpus
        assert found[f'vmtide_agent_limit_memory_bytes{{bound="{bound}"}}'] == memory
    assert not any(name.startswith("vmtide_agent_target{") for name in found)


def test_no_target_before_a_decision_and_no_limits_before_the_agent() -> None:
    """A target or limit of 0 would be a lie (and could fire an alert): no series instead."""
    registry = CollectorRegistry()
    holder: list[object] = []
    AgentMetrics(registry, limits=lambda: EXAMPLE_LIMITS if holder else None)
    names = {name.split("{")[0] for name in samples(generate_latest(registry).decode())}
    assert not {n for n in names if n.startswith(("vmtide_agent_target", "vmtide_agent_limit"))}
    holder.append(object())  # the agent exists: its limits are known
    names = {name.split("{")[0] for name in samples(generate_latest(registry).decode())}
    assert {"vmtide_agent_limit_cpus", "vmtide_agent_limit_memory_bytes"} <= names


def test_every_resource_label_speaks_one_vocabulary(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    metrics = populated_agent_metrics(registry, tmp_path / "guest")
    for kind in Kind:
        metrics.observe_item(ItemResult(kind, 1, Action.ONLINE, Outcome.DONE))
    metrics.observe_grow_latency("cpus", 0.5)
    metrics.observe_grow_latency("memory", 2.0)
    used = {
        sample.labels["resource"]
        for family in registry.collect()
        for sample in family.samples
        if "resource" in sample.labels
    }
    assert used == AGENT_RESOURCES, used
