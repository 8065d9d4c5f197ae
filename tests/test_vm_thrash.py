"""The agent under heavy memory pressure in a real guest: stress-ng drives the
guest into reclaim and the OOM killer while the broker has nothing to give,
and the agent must go on sensing, deciding and reporting; once the operator
adds capacity, it must grow the guest while the thrash goes on.

The agent runs as its unit would have it: memory locked (mlockall), out of the
OOM killer's reach (oom_score_adj -1000) and niced ahead of the load. Its
Prometheus endpoint, forwarded to the host, shows whether it keeps cycling.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from prom_helpers import http_get, samples
from vm.harness import VMOptions, VMs
from vm.rig import AGENT_CONFIG, GROW_TIMEOUT_SECONDS, GiB, ListHandler, MiB, Rig, free_port

from broker.config import PoolConfig

pytestmark = [pytest.mark.vm, pytest.mark.timeout(600)]

AGENT_PORT = 9474
# Two workers, touching 120 % of what was available when they started: more
# than the guest has, so reclaim never ends and the OOM killer keeps taking
# workers (stress-ng starts them again).
STRESS = "--vm 2 --vm-bytes 120% --vm-keep --timeout 0"
THRASH_SECONDS = 30.0
# The longest the agent may go without a completed sense-decide cycle, at a
# 0.5 s sensing interval: generous for a TCG guest on a loaded host, far below
# "stuck" (its systemd watchdog is 30 s).
LONGEST_GAP_SECONDS = 6.0
PRESSURE_TIMEOUT_SECONDS = 90.0
OOM_KILL = re.compile(r"Killed process \d+ \(([^)]*)\)")


@dataclass
class Watch:
    """The agent's metrics, scraped through QEMU's port forward every half second."""

    port: int
    cycles: list[tuple[float, float]] = field(default_factory=list)  # (when, ok cycles)
    pressure: list[tuple[float, float]] = field(default_factory=list)  # (when, memory some)
    last: dict[str, float] = field(default_factory=dict)
    failures: list[float] = field(default_factory=list)  # when a scrape failed

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                text = await asyncio.to_thread(http_get, f"http://127.0.0.1:{self.port}/metrics")
            except OSError:
                self.failures.append(time.monotonic())
            else:
                self.last = samples(text.decode())
                ok = self.last['vmtide_agent_sensing_cycles_total{result="ok"}']
                self.cycles.append((time.monotonic(), ok))
                self.pressure.append((time.monotonic(), self.memory_pressure()))
            await asyncio.sleep(0.5)

    def value(self, key: str) -> float:
        return self.last.get(key, 0.0)

    def memory_pressure(self) -> float:
        return self.value('vmtide_agent_pressure_ratio{kind="some",resource="memory"}')

    def peak_pressure(self, since: float) -> float:
        return max((some for when, some in self.pressure if when >= since), default=0.0)

    def longest_gap(self, since: float) -> float:
        """Longest time between scrapes that saw new cycles, from `since` to the last scrape."""
        changes = [since]
        previous = None
        for when, ok in self.cycles:
            if previous is not None and ok > previous and when >= since:
                changes.append(when)
            previous = ok
        end = self.cycles[-1][0] if self.cycles else since
        return max(b - a for a, b in zip([*changes], [*changes[1:], end], strict=True))

    def restarted(self) -> bool:
        """The counter went down: a new agent process."""
        values = [ok for _, ok in self.cycles]
        return any(b < a for a, b in itertools.pairwise(values))


async def test_the_agent_keeps_deciding_while_the_guest_thrashes(vms: VMs, tmp_path: Path) -> None:
    port = free_port()
    config = AGENT_CONFIG.replace(
        "[metrics]\nenabled = false", f'[metrics]\naddress = "0.0.0.0"\nport = {AGENT_PORT}'
    )
    assert config != AGENT_CONFIG
    # No memory to give at first: the pool is the guest's minimum.
    made = Rig(tmp_path, PoolConfig(cpus=1, memory_bytes=1 * GiB))
    watch = Watch(port)
    stop_watch = asyncio.Event()
    with ListHandler(made.log):
        setup = await made.add(
            vms,
            "vm1",
            VMOptions(virtio_mem="2G", host_forwards=((port, AGENT_PORT),)),
            agent_config=config,
        )
        made.start_broker()
        watcher = asyncio.create_task(watch.run(stop_watch))
        try:
            await made.connected()
            await setup.until(lambda: bool(watch.cycles), 60, "the agent's metrics")
            boot_total = setup.mem_total()

            # The thrash, with nothing to grant: the agent sees the pressure and asks.
            (setup.vm.share / "stress").write_text(STRESS + "\n")
            await setup.until(
                lambda: setup.state().get("requested", {}).get("memory_bytes", 0) > 1 * GiB,
                PRESSURE_TIMEOUT_SECONDS,
                "memory pressure, and the agent asking for memory",
            )
            thrash_start = time.monotonic()
            grows = watch.value('vmtide_agent_decisions_total{direction="grow",resource="memory"}')
            await setup.until(
                lambda: (
                    time.monotonic() - thrash_start >= THRASH_SECONDS or not setup.agent_alive()
                ),
                THRASH_SECONDS + 10,
                f"{THRASH_SECONDS:.0f} s of thrash",
            )
            assert setup.agent_alive(), setup.vm.explain("the agent died in the thrash")
            gap = watch.longest_gap(thrash_start)
            failed = sum(t >= thrash_start for t in watch.failures)
            scraped = sum(t >= thrash_start for t, _ in watch.cycles)
            # For docs/reliability.md (pytest -rP shows it).
            print(
                f"thrash: longest gap between sensing cycles {gap:.2f} s, "
                f"peak memory PSI some {watch.peak_pressure(thrash_start):.0%}, "
                f"scrapes failed in the thrash {failed} of {failed + scraped}"
            )
            assert gap <= LONGEST_GAP_SECONDS, setup.vm.explain(
                f"the agent went {gap:.1f} s without a sensing cycle in the thrash"
            )
            # It was a thrash: memory stalls (PSI some avg10 well above an idle 0).
            assert watch.peak_pressure(thrash_start) > 0.01, watch.pressure[-20:]
            # Still deciding: the memory policy keeps wanting more, not a frozen value.
            assert (
                watch.value('vmtide_agent_decisions_total{direction="grow",resource="memory"}')
                > grows
            )
            oom_victims = OOM_KILL.findall(setup.vm.console_path.read_text(errors="replace"))
            assert oom_victims, setup.vm.explain("no OOM kill: the guest did not thrash")
            assert not [v for v in oom_victims if "stress-ng" not in v], setup.vm.explain(
                f"the OOM killer took more than stress-ng: {oom_victims}"
            )

            # The operator adds capacity (a broker restart with a larger pool):
            # memory arrives while the thrash goes on.
            await made.stop_broker()
            made.pool = PoolConfig(cpus=1, memory_bytes=3 * GiB)
            made.start_broker()
            await setup.until(
                lambda: setup.mem_total() >= boot_total + 64 * MiB,  # a block came
                GROW_TIMEOUT_SECONDS,
                "MemTotal to grow under thrash",
            )
            assert setup.agent_alive() and not watch.restarted()
        finally:
            stop_watch.set()
            await watcher
            (setup.vm.share / "stop").touch()
            await made.stop_broker()
