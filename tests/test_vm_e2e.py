"""End to end on a real VM: the agent inside a Linux guest under QEMU, the broker
outside driving QEMU over QMP. No fake in the loop but the emulated hardware.

The guest script starts the agent, then follows load instructions the test
writes into the shared directory (`cpu-load`: busy loops; `mem-load`: MiB held
by a process) and publishes what its kernel shows (`cpus-online`, `meminfo`)
twice a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from vm.harness import BOOT_TIMEOUT_SECONDS, VENV_BIN, VM, VMOptions, VMs

from agent.kernel import parse_cpu_list
from broker.cli import serve
from broker.config import (
    BrokerConfig,
    BrokerSection,
    CpuLimits,
    GuestConfig,
    MemoryLimits,
    PoolConfig,
)

pytestmark = [pytest.mark.vm, pytest.mark.timeout(600)]

MiB = 1 << 20
GiB = 1 << 30
# The agent imports in about 12 s under TCG and connects at once.
AGENT_CONNECT_TIMEOUT_SECONDS = 120.0
# Sensing every 0.5 s, growth within two periods, plus hot-plug and ACPI.
GROW_TIMEOUT_SECONDS = 90.0
# The shrink window (8 s) plus PSI decay and the unplug.
SHRINK_TIMEOUT_SECONDS = 150.0

# Lean on forks: under TCG every process the loop spawns costs real CPU time
# that the agent would see as load. Shell builtins only, except the workers
# and one `mv` per status update.
GUEST_SCRIPT = """
S=$VMTIDE_SHARE
{venv}/vmtide-agent run --config $S/agent.toml >> $S/agent.log 2>&1 &
cpu_workers=""
mem_worker=""
mem_now=0
while [ ! -e $S/stop ]; do
    want=0; [ -e $S/cpu-load ] && {{ read want < $S/cpu-load || true; }}
    set -- $cpu_workers
    while [ "$#" -lt "$want" ]; do
        sh -c 'while :; do :; done' &
        cpu_workers="$cpu_workers $!"
        set -- $cpu_workers
    done
    while [ "$#" -gt "$want" ]; do
        kill "$1" || true
        shift
        cpu_workers="$*"
    done
    mem=0; [ -e $S/mem-load ] && {{ read mem < $S/mem-load || true; }}
    if [ "$mem" != "$mem_now" ]; then
        [ -n "$mem_worker" ] && {{ kill "$mem_worker" || true; }}
        mem_worker=""
        if [ "$mem" -gt 0 ]; then
            {venv}/python -c "import time; b = b'x' * ($mem << 20); time.sleep(1e6)" &
            mem_worker=$!
        fi
        mem_now=$mem
    fi
    read cpus < /sys/devices/system/cpu/online
    total=0
    while read key value unit; do
        [ "$key" = "MemTotal:" ] && total=$value && break
    done < /proc/meminfo
    online=0
    for f in /sys/devices/system/memory/memory*/state; do
        read st < $f || continue
        [ "$st" = online ] && online=$((online + 1))
    done
    set -- /sys/devices/system/memory/memory*
    echo "$cpus $total $# $online" > $S/.status
    mv $S/.status $S/status
    sleep 1
done
"""

AGENT_CONFIG = """
[agent]
guest_id = "vm1"
sensing_interval_seconds = 0.5
rescan_interval_seconds = 2.0
[broker]
target = "10.0.2.2:{port}"
reconnect_min_seconds = 0.5
reconnect_max_seconds = 2.0
request_retry_seconds = 3.0
[limits.cpus]
minimum = 1
maximum = 4
[limits.memory]
minimum_bytes = "1GiB"
maximum_bytes = "3GiB"
[metrics]
enabled = false
[policy.cpu]
shrink_window_seconds = 8.0
shrink_interval_seconds = 2.0
shrink_step_ratio = 1.0
[policy.memory]
shrink_window_seconds = 8.0
shrink_interval_seconds = 2.0
shrink_step_ratio = 1.0
headroom_min_bytes = "128MiB"
headroom_percent = 5.0
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Setup:
    def __init__(self, vm: VM, state_file: Path, broker_log: list[str]) -> None:
        self.vm = vm
        self.state_file = state_file
        self.broker_log = broker_log

    def state(self) -> dict[str, Any]:
        try:
            guest: dict[str, Any] = json.loads(self.state_file.read_text())["guests"]["vm1"]
        except (OSError, ValueError):
            return {}
        return guest

    def _status(self) -> list[str]:
        """The guest's last status: online CPU list, MemTotal kB, blocks, online blocks."""
        try:
            return (self.vm.share / "status").read_text().split()
        except OSError:
            return ["", "0", "0", "0"]

    def guest_cpus(self) -> frozenset[int]:
        return parse_cpu_list(self._status()[0])

    def mem_total(self) -> int:
        return int(self._status()[1]) * 1024

    def blocks(self) -> int:
        return int(self._status()[2])

    def online_blocks(self) -> int:
        return int(self._status()[3])

    def load(self, cpus: int | None = None, memory_mib: int | None = None) -> None:
        for name, value in (("cpu-load", cpus), ("mem-load", memory_mib)):
            if value is not None:
                tmp = self.vm.share / f".{name}"
                tmp.write_text(f"{value}\n")
                tmp.rename(self.vm.share / name)

    async def until(self, condition: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                agent_log = (
                    (self.vm.share / "agent.log").read_text()[-4000:]
                    if (self.vm.share / "agent.log").exists()
                    else ""
                )
                raise AssertionError(
                    self.vm.explain(
                        f"timed out after {timeout:.0f} s waiting for {what}\n"
                        f"broker state: {self.state()}\n--- agent log\n{agent_log}\n"
                        "--- broker log\n" + "\n".join(self.broker_log[-40:])
                    )
                )
            await asyncio.sleep(0.2)


class ListHandler:
    def __init__(self, lines: list[str]) -> None:
        import logging

        class Handler(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                lines.append(self.format(record))

        self.handler = Handler()
        self.handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
        self.logger = logging.getLogger("vmtide")

    def __enter__(self) -> None:
        self.logger.addHandler(self.handler)
        self.logger.setLevel("INFO")

    def __exit__(self, *exc: object) -> None:
        self.logger.removeHandler(self.handler)


async def plugged_vcpus(vm: VM) -> int:
    """vCPU slots QEMU has filled, the boot CPU included."""
    async with vm.qmp() as qmp:
        slots = await qmp.execute("query-hotpluggable-cpus")
    assert isinstance(slots, list)
    return sum("qom-path" in slot for slot in slots)


@contextlib.asynccontextmanager
async def booted(
    vms: VMs, tmp_path: Path, options: VMOptions, pool: PoolConfig
) -> AsyncIterator[Setup]:
    port = free_port()
    vm = vms.new(options)
    vm.share.mkdir(parents=True, exist_ok=True)
    (vm.share / "agent.toml").write_text(AGENT_CONFIG.format(port=port))
    await vm.start(GUEST_SCRIPT.format(venv=VENV_BIN))
    config = BrokerConfig(
        broker=BrokerSection(
            state_file=tmp_path / "broker.json", arbitrate_interval_seconds=0.5, metrics_port=0
        ),
        pool=pool,
        guests=(
            GuestConfig(
                id="vm1",
                listen=f"127.0.0.1:{port}",
                backend="qmp",
                qmp_socket=vm.qmp_socket,
                cpus=CpuLimits(minimum=1, maximum=4),
                memory=MemoryLimits(minimum_bytes=1 * GiB, maximum_bytes=3 * GiB),
                memory_step_bytes=512 * MiB,
                reclaim_deadline_seconds=20.0,
            ),
        ),
    )
    lines: list[str] = []
    stop = asyncio.Event()
    with ListHandler(lines):
        broker = asyncio.create_task(serve(config, stop))
        setup = Setup(vm, tmp_path / "broker.json", lines)
        try:
            await vm.wait_started(BOOT_TIMEOUT_SECONDS)
            await setup.until(
                lambda: setup.state().get("connected", False),
                AGENT_CONNECT_TIMEOUT_SECONDS,
                "the agent in the guest to connect",
            )
            yield setup
        finally:
            (vm.share / "stop").touch()
            stop.set()
            await broker


async def test_cpus_follow_load_in_a_real_guest(vms: VMs, tmp_path: Path) -> None:
    pool = PoolConfig(cpus=4, memory_bytes=8 * GiB)
    async with booted(vms, tmp_path, VMOptions(), pool) as setup:
        assert setup.guest_cpus() == {0}
        setup.load(cpus=3)
        # The agent asks, the broker hot-plugs over QMP, the agent onlines.
        await setup.until(lambda: len(setup.guest_cpus()) >= 2, GROW_TIMEOUT_SECONDS, "cpus up")
        await setup.until(
            lambda: setup.state().get("online", {}).get("cpus", 0) >= 2, 10, "broker sees them"
        )
        assert await plugged_vcpus(setup.vm) >= 2
        # Load stops: after the window the agent offlines, acknowledges, and
        # the broker unplugs exactly those vCPUs (QEMU confirms the removal).
        setup.load(cpus=0)
        await setup.until(lambda: setup.guest_cpus() == {0}, SHRINK_TIMEOUT_SECONDS, "cpus down")
        await setup.until(
            lambda: any("unplugged cpus [" in line for line in setup.broker_log),
            30,
            "the broker to unplug them",
        )
        deadline = time.monotonic() + 30
        while await plugged_vcpus(setup.vm) != 1:
            assert time.monotonic() < deadline, setup.vm.explain("vCPUs still plugged")
            await asyncio.sleep(0.5)
        await setup.until(lambda: setup.state()["online"]["cpus"] == 1, 10, "books match")


@pytest.mark.parametrize(
    "options",
    [VMOptions(virtio_mem="2G"), VMOptions()],
    ids=["virtio-mem", "pc-dimm"],
)
async def test_memory_follows_pressure_in_a_real_guest(
    vms: VMs, tmp_path: Path, options: VMOptions
) -> None:
    pool = PoolConfig(cpus=4, memory_bytes=8 * GiB)
    async with booted(vms, tmp_path, options, pool) as setup:
        boot_total, boot_blocks = setup.mem_total(), setup.blocks()
        assert boot_total > 0 and boot_blocks > 0
        # Memory pressure rises: memory arrives, goes online movable, MemTotal grows.
        setup.load(memory_mib=800)
        await setup.until(
            lambda: setup.mem_total() >= boot_total + 256 * MiB,
            GROW_TIMEOUT_SECONDS,
            "MemTotal to grow",
        )
        agent_log = (setup.vm.share / "agent.log").read_text()
        assert "online memory" in agent_log and ": done" in agent_log
        grown = setup.state()["online"]["memory_bytes"]
        assert grown >= 1 * GiB + 256 * MiB
        # Pressure ends: blocks that offline are unplugged, refusals are
        # reported, and the broker's books match the guest.
        setup.load(memory_mib=0)
        await setup.until(
            lambda: setup.state().get("online", {}).get("memory_bytes", grown) < grown,
            SHRINK_TIMEOUT_SECONDS,
            "memory to be given back",
        )
        await setup.until(
            lambda: setup.blocks() < boot_blocks + (grown - 1 * GiB) // (128 * MiB),
            60,
            "the freed blocks to be unplugged",
        )
        await setup.until(
            lambda: (
                not setup.state()["pending_reclaims"]
                and setup.state()["online"]["memory_bytes"] == setup.online_blocks() * 128 * MiB
            ),
            30,
            "the broker's books to match the guest's online blocks",
        )
        final = setup.state()["online"]["memory_bytes"]
        assert final >= 1 * GiB  # never below the minimum
        assert setup.mem_total() <= boot_total + (final - 1 * GiB) + 64 * MiB
