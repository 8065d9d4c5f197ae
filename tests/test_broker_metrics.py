"""The broker's metrics: every configured guest's series exist from the start."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from broker.arbiter import Amount
from broker.metrics import BrokerMetrics
from vmtide.v1 import broker_pb2 as pb


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def test_a_configured_guest_has_its_series_at_zero_before_any_event() -> None:
    registry = CollectorRegistry()
    BrokerMetrics(registry).add_guest("g1")
    # What it has online is unknown until its first report: no series, not 0.
    assert value(registry, "vmtide_broker_guest_online_cpus", guest="g1") is None
    assert value(registry, "vmtide_broker_guest_online_memory_bytes", guest="g1") is None
    for name in (
        "vmtide_broker_guest_connected",
        "vmtide_broker_guest_granted_cpus",
        "vmtide_broker_guest_granted_memory_bytes",
        "vmtide_broker_guest_requested_cpus",
        "vmtide_broker_guest_requested_memory_bytes",
        "vmtide_broker_grants_total",
        "vmtide_broker_reclaims_total",
        "vmtide_broker_reclaimed_cpus_total",
        "vmtide_broker_reclaimed_memory_bytes_total",
    ):
        assert value(registry, name, guest="g1") == 0, name
    for reason in BrokerMetrics.FAILURE_REASONS:
        assert value(registry, "vmtide_broker_failures_total", guest="g1", reason=reason) == 0
    for resource in ("cpus", "memory"):
        count = value(
            registry, "vmtide_broker_hotplug_seconds_count", guest="g1", resource=resource
        )
        assert count == 0, resource


def test_events_land_in_their_guests_series() -> None:
    registry = CollectorRegistry()
    metrics = BrokerMetrics(registry)
    for guest in ("g1", "g2"):
        metrics.add_guest(guest)
    metrics.session("g1", connected=True)
    metrics.books("g1", Amount(3, 2 << 30), Amount(4, 3 << 30))
    metrics.report("g1", pb.LoadReport(online_cpus=2, online_memory_bytes=1 << 30))
    metrics.granted("g1")
    metrics.reclaim_sent("g2")
    metrics.reclaimed("g2", Amount(1, 128 << 20))
    metrics.hotplugged("g1", "memory", 0.3)
    metrics.failure("g2", "plug_failed")
    # A peer no guest is configured for (a vsock CID nobody owns) is counted too.
    metrics.failure("", "refused_identity")

    assert value(registry, "vmtide_broker_guest_connected", guest="g1") == 1
    assert value(registry, "vmtide_broker_guest_connected", guest="g2") == 0
    assert value(registry, "vmtide_broker_guest_granted_cpus", guest="g1") == 3
    assert value(registry, "vmtide_broker_guest_requested_memory_bytes", guest="g1") == 3 << 30
    assert value(registry, "vmtide_broker_guest_online_cpus", guest="g1") == 2
    assert value(registry, "vmtide_broker_grants_total", guest="g1") == 1
    assert value(registry, "vmtide_broker_grants_total", guest="g2") == 0
    assert value(registry, "vmtide_broker_reclaims_total", guest="g2") == 1
    assert value(registry, "vmtide_broker_reclaimed_memory_bytes_total", guest="g2") == 128 << 20
    hotplug = "vmtide_broker_hotplug_seconds_sum"
    assert value(registry, hotplug, guest="g1", resource="memory") == 0.3
    assert value(registry, hotplug, guest="g1", resource="cpus") == 0
    assert value(registry, "vmtide_broker_failures_total", guest="g2", reason="plug_failed") == 1
    refused = value(registry, "vmtide_broker_failures_total", guest="", reason="refused_identity")
    assert refused == 1
