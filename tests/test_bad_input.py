"""Bad input is refused, never obeyed and never a crash.

Property tests drive every message the agent accepts from a broker and every
message the broker accepts from a guest with arbitrary field values (huge
numbers, NaN, unknown enum values, unknown and duplicate ids, any order), the
config loaders with random TOML, and the sysfs/procfs parsers with random file
contents. Explicit cases pin the refusals a hostile peer would try first.
tests/test_daemon.py has the agent's rules for well-formed messages; these are
the ones it does not cover.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from simulation import agent_config, broker_config

from agent import config as agent_config_module
from agent.actuator import Actuator
from agent.config import CpuLimits as AgentCpuLimits
from agent.config import MemoryLimits as AgentMemoryLimits
from agent.daemon import Agent
from agent.kernel import Kernel, KernelReadError, parse_cpu_list
from agent.metrics import AgentMetrics
from agent.sensing import (
    ProcParseError,
    Sensor,
    parse_meminfo,
    parse_psi,
    parse_stat,
    parse_vmstat,
)
from agent.session import BrokerLink
from agent.topology import Topology
from broker import config as broker_config_module
from broker.arbiter import Amount
from broker.config import CpuLimits, GuestConfig, MemoryLimits
from broker.core import Broker, GuestRecord, ProtocolViolationError
from broker.metrics import BrokerMetrics
from broker.server import check_hello
from broker.simulated import SimulatedBackend
from vmtide.config import ConfigError
from vmtide.fakesys import FakeGuest, FakeKernelWriter
from vmtide.v1 import broker_pb2 as pb

MiB = 1 << 20
GiB = 1 << 30
BLOCK = 128 * MiB
U32_MAX = (1 << 32) - 1
U64_MAX = (1 << 64) - 1
I32 = st.integers(-(1 << 31), (1 << 31) - 1)

# Property tests build a simulated guest per example: a few dozen files.
PROPERTY = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


class ErrorLog(logging.Handler):
    """Collects ERROR records (log.exception included): a contained crash is still a crash."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def text(self) -> str:
        return "\n".join(self.format(r) for r in self.records)


@contextmanager
def errors_logged(name: str) -> Iterator[ErrorLog]:
    handler = ErrorLog()
    logger = logging.getLogger(name)
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


def run(coroutine: Any) -> Any:
    return asyncio.run(coroutine)


# ======================================================================= agent


class CheckedWriter:
    """The simulated kernel's writer, recording every write that breaks a rule.

    The agent's own checks come first; this one sees what reaches the kernel.
    """

    def __init__(self, guest: FakeGuest, cpu_minimum: int, memory_minimum: int) -> None:
        self.guest = guest
        self.inner = FakeKernelWriter(guest.root)
        self.cpu_minimum = cpu_minimum
        self.memory_minimum = memory_minimum
        self.problems: list[str] = []
        self.writes = 0

    def write(self, path: Path, value: str, timeout: float | None = None) -> None:
        self.writes += 1
        name = path.parent.name
        if not path.exists():
            self.problems.append(f"wrote {value!r} to {path}, which does not exist")
        if name.startswith("cpu") and value == "0":
            if name == "cpu0":
                self.problems.append("offlined cpu0")
            if len(self.guest.online_cpus()) - 1 < self.cpu_minimum:
                self.problems.append(f"offlined {name} below the minimum {self.cpu_minimum}")
        if name.startswith("memory") and value == "offline":
            if (path.parent / ".boot").exists():
                self.problems.append(f"offlined boot memory {name}")
            if self.guest.online_memory_bytes() - self.guest.block_size < self.memory_minimum:
                self.problems.append(f"offlined {name} below the minimum")
        self.inner.write(path, value, timeout)


class RecordingLink(BrokerLink):
    """A connected link that keeps what the agent sends."""

    def __init__(self, agent: Agent) -> None:
        super().__init__(agent.config.broker, agent.hello, agent.on_broker_message)
        self.connected = True
        self.sent: list[pb.GuestMessage] = []

    def send(self, message: pb.GuestMessage) -> bool:
        self.sent.append(message)
        return True

    def acks(self) -> list[pb.Ack]:
        return [m.ack for m in self.sent if m.WhichOneof("body") == "ack"]


@dataclasses.dataclass
class AgentRig:
    agent: Agent
    link: RecordingLink
    guest: FakeGuest
    writer: CheckedWriter


def agent_rig(root: Path, cpu_minimum: int = 1, memory_minimum: int = 1 * GiB) -> AgentRig:
    """cpu0 and 8 boot blocks online; cpu1, cpu2 and 4 blocks standby; cpu3 possible."""
    guest = FakeGuest(root, possible_cpus=4, boot_cpus=1, boot_blocks=8)
    guest.plug_cpu(1)
    guest.plug_cpu(2)
    guest.plug_blocks(4)
    config = agent_config(
        guest,
        "g",
        "unix:/nonexistent",
        cpus=AgentCpuLimits(minimum=cpu_minimum),
        memory=AgentMemoryLimits(minimum_bytes=memory_minimum),
    )
    writer = CheckedWriter(guest, cpu_minimum, memory_minimum)
    kernel = Kernel(guest.sysfs, guest.procfs, writer=writer)
    links: list[RecordingLink] = []

    def link_factory(agent: Agent) -> BrokerLink:
        links.append(RecordingLink(agent))
        return links[0]

    agent = Agent(
        config,
        Actuator(kernel, offline_timeout=2.0),
        Sensor(guest.procfs),
        AgentMetrics(CollectorRegistry()),
        guest_id="g",
        link_factory=link_factory,
    )
    return AgentRig(agent, links[0], guest, writer)


def u32() -> st.SearchStrategy[int]:
    return st.one_of(st.integers(0, 6), st.integers(0, U32_MAX))


def u64_bytes() -> st.SearchStrategy[int]:
    return st.one_of(
        st.integers(0, 16).map(lambda n: n * BLOCK),
        st.integers(0, 2 * GiB),
        st.integers(0, U64_MAX),
    )


def ids() -> st.SearchStrategy[int]:
    # Small ids collide on purpose: duplicates and unknown ids alike.
    return st.one_of(st.integers(0, 3), st.integers(0, U64_MAX))


@st.composite
def limits(draw: st.DrawFn) -> pb.Limits:
    message = pb.Limits()
    if draw(st.booleans()):
        message.cpus.CopyFrom(
            pb.ResourceLimits(minimum=draw(u32()), maximum=draw(u32()), burst=draw(u32()))
        )
    if draw(st.booleans()):
        message.memory_bytes.CopyFrom(
            pb.ResourceLimits(
                minimum=draw(u64_bytes()), maximum=draw(u64_bytes()), burst=draw(u64_bytes())
            )
        )
    return message


@st.composite
def broker_messages(draw: st.DrawFn) -> pb.BrokerMessage:
    kind = draw(st.sampled_from(["welcome", "grant", "reclaim", "limits", "empty"]))
    if kind == "welcome":
        welcome = pb.Welcome(
            session_id=draw(st.text(max_size=20)),
            protocol_version=draw(u32()),
            guest_id=draw(st.sampled_from(["g", "other", ""])),
            report_interval_ms=draw(u32()),
        )
        if draw(st.booleans()):
            welcome.limits.CopyFrom(draw(limits()))
        return pb.BrokerMessage(welcome=welcome)
    if kind == "grant":
        return pb.BrokerMessage(
            grant=pb.Grant(
                grant_id=draw(ids()),
                request_id=draw(ids()),
                cpus=draw(u32()),
                memory_bytes=draw(u64_bytes()),
                cpu_ids=draw(st.lists(u32(), max_size=4)),
                memory_blocks=draw(st.lists(u32(), max_size=4)),
            )
        )
    if kind == "reclaim":
        return pb.BrokerMessage(
            reclaim=pb.Reclaim(
                reclaim_id=draw(ids()),
                request_id=draw(ids()),
                cpus=draw(u32()),
                memory_bytes=draw(u64_bytes()),
                deadline_ms=draw(st.one_of(st.integers(0, 3000), st.integers(0, U32_MAX))),
            )
        )
    if kind == "limits":
        return pb.BrokerMessage(limits=pb.LimitsUpdate(limits=draw(limits())))
    return pb.BrokerMessage()


def check_agent(rig: AgentRig, cpu_minimum: int, memory_minimum: int) -> None:
    guest, agent = rig.guest, rig.agent
    assert not rig.writer.problems, rig.writer.problems
    assert len(guest.online_cpus()) >= cpu_minimum
    assert guest.online_memory_bytes() >= memory_minimum
    assert 0 in guest.online_cpus()
    assert all(guest.block_state(i) == "online" for i in range(8)), "boot memory went offline"
    limits = agent.limits
    if agent.entitlement is not None:
        assert agent.entitlement.cpus >= limits.cpus.minimum
        assert agent.entitlement.memory_bytes >= limits.memory.minimum


async def agent_takes(
    rig: AgentRig, messages: Sequence[pb.BrokerMessage], cpu_minimum: int, memory_minimum: int
) -> None:
    agent, link = rig.agent, rig.link
    await agent.ensure_minimum("start")
    for message in messages:
        body = message.WhichOneof("body")
        acks_before = len(link.acks())
        limits_before = agent.limits
        seen_before = set(agent._seen_ids)
        entitled_before = agent.entitlement
        await agent.on_broker_message(message)
        check_agent(rig, cpu_minimum, memory_minimum)
        acks = link.acks()[acks_before:]
        if body == "grant":
            grant = message.grant
            if ("grant", grant.grant_id) in seen_before:
                assert not acks, "a duplicate grant was acted on"
                continue
            (ack,) = acks
            assert ack.grant_id == grant.grant_id
            entitled = agent.entitlement
            assert entitled is not None
            assert entitled.cpus <= max(limits_before.cpus.burst, limits_before.cpus.minimum)
            assert entitled.memory_bytes <= max(
                limits_before.memory.burst, limits_before.memory.minimum
            )
            if grant.cpus > limits_before.cpus.burst:
                assert f"burst limit {limits_before.cpus.burst}" in ack.note
            if grant.memory_bytes % rig.guest.block_size:
                assert "not a whole number of blocks" in ack.note
        elif body == "reclaim":
            reclaim = message.reclaim
            if ("reclaim", reclaim.reclaim_id) in seen_before:
                assert not acks, "a duplicate reclaim was acted on"
                continue
            (ack,) = acks
            assert ack.reclaim_id == reclaim.reclaim_id
            # A reclaim never raises the entitlement.
            assert agent.entitlement is not None
            if entitled_before is not None:
                assert agent.entitlement.cpus <= max(
                    entitled_before.cpus, limits_before.cpus.minimum
                )
                assert agent.entitlement.memory_bytes <= max(
                    entitled_before.memory_bytes, limits_before.memory.minimum
                )
            if reclaim.cpus < limits_before.cpus.minimum:
                assert f"minimum is {limits_before.cpus.minimum} CPUs" in ack.note
            if reclaim.memory_bytes < limits_before.memory.minimum:
                assert "minimum is" in ack.note and "MiB" in ack.note
        else:
            assert not acks
        for ack in acks:
            assert ack.online_cpus == len(rig.guest.online_cpus())
            assert ack.online_memory_bytes == rig.guest.online_memory_bytes()


@PROPERTY
@given(
    messages=st.lists(broker_messages(), min_size=1, max_size=8),
    cpu_minimum=st.integers(1, 3),
    memory_blocks=st.integers(1, 12),
)
def test_agent_survives_any_broker_messages(
    messages: list[pb.BrokerMessage], cpu_minimum: int, memory_blocks: int
) -> None:
    check_agent_messages(messages, cpu_minimum, memory_blocks * BLOCK)


def check_agent_messages(
    messages: Sequence[pb.BrokerMessage], cpu_minimum: int, memory_minimum: int
) -> None:
    """A fresh agent takes `messages`; every rule holds after each (also fuzz_agent.py's target)."""
    with tempfile.TemporaryDirectory() as tmp, errors_logged("vmtide.agent") as errors:
        rig = agent_rig(Path(tmp) / "g", cpu_minimum, memory_minimum)
        run(agent_takes(rig, messages, cpu_minimum, memory_minimum))
    assert not errors.records, errors.text()


# Explicit hostile cases (well-formed ones are in test_daemon.py).


def grant(grant_id: int, cpus: int, memory: int, cpu_ids: Sequence[int] = ()) -> pb.BrokerMessage:
    return pb.BrokerMessage(
        grant=pb.Grant(grant_id=grant_id, cpus=cpus, memory_bytes=memory, cpu_ids=cpu_ids)
    )


def reclaim(reclaim_id: int, cpus: int, memory: int, deadline_ms: int = 5000) -> pb.BrokerMessage:
    return pb.BrokerMessage(
        reclaim=pb.Reclaim(
            reclaim_id=reclaim_id, cpus=cpus, memory_bytes=memory, deadline_ms=deadline_ms
        )
    )


async def test_a_grant_naming_cpus_that_do_not_exist_onlines_only_real_ones(
    tmp_path: Path,
) -> None:
    rig = agent_rig(tmp_path / "g")
    # cpu3 is possible but not plugged; cpu9 and cpu4294967295 are not even possible.
    await rig.agent.on_broker_message(grant(1, U32_MAX, U64_MAX, cpu_ids=[3, 9, U32_MAX]))
    assert rig.guest.online_cpus() == {0, 1, 2}
    assert not rig.writer.problems
    (ack,) = rig.link.acks()
    assert "above this guest's burst limit 4" in ack.note
    assert {i.index for i in ack.items if i.kind == pb.RESOURCE_KIND_CPU} == {1, 2}


async def test_a_reclaim_of_what_was_never_granted_gives_nothing_below_the_minimum(
    tmp_path: Path,
) -> None:
    rig = agent_rig(tmp_path / "g", cpu_minimum=1, memory_minimum=1 * GiB)
    await rig.agent.on_broker_message(reclaim(1, 0, 0))
    assert rig.writer.writes == 0  # only boot resources are online: nothing to give
    (ack,) = rig.link.acks()
    assert "minimum is 1 CPUs" in ack.note and "minimum is 1024 MiB" in ack.note
    assert (ack.online_cpus, ack.online_memory_bytes) == (1, 1 * GiB)


async def test_a_reclaim_never_raises_the_entitlement(tmp_path: Path) -> None:
    rig = agent_rig(tmp_path / "g")
    await rig.agent.on_broker_message(grant(1, 2, 1 * GiB))
    # A "reclaim" up to more than was granted is not a grant.
    await rig.agent.on_broker_message(reclaim(2, U32_MAX, U64_MAX))
    assert rig.agent.entitlement is not None
    assert rig.agent.entitlement.cpus <= 2
    await rig.agent.reconcile("rescan")
    assert rig.guest.online_cpus() == {0, 1}


async def test_limits_from_the_broker_never_lower_the_floor(tmp_path: Path) -> None:
    rig = agent_rig(tmp_path / "g", cpu_minimum=2, memory_minimum=1 * GiB)
    await rig.agent.ensure_minimum("start")
    update = pb.BrokerMessage(
        limits=pb.LimitsUpdate(
            limits=pb.Limits(
                cpus=pb.ResourceLimits(minimum=0, maximum=1, burst=1),
                memory_bytes=pb.ResourceLimits(minimum=0, maximum=1, burst=1),
            )
        )
    )
    await rig.agent.on_broker_message(update)
    assert rig.agent.limits.cpus.minimum == 2
    assert rig.agent.limits.memory.minimum == 1 * GiB
    await rig.agent.on_broker_message(reclaim(1, 0, 0))
    assert len(rig.guest.online_cpus()) == 2
    assert rig.guest.online_memory_bytes() == 1 * GiB
    assert "minimum is 2 CPUs" in rig.link.acks()[-1].note


async def test_a_message_with_no_body_is_ignored_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rig = agent_rig(tmp_path / "g")
    await rig.agent.on_broker_message(pb.BrokerMessage())
    assert "no known body" in caplog.text
    assert rig.writer.writes == 0 and not rig.link.sent


# ====================================================================== broker


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclasses.dataclass
class BrokerRig:
    broker: Broker
    clock: Clock
    fakes: dict[str, FakeGuest]
    outboxes: dict[str, asyncio.Queue[pb.BrokerMessage | None]]

    def record(self, guest_id: str) -> GuestRecord:
        return self.broker.guests[guest_id]


GUEST_IDS = ("a", "b")


def broker_rig(tmp: Path, *, rate: float = 50.0) -> BrokerRig:
    """Two simulated guests (1 of 4 CPUs, 1 of 2 GiB each) sharing a pool of 6 CPUs, 4 GiB."""
    fakes: dict[str, FakeGuest] = {}
    guests = []
    for guest_id in GUEST_IDS:
        fakes[guest_id] = FakeGuest(tmp / guest_id, possible_cpus=4, boot_cpus=1, boot_blocks=8)
        guests.append(
            GuestConfig(
                id=guest_id,
                listen=f"unix:{tmp}/{guest_id}.sock",
                backend="simulated",
                simulated_root=fakes[guest_id].root,
                cpus=CpuLimits(minimum=1, maximum=3, burst=4),
                memory=MemoryLimits(minimum_bytes=1 * GiB, maximum_bytes=2 * GiB),
                reclaim_deadline_seconds=5.0,
            )
        )
    config = broker_config(tmp, guests, cpus=6, memory=4 * GiB)
    config = dataclasses.replace(
        config, broker=dataclasses.replace(config.broker, max_requests_per_second=rate)
    )
    clock = Clock()
    backends = {g: SimulatedBackend(fake, g) for g, fake in fakes.items()}
    broker = Broker(config, backends, BrokerMetrics(CollectorRegistry()), clock=clock)  # type: ignore[arg-type]
    return BrokerRig(broker, clock, fakes, {})


def true_hello(fake: FakeGuest, guest_id: str) -> pb.Hello:
    topology = Topology.read(Kernel(fake.sysfs, fake.procfs)).to_proto()
    return pb.Hello(protocol_version=1, guest_id=guest_id, topology=topology)


def open_all(rig: BrokerRig) -> None:
    for guest_id, fake in rig.fakes.items():
        hello = true_hello(fake, guest_id)
        assert check_hello(hello) is None
        _, rig.outboxes[guest_id] = rig.broker.open_session(guest_id, hello)


def drain(outbox: asyncio.Queue[pb.BrokerMessage | None]) -> list[pb.BrokerMessage]:
    messages = []
    while not outbox.empty():
        message = outbox.get_nowait()
        if message is not None:
            messages.append(message)
    return messages


def floats() -> st.SearchStrategy[float]:
    return st.one_of(st.floats(0, 100), st.floats(allow_nan=True, allow_infinity=True))


@st.composite
def load_reports(draw: st.DrawFn) -> pb.LoadReport:
    return pb.LoadReport(
        cpu_busy=draw(floats()),
        run_queue=draw(u32()),
        cpu_some_avg10=draw(floats()),
        memory_some_avg10=draw(floats()),
        memory_full_avg10=draw(floats()),
        io_some_avg10=draw(floats()),
        io_full_avg10=draw(floats()),
        memory_available_bytes=draw(u64_bytes()),
        memory_total_bytes=draw(u64_bytes()),
        swap_in_per_second=draw(floats()),
        swap_out_per_second=draw(floats()),
        online_cpus=draw(u32()),
        online_memory_bytes=draw(u64_bytes()),
    )


@st.composite
def item_results(draw: st.DrawFn) -> pb.ItemResult:
    # proto3 enums are open: values no version defines arrive as plain ints.
    if draw(st.booleans()):  # a plausible "offlined" item, true or not
        return pb.ItemResult(
            kind=draw(st.sampled_from([pb.RESOURCE_KIND_CPU, pb.RESOURCE_KIND_MEMORY_BLOCK])),
            index=draw(st.integers(0, 16)),
            action=pb.ACTION_OFFLINE,
            outcome=draw(st.sampled_from([pb.OUTCOME_DONE, pb.OUTCOME_ALREADY])),
        )
    return pb.ItemResult(
        kind=pb.ResourceKind.ValueType(draw(st.integers(-1, 4))),
        index=draw(st.one_of(st.integers(0, 16), u32())),
        action=pb.Action.ValueType(draw(st.integers(-1, 4))),
        outcome=pb.Outcome.ValueType(draw(st.integers(-1, 7))),
        errno=draw(I32),
        detail=draw(st.text(max_size=30)),
    )


@dataclasses.dataclass(frozen=True)
class Step:
    """One thing that happens to the broker: a guest message, an arbitration, time."""

    kind: str  # "message", "rebalance" or "tick"
    guest: str = "a"
    message: pb.GuestMessage | None = None
    # For acks and requests: answer the broker's latest reclaim or grant id
    # instead of the drawn one, so the valid paths are reached too.
    use_latest: bool = False
    seconds: float = 0.0


@st.composite
def guest_messages(draw: st.DrawFn) -> pb.GuestMessage:
    kind = draw(st.sampled_from(["report", "request", "request", "ack", "ack", "hello", "empty"]))
    seq = draw(st.integers(0, U64_MAX))
    if kind == "report":
        return pb.GuestMessage(seq=seq, report=draw(load_reports()))
    if kind == "request":
        return pb.GuestMessage(
            seq=seq,
            request=pb.ResourceRequest(
                request_id=draw(ids()),
                # Mostly within the limits, so that grants and reclaims follow.
                cpus=draw(st.one_of(st.integers(0, 4), st.integers(0, 4), u32())),
                memory_bytes=draw(
                    st.one_of(st.integers(6, 18).map(lambda n: n * BLOCK), u64_bytes())
                ),
                reason=draw(st.text(max_size=40)),
                urgency=pb.Urgency.ValueType(draw(st.integers(-2, 6))),
                seen_grant_id=draw(ids()),
            ),
        )
    if kind == "ack":
        ack = pb.Ack(
            items=draw(st.lists(item_results(), max_size=5)),
            online_cpus=draw(u32()),
            online_memory_bytes=draw(u64_bytes()),
            note=draw(st.text(max_size=30)),
        )
        if draw(st.booleans()):
            ack.reclaim_id = draw(ids())
        else:
            ack.grant_id = draw(ids())
        return pb.GuestMessage(seq=seq, ack=ack)
    if kind == "hello":
        return pb.GuestMessage(seq=seq, hello=pb.Hello(protocol_version=1, guest_id="a"))
    return pb.GuestMessage(seq=seq)


message_steps = st.builds(
    Step,
    kind=st.just("message"),
    guest=st.sampled_from(GUEST_IDS),
    message=guest_messages(),
    use_latest=st.sampled_from([True, True, False]),
)
# An answer to the broker's latest reclaim, listing items true or not.
answer_steps = st.builds(
    Step,
    kind=st.just("message"),
    guest=st.sampled_from(GUEST_IDS),
    message=st.builds(
        lambda items, cpus, memory: pb.GuestMessage(
            ack=pb.Ack(reclaim_id=0, items=items, online_cpus=cpus, online_memory_bytes=memory)
        ),
        st.lists(item_results(), max_size=6),
        st.integers(0, 4),
        st.integers(6, 18).map(lambda n: n * BLOCK),
    ),
    use_latest=st.just(True),
)
steps = st.one_of(
    message_steps,
    message_steps,
    answer_steps,
    st.just(Step("rebalance")),
    st.builds(Step, kind=st.just("tick"), seconds=st.sampled_from([0.01, 0.5, 2.0, 40.0])),
)


def latest(rig: BrokerRig, step: Step) -> pb.GuestMessage:
    """The step's message, answering what the broker last sent when asked to."""
    assert step.message is not None
    message = pb.GuestMessage()
    message.CopyFrom(step.message)
    record = rig.record(step.guest)
    if step.use_latest and message.WhichOneof("body") == "ack" and record.pending:
        message.ack.reclaim_id = max(record.pending)
    if step.use_latest and message.WhichOneof("body") == "request":
        message.request.seen_grant_id = record.last_grant_id
    return message


def check_books(rig: BrokerRig) -> None:
    broker = rig.broker
    pool = broker.pool.capacity
    entitled = Amount(0, 0)
    for guest_id, fake in rig.fakes.items():
        g = rig.record(guest_id)
        burst = g.limits.burst
        for name in ("online", "entitled", "demand", "releasing", "held"):
            value: Amount = getattr(g, name)
            assert value.cpus >= 0 and value.memory >= 0, f"{guest_id}.{name} = {value}"
        # What the broker counts as plugged is what the hypervisor has plugged.
        assert g.present_cpus == fake.present_cpus(), guest_id
        assert g.present_memory == len(fake.block_indexes()) * fake.block_size, guest_id
        # A guest is never counted as holding more than is plugged into it.
        assert g.online.cpus <= len(g.present_cpus), (guest_id, g.online)
        assert g.online.memory <= g.present_memory, (guest_id, g.online)
        # Nothing is granted above the guest's burst limit, nor demanded.
        assert g.entitled.fits(burst), (guest_id, g.entitled)
        assert g.demand.fits(burst), (guest_id, g.demand)
        entitled = entitled + g.entitled
    assert entitled.fits(pool), f"granted {entitled} of a pool of {pool}"


async def grow_all(rig: BrokerRig) -> None:
    """Each guest asks for and gets 3 CPUs and 1.5 GiB: something to take back."""
    for guest_id in GUEST_IDS:
        record = rig.record(guest_id)
        ask = pb.ResourceRequest(
            request_id=1, cpus=3, memory_bytes=12 * BLOCK, seen_grant_id=record.last_grant_id
        )
        await rig.broker.on_message(record, pb.GuestMessage(request=ask))
    await rig.broker.rebalance()
    rig.clock.now += 1.0
    assert all(rig.record(g).entitled == Amount(3, 12 * BLOCK) for g in GUEST_IDS)


async def broker_takes(rig: BrokerRig, script: Sequence[Step]) -> None:
    open_all(rig)
    await grow_all(rig)
    check_books(rig)
    for step in script:
        if step.kind == "tick":
            rig.clock.now += step.seconds
        elif step.kind == "rebalance":
            await rig.broker.rebalance()
        else:
            message = latest(rig, step)
            try:
                await rig.broker.on_message(rig.record(step.guest), message)
            except ProtocolViolationError as err:
                assert message.WhichOneof("body") in ("hello", None), err
        check_books(rig)
    await rig.broker.rebalance()
    check_books(rig)


@PROPERTY
@given(script=st.lists(steps, min_size=3, max_size=25))
def test_broker_survives_any_guest_messages(script: list[Step]) -> None:
    check_broker_script(script)


def check_broker_script(script: Sequence[Step]) -> None:
    """A fresh broker takes `script`; its books hold after each step (also fuzz_broker.py's)."""
    with tempfile.TemporaryDirectory() as tmp, errors_logged("vmtide.broker") as errors:
        rig = broker_rig(Path(tmp))
        run(broker_takes(rig, script))
    assert not errors.records, errors.text()


@st.composite
def hellos(draw: st.DrawFn) -> pb.Hello:
    """Topologies true, inconsistent, or absurd."""
    possible = draw(st.lists(st.integers(0, 40), max_size=12, unique=True))
    present = draw(st.lists(st.integers(0, 40), max_size=12, unique=True))
    online = draw(st.lists(st.integers(0, 40), max_size=12, unique=True))
    blocks = [
        pb.MemoryBlock(
            index=draw(st.integers(0, 40)),
            state=pb.BlockState.ValueType(draw(st.integers(-1, 4))),
            zone=pb.Zone.ValueType(draw(st.integers(-1, 3))),
            node=draw(u32()),
        )
        for _ in range(draw(st.integers(0, 24)))
    ]
    block_size = draw(
        st.one_of(st.just(BLOCK), st.integers(0, 63).map(lambda n: 1 << n), st.integers(0, U64_MAX))
    )
    return pb.Hello(
        protocol_version=draw(st.one_of(st.just(1), u32())),
        guest_id="a",
        agent_version=draw(st.text(max_size=10)),
        topology=pb.Topology(
            cpus=pb.CpuTopology(
                possible=possible, present=present, online=online, pinned=draw(st.lists(u32()))
            ),
            memory=pb.MemoryTopology(
                block_size_bytes=block_size, blocks=blocks, auto_online=draw(st.booleans())
            ),
        ),
    )


@PROPERTY
@given(hello=hellos())
def test_any_hello_is_refused_with_a_reason_or_bounded_by_what_is_plugged(hello: pb.Hello) -> None:
    check_hello_from_anyone(hello)


def check_hello_from_anyone(hello: pb.Hello) -> None:
    with tempfile.TemporaryDirectory() as tmp, errors_logged("vmtide.broker") as errors:
        rig = broker_rig(Path(tmp))

        async def scenario() -> None:
            problem = check_hello(hello) or await rig.broker.check_plugged("a", hello)
            if problem is not None:
                assert isinstance(problem, str) and problem
                return
            record, _ = rig.broker.open_session("a", hello)
            # Whatever the guest claimed, it is not counted above what is plugged.
            assert record.online.cpus <= len(rig.fakes["a"].present_cpus())
            await rig.broker.rebalance()
            for name in ("online", "entitled", "demand", "held"):
                value: Amount = getattr(record, name)
                assert value.cpus >= 0 and value.memory >= 0

        run(scenario())
    assert not errors.records, errors.text()


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda h: setattr(h, "protocol_version", 0), "protocol version 0 is not supported"),
        (lambda h: h.topology.cpus.online.append(3), "online CPUs must be present"),
        (lambda h: h.topology.cpus.present.append(9), "present CPUs possible"),
        (lambda h: setattr(h.topology.memory, "block_size_bytes", 3 << 20), "not a power of two"),
        (lambda h: setattr(h.topology.memory, "block_size_bytes", 0), "not a power of two"),
        (lambda h: h.topology.memory.blocks.append(h.topology.memory.blocks[0]), "duplicate"),
        (lambda h: h.topology.cpus.possible.extend(range(4, 9000)), "implausibly large"),
    ],
)
def test_a_malformed_hello_is_refused_naming_the_problem(
    tmp_path: Path, change: Any, reason: str
) -> None:
    hello = true_hello(FakeGuest(tmp_path / "g", possible_cpus=4), "g")
    assert check_hello(hello) is None
    change(hello)
    problem = check_hello(hello)
    assert problem is not None and reason in problem


async def test_a_hello_claiming_more_than_is_plugged_is_refused(tmp_path: Path) -> None:
    rig = broker_rig(tmp_path)
    hello = true_hello(rig.fakes["a"], "a")
    assert await rig.broker.check_plugged("a", hello) is None
    # cpu1..3 are possible but not plugged: a guest listing them lies.
    hello.topology.cpus.present.extend([1, 2, 3])
    hello.topology.cpus.online.extend([1, 2, 3])
    problem = await rig.broker.check_plugged("a", hello)
    assert problem == "topology: 4 CPUs present, but the hypervisor has plugged 1"
    hello = true_hello(rig.fakes["a"], "a")
    hello.topology.memory.blocks.extend(
        pb.MemoryBlock(index=i, state=pb.BLOCK_STATE_ONLINE) for i in range(8, 200)
    )
    problem = await rig.broker.check_plugged("a", hello)
    assert problem is not None and "can have at most 4096 MiB" in problem


async def test_a_report_claiming_more_than_is_plugged_counts_what_is_plugged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rig = broker_rig(tmp_path)
    open_all(rig)
    record = rig.record("a")
    report = pb.LoadReport(online_cpus=4000, online_memory_bytes=U64_MAX)
    await rig.broker.on_message(record, pb.GuestMessage(report=report))
    assert record.online == Amount(1, 1 * GiB)
    assert (
        "claims 4000 cpus" in caplog.text
        and "more than is plugged (1 cpus, 1024 MiB)" in caplog.text
    )
    # The other guest can still grow: nothing phantom fills the pool.
    other = rig.record("b")
    ask = pb.ResourceRequest(request_id=1, cpus=4, memory_bytes=2 * GiB)
    ask.seen_grant_id = other.last_grant_id
    await rig.broker.on_message(other, pb.GuestMessage(request=ask))
    await rig.broker.rebalance()
    assert other.entitled == Amount(4, 2 * GiB)


async def test_an_unknown_urgency_and_a_huge_reason_are_logged_not_fatal(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "vmtide.broker")
    rig = broker_rig(tmp_path)
    open_all(rig)
    record = rig.record("a")
    ask = pb.ResourceRequest(
        request_id=5, cpus=2, memory_bytes=1 * GiB, urgency=pb.Urgency.ValueType(77)
    )
    ask.reason = "x" * 100_000
    await rig.broker.on_message(record, pb.GuestMessage(request=ask))
    assert record.demand.cpus == 2
    assert "urgency 77" in caplog.text
    assert "x" * 201 not in caplog.text


async def test_a_request_above_the_limits_is_clamped_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "vmtide.broker")
    rig = broker_rig(tmp_path)
    open_all(rig)
    record = rig.record("a")
    ask = pb.ResourceRequest(request_id=9, cpus=U32_MAX, memory_bytes=U64_MAX)
    ask.seen_grant_id = record.last_grant_id
    await rig.broker.on_message(record, pb.GuestMessage(request=ask))
    assert record.demand == Amount(4, 2 * GiB)
    assert f"request 9 for {U32_MAX} cpus" in caplog.text
    assert "clamped to its limits" in caplog.text and "burst 4 cpus, 2048 MiB" in caplog.text


async def test_acks_that_lie_unplug_only_what_the_guest_gave_up(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rig = broker_rig(tmp_path)
    open_all(rig)
    await grow_all(rig)
    record = rig.record("a")
    fake = rig.fakes["a"]
    assert fake.present_cpus() == {0, 1, 2}
    # An ack for a reclaim never sent: ignored, and said so.
    await rig.broker.on_message(record, pb.GuestMessage(ack=pb.Ack(reclaim_id=424242)))
    assert "ack for unknown reclaim 424242 ignored" in caplog.text
    ask = pb.ResourceRequest(request_id=2, cpus=1, memory_bytes=1 * GiB)
    ask.seen_grant_id = record.last_grant_id
    rig.clock.now += 1.0
    await rig.broker.on_message(record, pb.GuestMessage(request=ask))
    await rig.broker.rebalance()
    (reclaim_id,) = record.pending
    offline = pb.ACTION_OFFLINE
    items = [
        # cpu0 never goes, whatever the guest says.
        pb.ItemResult(kind=pb.RESOURCE_KIND_CPU, index=0, action=offline, outcome=pb.OUTCOME_DONE),
        # cpu2 twice: unplugged once.
        pb.ItemResult(kind=pb.RESOURCE_KIND_CPU, index=2, action=offline, outcome=pb.OUTCOME_DONE),
        pb.ItemResult(kind=pb.RESOURCE_KIND_CPU, index=2, action=offline, outcome=pb.OUTCOME_DONE),
        # A CPU that was never plugged, and boot memory: not the guest's to give.
        pb.ItemResult(kind=pb.RESOURCE_KIND_CPU, index=9, action=offline, outcome=pb.OUTCOME_DONE),
        pb.ItemResult(
            kind=pb.RESOURCE_KIND_MEMORY_BLOCK, index=3, action=offline, outcome=pb.OUTCOME_DONE
        ),
    ]
    ack = pb.Ack(reclaim_id=reclaim_id, items=items, online_cpus=1, online_memory_bytes=1 * GiB)
    await rig.broker.on_message(record, pb.GuestMessage(ack=ack))
    assert fake.present_cpus() == {0, 1}
    assert record.present_cpus == {0, 1}
    assert 3 in fake.block_indexes()
    assert record.present_memory == len(fake.block_indexes()) * BLOCK
    # A second ack for the same reclaim changes nothing.
    await rig.broker.on_message(record, pb.GuestMessage(ack=ack))
    assert f"ack for unknown reclaim {reclaim_id} ignored" in caplog.text
    assert record.present_cpus == {0, 1}


async def test_a_second_hello_or_an_empty_message_is_a_protocol_violation(tmp_path: Path) -> None:
    rig = broker_rig(tmp_path)
    open_all(rig)
    record = rig.record("a")
    with pytest.raises(ProtocolViolationError, match="a second hello"):
        await rig.broker.on_message(record, pb.GuestMessage(hello=pb.Hello()))
    with pytest.raises(ProtocolViolationError, match="no known body"):
        await rig.broker.on_message(record, pb.GuestMessage())


# ===================================================================== configs


def toml_value(value: object) -> str:
    """A TOML literal for a JSON-like value (inline tables and arrays)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json_string(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    assert isinstance(value, dict)
    return "{" + ", ".join(f"{toml_key(k)} = {toml_value(v)}" for k, v in value.items()) + "}"


def json_string(text: str) -> str:
    import json

    return json.dumps(text)  # JSON's escapes are all valid in a TOML basic string


def toml_key(key: str) -> str:
    if key and all(c.isascii() and (c.isalnum() or c in "_-") for c in key):
        return key
    return json_string(key)


def toml_document(table: dict[str, object]) -> str:
    return "".join(f"{toml_key(k)} = {toml_value(v)}\n" for k, v in table.items())


def config_keys() -> list[str]:
    """Every key either config knows, at any depth, and a few it does not."""
    seen: set[str] = set()

    def walk(cls: type) -> None:
        hints = __import__("typing").get_type_hints(cls)
        for f in dataclasses.fields(cls):
            seen.add(f.name)
            hint = hints[f.name]
            for inner in (hint, *getattr(hint, "__args__", ())):
                if dataclasses.is_dataclass(inner) and isinstance(inner, type):
                    walk(inner)

    walk(agent_config_module.AgentConfig)
    walk(broker_config_module.BrokerConfig)
    return sorted(seen | {"unknown", "Maximum", ""})


KEYS = config_keys()
SIZES = st.one_of(
    st.from_regex(r"\A[0-9]{1,4}(\.[0-9]{1,3})? ?([KMGT]i?B?|B)?\Z"),
    st.from_regex(r"\A[0-9]{300,400}(TiB)?\Z"),  # more than a float holds
    st.text(max_size=8),
)
SCALARS = st.one_of(
    st.booleans(),
    st.integers(-(1 << 63), (1 << 63) - 1),
    st.integers(-2, 70_000),
    st.floats(allow_nan=True, allow_infinity=True),
    SIZES,
    st.sampled_from(["unix:/run/x.sock", "127.0.0.1:0", "qmp", "simulated", "online_kernel", ""]),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.sampled_from(KEYS), inner, max_size=5)
    ),
    max_leaves=12,
)
DOCUMENTS = st.dictionaries(st.sampled_from(KEYS), VALUES, max_size=6)


def loads_or_says_why(loader: Any, path: Path) -> None:
    try:
        loader(path)
    except ConfigError as err:
        assert err.file == str(path)
        assert str(err).startswith(f"{path}: ")
        assert err.reason
        if err.key is not None:
            assert f": {err.key}: " in str(err)


@settings(max_examples=300, deadline=None)
@given(document=DOCUMENTS)
def test_any_toml_is_a_config_or_an_error_naming_file_key_and_reason(
    document: dict[str, object],
) -> None:
    check_config_bytes(toml_document(document).encode())


@settings(max_examples=200, deadline=None)
@given(raw=st.binary(max_size=200))
def test_any_bytes_are_a_config_or_an_error_naming_the_file(raw: bytes) -> None:
    check_config_bytes(raw)


def check_config_bytes(raw: bytes) -> None:
    """Both loaders on one file: a config or a ConfigError (also fuzz_config.py's target)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "vmtide.toml"
        path.write_bytes(raw)
        loads_or_says_why(agent_config_module.load, path)
        loads_or_says_why(broker_config_module.load, path)


BROKER_TOML = """
[broker]
state_file = "/run/vmtide/broker.json"
{broker}
[pool]
cpus = 4
[[guests]]
listen = "unix:/run/a.sock"
backend = "simulated"
simulated_root = "/tmp/a"
{guest}
"""


@pytest.mark.parametrize(
    ("broker", "guest", "key", "reason"),
    [
        ("", "", "guests[0].id", "required"),
        ("max_requests_per_second = 0", 'id = "a"', "broker.max_requests_per_second", "positive"),
        (
            "max_requests_per_second = -1.0",
            'id = "a"',
            "broker.max_requests_per_second",
            "positive",
        ),
        ("max_requests_per_second = nan", 'id = "a"', "broker.max_requests_per_second", "nan"),
        (
            "arbitrate_interval_seconds = 0",
            'id = "a"',
            "broker.arbitrate_interval_seconds",
            "positive",
        ),
        (
            "arbitrate_interval_seconds = inf",
            'id = "a"',
            "broker.arbitrate_interval_seconds",
            "positive",
        ),
        ("block_size_bytes = 0", 'id = "a"', "broker.block_size_bytes", "power of two"),
        ('block_size_bytes = "100MiB"', 'id = "a"', "broker.block_size_bytes", "power of two"),
        ("metrics_port = 70000", 'id = "a"', "broker.metrics_port", "not a TCP port"),
        (
            "",
            'id = "a"\nreclaim_deadline_seconds = inf',
            "guests[0].reclaim_deadline_seconds",
            "at most",
        ),
        (
            "",
            'id = "a"\nreclaim_deadline_seconds = nan',
            "guests[0].reclaim_deadline_seconds",
            "nan",
        ),
        (
            "",
            'id = "a"\nmemory_step_bytes = "1' + "0" * 400 + 'TiB"',
            "guests[0].memory_step_bytes",
            "too large",
        ),
        ("", 'id = "a"\n"bad key" = 1', 'guests[0]."bad key"', "unknown key"),
    ],
)
def test_broker_settings_that_would_break_it_later_are_refused_at_load(
    tmp_path: Path, broker: str, guest: str, key: str, reason: str
) -> None:
    path = tmp_path / "broker.toml"
    path.write_text(BROKER_TOML.format(broker=broker, guest=guest))
    with pytest.raises(ConfigError) as caught:
        broker_config_module.load(path)
    assert caught.value.key == key
    assert reason in caught.value.reason
    assert str(caught.value).startswith(f"{path}: {key}: ")


@pytest.mark.parametrize(
    ("text", "key", "reason"),
    [
        ("[agent]\nrescan_interval_seconds = nan", "agent.rescan_interval_seconds", "nan"),
        ("[broker]\nrequest_retry_seconds = -1.0", "broker.request_retry_seconds", "positive"),
        ("[broker]\nrequest_retry_seconds = inf", "broker.request_retry_seconds", "positive"),
        ("[memory]\noffline_timeout_seconds = nan", "memory.offline_timeout_seconds", "nan"),
        ("[memory]\noffline_timeout_seconds = inf", "memory.offline_timeout_seconds", "finite"),
        (
            '[limits.memory]\nminimum_bytes = "9' + "9" * 400 + '"',
            "limits.memory.minimum_bytes",
            "too large",
        ),
        ("\xff", None, "not UTF-8"),
    ],
)
def test_agent_settings_that_would_break_it_later_are_refused_at_load(
    tmp_path: Path, text: str, key: str | None, reason: str
) -> None:
    path = tmp_path / "agent.toml"
    path.write_bytes(text.encode("latin-1") if text == "\xff" else text.encode())
    with pytest.raises(ConfigError) as caught:
        agent_config_module.load(path)
    assert caught.value.key == key
    assert reason in caught.value.reason


# ===================================================================== parsers

# Text that looks like the kernel's, mangled: the shapes parsers must not trust.
PROC_TEXT = st.one_of(
    st.text(max_size=200),
    st.text(alphabet="0123456789 -,\n\t:kBcpuavgsomefultal=.x", max_size=200),
    st.from_regex(r"\A(cpu[0-9]?( [0-9-]{1,25}){0,11}\n){0,4}(procs_running [0-9x-]*\n)?\Z"),
    st.from_regex(r"\A((some|full|none)( [a-z0-9]{1,6}=[0-9.eE+-]{0,12}){0,5}\n){0,3}\Z"),
    st.from_regex(r"\A([A-Za-z_()]{1,12}: *[0-9-]{0,25}( kB| MB)?\n){0,6}\Z"),
)
CPU_LIST = st.one_of(
    st.text(max_size=30),
    st.from_regex(r"\A([0-9]{1,3}(-[0-9]{1,3})?,?){0,4}\n?\Z"),
    st.from_regex(r"\A[0-9]{1,30}-[0-9]{1,30}\Z"),  # ranges as large as the text allows
)


@settings(max_examples=300, deadline=None)
@given(text=CPU_LIST)
def test_any_cpu_list_is_parsed_or_refused_naming_it(text: str) -> None:
    check_cpu_list(text)


def check_cpu_list(text: str) -> None:
    try:
        cpus = parse_cpu_list(text)
    except ValueError as err:
        assert repr(text.strip())[1:-1][:20] in str(err) or "CPU" in str(err)
        return
    assert all(0 <= cpu < 1 << 16 for cpu in cpus)


@settings(max_examples=300, deadline=None)
@given(text=PROC_TEXT)
def test_any_proc_text_is_parsed_or_refused_naming_the_file(text: str) -> None:
    check_proc_text(text)


def check_proc_text(text: str) -> None:
    for parse in (parse_psi, parse_stat, parse_meminfo, parse_vmstat):
        try:
            parse(text, "/proc/x")
        except ProcParseError as err:
            assert str(err).startswith("/proc/x: ") and err.reason


SYSFS_FILES = [
    "devices/system/cpu/possible",
    "devices/system/cpu/present",
    "devices/system/cpu/online",
    "devices/system/cpu/cpu1/online",
    "devices/system/memory/block_size_bytes",
    "devices/system/memory/auto_online_blocks",
    "devices/system/memory/memory3/state",
    "devices/system/memory/memory3/valid_zones",
]
PROC_FILES = ["stat", "meminfo", "vmstat", "pressure/cpu", "pressure/memory", "pressure/io"]


@PROPERTY
@given(
    sysfs=st.dictionaries(st.sampled_from(SYSFS_FILES), st.one_of(CPU_LIST, PROC_TEXT), max_size=3),
    procfs=st.dictionaries(st.sampled_from(PROC_FILES), PROC_TEXT, max_size=2),
)
def test_a_guest_tree_with_any_contents_reads_or_fails_naming_the_file(
    sysfs: dict[str, str], procfs: dict[str, str]
) -> None:
    check_guest_tree(sysfs, procfs)


def check_guest_tree(sysfs: Mapping[str, str], procfs: Mapping[str, str]) -> None:
    """A simulated guest whose files hold `sysfs` and `procfs` texts: read, or a clear error."""
    with tempfile.TemporaryDirectory() as tmp:
        guest = FakeGuest(Path(tmp) / "g", possible_cpus=4, boot_cpus=1, boot_blocks=4)
        guest.plug_cpu(1)
        for name, text in sysfs.items():
            (guest.sysfs / name).write_text(text)
        for name, text in procfs.items():
            (guest.procfs / name).write_text(text)
        try:
            topo = Topology.read(Kernel(guest.sysfs, guest.procfs))
        except KernelReadError as err:
            assert str(err).startswith(f"{guest.sysfs}/") and err.reason
        else:
            assert topo.block_size > 0
            assert topo.online_cpus <= len(topo.cpus)
        sensor = Sensor(guest.procfs)
        try:
            for _ in range(2):
                reading = sensor.sample()
        except ProcParseError as err:
            assert str(err).startswith(f"{guest.procfs}/") and err.reason
        else:
            for name in ("cpu_busy", "cpu_some", "memory_some", "swap_in_per_s"):
                value = getattr(reading, name)
                assert math.isfinite(value) and value >= 0, (name, value)


def test_a_cpu_list_with_an_absurd_range_is_refused_not_expanded() -> None:
    with pytest.raises(ValueError, match="beyond any kernel's 65536 CPUs"):
        parse_cpu_list("0-99999999999999\n")
    with pytest.raises(ValueError, match="bad CPU list entry"):
        parse_cpu_list("0-\u00b2")  # a digit to str.isdigit, not to the kernel


def test_a_stat_line_with_a_non_ascii_cpu_number_is_refused_naming_it() -> None:
    text = "cpu  1 2 3 4\ncpu\u00b2 1 2 3 4\nprocs_running 1\n"
    with pytest.raises(ProcParseError, match="line 2: bad CPU name 'cpu\u00b2'"):
        parse_stat(text, "/proc/stat")
