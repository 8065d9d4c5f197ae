"""The agent's rules, driven message by message: what it does with grants, reclaims,
hostile or confused broker messages, hot-adds without a broker, and its minimum."""

from __future__ import annotations

import dataclasses
import errno
from pathlib import Path

import pytest
from simulation import agent_config, make_agent

from agent import policy
from agent.config import AgentConfig, CpuLimits, MemoryLimits
from agent.daemon import Agent
from agent.session import BrokerLink
from vmtide.fakesys import FakeGuest
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
    # Boot memory is in kernel zones: never offered, so nothing was written.
    assert guest.online_memory_bytes() == 1 * GiB
    assert all(i.kind != pb.RESOURCE_KIND_MEMORY_BLOCK for i in link.acks()[-1].items)


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
