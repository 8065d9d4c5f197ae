"""The demo: a simulated guest whose CPUs and memory follow a load pattern.

    python -m vmtide.demo [--quick] [--workdir DIR]

A FakeGuest tree stands in for the guest's /sys and /proc. The real broker runs
here with the simulated backend (hot-plug creates CPUs and memory blocks in the
tree); the real agent runs as its own process against the tree, exactly as
`vmtide-agent run` runs in a VM. The load goes idle -> CPU burst -> memory
growth -> idle, and the table shows resources following it.

Exit status 0 when the guest grew for the load and shrank back afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from vmtide.fakesys import FakeGuest, Load

MiB = 1 << 20
GiB = 1 << 30


@dataclass(frozen=True)
class Phase:
    name: str
    seconds: float
    load: Load
    # End early once the guest is back to its minimum size. PSI averages
    # decay over ~20 s in real time, so this phase is never sped up.
    until_shrunk: bool = False


PHASES = (
    Phase("idle", 6, Load(cpus=0.3, memory_bytes=400 * MiB)),
    Phase("cpu burst", 15, Load(cpus=3.4, memory_bytes=400 * MiB)),
    Phase("memory growth", 15, Load(cpus=0.6, memory_bytes=1900 * MiB)),
    Phase("idle again", 75, Load(cpus=0.3, memory_bytes=400 * MiB), until_shrunk=True),
)

AGENT_CONFIG = """\
[agent]
guest_id = "{guest_id}"
sensing_interval_seconds = {interval}
rescan_interval_seconds = 2.0
sysfs_root = "{root}/sys"
procfs_root = "{root}/proc"
simulated_kernel = true
lock_memory = false

[broker]
target = "{target}"
reconnect_min_seconds = 0.2
reconnect_max_seconds = 2.0

[limits.cpus]
minimum = 1
maximum = {max_cpus}

[limits.memory]
minimum_bytes = "1GiB"
maximum_bytes = "{max_memory}"

# Short windows so the demo shows shrinking within a minute; the defaults
# (docs/policy.md) wait minutes, as a production guest should.
[policy.cpu]
shrink_window_seconds = {window}
shrink_interval_seconds = 2.0
shrink_step_ratio = 1.0

[policy.memory]
shrink_window_seconds = {window}
shrink_interval_seconds = 2.0
shrink_step_ratio = 1.0
headroom_min_bytes = "128MiB"
headroom_percent = 5.0

[metrics]
enabled = false
"""


def simulated_agent_config(
    root: Path,
    target: str,
    guest_id: str = "demo",
    *,
    shrink_window_seconds: float = 10.0,
    interval: float = 0.5,
    max_cpus: int = 4,
    max_memory: str = "3GiB",
) -> str:
    """An agent.toml for the real agent on a simulated guest, with short windows."""
    return AGENT_CONFIG.format(
        root=root,
        target=target,
        guest_id=guest_id,
        window=shrink_window_seconds,
        interval=interval,
        max_cpus=max_cpus,
        max_memory=max_memory,
    )


def bar(value: float, full: float, width: int = 24) -> str:
    filled = round(width * min(value / full, 1.0)) if full else 0
    return "#" * filled + "." * (width - filled)


class Screen:
    """A table refreshed in place on a terminal, one line per update otherwise."""

    def __init__(self) -> None:
        self.tty = sys.stdout.isatty()
        self._lines = 0

    def show(self, lines: list[str]) -> None:
        if not self.tty:
            print(lines[1] + " | " + lines[2] + " | " + lines[3], flush=True)
            return
        if self._lines:
            sys.stdout.write(f"\x1b[{self._lines}F")
        for line in lines:
            sys.stdout.write("\x1b[2K" + line + "\n")
        sys.stdout.flush()
        self._lines = len(lines)


async def run_demo(workdir: Path, speed: float, screen: Screen) -> int:
    from broker.cli import serve
    from broker.config import (
        BrokerConfig,
        BrokerSection,
        CpuLimits,
        GuestConfig,
        MemoryLimits,
        PoolConfig,
    )

    root = workdir / "guest"
    sock = workdir / "demo.sock"
    guest = FakeGuest(root, possible_cpus=4, boot_cpus=1, boot_blocks=8)
    config = BrokerConfig(
        broker=BrokerSection(
            state_file=workdir / "broker.json",
            arbitrate_interval_seconds=0.5,
            metrics_port=0,
        ),
        pool=PoolConfig(cpus=4, memory_bytes=3 * GiB),
        guests=(
            GuestConfig(
                id="demo",
                listen=f"unix:{sock}",
                backend="simulated",
                simulated_root=root,
                cpus=CpuLimits(minimum=1, maximum=4),
                memory=MemoryLimits(minimum_bytes=1 * GiB, maximum_bytes=3 * GiB),
                reclaim_deadline_seconds=10.0,
            ),
        ),
    )
    agent_toml = workdir / "agent.toml"
    agent_toml.write_text(
        simulated_agent_config(root, f"unix:{sock}", shrink_window_seconds=max(4.0, 10.0 / speed))
    )
    log_path = workdir / "agent.log"
    stop = asyncio.Event()
    broker_task = asyncio.create_task(serve(config, stop))
    with log_path.open("w") as log_file:
        agent = subprocess.Popen(
            [sys.executable, "-m", "agent.cli", "run", "--config", str(agent_toml)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    peak_cpus, peak_memory = 0, 0
    try:
        started = time.monotonic()
        last = started
        for phase in PHASES:
            phase_end = time.monotonic() + phase.seconds / (1.0 if phase.until_shrunk else speed)
            while time.monotonic() < phase_end:
                if phase.until_shrunk and _shrunk(guest):
                    break
                if agent.poll() is not None:
                    print(f"the agent exited ({agent.returncode}); see {log_path}", file=sys.stderr)
                    return 1
                await asyncio.sleep(0.25)
                now = time.monotonic()
                guest.tick(now - last, phase.load)
                last = now
                cpus = len(guest.online_cpus())
                memory = guest.online_memory_bytes()
                peak_cpus, peak_memory = max(peak_cpus, cpus), max(peak_memory, memory)
                screen.show(_table(now - started, phase, guest, cpus, memory, log_path))
        grew = peak_cpus >= 3 and peak_memory >= 2 * GiB
        shrank = _shrunk(guest)
        print(
            f"\npeak {peak_cpus} cpus and {peak_memory // MiB} MiB; "
            f"now {len(guest.online_cpus())} cpus and {guest.online_memory_bytes() // MiB} MiB: "
            + ("resources followed the load" if grew and shrank else "resources did NOT follow")
        )
        return 0 if grew and shrank else 1
    finally:
        agent.terminate()
        try:
            agent.wait(10)
        except subprocess.TimeoutExpired:
            agent.kill()
        stop.set()
        await broker_task


def _shrunk(guest: FakeGuest) -> bool:
    return len(guest.online_cpus()) <= 1 and guest.online_memory_bytes() <= 1 * GiB


def _table(
    elapsed: float, phase: Phase, guest: FakeGuest, cpus: int, memory: int, log_path: Path
) -> list[str]:
    load = phase.load
    psi = (guest.procfs / "pressure" / "cpu").read_text().split()[1].removeprefix("avg10=")
    recent = _tail(log_path, 4)
    return [
        f"vmtide demo  t={elapsed:5.1f}s  phase: {phase.name:<14}",
        f"cpus    load {load.cpus:4.1f}  [{bar(load.cpus, 4)}]   "
        f"online {cpus}  [{bar(cpus, 4)}]  cpu psi {psi}%",
        f"memory  load {load.memory_bytes / GiB:4.2f} GiB [{bar(load.memory_bytes, 3 * GiB)}]   "
        f"online {memory / GiB:4.2f} GiB [{bar(memory, 3 * GiB)}]",
        f"standby cpus {sorted(guest.present_cpus() - guest.online_cpus()) or '-'}  "
        f"blocks {len(guest.block_indexes())} listed",
        "agent log:",
        *(f"  {line[:110]}" for line in recent),
        *([""] * (4 - len(recent))),
    ]


def _tail(path: Path, count: int) -> list[str]:
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    wanted = [line for line in lines if " resize " in line or " decision " in line]
    return [line.split(" ", 2)[-1] for line in wanted[-count:]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vmtide.demo", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="run the pattern three times faster")
    parser.add_argument("--workdir", type=Path, help="keep the simulated guest and logs here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    speed = 3.0 if args.quick else 1.0
    if args.workdir:
        shutil.rmtree(args.workdir, ignore_errors=True)
        args.workdir.mkdir(parents=True)
        workdir = args.workdir
        cleanup = None
    else:
        cleanup = tempfile.TemporaryDirectory(prefix="vmtide-demo-")
        workdir = Path(cleanup.name)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    total = sum(p.seconds / (1.0 if p.until_shrunk else speed) for p in PHASES)
    print(f"simulated guest in {workdir}; the pattern takes up to {total:.0f} s (Ctrl-C stops)")
    if args.workdir:
        print(f"agent log: {workdir / 'agent.log'}; broker state: {workdir / 'broker.json'}")
    try:
        return asyncio.run(run_demo(workdir, speed, Screen()))
    except KeyboardInterrupt:
        return 130
    finally:
        if cleanup is not None:
            with contextlib.suppress(OSError):
                cleanup.cleanup()


if __name__ == "__main__":
    sys.exit(main())
