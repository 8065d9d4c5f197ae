"""Building blocks for fault injection (tests/test_faults.py) and the soak (tests/soak.py).

- `AgentProcess`, `BrokerProcess`: the real daemons as processes on simulated
  guests, so they can be SIGKILLed and restarted (an agent optionally armed
  with a crash point, agent/crashpoint.py);
- `Relay`: a unix-socket relay between an agent and its listener whose
  `cut()` closes the channel, as a network partition would, until `heal()`;
- `GatedWriter`: a simulated kernel whose matching writes wait at a gate, so
  a test can act while an online or offline sequence is half done;
- `ScriptedUevents`: uevents the test feeds (a storm) or never sends (lost);
- `guest_truth`, `always_problems`, `settled_problems`: what a guest's kernel
  shows, and the invariants every test and the soak check against the
  broker's books.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from agent.actuator import Actuator
from agent.config import AgentConfig
from agent.daemon import Agent
from agent.kernel import Kernel
from agent.metrics import AgentMetrics
from agent.sensing import Sensor
from agent.udev import Uevent
from broker.config import BrokerConfig, CpuLimits, GuestConfig, MemoryLimits
from vmtide.demo import simulated_agent_config
from vmtide.fakesys import FakeGuest, FakeKernelWriter, Load

MiB = 1 << 20
GiB = 1 << 30
REPO = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------ processes


class AgentProcess:
    """A simulated guest with the real agent (`vmtide-agent run`) in its own process."""

    def __init__(
        self,
        tmp: Path,
        name: str,
        *,
        target: str | None = None,
        possible_cpus: int = 4,
        boot_blocks: int = 8,
        max_cpus: int = 4,
        max_memory: str = "2GiB",
        shrink_window_seconds: float = 3.0,
    ) -> None:
        self.name = name
        self.fake = FakeGuest(
            tmp / name, possible_cpus=possible_cpus, boot_cpus=1, boot_blocks=boot_blocks
        )
        self.sock = tmp / f"{name}.sock"
        self.target = target or f"unix:{self.sock}"
        self.toml = tmp / f"{name}.toml"
        self.toml.write_text(
            simulated_agent_config(
                self.fake.root,
                self.target,
                name,
                shrink_window_seconds=shrink_window_seconds,
                interval=0.2,
                max_cpus=max_cpus,
                max_memory=max_memory,
            )
        )
        self.log = tmp / f"{name}.log"
        self.load = Load(cpus=0.3, memory_bytes=300 * MiB)
        self.process: subprocess.Popen[bytes] | None = None
        self.crash_at: str | None = None

    def start(self, crash_at: str | None = None) -> None:
        """Start the agent; with `crash_at` it SIGKILLs itself at that crash point."""
        env = {k: v for k, v in os.environ.items() if k != "VMTIDE_CRASH_AT"}
        if crash_at:
            env["VMTIDE_CRASH_AT"] = crash_at
        self.crash_at = crash_at
        with self.log.open("a") as log:
            log.write(f"--- agent started (crash point {crash_at or 'none'})\n")
            log.flush()
            self.process = subprocess.Popen(
                [sys.executable, "-m", "agent.cli", "run", "--config", str(self.toml)],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                env=env,
            )

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def returncode(self) -> int | None:
        """The exit status once the process is gone (-9 after SIGKILL), else None."""
        return None if self.process is None else self.process.poll()

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)
        self.process = None

    def stop(self) -> None:
        _stop(self.process)
        self.process = None

    def guest_config(
        self,
        *,
        priority: int = 0,
        cpus: CpuLimits | None = None,
        memory: MemoryLimits | None = None,
        reclaim_deadline_seconds: float = 3.0,
    ) -> GuestConfig:
        """This guest as the broker's config lists it (simulated backend)."""
        return GuestConfig(
            id=self.name,
            listen=f"unix:{self.sock}",
            priority=priority,
            backend="simulated",
            simulated_root=self.fake.root,
            cpus=cpus or CpuLimits(minimum=1, maximum=4),
            memory=memory or MemoryLimits(minimum_bytes=1 * GiB, maximum_bytes=2 * GiB),
            reclaim_deadline_seconds=reclaim_deadline_seconds,
        )

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


def _stop(process: subprocess.Popen[bytes] | None) -> None:
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)


def broker_toml(config: BrokerConfig) -> str:
    """The broker's config file for `config` (the inverse of broker.config.load)."""

    def value(v: object) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v)
        return json.dumps(str(v))

    def table(obj: object) -> list[str]:
        lines = []
        for f in dataclasses.fields(obj):  # type: ignore[arg-type]
            v = getattr(obj, f.name)
            if v is not None and not dataclasses.is_dataclass(v):
                lines.append(f"{f.name} = {value(v)}")
        return lines

    lines = ["[broker]", *table(config.broker), "", "[pool]", *table(config.pool)]
    for guest in config.guests:
        lines += ["", "[[guests]]", *table(guest)]
        lines += ["[guests.cpus]", *table(guest.cpus), "[guests.memory]", *table(guest.memory)]
    return "\n".join(lines) + "\n"


class BrokerProcess:
    """The real broker (`vmtide-broker run`) in its own process, so it can be SIGKILLed."""

    def __init__(self, tmp: Path, config: BrokerConfig) -> None:
        self.config = config
        self.toml = tmp / "broker.toml"
        self.toml.write_text(broker_toml(config))
        self.log = tmp / "broker.log"
        self.state_file = config.broker.state_file
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        # A state file left by a killed broker would look current: the new one
        # writes its own once it serves.
        with contextlib.suppress(FileNotFoundError):
            self.state_file.unlink()
        self.starts += 1
        with self.log.open("a") as log:
            log.write(f"--- broker start {self.starts}\n")
            log.flush()
            self.process = subprocess.Popen(
                [sys.executable, "-m", "broker.cli", "run", "--config", str(self.toml)],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO,
            )

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)
        self.process = None

    def stop(self) -> None:
        _stop(self.process)
        self.process = None

    def state(self) -> dict[str, Any] | None:
        """The broker's state file, or None while there is none (not started yet)."""
        try:
            state: dict[str, Any] = json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return None
        return state

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


# ------------------------------------------------------------------- channel


class Relay:
    """Relays one agent's connections to its broker listener (unix sockets).

    `cut()` closes every relayed connection and refuses new ones, as a
    network partition ending in a reset would; `heal()` lets them through again.
    """

    def __init__(self, listen: Path, upstream: Path) -> None:
        self.listen = listen
        self.upstream = upstream
        self.open = True
        self.cuts = 0
        self._server: asyncio.AbstractServer | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(self._serve, path=str(self.listen))

    async def close(self) -> None:
        self.open = False
        self._drop()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def cut(self) -> None:
        self.open = False
        self.cuts += 1
        self._drop()

    def _drop(self) -> None:
        for writer in list(self._writers):
            writer.close()
        self._writers.clear()

    def heal(self) -> None:
        self.open = True

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.open:
            writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_unix_connection(str(self.upstream))
        except OSError:
            writer.close()
            return
        self._writers |= {writer, up_writer}
        await asyncio.gather(
            self._pipe(reader, up_writer), self._pipe(up_reader, writer), return_exceptions=True
        )
        self._writers -= {writer, up_writer}

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()


# --------------------------------------------------------------------- kernel


class GatedWriter(FakeKernelWriter):
    """A simulated kernel whose matching writes wait at a gate until `release()`.

    `hold(value)` arms it: the next writes of that value ("1" onlines a CPU,
    "offline" a block, ...) block in the agent's worker thread, and `held` is
    set when the first one arrives.
    """

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.held = threading.Event()
        self._gate = threading.Event()
        self._gate.set()
        self._values: frozenset[str] = frozenset()

    def hold(self, *values: str) -> None:
        self._values = frozenset(values)
        self.held.clear()
        self._gate.clear()

    def release(self) -> None:
        self._values = frozenset()
        self._gate.set()

    def write(self, path: Path, value: str, timeout: float | None = None) -> None:
        if value.strip() in self._values and not self._gate.is_set():
            self.held.set()
            self._gate.wait(120)
        super().write(path, value, timeout)


def make_agent_on(
    config: AgentConfig,
    writer: FakeKernelWriter,
    uevents: ScriptedUevents | None = None,
    kernel_type: type[Kernel] = Kernel,
) -> Agent:
    """The real agent (in this process) on a simulated guest, through `writer`."""
    kernel = kernel_type(config.agent.sysfs_root, config.agent.procfs_root, writer=writer)
    holder: list[Agent] = []
    metrics = AgentMetrics(CollectorRegistry(), topology=lambda: holder[0].topo if holder else None)
    agent = Agent(
        config,
        Actuator(kernel, offline_timeout=2.0),
        Sensor(config.agent.procfs_root),
        metrics,
        guest_id=config.agent.guest_id,
        uevents=uevents,
    )
    holder.append(agent)
    return agent


class ScriptedUevents:
    """A UeventSource fed by the test: `put()` one, `storm()` many, or none at all."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[Uevent] = asyncio.Queue()
        self.delivered = 0

    def put(self, event: Uevent) -> None:
        self._queue.put_nowait(event)

    def storm(self, events: Iterable[Uevent]) -> int:
        count = 0
        for event in events:
            self._queue.put_nowait(event)
            count += 1
        return count

    @property
    def backlog(self) -> int:
        return self._queue.qsize()

    async def events(self, stop: asyncio.Event) -> AsyncIterator[Uevent]:
        stopped = asyncio.create_task(stop.wait())
        try:
            while not stop.is_set():
                get = asyncio.create_task(self._queue.get())
                await asyncio.wait({get, stopped}, return_when=asyncio.FIRST_COMPLETED)
                if not get.done():
                    get.cancel()
                    return
                self.delivered += 1
                yield get.result()
        finally:
            stopped.cancel()


def uevent(action: str, kind: str, index: int) -> Uevent:
    return Uevent(action, kind, f"{kind}{index}", index)


# ----------------------------------------------------------------- invariants


@dataclass(frozen=True)
class Truth:
    """What one simulated guest's kernel shows."""

    online_cpus: int
    present_cpus: int
    online_memory: int
    listed_memory: int  # every listed block, online or not
    standby_cpus: tuple[int, ...]  # plugged, offline
    offline_blocks: tuple[int, ...]  # listed, offline

    def __str__(self) -> str:
        return (
            f"{self.online_cpus}/{self.present_cpus} cpus online/plugged, "
            f"{self.online_memory // MiB}/{self.listed_memory // MiB} MiB online/plugged"
            + (f", standby cpus {list(self.standby_cpus)}" if self.standby_cpus else "")
            + (f", offline blocks {list(self.offline_blocks)}" if self.offline_blocks else "")
        )


def guest_truth(guest: FakeGuest) -> Truth:
    """A consistent reading of the tree; retried while a plug or unplug moves it."""
    seen = ""
    for attempt in range(100):
        if attempt:
            time.sleep(0.01)  # another process is plugging or removing right now
        try:
            online = guest.online_cpus()
            present = guest.present_cpus()
            states = {i: guest.block_state(i) for i in guest.block_indexes()}
            again = (guest.online_cpus(), guest.present_cpus())
            if (online, present) != again:
                seen = f"online/present cpus {sorted(online)}/{sorted(present)}, then "
                seen += f"{sorted(again[0])}/{sorted(again[1])}"
                continue
        except (FileNotFoundError, ValueError) as err:
            seen = repr(err)
            continue  # a CPU or block went between listing and reading
        offline = tuple(sorted(i for i, s in states.items() if s != "online"))
        return Truth(
            online_cpus=len(online),
            present_cpus=len(present),
            online_memory=(len(states) - len(offline)) * guest.block_size,
            listed_memory=len(states) * guest.block_size,
            standby_cpus=tuple(sorted(present - online)),
            offline_blocks=offline,
        )
    raise AssertionError(f"{guest.root}: the tree never held still long enough to read: {seen}")


def always_problems(
    state: Mapping[str, Any], truths: Mapping[str, Truth], limits: Mapping[str, GuestConfig]
) -> list[str]:
    """Invariants that hold at every instant, whatever is in flight.

    The broker's books never over-allocate the pool nor grant above a
    guest's burst limit; no guest is below its minimum or above that limit.
    (What is plugged across guests is compared with the pool by
    `plugged_problems`: reading several trees is not atomic, so that one is
    only meaningful when it persists.)
    """
    problems = []
    pool = state["pool"]
    for field in ("cpus", "memory_bytes"):
        if pool["allocated"][field] > pool["capacity"][field]:
            problems.append(
                f"pool over-allocated in the broker's books: {field} "
                f"{pool['allocated'][field]} > {pool['capacity'][field]}"
            )
    for name, truth in truths.items():
        config = limits[name]
        low_cpus, low_memory = config.cpus.minimum, config.memory.minimum_bytes
        high_cpus = config.cpus.burst or config.cpus.maximum
        high_memory = config.memory.burst_bytes or config.memory.maximum_bytes
        if truth.online_cpus < low_cpus or truth.online_memory < low_memory:
            problems.append(f"{name} below its minimum: {truth}")
        if truth.online_cpus > high_cpus or truth.online_memory > high_memory:
            problems.append(f"{name} above its limits: {truth}")
        granted = state["guests"][name]["granted"]
        if granted["cpus"] > high_cpus or granted["memory_bytes"] > high_memory:
            problems.append(f"{name} granted above its limits: {granted}")
    return problems


def plugged_problems(truths: Mapping[str, Truth], capacity_cpus: int, capacity: int) -> list[str]:
    """What the guests have plugged, together, fits in the pool."""
    cpus = sum(t.present_cpus for t in truths.values())
    memory = sum(t.listed_memory for t in truths.values())
    problems = []
    if cpus > capacity_cpus:
        problems.append(f"guests hold {cpus} plugged cpus, the pool has {capacity_cpus}")
    if memory > capacity:
        problems.append(f"guests hold {memory // MiB} MiB plugged, the pool has {capacity // MiB}")
    return problems


def settled_problems(state: Mapping[str, Any], truths: Mapping[str, Truth]) -> list[str]:
    """Once nothing is in flight: the broker's books equal each guest's kernel,
    what is granted is what is online, nothing is plugged but offline, and
    the pool's allocation is exactly what is plugged."""
    problems = []
    for name, truth in truths.items():
        books = state["guests"][name]
        seen = (books["online"]["cpus"], books["online"]["memory_bytes"])
        granted = (books["granted"]["cpus"], books["granted"]["memory_bytes"])
        real = (truth.online_cpus, truth.online_memory)
        if not books["connected"]:
            problems.append(f"{name} is not connected")
        if books["pending_reclaims"]:
            problems.append(f"{name} has reclaims pending: {books['pending_reclaims']}")
        if seen != real:
            problems.append(f"{name}: the broker sees {seen} online, the guest has {real}")
        if granted != real:
            problems.append(f"{name}: granted {granted}, the guest has {real} online")
        if truth.standby_cpus or truth.offline_blocks:
            problems.append(f"{name}: plugged but offline: {truth}")
    allocated = state["pool"]["allocated"]
    plugged = {
        "cpus": sum(t.present_cpus for t in truths.values()),
        "memory_bytes": sum(t.listed_memory for t in truths.values()),
    }
    if plugged != allocated:
        problems.append(f"the broker counts {allocated} in use, the guests have {plugged} plugged")
    return problems


async def wait_settled(
    state: Callable[[], Mapping[str, Any] | None],
    guests: Mapping[str, FakeGuest],
    timeout: float,
    *,
    stable_reads: int = 3,
) -> None:
    """Wait until `settled_problems` finds nothing in several reads in a row."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    clean = 0
    problems: list[str] = ["no broker state yet"]
    while clean < stable_reads:
        if loop.time() > deadline:
            raise AssertionError(f"not settled after {timeout} s: " + "; ".join(problems))
        await asyncio.sleep(0.3)
        current = state()
        if current is None:
            problems, clean = ["no broker state yet"], 0
            continue
        problems = settled_problems(current, {n: guest_truth(g) for n, g in guests.items()})
        clean = clean + 1 if not problems else 0


class Watch:
    """Checks the invariants that always hold, every `period` seconds, while a test runs.

    What is plugged across several guests is read one tree after another, so
    a plug racing the reads could look like over-allocation for one reading:
    that check counts only when it fails twice in a row.
    """

    def __init__(
        self,
        state: Callable[[], Mapping[str, Any] | None],
        guests: Mapping[str, FakeGuest],
        limits: Mapping[str, GuestConfig],
        pool: tuple[int, int],
        period: float = 0.2,
    ) -> None:
        self.state = state
        self.guests = guests
        self.limits = limits
        self.pool = pool
        self.period = period
        self.checks = 0
        self.problems: list[str] = []
        self._suspect: list[str] = []

    def check(self) -> list[str]:
        """One round; returns (and records) what failed."""
        truths = {name: guest_truth(g) for name, g in self.guests.items()}
        found = []
        state = self.state()
        if state is not None:
            found += always_problems(state, truths, self.limits)
        plugged = plugged_problems(truths, *self.pool)
        if plugged and self._suspect:
            found += plugged
        self._suspect = plugged
        self.checks += 1
        self.problems += found
        return found

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.check()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.period)
