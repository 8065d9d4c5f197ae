"""The broker's books, message by message, without gRPC."""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry
from simulation import broker_config

from agent.kernel import Kernel
from agent.topology import Topology
from broker.arbiter import Amount
from broker.backend import BackendError, BackendUnavailable, EjectRefused, PlugState
from broker.config import CpuLimits, GuestConfig, MemoryLimits
from broker.core import Broker, GuestRecord
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
