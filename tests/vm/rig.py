"""A rig for real-VM runs: guests under QEMU with the agent inside, the broker in
this process driving QEMU over QMP. Shared by the end-to-end tests and the demo.

The guest script starts the agent, then follows load instructions written into
the shared directory (`cpu-load`: busy loops; `mem-load`: MiB held by a
process; `pin-load`: MiB held unmovable, tests/vm/pin_pages.py; `stress`:
stress-ng's arguments) and publishes what its kernel shows
and whether the agent is alive (`status`) every second.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

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
from vm.harness import BOOT_TIMEOUT_SECONDS, VENV_BIN, VM, VMOptions, VMs

MiB = 1 << 20
GiB = 1 << 30
PIN_PAGES = Path(__file__).resolve().parent / "pin_pages.py"
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
start_agent() {{
    # Scheduled ahead of the load, as its unit does (Nice=-10).
    nice -n -10 {venv}/vmtide-agent run --config $S/agent.toml >> $S/agent.log 2>&1 &
    agent=$!
}}
start_agent
cpu_workers=""
mem_worker=""
mem_now=0
stress_worker=""
stress_now=""
pin_worker=""
pin_now=0
while [ ! -e $S/stop ]; do
    if [ -e $S/kill-agent ]; then
        rm $S/kill-agent
        kill -9 $agent || true
        wait $agent || true
        echo "--- agent killed with SIGKILL and restarted" >> $S/agent.log
        start_agent
    fi
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
            # Grows 32 MiB at a time, as a working set does: all at once would
            # be a race between memset and hot-plug that only the OOM killer wins.
            {venv}/python -c "
import time
held = []
for _ in range($mem // 32):
    held.append(b'x' * (32 << 20))
    time.sleep(0.1)
time.sleep(1e6)" &
            mem_worker=$!
        fi
        mem_now=$mem
    fi
    stress=""; [ -e $S/stress ] && {{ read stress < $S/stress || true; }}
    if [ "$stress" != "$stress_now" ]; then
        if [ -n "$stress_worker" ]; then
            kill "$stress_worker" || true
            wait "$stress_worker" || true
        fi
        stress_worker=""
        if [ -n "$stress" ]; then
            stress-ng --temp-path /tmp $stress >> $S/stress.log 2>&1 &
            stress_worker=$!
        fi
        stress_now=$stress
    fi
    pin=0; [ -e $S/pin-load ] && {{ read pin < $S/pin-load || true; }}
    if [ "$pin" != "$pin_now" ]; then
        [ -n "$pin_worker" ] && {{ kill "$pin_worker" || true; }}
        pin_worker=""
        if [ "$pin" -gt 0 ]; then
            {venv}/python {pin_pages} "$pin" > $S/pin.log 2>&1 &
            pin_worker=$!
        fi
        pin_now=$pin
    fi
    alive=0; kill -0 $agent 2>/dev/null && alive=1
    read cpus < /sys/devices/system/cpu/online
    total=0
    while read key value unit; do
        [ "$key" = "MemTotal:" ] && total=$value && break
    done < /proc/meminfo
    online=0
    movable=0
    for f in /sys/devices/system/memory/memory*/state; do
        read st < $f || continue
        [ "$st" = online ] || continue
        online=$((online + 1))
        read zones < ${{f%state}}valid_zones || continue
        [ "$zones" = Movable ] && movable=$((movable + 1))
    done
    set -- /sys/devices/system/memory/memory*
    echo "$cpus $total $# $online $alive $movable" > $S/.status
    mv $S/.status $S/status
    sleep 1
done
"""

AGENT_CONFIG = """
[agent]
guest_id = "{name}"
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
    """One guest of a rig: its VM, what its kernel shows, the broker's books on it."""

    def __init__(self, name: str, vm: VM, state_file: Path, broker_log: list[str]) -> None:
        self.name = name
        self.vm = vm
        self.state_file = state_file
        self.broker_log = broker_log

    def state(self) -> dict[str, Any]:
        try:
            guest: dict[str, Any] = json.loads(self.state_file.read_text())["guests"][self.name]
        except (OSError, ValueError, KeyError):
            return {}
        return guest

    def pool(self) -> dict[str, Any]:
        try:
            pool: dict[str, Any] = json.loads(self.state_file.read_text())["pool"]
        except (OSError, ValueError, KeyError):
            return {}
        return pool

    def _status(self) -> list[str]:
        """The guest's last status: online CPU list, MemTotal kB, blocks, online
        blocks, 1 if the agent is alive, online blocks in ZONE_MOVABLE."""
        try:
            return (self.vm.share / "status").read_text().split()
        except OSError:
            return ["", "0", "0", "0", "0", "0"]

    def guest_cpus(self) -> frozenset[int]:
        return parse_cpu_list(self._status()[0])

    def mem_total(self) -> int:
        return int(self._status()[1]) * 1024

    def blocks(self) -> int:
        return int(self._status()[2])

    def online_blocks(self) -> int:
        return int(self._status()[3])

    def movable_blocks(self) -> int:
        """Online blocks in ZONE_MOVABLE (their valid_zones is "Movable")."""
        return int(self._status()[5])

    def agent_alive(self) -> bool:
        """The agent the guest script started last is still running."""
        return self._status()[4:5] == ["1"]

    def load(
        self,
        cpus: int | None = None,
        memory_mib: int | None = None,
        pinned_mib: int | None = None,
    ) -> None:
        for name, value in (("cpu-load", cpus), ("mem-load", memory_mib), ("pin-load", pinned_mib)):
            if value is not None:
                tmp = self.vm.share / f".{name}"
                tmp.write_text(f"{value}\n")
                tmp.rename(self.vm.share / name)

    @staticmethod
    def _holds(condition: Callable[[], bool]) -> bool:
        # Before the broker's first state file, state() is {}: not yet, not an error.
        try:
            return condition()
        except KeyError:
            return False

    async def until(self, condition: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not self._holds(condition):
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


class Rig:
    """Guests under QEMU with the agent inside, and the broker in this process."""

    def __init__(self, tmp_path: Path, pool: PoolConfig, metrics_port: int = 0) -> None:
        self.tmp_path = tmp_path
        self.pool = pool
        self.metrics_port = metrics_port
        self.guests: dict[str, Setup] = {}
        self.configs: list[GuestConfig] = []
        self.log: list[str] = []
        self._stop = asyncio.Event()
        self._broker: asyncio.Task[int] | None = None

    async def add(
        self,
        vms: VMs,
        name: str,
        options: VMOptions,
        priority: int = 0,
        script: str = GUEST_SCRIPT,
        agent_config: str = AGENT_CONFIG,
    ) -> Setup:
        """Boot a guest running `script` (formatted with `venv` and `pin_pages`)
        with the agent's config at `$VMTIDE_SHARE/agent.toml` (formatted with
        `port` and `name`)."""
        port = free_port()
        vm = vms.new(options)
        vm.share.mkdir(parents=True, exist_ok=True)
        (vm.share / "agent.toml").write_text(agent_config.format(port=port, name=name))
        await vm.start(script.format(venv=VENV_BIN, pin_pages=PIN_PAGES))
        self.configs.append(
            GuestConfig(
                id=name,
                listen=f"127.0.0.1:{port}",
                priority=priority,
                backend="qmp",
                qmp_socket=vm.qmp_socket,
                cpus=CpuLimits(minimum=1, maximum=4),
                memory=MemoryLimits(minimum_bytes=1 * GiB, maximum_bytes=3 * GiB),
                memory_step_bytes=512 * MiB,
                reclaim_deadline_seconds=20.0,
            )
        )
        setup = Setup(name, vm, self.tmp_path / "broker.json", self.log)
        self.guests[name] = setup
        return setup

    def start_broker(self) -> None:
        config = BrokerConfig(
            broker=BrokerSection(
                state_file=self.tmp_path / "broker.json",
                arbitrate_interval_seconds=0.5,
                metrics_port=self.metrics_port,
            ),
            pool=self.pool,
            guests=tuple(self.configs),
        )
        self._stop = asyncio.Event()
        self._broker = asyncio.create_task(serve(config, self._stop))

    async def stop_broker(self) -> None:
        self._stop.set()
        if self._broker is not None:
            await self._broker
            self._broker = None

    def print_logs(self) -> None:
        """The broker's log and each agent's, for a failing test's report."""
        print("--- broker log (last 80 lines)", *self.log[-80:], sep="\n")
        for setup in self.guests.values():
            path = setup.vm.share / "agent.log"
            if path.exists():
                tail = path.read_text(errors="replace").splitlines()[-80:]
                print(f"--- agent log of {setup.name} (last 80 lines)", *tail, sep="\n")

    async def connected(self) -> None:
        for setup in self.guests.values():
            await setup.vm.wait_started(BOOT_TIMEOUT_SECONDS)
        for setup in self.guests.values():
            await setup.until(
                lambda s=setup: s.state().get("connected", False),  # type: ignore[misc]
                AGENT_CONNECT_TIMEOUT_SECONDS,
                f"the agent in {setup.name} to connect",
            )


@contextlib.asynccontextmanager
async def rig(
    vms: VMs,
    tmp_path: Path,
    pool: PoolConfig,
    guests: list[tuple[str, VMOptions, int]],
    connected: bool = True,
) -> AsyncIterator[Rig]:
    """Boot the guests and start the broker; with `connected`, wait for every agent."""
    made = Rig(tmp_path, pool)
    with ListHandler(made.log):
        try:
            for name, options, priority in guests:
                await made.add(vms, name, options, priority)
            made.start_broker()
            if connected:
                await made.connected()
            yield made
        except BaseException:
            made.print_logs()
            raise
        finally:
            for setup in made.guests.values():
                (setup.vm.share / "stop").touch()
            await made.stop_broker()


@contextlib.asynccontextmanager
async def booted(
    vms: VMs, tmp_path: Path, options: VMOptions, pool: PoolConfig
) -> AsyncIterator[Setup]:
    async with rig(vms, tmp_path, pool, [("vm1", options, 0)]) as made:
        yield made.guests["vm1"]
