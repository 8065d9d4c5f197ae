"""The agent's rules, driven message by message: what it does with grants, reclaims,
hostile or confused broker messages, hot-adds without a broker, and its minimum."""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, cast

import grpc.aio
import pytest
from prometheus_client import CollectorRegistry
from simulation import LoadDriver, agent_config, make_agent, running, until

from agent import policy
from agent.actuator import Actuator
from agent.config import AgentConfig, CpuLimits, MemoryLimits
from agent.daemon import Agent, LiveStateFile, RepeatedWarnings
from agent.kernel import Kernel, KernelReadError
from agent.metrics import AgentMetrics
from agent.sensing import MIN_SPAN_SECONDS, Sensor
from agent.session import BrokerLink
from agent.udev import OnliningRule
from vmtide.fakesys import FakeGuest, FakeKernelWriter, Load
from vmtide.v1 import broker_pb2 as pb

MiB = 1 << 20
GiB = 1 << 30


class RecordingLink(BrokerLink):
    """A connected link that records what the agent sends."""

    def __init__(self, agent: Agent) -> None:
        super().__init__(agent.config.broker, agent.hello, agent.on_broker_message)
        self.connected = True
        self.sent: list[pb.GuestMessage] = []

    def send(self, message: pb.GuestMessage) -> bool:
        self.sent.append(message)
        return True

    def acks(self) -> list[pb.Ack]:
        return [m.ack for m in self.sent if m.WhichOneof("body") == "ack"]

    def requested(self) -> list[tuple[int, int]]:
        """CPUs and memory bytes of each request sent."""
        return [
            (m.request.cpus, m.request.memory_bytes)
            for m in self.sent
            if m.WhichOneof("body") == "request"
        ]


@pytest.fixture
def guest(tmp_path: Path) -> FakeGuest:
    guest = FakeGuest(tmp_path / "g", possible_cpus=4, boot_cpus=1, boot_blocks=8)
    guest.plug_cpu(1)
    guest.plug_cpu(2)
    guest.plug_blocks(4)
    return guest


def build(
    guest: FakeGuest, *, broker: bool = True, **limits: object
) -> tuple[Agent, RecordingLink]:
    config: AgentConfig = agent_config(guest, "g", "unix:/nonexistent", **limits)
    if not broker:
        config = dataclasses.replace(
            config, broker=dataclasses.replace(config.broker, enabled=False)
        )
    agent = make_agent(config)
    link = RecordingLink(agent)
    agent.link = link if broker else None
    return agent, link


def grant(grant_id: int, cpus: int, memory: int) -> pb.BrokerMessage:
    return pb.BrokerMessage(grant=pb.Grant(grant_id=grant_id, cpus=cpus, memory_bytes=memory))


def reclaim(reclaim_id: int, cpus: int, memory: int) -> pb.BrokerMessage:
    return pb.BrokerMessage(
        reclaim=pb.Reclaim(reclaim_id=reclaim_id, cpus=cpus, memory_bytes=memory, deadline_ms=5000)
    )


async def test_standby_stays_offline_until_granted(guest: FakeGuest) -> None:
    agent, link = build(guest)
    await agent.ensure_minimum("test")
    assert guest.online_cpus() == {0}  # standby cpu1, cpu2 not granted
    await agent.on_broker_message(grant(1, 3, 1536 * MiB))
    assert guest.online_cpus() == {0, 1, 2}
    assert len(guest.online_blocks()) == 12
    (ack,) = link.acks()
    assert ack.grant_id == 1 and ack.online_cpus == 3 and ack.online_memory_bytes == 1536 * MiB
    assert [(i.kind, i.index, i.outcome) for i in ack.items][:2] == [
        (pb.RESOURCE_KIND_CPU, 1, pb.OUTCOME_DONE),
        (pb.RESOURCE_KIND_CPU, 2, pb.OUTCOME_DONE),
    ]


async def test_duplicate_grant_is_harmless(guest: FakeGuest) -> None:
    agent, link = build(guest)
    await agent.on_broker_message(grant(7, 2, 1 * GiB))
    await agent.on_broker_message(grant(7, 2, 1 * GiB))
    assert guest.online_cpus() == {0, 1}
    assert len(link.acks()) == 1


async def test_grant_above_burst_is_capped(guest: FakeGuest) -> None:
    agent, link = build(guest, cpus=CpuLimits(minimum=1, maximum=2))
    await agent.on_broker_message(grant(1, 99, 1 * GiB + 5))
    assert guest.online_cpus() == {0, 1}
    ack = link.acks()[0]
    assert "above this guest's burst limit 2" in ack.note
    assert "not a whole number of blocks" in ack.note


async def test_reclaim_offlines_highest_cpus_and_reports_items(guest: FakeGuest) -> None:
    agent, link = build(guest)
    await agent.on_broker_message(grant(1, 3, 1536 * MiB))
    guest.set_faults([{"kind": "memory", "index": 11, "effect": errno.EBUSY, "value": "offline"}])
    await agent.on_broker_message(reclaim(2, 1, 1 * GiB))
    assert guest.online_cpus() == {0}
    ack = link.acks()[-1]
    assert ack.reclaim_id == 2
    items = [(i.kind, i.index, i.outcome, i.errno) for i in ack.items]
    assert items[:2] == [
        (pb.RESOURCE_KIND_CPU, 2, pb.OUTCOME_DONE, 0),
        (pb.RESOURCE_KIND_CPU, 1, pb.OUTCOME_DONE, 0),
    ]
    # Block 11 refuses; the agent reports it and moves on to the next block.
    assert (pb.RESOURCE_KIND_MEMORY_BLOCK, 11, pb.OUTCOME_REFUSED, errno.EBUSY) in items
    assert ack.online_memory_bytes == guest.online_memory_bytes() == 1 * GiB + 128 * MiB
    assert guest.block_state(11) == "online"
    assert "no more movable blocks" in ack.note


async def test_reclaim_below_minimum_is_refused(guest: FakeGuest) -> None:
    agent, link = build(
        guest, cpus=CpuLimits(minimum=2), memory=MemoryLimits(minimum_bytes=1 * GiB)
    )
    await agent.on_broker_message(grant(1, 3, 1 * GiB))
    await agent.on_broker_message(reclaim(2, 0, 0))
    assert guest.online_cpus() == {0, 1}
    assert guest.online_memory_bytes() == 1 * GiB
    ack = link.acks()[-1]
    assert "minimum is 2 CPUs" in ack.note and "minimum is 1024 MiB" in ack.note


async def test_reclaim_never_offlines_cpu0_or_boot_memory(guest: FakeGuest) -> None:
    agent, link = build(
        guest, cpus=CpuLimits(minimum=1), memory=MemoryLimits(minimum_bytes=128 * MiB)
    )
    await agent.on_broker_message(reclaim(1, 1, 128 * MiB))
    assert 0 in guest.online_cpus()
    # Boot memory is in kernel zones: never offered, so nothing was written;
    # the Ack lists only the standby blocks, as already offline.
    assert guest.online_memory_bytes() == 1 * GiB
    blocks = [i for i in link.acks()[-1].items if i.kind == pb.RESOURCE_KIND_MEMORY_BLOCK]
    assert [(i.index, i.outcome, i.detail) for i in blocks] == [
        (b, pb.OUTCOME_ALREADY, "standby") for b in (8, 9, 10, 11)
    ]


async def test_reclaim_never_offlines_cpu0_even_where_it_has_an_online_file(
    tmp_path: Path,
) -> None:
    # arm64 and ppc64 kernels show cpu0/online; cpu1 refusing must not make
    # the shrink walk down to it.
    guest = FakeGuest(tmp_path / "g", possible_cpus=2, boot_cpus=2, cpu0_online_file=True)
    agent, link = build(guest)
    guest.set_faults([{"kind": "cpu", "index": 1, "effect": errno.EBUSY, "value": "0"}])
    await agent.on_broker_message(reclaim(1, 1, 1 * GiB))
    assert guest.online_cpus() == {0, 1}
    items = [(i.index, i.outcome) for i in link.acks()[-1].items if i.kind == pb.RESOURCE_KIND_CPU]
    assert items == [(1, pb.OUTCOME_REFUSED)]
    assert 0 in (await agent.hello()).topology.cpus.pinned


async def test_below_minimum_at_start_onlines_standby(guest: FakeGuest) -> None:
    agent, _ = build(
        guest, cpus=CpuLimits(minimum=3), memory=MemoryLimits(minimum_bytes=1280 * MiB)
    )
    await agent.ensure_minimum("start")
    assert guest.online_cpus() == {0, 1, 2}
    assert guest.online_memory_bytes() == 1280 * MiB


async def test_without_broker_hot_added_resources_are_onlined(guest: FakeGuest) -> None:
    agent, _ = build(guest, broker=False)
    await agent.reconcile("start")
    assert guest.online_cpus() == {0}  # what was standby before stays so
    guest.plug_cpu(3)
    new_blocks = guest.plug_blocks(2)
    await agent.reconcile("uevent")
    assert guest.online_cpus() == {0, 3}
    assert set(new_blocks) <= set(guest.online_blocks())


async def test_vanished_cpu_is_reported_not_fatal(guest: FakeGuest) -> None:
    agent, link = build(guest)
    guest.set_faults([{"kind": "cpu", "index": 1, "effect": "vanish"}])
    await agent.on_broker_message(grant(1, 3, 1 * GiB))
    items = {(i.index, i.outcome) for i in link.acks()[0].items}
    assert (1, pb.OUTCOME_NOT_FOUND) in items
    assert (2, pb.OUTCOME_DONE) in items


async def test_limits_update_tightens_the_ceiling(guest: FakeGuest) -> None:
    agent, _ = build(guest)
    assert agent.limits.cpus.maximum == 4
    update = pb.BrokerMessage(
        limits=pb.LimitsUpdate(
            limits=pb.Limits(cpus=pb.ResourceLimits(minimum=1, maximum=2, burst=2))
        )
    )
    await agent.on_broker_message(update)
    assert (agent.limits.cpus.maximum, agent.limits.cpus.burst) == (2, 2)
    assert agent.limits.cpus.minimum == 1


async def test_a_failing_rescan_is_logged_and_survived(
    guest: FakeGuest, caplog: pytest.LogCaptureFixture
) -> None:
    agent, _ = build(guest)
    size = guest.sysfs / "devices/system/memory/block_size_bytes"
    size.write_text("zz\n")
    await agent._contained("rescan", agent.reconcile("rescan"))
    assert "rescan: " in caplog.text and "block_size_bytes" in caplog.text
    assert "Traceback" not in caplog.text
    size.write_text("8000000\n")
    await agent.on_broker_message(grant(1, 2, 1 * GiB))
    assert guest.online_cpus() == {0, 1}


async def test_grant_ids_are_fresh_in_a_new_session(guest: FakeGuest) -> None:
    # A restarted broker numbers its grants from scratch: the same id in a
    # new session is a new grant, not a duplicate.
    agent, _ = build(guest)
    await agent.on_broker_message(grant(2, 1, 1 * GiB))
    welcome = pb.BrokerMessage(welcome=pb.Welcome(session_id="s2", guest_id="g"))
    await agent.on_broker_message(welcome)
    await agent.on_broker_message(grant(2, 3, 1 * GiB))
    assert guest.online_cpus() == {0, 1, 2}


def decisions(cpu: tuple[int, int], memory: tuple[int, int]) -> policy.Decisions:
    """Decisions from (target, current) pairs."""
    return policy.Decisions(
        cpu=policy.Decision(cpu[0], cpu[1], "test", policy.Urgency.LOW, bursting=False),
        memory=policy.Decision(memory[0], memory[1], "test", policy.Urgency.LOW, bursting=False),
    )


async def test_a_hold_while_a_grant_is_onlined_is_not_a_release(guest: FakeGuest) -> None:
    agent, link = build(guest)
    # Granted 3 CPUs; none of the standby ones could be onlined yet.
    guest.set_faults([{"kind": "cpu", "index": i, "effect": errno.EBUSY} for i in (1, 2)])
    await agent.on_broker_message(grant(1, 3, 1 * GiB))
    assert guest.online_cpus() == {0}
    await agent.pursue(decisions(cpu=(1, 1), memory=(1 * GiB, 1 * GiB)))
    assert not [m for m in link.sent if m.WhichOneof("body") == "request"]
    # A shrink is an offer to release.
    await agent.pursue(decisions(cpu=(2, 3), memory=(1 * GiB, 1 * GiB)))
    (request,) = [m.request for m in link.sent if m.WhichOneof("body") == "request"]
    assert (request.cpus, request.memory_bytes) == (2, 1 * GiB)


async def test_standby_cpus_are_asked_for_and_kept_offline(guest: FakeGuest) -> None:
    agent, link = build(guest, cpus=CpuLimits(minimum=1, maximum=3, standby=1))
    agent.on_link_state(True)
    # The session's first request says what the guest wants though it holds
    # it: one CPU online and one standby.
    await agent.pursue(decisions(cpu=(1, 1), memory=(1 * GiB, 1 * GiB)))
    assert link.requested() == [(2, 1 * GiB)]
    await agent.pursue(decisions(cpu=(1, 1), memory=(1 * GiB, 1 * GiB)))
    assert len(link.requested()) == 1  # a hold is not news
    # Granted, the standby stays offline: the policy wants one CPU.
    await agent.on_broker_message(grant(1, 2, 1 * GiB))
    assert guest.online_cpus() == {0}
    assert agent.entitlement is not None and agent.entitlement.cpus == 2
    # A grow to two asks for a third (standby again), never above maximum.
    await agent.pursue(decisions(cpu=(2, 1), memory=(1 * GiB, 1 * GiB)))
    assert guest.online_cpus() == {0, 1}  # within the entitlement: no wait
    assert link.requested()[-1] == (3, 1 * GiB)
    await agent.pursue(decisions(cpu=(3, 2), memory=(1 * GiB, 1 * GiB)))
    assert link.requested()[-1] == (3, 1 * GiB)


async def test_without_standby_a_session_restates_its_size_to_give_standby_back(
    guest: FakeGuest,
) -> None:
    agent, link = build(guest)
    agent.on_link_state(True)
    await agent.pursue(decisions(cpu=(1, 1), memory=(1 * GiB, 1 * GiB)))
    # One CPU online, two plugged: the request is the broker's cue to reclaim.
    assert link.requested() == [(1, 1 * GiB)]
    await agent.on_broker_message(reclaim(1, 1, 1 * GiB))
    (ack,) = link.acks()
    assert sorted(i.index for i in ack.items if i.kind == pb.RESOURCE_KIND_CPU) == [1, 2]


async def test_a_shrink_with_standby_goes_offline_in_the_guest_and_stays_plugged(
    guest: FakeGuest,
) -> None:
    agent, link = build(guest, cpus=CpuLimits(minimum=1, maximum=3, standby=1))
    await agent.on_broker_message(grant(1, 3, 1 * GiB))
    await agent.pursue(decisions(cpu=(3, 1), memory=(1 * GiB, 1 * GiB)))
    assert guest.online_cpus() == {0, 1, 2}
    # The load is gone: down to one CPU at once, no reclaim needed for it;
    # the guest offers back what is beyond its one standby.
    await agent.pursue(decisions(cpu=(1, 3), memory=(1 * GiB, 1 * GiB)))
    assert guest.online_cpus() == {0}
    assert link.requested()[-1] == (2, 1 * GiB)
    # The reclaim that answers keeps the standby within its target (cpu1,
    # which onlining takes first) and lists the other to unplug.
    await agent.on_broker_message(reclaim(2, 2, 1 * GiB))
    ack = link.acks()[-1]
    cpus = [(i.index, i.outcome) for i in ack.items if i.kind == pb.RESOURCE_KIND_CPU]
    assert cpus == [(2, pb.OUTCOME_ALREADY)]
    assert guest.present_cpus() >= {0, 1, 2}  # the broker unplugs; the agent never does


async def test_without_a_broker_standby_never_shrinks_what_nothing_would_grow_back(
    guest: FakeGuest,
) -> None:
    from agent.daemon import Amount

    agent, _ = build(guest, broker=False, cpus=CpuLimits(minimum=1, maximum=3, standby=1))
    await agent.act("test", Amount(3, 1 * GiB))
    await agent.pursue(decisions(cpu=(1, 3), memory=(1 * GiB, 1 * GiB)))
    assert guest.online_cpus() == {0, 1, 2}


def woken_sample(agent: Agent, run_queue: int, stall_percent: float) -> policy.Sample:
    from agent.daemon import make_sample

    sample = make_sample(agent.sensor.sample(), agent.topo)
    return dataclasses.replace(sample, run_queue=run_queue, cpu_some_now=stall_percent)


async def test_a_trigger_with_tasks_waiting_takes_an_entitled_standby_cpu_at_once(
    guest: FakeGuest,
) -> None:
    agent, link = build(guest, cpus=CpuLimits(minimum=1, maximum=3, standby=1))
    # Not entitled to more than is online: nothing to take, whatever the load.
    assert not await agent._take_standby(woken_sample(agent, run_queue=3, stall_percent=80))
    await agent.on_broker_message(grant(1, 2, 1 * GiB))
    assert guest.online_cpus() == {0}
    # Noise: a stall with nothing waiting, or tasks waiting that never stalled.
    assert not await agent._take_standby(woken_sample(agent, run_queue=1, stall_percent=80))
    assert not await agent._take_standby(woken_sample(agent, run_queue=3, stall_percent=2))
    assert not await agent._take_standby(woken_sample(agent, run_queue=3, stall_percent=math.nan))
    assert guest.online_cpus() == {0}
    asked_before = len(link.requested())
    assert await agent._take_standby(woken_sample(agent, run_queue=3, stall_percent=40))
    assert guest.online_cpus() == {0, 1}
    # No request: it was the guest's already. The decision is on record.
    assert len(link.requested()) == asked_before
    assert agent.recent_decisions[-1]["target"] == 2
    # All of the entitlement online: the next trigger must wait for a grant.
    assert not await agent._take_standby(woken_sample(agent, run_queue=3, stall_percent=40))


async def test_sensing_goes_on_while_a_reclaim_offlines(
    guest: FakeGuest, caplog: pytest.LogCaptureFixture
) -> None:
    # A reclaim's offline write hangs until its deadline (2 s here; 30 s plus
    # the kill grace on a real guest) while the load is over what is online:
    # the sensing loop must keep feeding the watchdog rather than wait its turn.
    caplog.set_level(logging.DEBUG, logger="vmtide.agent")
    agent, link = build(guest)
    # Granted 3 CPUs; cpu2 cannot come online, so the policy keeps trying.
    guest.set_faults([{"kind": "cpu", "index": 2, "effect": errno.EBUSY, "value": "1"}])
    await agent.on_broker_message(grant(1, 3, 1536 * MiB))
    assert guest.online_cpus() == {0, 1}
    guest.set_faults(
        [
            {"kind": "cpu", "index": 2, "effect": errno.EBUSY, "value": "1"},
            {"kind": "memory", "index": 11, "effect": "hang", "value": "offline"},
        ]
    )
    pings: list[float] = []
    agent.notify = lambda state: pings.append(time.monotonic())
    driver = LoadDriver(guest, Load(cpus=3.5, memory_bytes=300 * MiB))
    async with running(driver.run, agent._sensing_loop):
        await asyncio.sleep(0.5)  # the policy now wants more CPUs than are online
        started = time.monotonic()
        await agent.on_broker_message(reclaim(2, 3, 1408 * MiB))
        took = time.monotonic() - started
    during = [t for t in pings if started <= t <= started + took]
    assert took >= 1.5, "the offline did not hang"
    gaps = [b - a for a, b in zip([started, *during], [*during, started + took], strict=True)]
    assert max(gaps) < 0.6, f"the sensing loop stalled for {max(gaps):.1f} s"
    # Its samples are marked as the reclaim's (the next test), and the policy
    # holds the CPUs on such samples rather than grow (tests/test_policy.py).
    assert "growing at a later cycle" not in caplog.text
    items = [(i.index, i.outcome) for i in link.acks()[-1].items]
    assert (11, pb.OUTCOME_TIMED_OUT) in items


async def test_samples_that_overlap_a_reclaim_say_so_for_the_policy(guest: FakeGuest) -> None:
    # The reclaim's offline write takes its 2 s deadline; its page migration
    # would load the CPUs in a real guest. Samples whose busy shares cover any
    # of it are marked, and later ones carry when it ended.
    agent, _ = build(guest)
    await agent.on_broker_message(grant(1, 3, 1536 * MiB))
    guest.set_faults([{"kind": "memory", "index": 11, "effect": "hang", "value": "offline"}])
    driver = LoadDriver(guest, Load(cpus=0.2, memory_bytes=300 * MiB))
    async with running(driver.run, agent._sensing_loop):
        await until(lambda: len(agent.samples) >= 3, 10, "samples before the reclaim")
        started = time.monotonic()
        await agent.on_broker_message(reclaim(2, 3, 1408 * MiB))
        ended = time.monotonic()
        await until(lambda: agent.samples[-1].at > ended + 1.0, 10, "samples after the reclaim")
    samples = list(agent.samples)
    assert not any(s.offlining for s in samples if s.at < started)
    during = [s for s in samples if started < s.at < ended]
    assert len(during) >= 5 and all(s.offlining for s in during)
    end = samples[-1].offlined_at
    assert started + 1.5 < end <= ended
    # A busy share spans half a second at least: those just after still reach
    # back into the reclaim; a second on, none does.
    assert all(s.offlining for s in samples if end < s.at < end + MIN_SPAN_SECONDS)
    assert not samples[-1].offlining


class ReadFailsAfter(Kernel):
    """A kernel whose block list cannot be read (EIO) once `trip` is set, as
    when sysfs changes under the agent mid-operation."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.trip_on = ""  # "cpu": after a CPU is offlined; "memory": after a block
        self.tripped = False

    def memory_blocks(self) -> Any:
        if self.tripped:
            raise KernelReadError(self.sysfs / "devices/system/memory", "Input/output error")
        return super().memory_blocks()

    def set_cpu(self, cpu_id: int, online: bool, timeout: float | None = None) -> Any:
        result = super().set_cpu(cpu_id, online, timeout)
        self.tripped |= self.trip_on == "cpu" and not online
        return result

    def offline_block(self, index: int, timeout: float | None = 10.0) -> Any:
        result = super().offline_block(index, timeout)
        self.tripped |= self.trip_on == "memory"
        return result


@pytest.mark.parametrize("trip_on", ["cpu", "memory"])
async def test_a_reclaim_is_acknowledged_when_sysfs_cannot_be_read_back(
    guest: FakeGuest, trip_on: str
) -> None:
    # Without the Ack the broker would never unplug what went offline.
    config = agent_config(guest, "g", "unix:/nonexistent")
    kernel = ReadFailsAfter(guest.sysfs, guest.procfs, writer=FakeKernelWriter(guest.root))
    agent = Agent(
        config,
        Actuator(kernel, offline_timeout=2.0),
        Sensor(guest.procfs),
        AgentMetrics(CollectorRegistry()),
        guest_id="g",
    )
    link = RecordingLink(agent)
    agent.link = link
    await agent.on_broker_message(grant(1, 3, 1536 * MiB))
    kernel.trip_on = trip_on
    await agent.on_broker_message(reclaim(2, 1, 1 * GiB))
    ack = link.acks()[-1]
    assert ack.reclaim_id == 2
    done = {(i.kind, i.index) for i in ack.items if i.outcome == pb.OUTCOME_DONE}
    assert {(pb.RESOURCE_KIND_CPU, 2), (pb.RESOURCE_KIND_CPU, 1)} <= done
    assert guest.online_cpus() == {0} and ack.online_cpus == 1
    if trip_on == "cpu":  # the block list failed before any block was tried
        assert "stopped: " in ack.note and "Input/output error" in ack.note
        assert ack.online_memory_bytes == guest.online_memory_bytes() == 1536 * MiB
    else:  # every block went; the counts come from the items
        assert ack.online_memory_bytes == guest.online_memory_bytes() == 1 * GiB


class HelloOnlyChannel:
    """A broker channel whose sessions take the Hello and end at once (the
    broker going away), so the link reconnects."""

    def __init__(self, on_hello: Callable[[pb.Hello], None]) -> None:
        self.on_hello = on_hello

    async def __aenter__(self) -> HelloOnlyChannel:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    def stream_stream(self, *args: object, **kwargs: object) -> Callable[..., HelloOnlyCall]:
        return lambda requests: HelloOnlyCall(requests, self.on_hello)


class HelloOnlyCall:
    def __init__(
        self, requests: AsyncIterator[pb.GuestMessage], on_hello: Callable[[pb.Hello], None]
    ) -> None:
        self.requests = requests
        self.on_hello = on_hello

    async def __aiter__(self) -> AsyncIterator[pb.BrokerMessage]:
        first = await anext(self.requests)
        self.on_hello(first.hello)
        return
        yield  # an async generator that ends the stream without a message

    def cancel(self) -> bool:
        return True


async def test_the_hello_after_a_reconnect_shows_what_changed_meanwhile(
    guest: FakeGuest,
) -> None:
    # No rescan runs between the sessions: the Hello itself reads sysfs.
    agent, _ = build(guest)
    hellos: list[pb.Hello] = []
    stop = asyncio.Event()

    def on_hello(hello: pb.Hello) -> None:
        hellos.append(hello)
        if len(hellos) == 1:  # the host hot-adds while the session is down
            guest.plug_cpu(3)
            guest.plug_blocks(2)
        else:
            stop.set()

    link = BrokerLink(
        agent.config.broker,
        agent.hello,
        agent.on_broker_message,
        channel_factory=lambda config: cast(grpc.aio.Channel, HelloOnlyChannel(on_hello)),
    )
    await asyncio.wait_for(link.run(stop), 10)
    before, after = (h.topology for h in hellos)
    assert list(before.cpus.present) == [0, 1, 2] and len(before.memory.blocks) == 12
    assert list(after.cpus.present) == [0, 1, 2, 3] and len(after.memory.blocks) == 14
    assert agent.topo.standby_cpus == (1, 2, 3)


async def test_a_hello_tells_of_a_udev_rule_onlining_memory(
    guest: FakeGuest, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="vmtide.agent")
    agent, _ = build(guest)
    assert not (await agent.hello()).topology.memory.auto_online  # auto_online_blocks=offline
    rules = [
        OnliningRule(Path("/usr/lib/udev/rules.d/80-hotplug-cpu.rules"), frozenset({"cpu"})),
        OnliningRule(Path("/usr/lib/udev/rules.d/40-redhat.rules"), frozenset({"memory"})),
    ]
    cpu_only = Agent(
        agent.config,
        agent.actuator,
        agent.sensor,
        agent.metrics,
        guest_id="g",
        onlining_rules=rules[:1],
    )
    assert not (await cpu_only.hello()).topology.memory.auto_online
    caplog.clear()
    agent = Agent(
        agent.config,
        agent.actuator,
        agent.sensor,
        agent.metrics,
        guest_id="g",
        onlining_rules=rules,
    )
    for _ in range(2):  # a Hello per session; the log line only at start
        assert (await agent.hello()).topology.memory.auto_online
    logged = [r.getMessage() for r in caplog.records if "40-redhat.rules" in r.getMessage()]
    assert logged == [
        "udev rule /usr/lib/udev/rules.d/40-redhat.rules (memory) onlines hot-added resources;"
        " vmtide works alongside it"
    ]


async def sensing_for(agent: Agent, seconds: float) -> None:
    async with running(agent._sensing_loop):
        await asyncio.sleep(seconds)


async def test_sysfs_or_procfs_changing_underfoot_is_one_line_not_a_traceback(
    guest: FakeGuest, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="vmtide.agent")
    agent, _ = build(guest)
    (guest.procfs / "stat").unlink()  # procfs: ProcParseError every cycle
    await sensing_for(agent, 0.5)
    (records,) = [r for r in caplog.records if "sensing cycle" in r.getMessage()]
    assert records.levelno == logging.WARNING and records.exc_info is None
    assert f"{guest.procfs}/stat: unreadable" in records.getMessage()
    failed = agent.cycle_errors["expected"]
    assert failed >= 3 and agent.cycle_errors["unexpected"] == 0
    assert agent.metrics.cycles.labels("error")._value.get() == failed
    assert "Traceback" not in caplog.text

    # A bug is another matter: its traceback is logged, every time.
    caplog.clear()

    def broken() -> Any:
        raise RuntimeError("a bug")

    agent.sensor.sample = broken  # type: ignore[method-assign]
    await sensing_for(agent, 0.25)
    bugs = [r for r in caplog.records if "sensing cycle failed" in r.getMessage()]
    assert bugs and all(r.exc_info is not None for r in bugs)
    assert agent.cycle_errors["unexpected"] == len(bugs)


class ScriptedPressure:
    """A PressureWatch whose trigger fires on the waits `fires` names (0 first)."""

    available = True

    def __init__(self, fires: set[int], waits: int) -> None:
        self.fires = fires
        self.timeouts: list[float] = []
        self.done = asyncio.Event()  # set at the last wait, which lasts until released
        self.released = asyncio.Event()
        self._waits = waits

    async def wait(self, timeout: float) -> bool:
        self.timeouts.append(timeout)
        if len(self.timeouts) >= self._waits:
            self.done.set()
            await self.released.wait()
        return len(self.timeouts) - 1 in self.fires


async def test_after_a_pressure_trigger_the_agent_looks_again_within_half_a_second(
    guest: FakeGuest,
) -> None:
    config = agent_config(guest, "g", "unix:/nonexistent")
    agent = make_agent(
        dataclasses.replace(
            config,
            agent=dataclasses.replace(
                config.agent, sensing_interval_seconds=5.0, rescan_interval_seconds=5.0
            ),
        )
    )
    pressure = ScriptedPressure(fires={1}, waits=4)
    agent.pressure = pressure  # type: ignore[assignment]
    async with running(agent._sensing_loop):
        await asyncio.wait_for(pressure.done.wait(), 10)
        pressure.released.set()
    # Waits return at once here (a timeout or the trigger): what counts is how
    # long each would have lasted. The trigger fired in the second wait.
    first, fired, after_trigger, after_that = pressure.timeouts
    assert first > 4.0 and fired > 4.0
    assert after_trigger <= 0.5
    assert after_that > 4.0


def test_a_repeated_warning_is_logged_once_a_minute(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    warnings = RepeatedWarnings(60.0, clock=lambda: now[0])
    for now[0] in (0.0, 1.0, 2.0, 59.0, 61.0, 62.0):
        warnings.warn("sysfs: gone")
    warnings.warn("procfs: gone")
    assert [r.getMessage() for r in caplog.records] == [
        "sysfs: gone",
        "sysfs: gone (and 3 times more since it was last logged)",
        "procfs: gone",
    ]


async def test_the_live_state_says_what_the_daemon_sees_and_does(
    guest: FakeGuest, tmp_path: Path
) -> None:
    agent, link = build(guest)
    link.session_id = "s-1"
    agent.state_file = LiveStateFile(tmp_path / "run" / "agent.json")
    await agent.on_broker_message(grant(1, 2, 1 * GiB))
    driver = LoadDriver(guest, Load(cpus=3.5, memory_bytes=300 * MiB))
    async with running(driver.run, agent._sensing_loop):
        await asyncio.sleep(0.8)  # busy for longer than the grow window
    # Written at the first cycle, then at most once a second.
    written = json.loads((tmp_path / "run" / "agent.json").read_text())
    assert written["source"] == "daemon" and written["cpus"]["online"] == 2
    state = json.loads(json.dumps(agent.live_state()))
    assert state["guest_id"] == "g" and state["sensing_interval_seconds"] == 0.1
    assert state["cpus"]["online"] == 2 and state["cpus"]["standby"] == [2]
    assert state["memory"]["online_bytes"] == 1 * GiB
    assert state["cpus"]["limits"] == {"minimum": 1, "maximum": 4, "burst": 4}
    assert state["entitlement"] == {"cpus": 2, "memory_bytes": 1 * GiB}
    assert state["broker"]["connected"] and state["broker"]["session_id"] == "s-1"
    assert state["broker"]["last_grant_id"] == 1
    assert state["cpus"]["decision"]["direction"] == "grow"
    assert state["cpus"]["decision"]["reason"].startswith("cpu 2->")
    request = state["last_request"]
    assert request["cpus"] > 2 and request["reason"].startswith("cpus: cpu 2->")
    recent = state["recent_decisions"]
    assert recent and recent[-1]["resource"] == "cpus" and recent[-1]["direction"] == "grow"
    assert state["pending"] == {
        "acting": None,
        "granted_not_online": {"cpus": 0, "memory_bytes": 0},
    }
    # A clean stop removes it: `status` then knows at once that no agent runs.
    agent.state_file.remove()
    assert not (tmp_path / "run" / "agent.json").exists()


def test_a_state_file_that_cannot_be_written_is_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "file").write_text("")
    state = LiveStateFile(tmp_path / "file" / "agent.json", clock=iter(range(0, 100, 2)).__next__)
    for _ in range(3):
        assert state.due()
        state.write({"x": 1})
    assert len([r for r in caplog.records if "cannot write the live state" in r.getMessage()]) == 1


def test_the_state_file_directory_is_made_when_missing(tmp_path: Path) -> None:
    import shutil

    path = tmp_path / "run" / "vmtide-agent" / "state.json"
    state = LiveStateFile(path)
    state.write({"x": 1})
    shutil.rmtree(tmp_path / "run")  # systemd-tmpfiles, or an operator, cleaned it
    state.write({"x": 2})
    assert json.loads(path.read_text()) == {"x": 2}


def test_a_sample_carries_the_period_own_stall_from_the_psi_totals(guest: FakeGuest) -> None:
    from agent.daemon import make_sample
    from agent.topology import Topology

    topo = Topology.read(Kernel(guest.sysfs, guest.procfs))
    before = Sensor(guest.procfs).sample()
    # Half a second later: 0.1 s of CPU stall, 0.25 s some and 0.05 s full on memory.
    after = dataclasses.replace(
        before,
        at=before.at + 0.5,
        psi_available=True,
        cpu_some_total_us=before.cpu_some_total_us + 100_000,
        memory_some_total_us=before.memory_some_total_us + 250_000,
        memory_full_total_us=before.memory_full_total_us + 50_000,
    )
    sample = make_sample(after, topo, dataclasses.replace(before, psi_available=True))
    assert sample.cpu_some_now == pytest.approx(20.0)
    assert sample.memory_some_now == pytest.approx(50.0)
    assert sample.memory_full_now == pytest.approx(10.0)
    # The first sample, a counter that went back (a new boot) or no PSI: unknown.
    assert math.isnan(make_sample(after, topo).memory_some_now)
    later_boot = dataclasses.replace(before, memory_some_total_us=10**12)
    assert math.isnan(make_sample(after, topo, later_boot).memory_some_now)
    no_psi = dataclasses.replace(after, psi_available=False)
    assert math.isnan(make_sample(no_psi, topo, before).cpu_some_now)


def test_a_noisy_grow_the_outstanding_request_covers_is_not_resent(guest: FakeGuest) -> None:
    from agent.daemon import Amount

    agent, link = build(guest)
    agent.entitlement = Amount(1, 1 * GiB)

    def want(cpus: int, memory: int = 1 * GiB) -> None:
        cpu = policy.Decision(cpus, 1, f"need {cpus}", policy.Urgency.HIGH, False)
        mem = policy.Decision(memory, 1 * GiB, "hold", policy.Urgency.LOW, False)
        agent._request(Amount(cpus, memory), policy.Decisions(cpu, mem))

    def asked() -> list[tuple[int, int]]:
        return [
            (m.request.cpus, m.request.memory_bytes)
            for m in link.sent
            if m.WhichOneof("body") == "request"
        ]

    # Nothing is granted and the need wobbles: one request covers it.
    for cpus in (4, 2, 3, 4, 2):
        want(cpus)
    assert asked() == [(4, 1 * GiB)]
    # More than asked goes at once; so does a memory grow beyond the last ask.
    want(5)
    want(5, 2 * GiB)
    assert asked() == [(4, 1 * GiB), (5, 1 * GiB), (5, 2 * GiB)]
    # Once the retry interval has passed, the current want is sent again.
    assert agent._last_request is not None
    cpus, memory, at = agent._last_request
    agent._last_request = (cpus, memory, at - agent.config.broker.request_retry_seconds)
    want(3)
    assert asked()[-1] == (3, 1 * GiB)


async def test_sensing_does_not_queue_behind_a_reclaim_waiting_for_the_lock(
    guest: FakeGuest,
) -> None:
    from agent.daemon import Amount

    agent, _ = build(guest)
    agent.entitlement = Amount(2, 1 * GiB)
    grow = policy.Decisions(
        policy.Decision(2, 1, "need 2", policy.Urgency.HIGH, False),
        policy.Decision(1 * GiB, 1 * GiB, "hold", policy.Urgency.LOW, False),
    )
    acted: list[str] = []

    async def act(why: str, target: Any, only: Any = None) -> Any:
        acted.append(why)
        return [], ""

    agent.act = act  # type: ignore[method-assign]
    holding = asyncio.Event()
    seen: dict[str, object] = {}

    async def rescan() -> None:
        async with agent._exclusive():
            holding.set()
            await asyncio.sleep(0.05)
        # Released, and the reclaim below not yet woken: the lock looks free.
        seen["locked"] = agent._act_lock.locked()
        await agent.pursue(grow)

    async def reclaim() -> None:
        async with agent._exclusive():
            await asyncio.sleep(0.05)

    first = asyncio.create_task(rescan())
    await holding.wait()
    second = asyncio.create_task(reclaim())
    await asyncio.gather(first, second)
    assert seen["locked"] is False
    assert acted == []  # it would have queued behind the reclaim
