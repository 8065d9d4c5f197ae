"""The broker with the simulated backend and several real agent processes:
priorities, minimums, burst from idle capacity, reclaim acknowledged item by
item, refusals, and a guest that disappears in the middle of a reclaim."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from simulation import broker_config, broker_serve, running, until

from broker.config import CpuLimits, GuestConfig, MemoryLimits
from vmtide.demo import simulated_agent_config
from vmtide.fakesys import FakeGuest, Load

GiB = 1 << 30
MiB = 1 << 20
BLOCK = 128 * MiB


# Burst credits in seconds rather than minutes: a guest idle for a moment may
# burst at once, and for long enough to see it taken back.
FAST_BURST = "burst_earn_ratio = 50.0\nburst_reserve_seconds = 1.0\n"


class Guest:
    """A simulated guest with the real agent running in its own process.

    `burst`: the guest's (and its agent's) CPU burst limit above maximum.
    """

    def __init__(
        self, tmp: Path, name: str, priority: int, maximum: int = 4, burst: int = 0
    ) -> None:
        self.name = name
        self.tmp = tmp
        self.fake = FakeGuest(tmp / name, possible_cpus=4, boot_cpus=1, boot_blocks=8)
        self.sock = tmp / f"{name}.sock"
        self.config = GuestConfig(
            id=name,
            listen=f"unix:{self.sock}",
            priority=priority,
            backend="simulated",
            simulated_root=self.fake.root,
            cpus=CpuLimits(minimum=1, maximum=maximum, burst=burst),
            memory=MemoryLimits(minimum_bytes=1 * GiB, maximum_bytes=2 * GiB),
            reclaim_deadline_seconds=3.0,
        )
        self.toml = tmp / f"{name}.toml"
        toml = simulated_agent_config(
            self.fake.root,
            f"unix:{self.sock}",
            name,
            shrink_window_seconds=3.0,
            interval=0.2,
            max_cpus=maximum,
            max_memory="2GiB",
        )
        if burst:
            toml = toml.replace(f"maximum = {maximum}\n", f"maximum = {maximum}\nburst = {burst}\n")
            toml = toml.replace("[policy.cpu]\n", "[policy.cpu]\n" + FAST_BURST)
        self.toml.write_text(toml)
        self.log = tmp / f"{name}.log"
        self.load = Load(cpus=0.3, memory_bytes=300 * MiB)
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("a") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "agent.cli", "run", "--config", str(self.toml)],
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)
        self.process = None

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.process = None

    def cpus(self) -> int:
        return len(self.fake.online_cpus())

    def memory(self) -> int:
        return self.fake.online_memory_bytes()


@pytest.fixture
def guests(tmp_path: Path) -> Iterator[dict[str, Guest]]:
    made = {"high": Guest(tmp_path, "high", 10), "low": Guest(tmp_path, "low", 0)}
    try:
        yield made
    finally:
        for guest in made.values():
            guest.stop()
        for guest in made.values():
            print(f"--- {guest.name} agent log (tail)\n" + guest.log.read_text()[-4000:])


async def drive(guests: dict[str, Guest], stop: asyncio.Event) -> None:
    """Advance every simulated guest's clock under its current load."""
    loop = asyncio.get_running_loop()
    last = loop.time()
    while not stop.is_set():
        await asyncio.sleep(0.1)
        now = loop.time()
        for guest in guests.values():
            guest.fake.tick(now - last, guest.load)
        last = now


@contextlib.asynccontextmanager
async def both_running(tmp: Path, guests: dict[str, Guest]) -> AsyncIterator[None]:
    """The broker (four CPUs for both guests) and both agents, with their loads driven."""
    config = broker_config(tmp, [g.config for g in guests.values()], cpus=4, memory=4 * GiB)

    async def loads(stop: asyncio.Event) -> None:
        await drive(guests, stop)

    async with running(await broker_serve(config), loads):
        await until((tmp / "broker.json").exists, 10, "the broker to start")
        for guest in guests.values():
            guest.start()
        yield


def broker_state(tmp: Path) -> dict[str, Any]:
    state: dict[str, Any] = json.loads((tmp / "broker.json").read_text())
    return state


async def test_priority_wins_and_the_low_guest_is_reclaimed_to_its_minimum(
    tmp_path: Path, guests: dict[str, Guest]
) -> None:
    high, low = guests["high"], guests["low"]
    # Four CPUs for both guests: their minimums take two, two are surplus.
    async with both_running(tmp_path, guests):
        await until(
            lambda: all(g["connected"] for g in broker_state(tmp_path)["guests"].values()),
            20,
            "both agents connected",
        )
        # The low-priority guest is busy first and takes the surplus.
        low.load = Load(cpus=3.5, memory_bytes=300 * MiB)
        await until(lambda: low.cpus() == 3, 20, "low grows into the idle surplus")
        # Then the high-priority guest needs it: low is reclaimed to its minimum.
        high.load = Load(cpus=3.5, memory_bytes=300 * MiB)
        await until(lambda: high.cpus() == 3, 30, "high gets the surplus")
        assert low.cpus() == 1
        # Exactly what low offlined was unplugged, nothing more.
        await until(lambda: low.fake.present_cpus() == {0}, 10, "low's cpus unplugged")
        # Low still wants more than it is granted. The state file lags up to a
        # second: wait for one written after high's grant.
        await until(
            lambda: broker_state(tmp_path)["guests"]["high"]["granted"]["cpus"] == 3,
            5,
            "the state file shows high's grant",
        )
        state = broker_state(tmp_path)
        assert state["pool"]["allocated"]["cpus"] <= 4
        assert (
            state["guests"]["low"]["requested"]["cpus"] > state["guests"]["low"]["granted"]["cpus"]
        )
        # When high calms down, low gets the surplus back.
        high.load = Load(cpus=0.3, memory_bytes=300 * MiB)
        await until(lambda: low.cpus() == 3, 40, "low grows again")
        assert high.cpus() == 1


async def test_guest_killed_mid_reclaim_keeps_its_capacity_counted(
    tmp_path: Path, guests: dict[str, Guest]
) -> None:
    high, low = guests["high"], guests["low"]
    async with both_running(tmp_path, guests):
        low.load = Load(cpus=3.5, memory_bytes=300 * MiB)
        await until(lambda: low.cpus() == 3, 30, "low holds three cpus")
        # Low's next offline of cpu2 hangs in the kernel; then low dies.
        low.fake.set_faults([{"kind": "cpu", "index": 2, "effect": "hang", "seconds": 60}])
        high.load = Load(cpus=3.5, memory_bytes=300 * MiB)
        await until(
            lambda: "reclaim" in low.log.read_text() and "come down" in low.log.read_text(),
            30,
            "low receives a reclaim",
        )
        low.kill()
        await until(
            lambda: not broker_state(tmp_path)["guests"]["low"]["connected"], 10, "low gone"
        )
        # What low still has online is still counted: high cannot have it.
        for _ in range(20):
            await asyncio.sleep(0.2)
            state = broker_state(tmp_path)
            assert high.cpus() + low.cpus() <= 4
            assert state["pool"]["allocated"]["cpus"] <= 4
        # Low comes back: its Hello tells the truth and the books reconverge.
        low.fake.set_faults([])
        low.load = Load(cpus=0.3, memory_bytes=300 * MiB)
        low.start()
        await until(lambda: high.cpus() == 3 and low.cpus() == 1, 40, "reconverged")
        await until(
            lambda: broker_state(tmp_path)["guests"]["low"]["online"]["cpus"] == 1,
            10,
            "the broker's books match low",
        )
        # High got its three only once low's were unplugged: low has its boot
        # CPU alone, and the books count exactly what both have plugged.
        assert low.fake.present_cpus() == {0}
        assert len(high.fake.present_cpus()) == 3
        await until(
            lambda: broker_state(tmp_path)["pool"]["allocated"]["cpus"] == 4,
            5,
            "the books count four plugged cpus",
        )


@pytest.fixture
def bursty(tmp_path: Path) -> Iterator[dict[str, Guest]]:
    made = {
        "bursty": Guest(tmp_path, "bursty", 0, maximum=2, burst=4),
        "steady": Guest(tmp_path, "steady", 0, maximum=4),
    }
    try:
        yield made
    finally:
        for guest in made.values():
            guest.stop()
        for guest in made.values():
            print(f"--- {guest.name} agent log (tail)\n" + guest.log.read_text()[-4000:])


async def test_burst_comes_from_idle_capacity_and_is_taken_back_first(
    tmp_path: Path, bursty: dict[str, Guest]
) -> None:
    guest, steady = bursty["bursty"], bursty["steady"]
    async with both_running(tmp_path, bursty):
        await until(
            lambda: all(g["connected"] for g in broker_state(tmp_path)["guests"].values()),
            20,
            "both agents connected",
        )
        # Busy with credits earned while idle: it asks for its burst limit, 4.
        # Steady idles at its minimum, so one CPU of the four is left: above its
        # maximum of 2, the bursting guest gets only that idle one.
        guest.load = Load(cpus=3.8, memory_bytes=300 * MiB)
        await until(
            lambda: broker_state(tmp_path)["guests"]["bursty"]["requested"]["cpus"] == 4,
            20,
            "bursty asks for its burst",
        )
        await until(lambda: guest.cpus() == 3, 20, "bursty above its maximum")
        for _ in range(5):  # and no further, whatever it asks
            await asyncio.sleep(0.2)
            assert guest.cpus() == 3 and steady.cpus() == 1
        # Steady needs CPUs (a normal claim, same priority): the burst goes
        # first; bursty keeps its maximum, which is its normal share.
        steady.load = Load(cpus=3.8, memory_bytes=300 * MiB)
        await until(lambda: steady.cpus() == 2, 30, "steady gets the burst back")
        assert guest.cpus() == 2
        await until(lambda: guest.fake.present_cpus() == {0, 1}, 10, "the burst CPU unplugged")
        state = broker_state(tmp_path)
        assert state["pool"]["allocated"]["cpus"] <= 4
        assert state["guests"]["bursty"]["requested"]["cpus"] > 2  # it still wants its burst


async def test_a_reclaim_the_guest_partly_refuses_leaves_books_that_match_it(
    tmp_path: Path, guests: dict[str, Guest]
) -> None:
    low = guests["low"]
    async with both_running(tmp_path, guests):
        # Low grows by memory (boot memory is eight 128 MiB blocks).
        low.load = Load(cpus=0.3, memory_bytes=1400 * MiB)
        await until(lambda: low.memory() >= 1 * GiB + 3 * BLOCK, 30, "low's memory grown")
        hot = [b for b in low.fake.block_indexes() if b >= 8]
        # The kernel will refuse to offline one of the hot-plugged blocks.
        busy = hot[0]
        low.fake.set_faults([{"kind": "memory", "index": busy, "effect": errno.EBUSY}])
        low.load = Load(cpus=0.3, memory_bytes=200 * MiB)

        def rest_unplugged() -> bool:
            return [b for b in low.fake.block_indexes() if b >= 8] == [busy]

        await until(rest_unplugged, 30, "low's other blocks offlined and unplugged")
        assert low.fake.block_state(busy) == "online"
        assert "refused" in low.log.read_text()

        # The books match the guest: what it has online, what is plugged.
        def books_match() -> bool:
            online = broker_state(tmp_path)["guests"]["low"]["online"]["memory_bytes"]
            return bool(online == low.memory() == 1 * GiB + BLOCK)

        await until(books_match, 10, "the broker's books match low")
        plugged = sum(len(g.fake.block_indexes()) for g in guests.values()) * BLOCK
        state = broker_state(tmp_path)
        assert state["pool"]["allocated"]["memory_bytes"] == plugged
        assert state["guests"]["low"]["granted"]["memory_bytes"] <= low.memory()
