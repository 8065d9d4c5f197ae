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
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prom_helpers import (
    SCRAPED_SECONDS,
    GiB,
    Stack,
    StackConfig,
    http_get,
    promql,
    running_prometheus,
    running_stack,
    settled,
    tool,
    values,
    wait_for,
)
from prometheus_client import CollectorRegistry

from agent.kernel import Kernel
from agent.metrics import AgentMetrics
from agent.topology import Topology
from broker.metrics import BrokerMetrics
from vmtide.fakesys import FakeGuest

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
    cpu_target = values(promql(prometheus, 'vmtide_agent_target{resource="cpus"}'))
    assert len(cpu_target) == 1 and 1 <= cpu_target[0] <= online_cpus, cpu_target
    memory_target = values(promql(prometheus, 'vmtide_agent_target{resource="memory"}'))
    assert len(memory_target) == 1, memory_target
    assert 1 * GiB <= memory_target[0] <= guest.online_memory_bytes(), memory_target
    available = values(promql(prometheus, "vmtide_agent_memory_available_bytes"))
    assert len(available) == 1 and 0 < available[0] < guest.online_memory_bytes(), available
    busy = values(promql(prometheus, "vmtide_agent_cpu_busy_cpus"))
    assert len(busy) == 1 and 0 <= busy[0] <= online_cpus, busy
    pressure = values(promql(prometheus, "vmtide_agent_pressure_ratio"))
    assert len(pressure) == 5 and all(0 <= p <= 1 for p in pressure), pressure

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


def test_rule_expressions_match_the_real_label_sets(stack: Stack, prometheus: str) -> None:
    """The joins in vmtide.rules.yml pair real series (a mismatch would silently never fire)."""
    online_cpus, online_memory = len(stack.guest.online_cpus()), stack.guest.online_memory_bytes()
    joins: list[tuple[str, str, Callable[[float], bool]]] = [
        # VmtideGuestAtMaximum and VmtideGuestGrowthStalled: the target beside
        # what is online. The light load wants no more than it has.
        (
            'vmtide_agent_target{resource="cpus"}'
            ' - ignoring(resource, state) group_left vmtide_agent_cpus{state="online"}',
            "cpus",
            lambda value: value <= 0,
        ),
        (
            'vmtide_agent_target{resource="memory"} - ignoring(resource) group_left'
            ' sum without(state, zone) (vmtide_agent_memory_bytes{state="online"})',
            "memory",
            lambda value: value <= 0,
        ),
        # VmtideGuestAtMaximum's PSI side keeps the target's series.
        (
            'vmtide_agent_target{resource="cpus"} and ignoring(resource, kind)'
            ' vmtide_agent_pressure_ratio{resource="cpu", kind="some"}',
            "cpus",
            lambda value: 1 <= value <= online_cpus,
        ),
        (
            'vmtide_agent_target{resource="memory"} and ignoring(resource, kind)'
            ' vmtide_agent_pressure_ratio{resource="memory", kind="some"}',
            "memory",
            lambda value: 1 * GiB <= value <= online_memory,
        ),
    ]
    for query, resource, plausible in joins:
        result = promql(prometheus, query)
        assert len(result) == 1, (query, result)
        labels = result[0]["metric"]
        assert labels.get("resource") == resource, (query, labels)
        assert labels["job"] == "vmtide-agent" and labels["instance"] == stack.agent_address
        assert plausible(float(result[0]["value"][1])), (query, result)
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
    guest = FakeGuest(tmp_path / "guest")
    topology = Topology.read(Kernel(guest.sysfs, guest.procfs))
    agent_registry, broker_registry = CollectorRegistry(), CollectorRegistry()
    AgentMetrics(agent_registry, topology=lambda: topology)
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
