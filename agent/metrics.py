"""The agent's Prometheus metrics.

Topology gauges and the guest's limits come from collectors that read the
agent's own state at scrape time (no second source of truth); events are
counters and histograms updated as they happen. Everything registers on the
registry it is given, so tests use a fresh one. The HTTP endpoint only serves
GET: it exposes no control.

Every `resource` label says `cpus` or `memory` (and `io` for pressure), as the
config's `[limits.cpus]` and `[limits.memory]` do and the broker's
`vmtide_broker_hotplug_seconds`; counts and bytes never share a metric.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from agent.kernel import Action, ItemResult, Kind, Outcome

if TYPE_CHECKING:
    from agent.daemon import EffectiveLimits
    from agent.policy import Decisions
    from agent.sensing import Reading
    from agent.topology import Topology

# From a standby CPU online in milliseconds to a hot-plugged DIMM onlined on
# a slow emulated guest in tens of seconds.
_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0)

# The kernel's item kinds, in the metrics' one resource vocabulary.
_RESOURCE = {Kind.CPU: "cpus", Kind.MEMORY_BLOCK: "memory"}


class TopologyCollector(Collector):
    def __init__(self, topology: Callable[[], Topology | None]) -> None:
        self._topology = topology

    def collect(self) -> Iterator[GaugeMetricFamily]:
        started = time.monotonic()
        topo = self._topology()
        if topo is None:
            return
        cpus = GaugeMetricFamily(
            "vmtide_agent_cpus", "CPUs by state (standby: present, not online)", labels=["state"]
        )
        cpus.add_metric(["possible"], len(topo.possible_cpus))
        cpus.add_metric(["present"], len(topo.cpus))
        cpus.add_metric(["online"], topo.online_cpus)
        cpus.add_metric(["standby"], len(topo.standby_cpus))
        yield cpus
        memory = GaugeMetricFamily(
            "vmtide_agent_memory_bytes",
            "Memory in hotplug blocks by state and zone",
            labels=["state", "zone"],
        )
        online_by_zone: dict[str, int] = {}
        for block in topo.blocks:
            if block.online:
                zone = "movable" if block.movable else "kernel"
                online_by_zone[zone] = online_by_zone.get(zone, 0) + topo.block_size
        for zone in ("kernel", "movable"):
            memory.add_metric(["online", zone], online_by_zone.get(zone, 0))
        memory.add_metric(["standby", ""], len(topo.standby_blocks) * topo.block_size)
        yield memory
        yield GaugeMetricFamily(
            "vmtide_agent_memory_block_size_bytes",
            "Memory hotplug block size",
            value=topo.block_size,
        )
        yield GaugeMetricFamily(
            "vmtide_agent_topology_collect_seconds",
            "Time to produce the topology metrics",
            value=time.monotonic() - started,
        )


class PolicyCollector(Collector):
    """The policy's last targets and the limits it works within."""

    def __init__(
        self,
        decisions: Callable[[], Decisions | None],
        limits: Callable[[], EffectiveLimits | None],
    ) -> None:
        self._decisions = decisions
        self._limits = limits

    def collect(self) -> Iterator[GaugeMetricFamily]:
        # No series before the first decision: a target of 0 would be a lie.
        decisions = self._decisions()
        if decisions is not None:
            yield GaugeMetricFamily(
                "vmtide_agent_target_cpus",
                "CPUs the policy wants online now",
                value=decisions.cpu.target,
            )
            yield GaugeMetricFamily(
                "vmtide_agent_target_memory_bytes",
                "Memory the policy wants online now",
                value=decisions.memory.target,
            )
        limits = self._limits()
        if limits is None:
            return
        for name, what, bounds in (
            ("vmtide_agent_limit_cpus", "CPUs", limits.cpus),
            ("vmtide_agent_limit_memory_bytes", "Memory", limits.memory),
        ):
            family = GaugeMetricFamily(
                name,
                f"{what} the policy keeps the guest within (config tightened by the broker)",
                labels=["bound"],
            )
            family.add_metric(["minimum"], bounds.minimum)
            family.add_metric(["maximum"], bounds.maximum)
            family.add_metric(["burst"], bounds.burst)
            yield family


class AgentMetrics:
    def __init__(
        self,
        registry: CollectorRegistry,
        topology: Callable[[], Topology | None] = lambda: None,
        *,
        broker: bool = True,
        limits: Callable[[], EffectiveLimits | None] = lambda: None,
    ) -> None:
        """`topology` and `limits` are read at each scrape: the agent's current
        view of the guest and its effective limits (`Agent.limits`)."""
        registry.register(TopologyCollector(topology))
        self._last_decisions: Decisions | None = None
        registry.register(PolicyCollector(lambda: self._last_decisions, limits))
        self.pressure = Gauge(
            "vmtide_agent_pressure_ratio",
            "PSI avg10 stall share (0-1)",
            ["resource", "kind"],
            registry=registry,
        )
        self.cpu_busy = Gauge(
            "vmtide_agent_cpu_busy_cpus", "CPUs' worth of busy time, last period", registry=registry
        )
        self.memory_available = Gauge(
            "vmtide_agent_memory_available_bytes", "MemAvailable", registry=registry
        )
        self.decisions = Counter(
            "vmtide_agent_decisions_total",
            "Policy decisions by resource and direction",
            ["resource", "direction"],
            registry=registry,
        )
        self.operations = Counter(
            "vmtide_agent_resize_operations_total",
            "Online/offline writes by resource, action and outcome",
            ["resource", "action", "outcome"],
            registry=registry,
        )
        self.grow_latency = Histogram(
            "vmtide_agent_grow_latency_seconds",
            "From the policy wanting more to the resource online",
            ["resource"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        # Without a broker (standalone agent) the connection metrics are absent,
        # so "broker unreachable" alerts cannot mistake one for the other.
        broker_registry = registry if broker else None
        self.connected = Gauge(
            "vmtide_agent_broker_connected",
            "1 while a broker session is open",
            registry=broker_registry,
        )
        self.connects = Counter(
            "vmtide_agent_broker_sessions_total",
            "Broker sessions opened",
            registry=broker_registry,
        )
        self.cycles = Counter(
            "vmtide_agent_sensing_cycles_total",
            "Sense-decide cycles by result",
            ["result"],
            registry=registry,
        )
        # Every series starts at zero, so rate() sees the first event too.
        for result in ("ok", "error"):
            self.cycles.labels(result)
        for resource in ("cpus", "memory"):
            for direction in ("grow", "shrink", "hold"):
                self.decisions.labels(resource, direction)
        for kind in Kind:
            for action in Action:
                for outcome in Outcome:
                    self.operations.labels(_RESOURCE[kind], action.value, outcome.value)

    def observe_reading(self, reading: Reading) -> None:
        for resource, kind, value in (
            ("cpus", "some", reading.cpu_some),
            ("memory", "some", reading.memory_some),
            ("memory", "full", reading.memory_full),
            ("io", "some", reading.io_some),
            ("io", "full", reading.io_full),
        ):
            self.pressure.labels(resource, kind).set(value / 100.0)
        self.cpu_busy.set(reading.cpu_busy)
        self.memory_available.set(reading.memory_available)

    def observe_decisions(self, decisions: Decisions) -> None:
        self._last_decisions = decisions
        for resource, decision in (("cpus", decisions.cpu), ("memory", decisions.memory)):
            self.decisions.labels(resource, decision.direction).inc()

    def observe_item(self, item: ItemResult) -> None:
        self.operations.labels(_RESOURCE[item.kind], item.action.value, item.outcome.value).inc()

    def observe_grow_latency(self, resource: str, seconds: float) -> None:
        self.grow_latency.labels(resource).observe(seconds)

    def observe_cycle(self, *, ok: bool) -> None:
        self.cycles.labels("ok" if ok else "error").inc()

    def broker_connected(self, connected: bool) -> None:
        self.connected.set(1 if connected else 0)
        if connected:
            self.connects.inc()
