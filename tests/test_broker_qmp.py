"""The broker with its QMP backend against real QEMU processes that come and go.

A QEMU that is not there yet, or dies, or is restarted on the same socket must
cost only its own guest: the broker serves the others meanwhile, says which guest
and socket it cannot reach (log, `vmtide-broker status`), reconnects, and reads
what the new QEMU has plugged before it hot-plugs again. No guest OS runs: the
guest's side is a hand-made Hello (or a simulated guest with the real agent).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from qemu.qmp import QMPClient
from qemu_proc import QemuProcess, qemu_binary
from simulation import LoadDriver, agent_config, broker_config, make_agent, running, until

from broker import cli as broker_cli
from broker import config as broker_config_module
from broker.arbiter import Amount
from broker.config import CpuLimits, GuestConfig, MemoryLimits
from broker.core import Broker
from broker.metrics import BrokerMetrics
from broker.qmp_backend import QmpBackend
from broker.supervisor import SupervisedBackend
from vmtide.fakesys import FakeGuest, Load
from vmtide.v1 import broker_pb2 as pb

pytestmark = pytest.mark.qemu

MiB = 1 << 20
GiB = 1 << 30
BLOCK = 128 * MiB
BOOT_MEMORY = 512 * MiB  # tests/qemu_proc.py's -m 512M


@pytest.fixture
def qemus(tmp_path: Path) -> Iterator[list[QemuProcess]]:
    """QEMUs a test starts itself (every one killed at the end, by its pid)."""
    if qemu_binary() is None:
        pytest.skip("qemu-system-x86_64 is not installed")
    procs: list[QemuProcess] = []
    try:
        yield procs
    finally:
        for proc in procs:
            proc.kill()


async def start_qemu(workdir: Path, qemus: list[QemuProcess]) -> QemuProcess:
    proc = QemuProcess(workdir)
    qemus.append(proc)
    await asyncio.to_thread(proc.start)
    return proc


def read_state(path: Path) -> dict[str, Any]:
    try:
        state: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return state


def reachable(path: Path, guest: str) -> bool | None:
    """Whether the state file says the guest's hypervisor answers (None: no state yet)."""
    backend = read_state(path).get("guests", {}).get(guest, {}).get("backend", {})
    available = backend.get("available")
    return available if isinstance(available, bool) else None


async def test_broker_serves_others_while_a_qemu_is_missing_then_reconnects(
    tmp_path: Path, qemus: list[QemuProcess], capsys: pytest.CaptureFixture[str]
) -> None:
    vm_dir = tmp_path / "vm"
    socket = vm_dir / "qmp.sock"  # no QEMU there yet
    fake = FakeGuest(tmp_path / "sim", possible_cpus=4, boot_cpus=1, boot_blocks=8)
    toml = tmp_path / "broker.toml"
    toml.write_text(
        f"""
[broker]
state_file = "{tmp_path / "broker.json"}"
arbitrate_interval_seconds = 0.2
max_requests_per_second = 50.0
metrics_port = 0

[pool]
cpus = 6
memory_bytes = "8GiB"

[[guests]]
id = "vm"
listen = "unix:{tmp_path / "vm.sock"}"
qmp_socket = "{socket}"
[guests.cpus]
minimum = 1
maximum = 4
[guests.memory]
minimum_bytes = "512MiB"
maximum_bytes = "2GiB"

[[guests]]
id = "sim"
listen = "unix:{tmp_path / "sim.sock"}"
backend = "simulated"
simulated_root = "{fake.root}"
[guests.cpus]
minimum = 1
maximum = 2
[guests.memory]
minimum_bytes = "1GiB"
maximum_bytes = "1GiB"
"""
    )
    config = broker_config_module.load(toml)  # a good config, an absent QEMU
    state_file = config.broker.state_file
    agent = make_agent(agent_config(fake, "sim", f"unix:{tmp_path / 'sim.sock'}"))
    driver = LoadDriver(fake, Load(cpus=1.8, memory_bytes=300 * MiB))

    async def broker(stop: asyncio.Event) -> int:
        return await broker_cli.serve(config, stop)

    async with running(broker, driver.run, agent.run):
        await until(lambda: reachable(state_file, "vm") is False, 10, "the broker serving")
        # The other guest is served all the same: it grows to its maximum.
        await until(lambda: len(fake.online_cpus()) == 2, 30, "the simulated guest grown")
        assert broker_cli.main(["status", "--config", str(toml)]) == 0
        text = capsys.readouterr().out
        assert "UNREACHABLE" in text
        assert f"vm: guest vm: connect: cannot reach QMP socket {socket}" in text
        # The memory limits show in the text too (min/max/burst, MiB).
        assert "512/2048/2048" in text and "1024/1024/1024" in text

        await start_qemu(vm_dir, qemus)
        await until(lambda: reachable(state_file, "vm") is True, 20, "connected to QEMU")

        # QEMU dies: noticed at once, without a command failing first.
        qemus[-1].kill()
        await until(lambda: reachable(state_file, "vm") is False, 10, "QEMU seen gone")
        error = read_state(state_file)["guests"]["vm"]["backend"]["error"]
        assert f"QMP socket {socket} closed" in error

        # A new QEMU on the same socket: connected again.
        await start_qemu(vm_dir, qemus)
        await until(lambda: reachable(state_file, "vm") is True, 20, "reconnected")
        assert broker_cli.main(["status", "--config", str(toml)]) == 0
        assert "UNREACHABLE" not in capsys.readouterr().out


def hello(present_cpus: int) -> pb.Hello:
    """What an agent in a guest booted with -smp 1,maxcpus=4 -m 512M would say."""
    blocks = [
        pb.MemoryBlock(index=i, state=pb.BLOCK_STATE_ONLINE, zone=pb.ZONE_KERNEL)
        for i in range(BOOT_MEMORY // BLOCK)
    ]
    return pb.Hello(
        protocol_version=1,
        guest_id="vm",
        topology=pb.Topology(
            cpus=pb.CpuTopology(
                possible=range(4), present=range(present_cpus), online=range(present_cpus)
            ),
            memory=pb.MemoryTopology(block_size_bytes=BLOCK, blocks=blocks),
        ),
    )


@contextlib.asynccontextmanager
async def supervised_broker(
    tmp_path: Path, socket: Path
) -> AsyncIterator[tuple[Broker, SupervisedBackend]]:
    """A Broker over one QMP guest, kept connected as serve() keeps it."""
    guest = GuestConfig(
        id="vm",
        listen="unix:/nonexistent",
        qmp_socket=socket,
        cpus=CpuLimits(minimum=1, maximum=4),
        memory=MemoryLimits(minimum_bytes=BOOT_MEMORY, maximum_bytes=BOOT_MEMORY),
    )
    backend = SupervisedBackend(QmpBackend(socket, "vm"), "vm", str(socket))
    broker = Broker(
        broker_config(tmp_path, [guest], cpus=4, memory=4 * GiB),
        {"vm": backend},
        BrokerMetrics(CollectorRegistry()),
    )
    await backend.connect()
    await broker.load_plugged()
    stop = asyncio.Event()

    def down(reason: str) -> None:
        broker.backend_down("vm", reason)

    async def up() -> None:
        await broker.backend_up("vm")

    keeper = asyncio.create_task(backend.run(stop, up, down))
    try:
        yield broker, backend
    finally:
        stop.set()
        await keeper
        await backend.close()


async def plugged_cores(socket: Path) -> list[int]:
    """The core-ids QEMU has a vCPU in, asked on the test's own QMP socket."""
    inspector = QMPClient("test-inspector")
    await inspector.connect(str(socket.with_name("inspect.sock")))
    try:
        slots = await inspector.execute("query-hotpluggable-cpus")
    finally:
        await inspector.disconnect()
    assert isinstance(slots, list)
    return sorted(s["props"]["core-id"] for s in slots if s.get("qom-path"))


async def test_after_qemu_restarts_what_is_plugged_is_read_again_before_plugging(
    tmp_path: Path, qemus: list[QemuProcess]
) -> None:
    vm_dir = tmp_path / "vm"
    first = await start_qemu(vm_dir, qemus)
    async with supervised_broker(tmp_path, first.qmp_socket) as (broker, backend):
        record, outbox = broker.open_session("vm", hello(present_cpus=1))

        async def ask(request_id: int, cpus: int) -> None:
            record.last_request_at = 0.0
            request = pb.ResourceRequest(
                request_id=request_id,
                cpus=cpus,
                memory_bytes=BOOT_MEMORY,
                seen_grant_id=record.last_grant_id,
            )
            await broker.on_message(record, pb.GuestMessage(request=request))
            await broker.rebalance()

        await ask(1, 3)
        assert await plugged_cores(first.qmp_socket) == [0, 1, 2]
        assert record.present_cpus == {0, 1, 2}

        # QEMU is restarted (the guest with it): while it is away, nothing is
        # plugged or promised.
        first.kill()
        await until(lambda: not backend.available, 10, "QEMU seen gone")
        await ask(2, 4)
        assert record.entitled.cpus == 3
        second = await start_qemu(vm_dir, qemus)
        await until(lambda: backend.available, 20, "reconnected to the new QEMU")
        await until(lambda: record.present_cpus == {0}, 5, "the new QEMU's CPUs read")

        # The new QEMU has its boot CPU only: three are plugged for a grant of 4,
        # not the one the old books would have said was missing.
        await broker.rebalance()
        assert await plugged_cores(second.qmp_socket) == [0, 1, 2, 3]
        assert record.entitled == Amount(4, BOOT_MEMORY)
        grants = []
        while not outbox.empty():
            message = outbox.get_nowait()
            if message is not None and message.WhichOneof("body") == "grant":
                grants.append(message.grant.cpus)
        assert grants[-1] == 4
