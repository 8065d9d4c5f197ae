"""The broker's books, message by message, without gRPC."""

from __future__ import annotations

import asyncio
from pathlib import Path

from prometheus_client import CollectorRegistry
from simulation import broker_config

from agent.kernel import Kernel
from agent.topology import Topology
from broker.arbiter import Amount
from broker.config import CpuLimits, GuestConfig, MemoryLimits
from broker.core import Broker
from broker.metrics import BrokerMetrics
from broker.simulated import SimulatedBackend
from vmtide.fakesys import FakeGuest
from vmtide.v1 import broker_pb2 as pb

GiB = 1 << 30


def make(tmp_path: Path) -> tuple[Broker, FakeGuest]:
    fake = FakeGuest(tmp_path / "g", possible_cpus=4, boot_cpus=1, boot_blocks=8)
    guest = GuestConfig(
        id="g",
        listen="unix:/nonexistent",
        backend="simulated",
        simulated_root=fake.root,
        cpus=CpuLimits(minimum=1, maximum=4),
        memory=MemoryLimits(minimum_bytes=1 * GiB, maximum_bytes=2 * GiB),
    )
    config = broker_config(tmp_path, [guest], cpus=4, memory=4 * GiB)
    broker = Broker(config, {"g": SimulatedBackend(fake)}, BrokerMetrics(CollectorRegistry()))
    return broker, fake


def hello(fake: FakeGuest) -> pb.Hello:
    topology = Topology.read(Kernel(fake.sysfs, fake.procfs)).to_proto()
    return pb.Hello(protocol_version=1, guest_id="g", topology=topology)


def request(request_id: int, cpus: int, seen_grant_id: int) -> pb.GuestMessage:
    return pb.GuestMessage(
        request=pb.ResourceRequest(
            request_id=request_id, cpus=cpus, memory_bytes=1 * GiB, seen_grant_id=seen_grant_id
        )
    )


async def test_a_request_that_crossed_a_grant_is_not_a_release(tmp_path: Path) -> None:
    broker, fake = make(tmp_path)
    record, outbox = broker.open_session("g", hello(fake))
    await broker.on_message(record, request(1, 3, record.last_grant_id))
    await broker.rebalance()
    assert record.entitled == Amount(3, 1 * GiB)
    # The guest asked for 2 before it saw the grant of 3: not an offer of 1 CPU.
    record.last_request_at = 0.0
    await broker.on_message(record, request(2, 2, seen_grant_id=1))
    await broker.rebalance()
    assert record.demand.cpus == 3 and not record.pending
    # The same request made after seeing the grant is an offer, and is taken up.
    record.last_request_at = 0.0
    await broker.on_message(record, request(3, 2, record.last_grant_id))
    await broker.rebalance()
    assert record.pending
    reclaims = []
    while not outbox.empty():
        message = outbox.get_nowait()
        if message is not None and message.WhichOneof("body") == "reclaim":
            reclaims.append(message.reclaim)
    assert [r.cpus for r in reclaims] == [2]


def sent(outbox: asyncio.Queue[pb.BrokerMessage | None], kind: str) -> list[pb.BrokerMessage]:
    messages = []
    while not outbox.empty():
        message = outbox.get_nowait()
        if message is not None and message.WhichOneof("body") == kind:
            messages.append(message)
    return messages


async def test_a_release_and_a_rise_at_once_end_in_both(tmp_path: Path) -> None:
    broker, fake = make(tmp_path)
    record, outbox = broker.open_session("g", hello(fake))
    ask = pb.ResourceRequest(request_id=1, cpus=3, memory_bytes=GiB + GiB // 2)
    ask.seen_grant_id = record.last_grant_id
    await broker.on_message(record, pb.GuestMessage(request=ask))
    await broker.rebalance()
    grant = sent(outbox, "grant")[-1].grant
    await broker.on_message(
        record,
        pb.GuestMessage(
            ack=pb.Ack(grant_id=grant.grant_id, online_cpus=3, online_memory_bytes=GiB + GiB // 2)
        ),
    )
    # More CPUs, less memory, in one request.
    record.last_request_at = 0.0
    ask = pb.ResourceRequest(request_id=2, cpus=4, memory_bytes=GiB)
    ask.seen_grant_id = record.last_grant_id
    await broker.on_message(record, pb.GuestMessage(request=ask))
    await broker.rebalance()
    (reclaim,) = [m.reclaim for m in sent(outbox, "reclaim")]
    assert (reclaim.cpus, reclaim.memory_bytes) == (3, GiB)
    await broker.on_message(
        record,
        pb.GuestMessage(
            ack=pb.Ack(reclaim_id=reclaim.reclaim_id, online_cpus=3, online_memory_bytes=GiB)
        ),
    )
    await broker.rebalance()
    # The CPU rise was not lost behind the reclaim.
    (later,) = [m.grant for m in sent(outbox, "grant")]
    assert (later.cpus, later.memory_bytes) == (4, GiB)
    assert record.held == Amount(4, GiB)
