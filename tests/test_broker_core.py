"""The broker's books, message by message, without gRPC."""

from __future__ import annotations

import asyncio
import errno
import json
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from simulation import broker_config

from agent.kernel import Kernel
from agent.topology import Topology
from broker import arbiter, core
from broker.arbiter import Amount, GuestView, Plan, Pool
from broker.backend import BackendError, BackendUnavailable, EjectRefused, PlugState
from broker.config import CpuLimits, GuestConfig, MemoryLimits
from broker.core import (
    PLUG_BACKOFF_SECONDS,
    ROUND_GUESTS,
    SHORT_RECLAIM_BACKOFF_SECONDS,
    Broker,
    GuestRecord,
)
from broker.metrics import BrokerMetrics
from broker.simulated import SimulatedBackend
from vmtide.fakesys import FakeGuest
from vmtide.v1 import broker_pb2 as pb

GiB = 1 << 30
BLOCK = 128 << 20


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


def offlined(
    block: int, outcome: pb.Outcome.ValueType = pb.OUTCOME_DONE, errno: int = 0
) -> pb.ItemResult:
    return pb.ItemResult(
        kind=pb.RESOURCE_KIND_MEMORY_BLOCK,
        index=block,
        action=pb.ACTION_OFFLINE,
        outcome=outcome,
        errno=errno,
    )


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
    # The guest offlined the four blocks the grant plugged; only then are they
    # unplugged, and only then is the memory no longer counted as plugged.
    plugged = [b for b in fake.block_indexes() if b >= 8]
    assert len(plugged) == 4
    await broker.on_message(
        record,
        pb.GuestMessage(
            ack=pb.Ack(
                reclaim_id=reclaim.reclaim_id,
                online_cpus=3,
                online_memory_bytes=GiB,
                items=[offlined(b) for b in plugged],
            )
        ),
    )
    await broker.rebalance()
    # The CPU rise was not lost behind the reclaim.
    (later,) = [m.grant for m in sent(outbox, "grant")]
    assert (later.cpus, later.memory_bytes) == (4, GiB)
    assert record.held == Amount(4, GiB)


# ----------------------------------------------------------------- hypervisor away


class Unreachable(SimulatedBackend):
    """A simulated guest whose hypervisor can be switched off and on."""

    up = True
    log: list[str]

    @property
    def available(self) -> bool:
        return self.up

    async def state(self) -> PlugState:
        if not self.up:
            raise BackendUnavailable(self.name, "state", "QMP socket /run/g.qmp: gone")
        return await super().state()

    async def plug_cpus(self, count: int) -> list[int]:
        if not self.up:
            raise BackendUnavailable(self.name, "plug", "QMP socket /run/g.qmp: gone")
        return await super().plug_cpus(count)


def make_with(tmp_path: Path, backend_type: type[SimulatedBackend], **guest: Any) -> Setup:
    fake = FakeGuest(
        tmp_path / "g", possible_cpus=4, boot_cpus=1, boot_blocks=guest.pop("boot_blocks", 8)
    )
    config = GuestConfig(
        id="g",
        listen="unix:/nonexistent",
        backend="simulated",
        simulated_root=fake.root,
        cpus=CpuLimits(minimum=1, maximum=4),
        memory=MemoryLimits(minimum_bytes=1 * GiB, maximum_bytes=3 * GiB),
        **guest,
    )
    backend = backend_type(fake, balloon=True)
    registry = CollectorRegistry()
    broker = Broker(
        broker_config(tmp_path, [config], cpus=4, memory=8 * GiB),
        {"g": backend},
        BrokerMetrics(registry),
    )
    return Setup(broker, fake, backend, registry)


@dataclass
class Setup:
    broker: Broker
    fake: FakeGuest
    backend: SimulatedBackend
    registry: CollectorRegistry

    def failures(self, reason: str) -> float:
        value = self.registry.get_sample_value(
            "vmtide_broker_failures_total", {"guest": "g", "reason": reason}
        )
        return value or 0.0


def ask(record: GuestRecord, request_id: int, cpus: int, memory: int) -> pb.GuestMessage:
    record.last_request_at = 0.0  # never rate limited here
    return pb.GuestMessage(
        request=pb.ResourceRequest(
            request_id=request_id,
            cpus=cpus,
            memory_bytes=memory,
            seen_grant_id=record.last_grant_id,
        )
    )


async def test_a_guest_whose_hypervisor_is_away_is_not_grown_until_it_is_back(
    tmp_path: Path,
) -> None:
    setup = make_with(tmp_path, Unreachable)
    broker, backend = setup.broker, setup.backend
    assert isinstance(backend, Unreachable)
    record, outbox = broker.open_session("g", hello(setup.fake))
    sent(outbox, "grant")
    backend.up = False
    broker.backend_down("g", "QMP socket /run/g.qmp: gone")

    await broker.on_message(record, ask(record, 1, 3, GiB))
    await broker.rebalance()

    # Nothing to plug with: no grant, nothing promised, and it says why.
    assert sent(outbox, "grant") == []
    assert record.entitled.cpus == 1
    assert setup.failures("backend_unavailable") == 1
    status = broker.status()["guests"]["g"]["backend"]
    assert status == {"available": False, "error": "QMP socket /run/g.qmp: gone"}

    # QEMU restarted meanwhile with one more CPU than the books knew: the
    # books take the hypervisor's word before anything is plugged.
    setup.fake.plug_cpu(1)
    backend.up = True
    # Reachable, but what is plugged not yet re-read: still hands off.
    await broker.rebalance()
    assert sent(outbox, "grant") == [] and setup.fake.present_cpus() == {0, 1}
    await broker.backend_up("g")
    assert record.present_cpus == {0, 1}
    await broker.rebalance()
    (grant,) = [m.grant for m in sent(outbox, "grant")]
    assert grant.cpus == 3
    assert setup.fake.present_cpus() == {0, 1, 2}  # one plugged, not two
    assert broker.status()["guests"]["g"]["backend"] == {"available": True, "error": ""}


async def test_a_guest_never_read_is_counted_at_its_burst_limit(tmp_path: Path) -> None:
    setup = make_with(tmp_path, Unreachable)
    backend = setup.backend
    assert isinstance(backend, Unreachable)
    backend.up = False

    await setup.broker.load_plugged()

    # It may hold anything the last broker gave it: never hand that out twice.
    assert setup.broker.allocated() == Amount(4, 3 * GiB)
    backend.up = True
    await setup.broker.backend_up("g")
    assert setup.broker.allocated() == Amount(1, 1 * GiB)


class OutOfVcpus(SimulatedBackend):
    """QEMU refuses every vCPU hot-plug (no slot left, or TCG's budget spent)."""

    cpu_attempts = 0

    async def plug_cpus(self, count: int) -> list[int]:
        self.cpu_attempts += 1
        raise BackendError(self.name, "device_add (vCPU)", "no free vCPU slot")


async def test_a_refused_vcpu_plug_does_not_hold_back_memory(tmp_path: Path) -> None:
    setup = make_with(tmp_path, OutOfVcpus)
    broker, backend = setup.broker, setup.backend
    assert isinstance(backend, OutOfVcpus)
    record, outbox = broker.open_session("g", hello(setup.fake))
    sent(outbox, "grant")

    await broker.on_message(record, ask(record, 1, 3, 2 * GiB))
    await broker.rebalance()

    # The vCPU failed; the memory beside it was still plugged and granted.
    (grant,) = [m.grant for m in sent(outbox, "grant")]
    assert (grant.cpus, grant.memory_bytes) == (1, 2 * GiB)
    assert setup.failures("plug_failed") == 1
    # Within the backoff the vCPU is not tried again, but memory still is.
    await broker.on_message(record, ask(record, 2, 3, 3 * GiB))
    await broker.rebalance()
    (grant,) = [m.grant for m in sent(outbox, "grant")]
    assert (grant.cpus, grant.memory_bytes) == (1, 3 * GiB)
    assert backend.cpu_attempts == 1


class RefusingEject(SimulatedBackend):
    async def unplug_cpus(self, cpu_ids: Sequence[int], timeout: float) -> list[int]:
        removed = await super().unplug_cpus([c for c in cpu_ids if c != 2], timeout)
        detail = "refused cpu2: _OST 0x82"
        raise EjectRefused(self.name, "unplug CPUs", detail, status=0x82, source=3, removed=removed)


async def test_an_eject_the_guest_refuses_keeps_what_went_and_what_did_not(
    tmp_path: Path,
) -> None:
    setup = make_with(tmp_path, RefusingEject)
    broker, fake = setup.broker, setup.fake
    record, outbox = broker.open_session("g", hello(fake))
    await broker.on_message(record, ask(record, 1, 3, GiB + BLOCK))
    await broker.rebalance()
    assert fake.present_cpus() == {0, 1, 2}
    (plugged_block,) = [b for b in fake.block_indexes() if b >= 8]
    sent(outbox, "grant")
    await broker.on_message(record, ask(record, 2, 1, GiB))
    await broker.rebalance()
    (reclaim,) = [m.reclaim for m in sent(outbox, "reclaim")]
    cpus = [
        pb.ItemResult(
            kind=pb.RESOURCE_KIND_CPU, index=c, action=pb.ACTION_OFFLINE, outcome=pb.OUTCOME_DONE
        )
        for c in (1, 2)
    ]
    ack = pb.Ack(
        reclaim_id=reclaim.reclaim_id,
        online_cpus=1,
        online_memory_bytes=GiB,
        items=[*cpus, offlined(plugged_block)],
    )

    await broker.on_message(record, pb.GuestMessage(ack=ack))

    # cpu1 went; cpu2 the guest refused to eject stays plugged and counted; the
    # memory was still unplugged after the refusal.
    assert record.present_cpus == {0, 2} == fake.present_cpus()
    assert plugged_block not in fake.block_indexes()
    assert record.held == Amount(2, GiB)
    assert setup.failures("eject_refused") == 1


# ----------------------------------------------------------------- balloon


class Ordered(SimulatedBackend):
    """Records the order of balloon and plug calls."""

    calls: list[str]

    async def set_balloon(self, hold_bytes: int) -> None:
        await super().set_balloon(hold_bytes)
        self.calls = [*getattr(self, "calls", []), f"balloon {hold_bytes >> 20}"]

    async def plug_memory(self, nbytes: int) -> int:
        added = await super().plug_memory(nbytes)
        self.calls = [*getattr(self, "calls", []), f"plug {added >> 20}"]
        return added


def refused(block: int) -> pb.ItemResult:
    return offlined(block, pb.OUTCOME_REFUSED, errno.EBUSY)


async def test_balloon_over_memory_the_guest_refused_to_give_back(tmp_path: Path) -> None:
    # 2 GiB of boot memory, minimum 1 GiB: boot blocks refuse offlining (EBUSY).
    setup = make_with(tmp_path, Ordered, boot_blocks=16, balloon_fallback=True)
    broker, backend = setup.broker, setup.backend
    assert isinstance(backend, Ordered)
    record, outbox = broker.open_session("g", hello(setup.fake))
    await broker.on_message(record, ask(record, 1, 1, GiB))  # an offer to release 1 GiB
    await broker.rebalance()
    (reclaim,) = [m.reclaim for m in sent(outbox, "reclaim")]
    assert reclaim.memory_bytes == GiB
    ack = pb.Ack(
        reclaim_id=reclaim.reclaim_id,
        online_cpus=1,
        online_memory_bytes=2 * GiB,
        items=[refused(b) for b in range(8, 16)],
    )
    await broker.on_message(record, pb.GuestMessage(ack=ack))
    await broker.rebalance()

    # The balloon takes what the guest kept beyond its target, no more: the
    # guest is left with its entitlement. The books still count it all.
    assert backend.calls == ["balloon 1024"]
    assert broker.status()["guests"]["g"]["balloon_bytes"] == GiB
    assert broker.allocated().memory == 2 * GiB
    await broker.rebalance()
    assert backend.calls == ["balloon 1024"]  # nothing to change: no call

    # The guest grows again: the balloon deflates first, then memory is plugged.
    await broker.on_message(record, ask(record, 2, 1, 2 * GiB + 2 * BLOCK))
    await broker.rebalance()
    assert backend.calls == ["balloon 1024", "balloon 0", "plug 256"]
    (grant,) = [m.grant for m in sent(outbox, "grant")]
    assert grant.memory_bytes == 2 * GiB + 2 * BLOCK


async def test_no_balloon_without_balloon_fallback(tmp_path: Path) -> None:
    setup = make_with(tmp_path, Ordered, boot_blocks=16)
    broker, backend = setup.broker, setup.backend
    record, outbox = broker.open_session("g", hello(setup.fake))
    await broker.on_message(record, ask(record, 1, 1, GiB))
    await broker.rebalance()
    (reclaim,) = [m.reclaim for m in sent(outbox, "reclaim")]
    ack = pb.Ack(
        reclaim_id=reclaim.reclaim_id,
        online_cpus=1,
        online_memory_bytes=2 * GiB,
        items=[refused(b) for b in range(8, 16)],
    )
    await broker.on_message(record, pb.GuestMessage(ack=ack))
    await broker.rebalance()
    assert backend.balloon_requests == []


# ----------------------------------------------------- the books against lies and races


class OneThenRefuses(SimulatedBackend):
    """Plugs one vCPU of those asked, then QEMU refuses the next device_add."""

    async def plug_cpus(self, count: int) -> list[int]:
        await super().plug_cpus(1)
        raise BackendError(self.name, "device_add (vCPU)", "the second slot is refused")


async def test_a_half_done_vcpu_plug_is_counted(tmp_path: Path) -> None:
    setup = make_with(tmp_path, OneThenRefuses)
    broker, fake = setup.broker, setup.fake
    record, outbox = broker.open_session("g", hello(fake))
    sent(outbox, "grant")  # the session's opening grant
    await broker.on_message(record, ask(record, 1, 3, GiB))
    await broker.rebalance()
    # QEMU plugged one before it refused: the books have it, and it is granted.
    assert fake.present_cpus() == {0, 1} == record.present_cpus
    (grant,) = [m.grant for m in sent(outbox, "grant")]
    assert grant.cpus == 2
    assert broker.allocated().cpus == 2


async def test_a_hello_that_hides_plugged_cpus_does_not_free_them(tmp_path: Path) -> None:
    setup = make_with(tmp_path, SimulatedBackend)
    broker, fake = setup.broker, setup.fake
    fake.plug_cpu(1)
    fake.plug_cpu(2)
    lie = hello(fake)
    del lie.topology.cpus.present[1:]  # "only cpu0 is plugged here"
    del lie.topology.cpus.online[1:]
    assert await broker.check_plugged("g", lie) is None
    record, _ = broker.open_session("g", lie)
    # Plugged is QEMU's word: three CPUs stay counted as this guest's.
    assert record.present_cpus == {0, 1, 2}
    assert broker.allocated().cpus == 3


async def test_plugged_standby_is_kept_until_the_first_request_says_otherwise(
    tmp_path: Path,
) -> None:
    broker, fake = make(tmp_path)
    fake.plug_cpu(1)  # plugged, offline: standby the guest may mean to keep
    record, outbox = broker.open_session("g", hello(fake))
    await broker.rebalance()
    assert not sent(outbox, "reclaim") and record.held.cpus == 2
    # A guest that keeps a standby CPU asks for it with the one online.
    await broker.on_message(record, request(1, 2, record.last_grant_id))
    await broker.rebalance()
    assert not record.pending and [g.grant.cpus for g in sent(outbox, "grant")] == [2]
    assert fake.present_cpus() == {0, 1}  # nothing plugged: it was there
    # One that wants only what is online offers the rest back.
    record.last_request_at = 0.0
    await broker.on_message(record, request(2, 1, record.last_grant_id))
    await broker.rebalance()
    assert [r.reclaim.cpus for r in sent(outbox, "reclaim")] == [1]


def test_a_hello_with_an_absurd_block_size_is_refused() -> None:
    from broker.server import check_hello

    hello_ = pb.Hello(protocol_version=1)
    hello_.topology.cpus.possible.append(0)
    hello_.topology.memory.block_size_bytes = 1 << 40
    problem = check_hello(hello_)
    assert problem is not None and "block size" in problem


class SlowUnplug(SimulatedBackend):
    """Unplugs CPUs only once `go` is set."""

    go: asyncio.Event

    async def unplug_cpus(self, cpu_ids: Sequence[int], timeout: float) -> list[int]:
        await self.go.wait()
        return await super().unplug_cpus(cpu_ids, timeout)


async def test_an_ack_whose_reclaim_ends_while_it_is_unplugged(tmp_path: Path) -> None:
    setup = make_with(tmp_path, SlowUnplug)
    broker, fake, backend = setup.broker, setup.fake, setup.backend
    assert isinstance(backend, SlowUnplug)
    backend.go = asyncio.Event()
    record, outbox = broker.open_session("g", hello(fake))
    await broker.on_message(record, ask(record, 1, 2, GiB))
    await broker.rebalance()
    sent(outbox, "grant")
    await broker.on_message(record, ask(record, 2, 1, GiB))
    await broker.rebalance()
    (reclaim,) = [m.reclaim for m in sent(outbox, "reclaim")]
    done = pb.ItemResult(
        kind=pb.RESOURCE_KIND_CPU, index=1, action=pb.ACTION_OFFLINE, outcome=pb.OUTCOME_DONE
    )
    ack = pb.Ack(reclaim_id=reclaim.reclaim_id, online_cpus=1, online_memory_bytes=GiB)
    ack.items.append(done)
    acking = asyncio.create_task(broker.on_message(record, pb.GuestMessage(ack=ack)))
    await asyncio.sleep(0)
    # Meanwhile the same Ack again, and the reclaim's deadline long past.
    await broker.on_message(record, pb.GuestMessage(ack=ack))
    broker._clock = lambda: 1e12
    await broker.rebalance()
    assert setup.failures("reclaim_timeout") == 0  # acknowledged: not expired
    # And the guest reconnects before the unplug ends: its pending work is gone.
    broker.open_session("g", hello(fake))
    backend.go.set()
    await acking  # no KeyError
    assert fake.present_cpus() == {0} and record.present_cpus == {0}


# ------------------------------------------- incremental rounds against full ones


class TwinAgent:
    """One guest's agent, as the benchmark plays it: onlining and offlining are
    bookkeeping, what the tree lists is what the broker plugged."""

    def __init__(self, fake: FakeGuest) -> None:
        self.fake = fake
        self.online_cpus: set[int] = set()
        self.online_blocks: set[int] = set()
        self.present: set[int] = set()
        self.last_grant_id = 0

    def hello(self) -> pb.Hello:
        topology = Topology.read(Kernel(self.fake.sysfs, self.fake.procfs))
        self.present = {c.id for c in topology.cpus}
        self.online_cpus = {c.id for c in topology.cpus if c.online}
        self.online_blocks = {b.index for b in topology.blocks if b.online}
        self.last_grant_id = 0
        return pb.Hello(protocol_version=1, topology=topology.to_proto())

    def online(self) -> tuple[int, int]:
        return len(self.online_cpus), len(self.online_blocks) * BLOCK

    def answer(self, message: pb.BrokerMessage, policy: str) -> pb.GuestMessage | None:
        """The Ack for a Grant or Reclaim; for a Reclaim, `policy` may keep one
        block online (a refusal) or send nothing (a stuck agent)."""
        items: list[pb.ItemResult] = []
        if message.WhichOneof("body") == "grant":
            grant = message.grant
            self.last_grant_id = grant.grant_id
            self.present |= set(grant.cpu_ids)
            for cpu in sorted(self.present - self.online_cpus):
                if len(self.online_cpus) >= grant.cpus:
                    break
                self.online_cpus.add(cpu)
                items.append(item(pb.RESOURCE_KIND_CPU, cpu, pb.ACTION_ONLINE, pb.OUTCOME_DONE))
            for index in sorted(set(self.fake.block_indexes()) - self.online_blocks):
                if len(self.online_blocks) * BLOCK >= grant.memory_bytes:
                    break
                self.online_blocks.add(index)
                kind = pb.RESOURCE_KIND_MEMORY_BLOCK
                items.append(item(kind, index, pb.ACTION_ONLINE, pb.OUTCOME_DONE))
            ack = pb.Ack(grant_id=grant.grant_id, items=items)
        elif message.WhichOneof("body") == "reclaim":
            if policy == "silent":
                return None
            reclaim = message.reclaim
            for cpu in sorted(self.online_cpus - {0}, reverse=True):
                if len(self.online_cpus) <= reclaim.cpus:
                    break
                self.online_cpus.discard(cpu)
                self.present.discard(cpu)
                items.append(item(pb.RESOURCE_KIND_CPU, cpu, pb.ACTION_OFFLINE, pb.OUTCOME_DONE))
            refuse = policy == "refuse"
            for index in sorted(self.online_blocks - set(range(8)), reverse=True):
                if len(self.online_blocks) * BLOCK <= reclaim.memory_bytes:
                    break
                kind = pb.RESOURCE_KIND_MEMORY_BLOCK
                if refuse:
                    refuse = False
                    items.append(item(kind, index, pb.ACTION_OFFLINE, pb.OUTCOME_REFUSED))
                    continue
                self.online_blocks.discard(index)
                items.append(item(kind, index, pb.ACTION_OFFLINE, pb.OUTCOME_DONE))
            ack = pb.Ack(reclaim_id=reclaim.reclaim_id, items=items)
        else:
            return None
        ack.online_cpus, ack.online_memory_bytes = self.online()
        return pb.GuestMessage(ack=ack)


def item(
    kind: pb.ResourceKind.ValueType,
    index: int,
    action: pb.Action.ValueType,
    outcome: pb.Outcome.ValueType,
) -> pb.ItemResult:
    return pb.ItemResult(kind=kind, index=index, action=action, outcome=outcome)


class Jammed(Unreachable):
    """A hypervisor that can also refuse to plug CPUs (TCG out of vCPUs) and to
    resize the balloon."""

    jammed = False

    async def plug_cpus(self, count: int) -> list[int]:
        if self.jammed:
            raise BackendError(self.name, "device_add", "no free vCPU slot")
        return await super().plug_cpus(count)

    async def set_balloon(self, hold_bytes: int) -> None:
        if self.jammed:
            raise BackendError(self.name, "balloon", "balloon device not ready")
        await super().set_balloon(hold_bytes)


@dataclass
class Twin:
    """A broker and its guests' agents; two twins see the same events."""

    broker: Broker
    backends: dict[str, Jammed]
    agents: dict[str, TwinAgent]
    outboxes: dict[str, asyncio.Queue[pb.BrokerMessage | None]]


def make_twin(
    root: Path,
    limits: Sequence[tuple[int, int, int, int, int, bool]],
    pool: tuple[int, int],
    **kw: Any,
) -> Twin:
    configs, backends, agents = [], {}, {}
    for i, (cpu_min, cpu_max, cpu_burst, mem_max, priority, balloon) in enumerate(limits):
        gid = f"g{i}"
        fake = FakeGuest(root / gid, possible_cpus=6, boot_cpus=1, boot_blocks=8)
        configs.append(
            GuestConfig(
                id=gid,
                listen=f"unix:/nonexistent/{gid}",
                backend="simulated",
                simulated_root=fake.root,
                priority=priority,
                cpus=CpuLimits(minimum=cpu_min, maximum=cpu_max, burst=cpu_burst),
                memory=MemoryLimits(minimum_bytes=GiB, maximum_bytes=mem_max * BLOCK),
                balloon_fallback=balloon,
            )
        )
        backends[gid] = Jammed(fake, gid, balloon=True)
        agents[gid] = TwinAgent(fake)
    config = broker_config(root, configs, cpus=pool[0], memory=pool[1] * BLOCK)
    broker = Broker(config, dict(backends), BrokerMetrics(CollectorRegistry()), **kw)
    return Twin(broker, backends, agents, {})


def books(twin: Twin) -> dict[str, Any]:
    """Everything the broker knows and shows, less its ids."""
    broker = twin.broker
    state = broker.status()
    # The state file re-encodes only the guests that changed: it must not miss one.
    assert json.loads(broker.status_json()) == state
    for entry in state["guests"].values():
        entry.pop("session")
        entry["pending_reclaims"] = len(entry["pending_reclaims"])
    for g in broker.guests.values():
        state["guests"][g.id]["books"] = (
            g.held,
            g.present_cpus,
            g.present_memory,
            sorted((p.target, p.releasing, p.deadline) for p in g.pending.values()),
            g.deferred_request is not None,
            g.reclaim_backoff_until,
            dict(g.plug_backoff_until),
            g.balloon_backoff_until,
            twin.backends[g.id].balloon_requests,
        )
    return state


def differences(a: Any, b: Any, where: str = "") -> list[str]:
    """Where two nested dicts differ, and how, for a failure one can read."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [
            line
            for key in sorted(a.keys() | b.keys(), key=str)
            for line in differences(a.get(key), b.get(key), f"{where}.{key}")
        ]
    return [] if a == b else [f"{where}: {a!r} != {b!r}"]


def drained(twin: Twin, gid: str) -> list[pb.BrokerMessage]:
    outbox = twin.outboxes.get(gid)
    messages = []
    while outbox is not None and not outbox.empty():
        message = outbox.get_nowait()
        if message is not None:
            messages.append(message)
    return messages


def without_ids(message: pb.BrokerMessage) -> str:
    copy = pb.BrokerMessage()
    copy.CopyFrom(message)
    for part in (copy.welcome, copy.grant, copy.reclaim):
        for name in ("session_id", "grant_id", "reclaim_id"):
            if hasattr(part, name):
                part.ClearField(name)  # type: ignore[arg-type]
    return str(copy)


# Each a session opened or closed, a request, the guest reading and answering
# what it was sent, a LoadReport (after onlining all it has, unasked, now and
# then), time passing, its hypervisor going away or coming back, its plugs and
# balloon refused or allowed again, an arbitration round, or time passing and
# a round (backoffs running out while nothing else happens).
EVENTS = (
    "open close ask ask ask deliver deliver deliver report report time down up jam "
    "round round round wait wait"
)


@pytest.mark.parametrize("seed", range(60))
async def test_incremental_rounds_do_what_full_rounds_do(tmp_path: Path, seed: int) -> None:
    """Random sessions, requests, Acks (refused and missing ones too), reports,
    hypervisor outages and time passing, against a broker that plans only for
    what changed and one that runs the arbiter over every guest every round:
    the same messages, books and status at every step. A third of the seeds
    cap the incremental rounds at one guest and another third at two, so that
    a round leaves guests for the next (run at once, at the same time)."""
    rng = random.Random(seed)
    round_guests = (1, 2, ROUND_GUESTS)[seed % 3]
    count = rng.randint(2, 6)
    limits = []
    for _ in range(count):
        cpu_min = rng.randint(1, 2)
        cpu_max = rng.randint(cpu_min, 4)
        burst, memory = rng.choice([cpu_max, 6]), rng.randint(8, 20)
        limits.append((cpu_min, cpu_max, burst, memory, rng.randint(0, 2), rng.random() < 0.5))
    # Roomy pools stay uncontended; tight ones switch between the two.
    pool = rng.choice(
        [(6 * count, 20 * count), (2 * count, 10 * count), (count + 2, 8 * count + 6)]
    )
    now = [1000.0]
    twins = [
        make_twin(tmp_path / "fast", limits, pool, clock=lambda: now[0], round_guests=round_guests),
        make_twin(tmp_path / "full", limits, pool, clock=lambda: now[0], incremental=False),
    ]
    gids = [f"g{i}" for i in range(count)]
    for step in range(150):
        event = rng.choice(EVENTS.split())
        gid = rng.choice(gids)
        if event == "ask":
            cpus, blocks, stale = rng.randint(0, 7), rng.randint(6, 22), rng.random() < 0.2
        policy = rng.choice(["ack", "ack", "ack", "refuse", "silent"])
        later = rng.choice([0.05, 0.5, 3.0, 20.0, 40.0])
        udev = rng.random() < 0.2
        delivered: list[list[str]] = []
        now[0] += {"time": later, "wait": 16.0}.get(event, 0.0)  # one clock for both
        for twin in twins:
            broker, record, agent = twin.broker, twin.broker.guests[gid], twin.agents[gid]
            if event == "open" and not record.connected:
                _, twin.outboxes[gid] = broker.open_session(gid, agent.hello())
            elif event == "close" and record.outbox is not None:
                broker.close_session(record, record.outbox)
                twin.outboxes.pop(gid, None)
            elif event == "ask" and record.connected:
                seen = 0 if stale else agent.last_grant_id
                message = pb.ResourceRequest(
                    request_id=step, cpus=cpus, memory_bytes=blocks * BLOCK, seen_grant_id=seen
                )
                await broker.on_message(record, pb.GuestMessage(request=message))
            elif event == "deliver" and record.connected:
                sent = drained(twin, gid)
                delivered.append([without_ids(m) for m in sent])
                for sent_message in sent:
                    reply = agent.answer(sent_message, policy)
                    if reply is not None:
                        await broker.on_message(record, reply)
            elif event == "report" and record.connected:
                if udev:  # a udev rule onlines what is plugged, no Ack says so
                    agent.online_cpus |= agent.present
                    agent.online_blocks |= set(agent.fake.block_indexes())
                cpus_online, memory_online = agent.online()
                report = pb.LoadReport(online_cpus=cpus_online, online_memory_bytes=memory_online)
                await broker.on_message(record, pb.GuestMessage(report=report))
            elif event == "down" and twin.backends[gid].up:
                twin.backends[gid].up = False
                broker.backend_down(gid, "QMP socket gone")
            elif event == "up" and not twin.backends[gid].up:
                twin.backends[gid].up = True
                await broker.backend_up(gid)
            elif event == "jam":
                twin.backends[gid].jammed = not twin.backends[gid].jammed
            elif event in ("round", "wait"):
                for _ in range(2 * len(gids)):
                    if not await broker.rebalance():
                        break
                else:
                    pytest.fail(f"step {step}: the rounds never ran out of guests")
        fast, full = twins
        assert delivered[:1] == delivered[1:], (step, gid)
        assert differences(books(fast), books(full)) == [], (step, event, gid)


async def answer(twin: Twin, gid: str, policy: str = "ack") -> list[pb.BrokerMessage]:
    """Read what the broker sent the guest, and answer it as its agent would."""
    messages = drained(twin, gid)
    for message in messages:
        reply = twin.agents[gid].answer(message, policy)
        if reply is not None:
            await twin.broker.on_message(twin.broker.guests[gid], reply)
    return messages


async def asks(twin: Twin, gid: str, cpus: int, blocks: int) -> None:
    record = twin.broker.guests[gid]
    record.last_request_at = -math.inf  # never rate limited here
    message = pb.ResourceRequest(
        cpus=cpus, memory_bytes=blocks * BLOCK, seen_grant_id=twin.agents[gid].last_grant_id
    )
    await twin.broker.on_message(record, pb.GuestMessage(request=message))


def open_all(twin: Twin) -> None:
    for gid, agent in twin.agents.items():
        _, twin.outboxes[gid] = twin.broker.open_session(gid, agent.hello())


async def test_a_request_that_fits_is_planned_alone_and_contention_runs_the_arbiter(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    twin = make_twin(tmp_path, [(1, 4, 4, 16, 0, False)] * 3, pool=(6, 48))
    open_all(twin)
    planned: list[list[str]] = []
    arbitrated: list[list[str]] = []

    def plan_alone(guests: Sequence[GuestView], block_size: int) -> Plan:
        planned.append([g.guest_id for g in guests])
        return arbiter.plan_alone(guests, block_size)

    def arbitrate(pool: Pool, guests: Sequence[GuestView], block_size: int) -> Plan:
        arbitrated.append([g.guest_id for g in guests])
        return arbiter.arbitrate(pool, guests, block_size)

    monkeypatch.setattr(core, "plan_alone", plan_alone)
    monkeypatch.setattr(core, "arbitrate", arbitrate)
    await twin.broker.rebalance()  # the sessions' round: everybody, alone
    for gid in twin.agents:
        await answer(twin, gid)  # the sessions' grants
    await twin.broker.rebalance()  # and their Acks
    planned.clear()

    await asks(twin, "g1", 3, 12)
    await twin.broker.rebalance()
    [grant] = [m.grant for m in await answer(twin, "g1")]
    assert (grant.cpus, grant.memory_bytes) == (3, 12 * BLOCK)
    # The round planned for g1 alone, and once more to see it has nothing left to do.
    assert planned == [["g1"], ["g1"]] and arbitrated == []
    planned.clear()
    await twin.broker.rebalance()  # for the grant's Ack
    assert planned == [["g1"], ["g1"]]
    planned.clear()
    await twin.broker.rebalance()
    assert planned == [] and arbitrated == []  # nothing changed: nobody to plan for

    # g0 wants 4 CPUs: 4 + 3 + 1 do not fit 6. Shares depend on each other now.
    await asks(twin, "g0", 4, 8)
    await twin.broker.rebalance()
    assert arbitrated == [["g0", "g1", "g2"]]
    [grant] = [m.grant for m in await answer(twin, "g0")]
    assert grant.cpus == 2  # water-filled: 6 = 2 + 3 + 1, none to reclaim from g1 at 3
    assert planned == []


async def settle(twin: Twin) -> None:
    """Run rounds until none leaves guests for the next, answering what is sent."""
    for _ in range(len(twin.agents) + 1):
        more = await twin.broker.rebalance()
        for gid in twin.agents:
            await answer(twin, gid)
        if not more:
            return
    pytest.fail("the rounds never ran out of guests")


async def test_a_round_plans_for_few_guests_those_asking_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    twin = make_twin(tmp_path, [(1, 4, 4, 16, 0, False)] * 5, pool=(20, 80), round_guests=2)
    open_all(twin)
    await settle(twin)
    await settle(twin)  # the grants' Acks
    rounds: list[list[str]] = []

    def plan_alone(guests: Sequence[GuestView], block_size: int) -> Plan:
        if not rounds[-1]:  # the round's own plan; _idle() then plans each guest again
            rounds[-1] = [g.guest_id for g in guests]
        return arbiter.plan_alone(guests, block_size)

    monkeypatch.setattr(core, "plan_alone", plan_alone)
    for gid in ("g0", "g1", "g2"):  # changed, asking for nothing
        record = twin.broker.guests[gid]
        assert record.outbox is not None
        twin.broker.close_session(record, record.outbox)
    await asks(twin, "g4", 3, 8)
    await asks(twin, "g3", 2, 8)
    left = []
    for _ in range(3):
        rounds.append([])
        left.append(await twin.broker.rebalance())
    assert rounds == [["g4", "g3"], ["g0", "g1"], ["g2"]]
    assert left == [True, True, False]
    grants = {gid: [m.grant.cpus for m in drained(twin, gid)] for gid in ("g3", "g4")}
    assert grants == {"g3": [2], "g4": [3]}


async def test_a_round_counts_the_changes_of_guests_it_leaves_for_the_next(
    tmp_path: Path,
) -> None:
    """g1's request is left for the next round, but the pool cannot cover both
    requests: planning g0 alone would hand it what g1 is owed."""
    limits = [(1, 4, 4, 16, 0, False)] * 2
    twins = [
        make_twin(tmp_path / "fast", limits, pool=(4, 32), round_guests=1),
        make_twin(tmp_path / "full", limits, pool=(4, 32), incremental=False),
    ]
    for twin in twins:
        open_all(twin)
        await settle(twin)
        await settle(twin)
        await asks(twin, "g0", 3, 8)
        await asks(twin, "g1", 3, 8)
        assert await twin.broker.rebalance() is False  # contended: everyone at once
    fast, full = ([m.grant.cpus for gid in ("g0", "g1") for m in drained(t, gid)] for t in twins)
    assert fast == full == [2, 2]


async def test_a_short_reclaim_is_asked_again_after_its_backoff_though_nothing_changes(
    tmp_path: Path,
) -> None:
    now = [1000.0]
    twin = make_twin(tmp_path, [(1, 4, 4, 16, 0, False)] * 2, pool=(8, 32), clock=lambda: now[0])
    open_all(twin)
    await asks(twin, "g0", 1, 12)
    await twin.broker.rebalance()
    await answer(twin, "g0")
    await asks(twin, "g0", 1, 8)
    await twin.broker.rebalance()
    # The guest keeps one block (EBUSY): the reclaim is short.
    [reclaim] = [m.reclaim for m in await answer(twin, "g0", "refuse")]
    assert reclaim.memory_bytes == 8 * BLOCK
    await twin.broker.rebalance()
    assert drained(twin, "g0") == []
    now[0] += SHORT_RECLAIM_BACKOFF_SECONDS / 2
    await twin.broker.rebalance()
    assert drained(twin, "g0") == []
    now[0] += SHORT_RECLAIM_BACKOFF_SECONDS / 2 + 1
    await twin.broker.rebalance()  # a periodic round, nothing new about anybody
    [again] = [m.reclaim for m in drained(twin, "g0")]
    assert again.memory_bytes == 8 * BLOCK


async def test_a_failed_balloon_is_tried_again_after_its_backoff_though_nothing_changes(
    tmp_path: Path,
) -> None:
    now = [1000.0]
    twin = make_twin(tmp_path, [(1, 4, 4, 16, 0, True)], pool=(4, 16), clock=lambda: now[0])
    open_all(twin)
    backend = twin.backends["g0"]
    await asks(twin, "g0", 1, 12)
    await twin.broker.rebalance()
    await answer(twin, "g0")
    await asks(twin, "g0", 1, 8)
    await twin.broker.rebalance()
    backend.jammed = True
    await answer(twin, "g0", "refuse")  # one block kept online: for the balloon
    await twin.broker.rebalance()
    assert backend.balloon_requests == []
    backend.jammed = False
    # It asks for what it has now: no release offer left to wait for.
    await asks(twin, "g0", 1, 9)
    await twin.broker.rebalance()
    assert drained(twin, "g0") == []
    assert backend.balloon_requests == []  # not before its backoff ends
    now[0] += PLUG_BACKOFF_SECONDS + 1
    await twin.broker.rebalance()
    assert backend.balloon_requests == [BLOCK]
