"""The broker-scale benchmark: its quick mode against a real broker process, and its parts.

No timing is asserted: the benchmark measures latency, the tests check that it
ran the flow it claims and reported it in a well-formed way.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from broker import config as broker_config
from vmtide.fakesys import FakeGuest
from vmtide.v1 import broker_pb2 as pb

# bench/ is not an installed package: import it from this checkout.
REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import broker_scale  # noqa: E402


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
    assert len(rows[0].strip("|").split("|")) == 10
    assert "python -m bench.broker_scale --quick" in report
    assert results["machine"]["uname"] in report
    assert (out / f"{broker_scale.NAME}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_broker_config_it_writes_loads_and_covers_every_guest(tmp_path: Path) -> None:
    roots = [tmp_path / broker_scale.guest_id(i) for i in range(3)]
    listens = [f"unix:{tmp_path}/{i}.sock" for i in range(3)]
    config = broker_config.load(broker_scale.write_broker_config(tmp_path, roots, listens))

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
