"""The demo: a real Linux guest under QEMU whose CPUs and memory follow its load.

    make demo                      # or: PYTHONPATH=tests .venv/bin/python -m vm.demo

Boots Debian 12's kernel under QEMU (TCG) with one vCPU of four and 1 GiB of
RAM plus a virtio-mem device, starts `vmtide-agent` inside the guest, and runs
the real broker here, driving QEMU over QMP. The load inside the guest goes
idle -> three busy loops -> idle -> 800 MiB held -> idle, and a table shows the
guest's kernel and the broker's books following it, live.

Exit status 0 when the guest grew for each load and shrank back after it;
1 when it did not (the agent's and broker's logs and the guest console are
printed); 2 when the guest cannot be booted here.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from broker.config import PoolConfig
from vm.build_image import ImageError, ensure_image
from vm.harness import VMOptions, VMs, qemu_binary
from vm.rig import (
    AGENT_CONNECT_TIMEOUT_SECONDS,
    GROW_TIMEOUT_SECONDS,
    SHRINK_TIMEOUT_SECONDS,
    GiB,
    MiB,
    Rig,
    Setup,
    rig,
)

# The host's pool: room for the guest's maximum, so only load decides.
POOL = PoolConfig(cpus=4, memory_bytes=8 * GiB)
# Eight vCPU slots for a guest limited to four: under TCG QEMU realizes at most
# maxcpus vCPUs over its life, and the guest grows, shrinks and grows again.
GUEST = VMOptions(cpus=1, maxcpus=8, memory="1G", virtio_mem="2G")
BUSY_LOOPS = 3
HELD_MIB = 800
# How long each load is held after the guest has grown for it, so the table
# shows the steady state; the quick run (CI) holds none.
HOLD_SECONDS = 8.0
REFRESH_SECONDS = 0.5


@dataclass(frozen=True)
class Phase:
    name: str
    cpus: int  # busy loops in the guest
    memory_mib: int  # memory held in the guest
    what: str  # what the phase waits for, in words
    timeout: float


@dataclass(frozen=True)
class Row:
    """What one refresh sees: the guest's kernel, and what the broker granted it."""

    cpus: str
    mem_total: int
    broker_cpus: int
    broker_memory: int
    pending: int

    def cells(self) -> tuple[str, ...]:
        return (
            self.cpus or "-",
            format_bytes(self.mem_total),
            str(self.broker_cpus),
            format_bytes(self.broker_memory),
            str(self.pending),
        )


def format_bytes(n: int) -> str:
    return f"{n / GiB:.2f} GiB" if n else "-"


HEADER = ("time", "phase", "load", "guest CPUs", "MemTotal", "granted", "granted mem", "reclaims")
WIDTHS = (6, 15, 14, 11, 10, 8, 11, 8)


def _line(cells: tuple[str, ...]) -> str:
    return "  ".join(c.ljust(w) for c, w in zip(cells, WIDTHS, strict=True)).rstrip()


class Table:
    """Rows printed when the state changes; on a terminal, a status line
    below them is rewritten in place with what the demo is waiting for."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.live = out.isatty()
        self.start = time.monotonic()
        self.last: tuple[str, Row] | None = None

    def header(self) -> None:
        self.print(_line(HEADER))

    def print(self, text: str) -> None:
        if self.live:
            self.out.write("\r\x1b[K")
        self.out.write(text + "\n")
        self.out.flush()

    def update(self, phase: Phase, row: Row, waiting: str) -> None:
        elapsed = time.monotonic() - self.start
        load = f"{phase.cpus} loops" if phase.cpus else f"{phase.memory_mib} MiB"
        if not phase.cpus and not phase.memory_mib:
            load = "none"
        if self.last != (phase.name, row):
            self.last = (phase.name, row)
            self.print(_line((f"{elapsed:5.0f}s", phase.name, load, *row.cells())))
        if self.live:
            self.out.write(f"\r\x1b[K  ... {waiting} ({elapsed:.0f} s)")
            self.out.flush()


def observe(setup: Setup) -> Row:
    state = setup.state()
    granted = state.get("granted", {})
    status = setup.vm.share / "status"
    cpus = status.read_text().split()[0] if status.exists() else ""
    return Row(
        cpus=cpus,
        mem_total=setup.mem_total(),
        broker_cpus=int(granted.get("cpus", 0)),
        broker_memory=int(granted.get("memory_bytes", 0)),
        pending=len(state.get("pending_reclaims", [])),
    )


async def follow(
    setup: Setup, table: Table, phase: Phase, done: Callable[[], bool], hold: float
) -> None:
    """Set the phase's load, refresh the table until `done`, then hold."""
    setup.load(cpus=phase.cpus, memory_mib=phase.memory_mib)
    held_until: float | None = None

    def finished() -> bool:
        nonlocal held_until
        table.update(phase, observe(setup), phase.what if held_until is None else "holding")
        if held_until is None and done():
            held_until = time.monotonic() + hold
        return held_until is not None and time.monotonic() >= held_until

    await setup.until(finished, phase.timeout + hold, phase.what)


async def run(out: TextIO, workdir: Path, hold: float) -> int:
    table = Table(out)
    table.print("vmtide demo: a real Linux guest under QEMU (TCG), vmtide-agent inside,")
    table.print("the broker here driving QEMU over QMP. About three minutes.")
    with VMs(ensure_image(), workdir) as vms:
        table.print(f"booting the guest ({GUEST.cpus} vCPU of {GUEST.maxcpus}, {GUEST.memory}) ...")
        async with rig(vms, workdir, POOL, [("demo", GUEST, 0)], connected=False) as made:
            setup = made.guests["demo"]
            table.header()
            await connected(made, table)
            table.print(f"the agent connected after {time.monotonic() - table.start:.0f} s")
            boot = observe(setup)
            boot_cpus, boot_total = setup.guest_cpus(), boot.mem_total

            def cpus_up() -> bool:
                return len(setup.guest_cpus()) > len(boot_cpus)

            def cpus_back() -> bool:
                return setup.guest_cpus() == boot_cpus and observe(setup).broker_cpus == 1

            def memory_up() -> bool:
                return setup.mem_total() >= boot_total + 256 * MiB

            def memory_back() -> bool:
                back = setup.mem_total() <= boot_total + 128 * MiB
                return back and not observe(setup).pending

            grow, shrink = GROW_TIMEOUT_SECONDS, SHRINK_TIMEOUT_SECONDS
            phases = [
                (Phase("cpu load", BUSY_LOOPS, 0, "CPUs to come online", grow), cpus_up, hold),
                (Phase("idle", 0, 0, "CPUs to be given back", shrink), cpus_back, 0.0),
                (Phase("memory load", 0, HELD_MIB, "memory to come online", grow), memory_up, hold),
                (Phase("idle", 0, 0, "memory to be given back", shrink), memory_back, 0.0),
            ]
            for phase, done, hold_for in phases:
                await follow(setup, table, phase, done, hold_for)
            table.print(
                f"\nthe guest grew for each load and gave everything back "
                f"in {time.monotonic() - table.start:.0f} s"
            )
    return 0


async def connected(made: Rig, table: Table) -> None:
    setup = made.guests["demo"]
    booting = Phase("boot", 0, 0, "the agent to connect", AGENT_CONNECT_TIMEOUT_SECONDS)

    def agent_connected() -> bool:
        table.update(booting, observe(setup), booting.what)
        return bool(setup.state().get("connected", False))

    await setup.vm.wait_started()
    await setup.until(agent_connected, booting.timeout, booting.what)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vmtide-demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="hold no load once it is met (CI)")
    parser.add_argument("--workdir", type=Path, help="keep the VM files here")
    args = parser.parse_args(argv)
    if qemu_binary() is None:
        missing = "no qemu-system-x86_64 (apt-get install qemu-system-x86)"
        print(f"vmtide demo: {missing}", file=sys.stderr)
        return 2
    hold = 0.0 if args.quick else HOLD_SECONDS
    try:
        if args.workdir:
            args.workdir.mkdir(parents=True, exist_ok=True)
            return asyncio.run(run(sys.stdout, args.workdir, hold))
        with tempfile.TemporaryDirectory(prefix="vmtide-demo-") as tmp:
            return asyncio.run(run(sys.stdout, Path(tmp), hold))
    except ImageError as err:
        print(f"\nvmtide demo: cannot build the guest image: {err}", file=sys.stderr)
        return 2
    except AssertionError as err:
        print(f"\nvmtide demo: FAILED: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nvmtide demo: interrupted; QEMU was stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
