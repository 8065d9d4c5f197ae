"""The broker-scale benchmark: its quick mode against a real broker process, and its parts.

No timing is asserted: the benchmark measures latency, the tests check that it
ran the flow it claims and reported it in a well-formed way.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from simulation import broker_config, until

from agent.kernel import Kernel
from agent.topology import Topology
from broker import config as broker_config_file
from broker.arbiter import Amount
from broker.backend import Backend
from broker.config import CpuLimits, GuestConfig, MemoryLimits
from broker.core import Broker
from broker.metrics import BrokerMetrics
from broker.simulated import SimulatedBackend
from vmtide.fakesys import FakeGuest
from vmtide.v1 import broker_pb2 as pb

# bench/ is not an installed package: import it from this checkout.
REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import broker_scale  # noqa: E402

GiB = 1 << 30


def test_quick_mode_grants_every_guest_and_writes_a_report(tmp_path: Path) -> None:
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-m", "bench.broker_scale", "--quick", "--out", str(out)],
        cwd=REPO,
        check=False,
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert done.returncode == 0, done.stderr

    results = json.loads((out / f"{broker_scale.NAME}.json").read_text())
    [point] = results["points"]
    assert point["guests"] == 20
    [run] = point["runs"]
    # Every guest asked to grow early in the window and was granted.
    assert run["guests_granted"] == 20
    assert run["decisions"] == run["requests"] - run["unanswered"] > 0
    assert run["unexpected"] == 0
    assert run["reconnects"] == 0
    assert 0 < run["p50_ms"] <= run["p99_ms"] <= run["max_ms"]
    assert run["broker_rss_mib"] > 0

    report = (out / f"{broker_scale.NAME}.md").read_text()
    rows = [line for line in report.splitlines() if re.match(r"\| 20 \| 1 \| \d+ \|", line)]
    assert len(rows) == 1, report
    assert len(rows[0].strip("|").split("|")) == 11
    assert "python -m bench.broker_scale --quick" in report
    assert results["machine"]["uname"] in report
    assert (out / f"{broker_scale.NAME}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_broker_config_it_writes_loads_and_covers_every_guest(tmp_path: Path) -> None:
    roots = [tmp_path / broker_scale.guest_id(i) for i in range(3)]
    listens = [f"unix:{tmp_path}/{i}.sock" for i in range(3)]
    config = broker_config_file.load(broker_scale.write_broker_config(tmp_path, roots, listens))

    assert [g.id for g in config.guests] == ["g00000", "g00001", "g00002"]
    assert [g.listen for g in config.guests] == listens
    assert all(g.backend == "simulated" for g in config.guests)
    # The pool covers every guest at its maximum, so no request waits on another guest.
    assert config.pool.cpus == sum(g.cpus.maximum for g in config.guests)
    assert config.pool.memory_bytes == sum(g.memory.maximum_bytes for g in config.guests)


def test_reset_returns_a_tree_to_its_boot_topology(tmp_path: Path) -> None:
    [built] = broker_scale.prepare_trees(tmp_path, 1)
    assert built.name == "g00000"
    guest = FakeGuest.open(built)
    guest.plug_cpu(2)
    guest.plug_blocks(4)

    broker_scale.prepare_trees(tmp_path, 1)

    guest = FakeGuest.open(built)
    assert guest.present_cpus() == {0}
    assert guest.block_indexes() == list(range(broker_scale.BOOT_BLOCKS))


class FakeLink:
    def __init__(self) -> None:
        self.sent: list[pb.GuestMessage] = []

    def send(self, message: pb.GuestMessage) -> bool:
        self.sent.append(message)
        return True


@pytest.fixture
def guest(tmp_path: Path) -> broker_scale.SimGuest:
    [root] = broker_scale.prepare_trees(tmp_path, 1)
    sim = broker_scale.SimGuest("g00000", "unix:/nowhere", root)
    sim.link = FakeLink()  # type: ignore[assignment]
    sim.hello()
    return sim


async def test_a_grow_answered_by_a_grant_is_timed_and_acknowledged(
    guest: broker_scale.SimGuest,
) -> None:
    link: FakeLink = guest.link  # type: ignore[assignment]
    FakeGuest.open(guest.root).plug_blocks(4)  # as the broker does before its grant
    guest.measuring = True
    guest.request("grow")
    [request] = link.sent
    assert (request.request.cpus, request.request.memory_bytes) == (3, 12 * broker_scale.BLOCK_SIZE)

    grant = pb.Grant(grant_id=7, cpus=3, memory_bytes=12 * broker_scale.BLOCK_SIZE, cpu_ids=[1, 2])
    await guest.on_message(pb.BrokerMessage(grant=grant))

    assert len(guest.latencies["grow"]) == 1 and guest.pending is None
    assert guest.granted == 1
    ack = link.sent[-1].ack
    assert ack.grant_id == 7
    assert (ack.online_cpus, ack.online_memory_bytes) == (3, 12 * broker_scale.BLOCK_SIZE)
    onlined = sorted((i.kind, i.index) for i in ack.items if i.action == pb.ACTION_ONLINE)
    assert onlined == [(pb.RESOURCE_KIND_CPU, 1), (pb.RESOURCE_KIND_CPU, 2)] + [
        (pb.RESOURCE_KIND_MEMORY_BLOCK, i) for i in range(8, 12)
    ]
    # The next request says which grant it had seen, as the agent does.
    guest.request("shrink")
    assert link.sent[-1].request.seen_grant_id == 7


async def test_a_shrink_answered_by_a_reclaim_offlines_all_but_boot(
    guest: broker_scale.SimGuest,
) -> None:
    link: FakeLink = guest.link  # type: ignore[assignment]
    await guest.on_message(pb.BrokerMessage(grant=pb.Grant(grant_id=1, cpus=2, cpu_ids=[1])))
    guest.measuring = True
    guest.request("shrink")

    reclaim = pb.Reclaim(reclaim_id=9, cpus=1, memory_bytes=8 * broker_scale.BLOCK_SIZE)
    await guest.on_message(pb.BrokerMessage(reclaim=reclaim))

    assert len(guest.latencies["shrink"]) == 1 and guest.granted == 0
    ack = link.sent[-1].ack
    assert ack.reclaim_id == 9 and ack.online_cpus == 1
    assert [(i.index, i.action) for i in ack.items] == [(1, pb.ACTION_OFFLINE)]


async def test_a_reply_of_the_wrong_kind_is_counted_not_timed(
    guest: broker_scale.SimGuest,
) -> None:
    guest.measuring = True
    guest.request("grow")
    await guest.on_message(pb.BrokerMessage(reclaim=pb.Reclaim(reclaim_id=3, cpus=1)))
    assert guest.unexpected == 1
    assert guest.latencies == {"grow": [], "shrink": []}
    assert guest.pending is not None


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert broker_scale.percentile(values, 50) == 50
    assert broker_scale.percentile(values, 99) == 99
    assert broker_scale.percentile([3.0], 99) == 3.0


def test_bad_settings_name_the_option() -> None:
    with pytest.raises(broker_scale.BenchError, match="--guests"):
        broker_scale.Settings(guests=0, duration=1, request_interval=1)
    with pytest.raises(broker_scale.BenchError, match="--transport"):
        broker_scale.Settings(guests=1, duration=1, request_interval=1, transport="vsock")


# ------------------------------------------- broker changes the benchmark led to


def make_broker(tmp_path: Path, count: int = 1) -> tuple[Broker, list[FakeGuest]]:
    fakes = [
        FakeGuest(tmp_path / f"g{i}", possible_cpus=4, boot_cpus=1, boot_blocks=8)
        for i in range(count)
    ]
    guests = [
        GuestConfig(
            id=f"g{i}",
            listen=f"unix:{tmp_path}/g{i}.sock",
            backend="simulated",
            simulated_root=fake.root,
            cpus=CpuLimits(minimum=1, maximum=4),
            memory=MemoryLimits(minimum_bytes=GiB, maximum_bytes=2 * GiB),
        )
        for i, fake in enumerate(fakes)
    ]
    config = broker_config(tmp_path, guests, cpus=4 * count, memory=2 * GiB * count)
    backends: dict[str, Backend] = {
        g.id: SimulatedBackend(fake, g.id) for g, fake in zip(guests, fakes, strict=True)
    }
    return Broker(config, backends, BrokerMetrics(CollectorRegistry())), fakes


def hello(fake: FakeGuest) -> pb.Hello:
    topology = Topology.read(Kernel(fake.sysfs, fake.procfs)).to_proto()
    return pb.Hello(protocol_version=1, topology=topology)


def ask(cpus: int, seen_grant_id: int) -> pb.GuestMessage:
    return pb.GuestMessage(
        request=pb.ResourceRequest(
            request_id=1, cpus=cpus, memory_bytes=GiB, seen_grant_id=seen_grant_id
        )
    )


def sent(outbox: asyncio.Queue[pb.BrokerMessage | None], kind: str) -> list[pb.BrokerMessage]:
    messages = []
    while not outbox.empty():
        message = outbox.get_nowait()
        if message is not None and message.WhichOneof("body") == kind:
            messages.append(message)
    return messages


def state_of(broker: Broker, guest: str) -> dict[str, Any] | None:
    try:
        state: dict[str, Any] = json.loads(broker.config.broker.state_file.read_text())
    except (OSError, ValueError):
        return None
    return state["guests"][guest]  # type: ignore[no-any-return]


async def test_a_burst_of_changes_writes_the_state_file_once_with_the_last(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    broker, [fake] = make_broker(tmp_path)
    record, _ = broker.open_session("g0", hello(fake))
    writes: list[int] = []
    write = broker.write_state

    def counted() -> None:
        writes.append(record.demand.cpus)
        write()

    monkeypatch.setattr(broker, "write_state", counted)
    for cpus in (2, 3, 4):
        record.demand = Amount(cpus, GiB)
        broker.noted(record)
        broker.state_changed()

    await until(lambda: bool(writes), 10, "the state file to be written")
    assert writes == [4]
    state = state_of(broker, "g0")
    assert state is not None and state["requested"]["cpus"] == 4


async def test_a_grant_ack_that_changes_nothing_starts_no_round_but_shows_in_status(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    broker, [fake] = make_broker(tmp_path)
    record, outbox = broker.open_session("g0", hello(fake))
    await broker.on_message(record, ask(3, record.last_grant_id))
    await broker.rebalance()
    grant = sent(outbox, "grant")[-1].grant  # after the session's own
    assert grant.cpus == 3
    rounds: list[str] = []
    monkeypatch.setattr(broker, "changed", lambda *_: rounds.append("round"))

    onlined = [
        pb.ItemResult(
            kind=pb.RESOURCE_KIND_CPU, index=cpu, action=pb.ACTION_ONLINE, outcome=pb.OUTCOME_DONE
        )
        for cpu in grant.cpu_ids
    ]
    ack = pb.Ack(grant_id=grant.grant_id, items=onlined, online_cpus=3, online_memory_bytes=GiB)
    await broker.on_message(record, pb.GuestMessage(ack=ack))
    assert rounds == []
    await until(
        lambda: (s := state_of(broker, "g0")) is not None and s["online"]["cpus"] == 3,
        10,
        "the status to show the Ack's online CPUs",
    )

    # A reclaim's Ack frees capacity: that is a round.
    record.last_request_at = 0.0
    await broker.on_message(record, ask(1, record.last_grant_id))
    await broker.rebalance()
    [reclaim] = [m.reclaim for m in sent(outbox, "reclaim")]
    offlined = [
        pb.ItemResult(
            kind=pb.RESOURCE_KIND_CPU, index=cpu, action=pb.ACTION_OFFLINE, outcome=pb.OUTCOME_DONE
        )
        for cpu in grant.cpu_ids
    ]
    rounds.clear()
    ack = pb.Ack(
        reclaim_id=reclaim.reclaim_id, items=offlined, online_cpus=1, online_memory_bytes=GiB
    )
    await broker.on_message(record, pb.GuestMessage(ack=ack))
    assert rounds == ["round"]


async def test_a_round_updates_the_gauges_of_changed_guests_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    broker, fakes = make_broker(tmp_path, count=3)
    records = [broker.open_session(f"g{i}", hello(fake))[0] for i, fake in enumerate(fakes)]
    updated: list[str] = []
    books = broker.metrics.books

    def spied(guest: str, granted: Amount, requested: Amount) -> None:
        updated.append(guest)
        books(guest, granted, requested)

    monkeypatch.setattr(broker.metrics, "books", spied)
    await broker.rebalance()
    assert sorted(updated) == ["g0", "g1", "g2"]

    updated.clear()
    await broker.rebalance()
    assert updated == []

    await broker.on_message(records[1], ask(2, records[1].last_grant_id))
    await broker.rebalance()
    assert updated == ["g1"]
    granted = broker.metrics.granted_cpus.labels("g1")._value.get()
    assert granted == records[1].entitled.cpus == 2
