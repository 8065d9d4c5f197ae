"""The broker's Prometheus metrics: per guest and for the pool."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from vmtide.v1 import broker_pb2 as pb

if TYPE_CHECKING:
    from broker.arbiter import Amount


class BrokerMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.connected = Gauge(
            "vmtide_broker_guest_connected",
            "1 while the guest has a session",
            ["guest"],
            registry=registry,
        )
        self.granted_cpus = Gauge(
            "vmtide_broker_guest_granted_cpus",
            "CPUs the guest may hold",
            ["guest"],
            registry=registry,
        )
        self.granted_memory = Gauge(
            "vmtide_broker_guest_granted_memory_bytes",
            "Memory the guest may hold",
            ["guest"],
            registry=registry,
        )
        self.requested_cpus = Gauge(
            "vmtide_broker_guest_requested_cpus",
            "CPUs the guest last asked for",
            ["guest"],
            registry=registry,
        )
        self.requested_memory = Gauge(
            "vmtide_broker_guest_requested_memory_bytes",
            "Memory the guest last asked for",
            ["guest"],
            registry=registry,
        )
        self.online_cpus = Gauge(
            "vmtide_broker_guest_online_cpus",
            "CPUs online in the guest (its last report)",
            ["guest"],
            registry=registry,
        )
        self.online_memory = Gauge(
            "vmtide_broker_guest_online_memory_bytes",
            "Memory online in the guest (last report)",
            ["guest"],
            registry=registry,
        )
        self.grants = Counter(
            "vmtide_broker_grants_total", "Grants sent", ["guest"], registry=registry
        )
        self.reclaims = Counter(
            "vmtide_broker_reclaims_total", "Reclaims sent", ["guest"], registry=registry
        )
        self.reclaimed_cpus = Counter(
            "vmtide_broker_reclaimed_cpus_total",
            "CPUs unplugged after a reclaim",
            ["guest"],
            registry=registry,
        )
        self.reclaimed_memory = Counter(
            "vmtide_broker_reclaimed_memory_bytes_total",
            "Memory unplugged after a reclaim",
            ["guest"],
            registry=registry,
        )
        self.failures = Counter(
            "vmtide_broker_failures_total",
            "Failures by guest and reason (plug_failed, unplug_failed, eject_refused, "
            "offline_refused, reclaim_timeout, rate_limited, unknown_ack, refused_identity, "
            "bad_message, backend_unavailable, balloon_failed)",
            ["guest", "reason"],
            registry=registry,
        )
        self.hotplug_seconds = Histogram(
            "vmtide_broker_hotplug_seconds",
            "Time to hot-plug what a grant needs, by resource (QMP commands and "
            "QEMU's answers; the guest's onlining is not in it)",
            ["guest", "resource"],
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
            registry=registry,
        )
        self.pool_capacity = Gauge(
            "vmtide_broker_pool_capacity",
            "Pool capacity (cpus: count, memory: bytes)",
            ["resource"],
            registry=registry,
        )
        self.pool_allocated = Gauge(
            "vmtide_broker_pool_allocated",
            "Held plus being released, over all guests",
            ["resource"],
            registry=registry,
        )
        self._series: dict[str, _GuestSeries] = {}

    FAILURE_REASONS = (
        "plug_failed",
        "unplug_failed",
        "eject_refused",
        "offline_refused",
        "reclaim_timeout",
        "rate_limited",
        "unknown_ack",
        "refused_identity",
        "bad_message",
        "backend_unavailable",
        "balloon_failed",
    )
    HOTPLUG_RESOURCES = ("cpus", "memory")

    def add_guest(self, guest: str) -> None:
        """Every series of a configured guest, at zero, before its first session:
        a guest that never connects is visible, and rate() sees first events.
        Only what it has online waits for its first report. Made at start-up,
        the series stay out of the garbage collector's way (the broker freezes
        what start-up built), and an event finds its series without a label
        lookup."""
        self._series[guest] = _GuestSeries(self, guest)

    def books(self, guest: str, granted: Amount, requested: Amount) -> None:
        """What the broker's books say now (grants, reclaims and reconnects alike)."""
        series = self._series[guest]
        series.granted_cpus.set(granted.cpus)
        series.granted_memory.set(granted.memory)
        series.requested_cpus.set(requested.cpus)
        series.requested_memory.set(requested.memory)

    def session(self, guest: str, *, connected: bool) -> None:
        self._series[guest].connected.set(1 if connected else 0)

    def report(self, guest: str, report: pb.LoadReport) -> None:
        series = self._series[guest]
        if series.online is None:  # no series before the guest said: 0 would be a lie
            series.online = (self.online_cpus.labels(guest), self.online_memory.labels(guest))
        cpus, memory = series.online
        cpus.set(report.online_cpus)
        memory.set(report.online_memory_bytes)

    def granted(self, guest: str) -> None:
        self._series[guest].grants.inc()

    def reclaim_sent(self, guest: str) -> None:
        self._series[guest].reclaims.inc()

    def reclaimed(self, guest: str, amount: Amount) -> None:
        series = self._series[guest]
        series.reclaimed_cpus.inc(amount.cpus)
        series.reclaimed_memory.inc(amount.memory)

    def hotplugged(self, guest: str, resource: str, seconds: float) -> None:
        self._series[guest].hotplug_seconds[resource].observe(seconds)

    def failure(self, guest: str, reason: str) -> None:
        series = self._series.get(guest)  # none for a peer no guest is configured for
        counter = series.failures[reason] if series else self.failures.labels(guest, reason)
        counter.inc()

    def pool(self, capacity: Amount, allocated: Amount) -> None:
        self.pool_capacity.labels("cpus").set(capacity.cpus)
        self.pool_capacity.labels("memory_bytes").set(capacity.memory)
        self.pool_allocated.labels("cpus").set(allocated.cpus)
        self.pool_allocated.labels("memory_bytes").set(allocated.memory)


class _GuestSeries:
    """One guest's children of the labelled metrics."""

    def __init__(self, metrics: BrokerMetrics, guest: str) -> None:
        self.connected = metrics.connected.labels(guest)
        self.connected.set(0)
        self.granted_cpus = metrics.granted_cpus.labels(guest)
        self.granted_memory = metrics.granted_memory.labels(guest)
        self.requested_cpus = metrics.requested_cpus.labels(guest)
        self.requested_memory = metrics.requested_memory.labels(guest)
        self.online: tuple[Gauge, Gauge] | None = None  # cpus, memory: from the first report
        self.grants = metrics.grants.labels(guest)
        self.reclaims = metrics.reclaims.labels(guest)
        self.reclaimed_cpus = metrics.reclaimed_cpus.labels(guest)
        self.reclaimed_memory = metrics.reclaimed_memory.labels(guest)
        self.failures = {r: metrics.failures.labels(guest, r) for r in metrics.FAILURE_REASONS}
        self.hotplug_seconds = {
            r: metrics.hotplug_seconds.labels(guest, r) for r in metrics.HOTPLUG_RESOURCES
        }
