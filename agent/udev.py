"""Kernel uevents for CPUs and memory blocks, without blocking the event loop.

The netlink socket is registered with the asyncio loop; each readable event
drains the monitor without waiting. Uevents can be lost (a full socket buffer
on a huge hot-add, as Kata saw), so the daemon never relies on them alone: they
only trigger a rescan sooner.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger("vmtide.agent.udev")

# Room for the ~30,000 events of a 4 TiB hot-add in 128 MiB blocks; the
# default 212 KiB overflows on a few thousand.
RECEIVE_BUFFER_BYTES = 8 << 20
_SUBSYSTEMS = ("cpu", "memory")
_INDEX = re.compile(r"(?:cpu|memory)(\d+)")
RULE_DIRS = (
    Path("/etc/udev/rules.d"),
    Path("/run/udev/rules.d"),
    Path("/usr/lib/udev/rules.d"),
    Path("/lib/udev/rules.d"),
)


@dataclass(frozen=True)
class Uevent:
    action: str  # add, remove, online, offline, change
    subsystem: str  # cpu or memory
    name: str  # cpu3, memory42
    index: int | None

    def __str__(self) -> str:
        return f"{self.action} {self.name}"


def parse(action: str | None, subsystem: str | None, name: str | None) -> Uevent | None:
    """A Uevent for a CPU or memory block, or None for anything else."""
    if not action or subsystem not in _SUBSYSTEMS or not name:
        return None
    match = _INDEX.fullmatch(name)
    if match is None:
        return None  # e.g. the "cpufreq" or "memory" directories themselves
    return Uevent(action, subsystem, name, int(match.group(1)))


class UeventSource(Protocol):
    def events(self, stop: asyncio.Event) -> AsyncIterator[Uevent]: ...


class UdevMonitor:
    """Uevents from the kernel through pyudev's netlink monitor."""

    def __init__(self, receive_buffer_bytes: int = RECEIVE_BUFFER_BYTES) -> None:
        self.receive_buffer_bytes = receive_buffer_bytes

    async def events(self, stop: asyncio.Event) -> AsyncIterator[Uevent]:
        import pyudev  # only on a real guest; simulated ones need no netlink

        monitor: Any = pyudev.Monitor.from_netlink(pyudev.Context(), source="kernel")
        for subsystem in _SUBSYSTEMS:
            monitor.filter_by(subsystem)
        with contextlib.suppress(OSError):  # needs CAP_NET_ADMIN beyond rmem_max
            monitor.set_receive_buffer_size(self.receive_buffer_bytes)
        monitor.start()
        queue: asyncio.Queue[Uevent | None] = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def readable() -> None:
            while (device := monitor.poll(timeout=0)) is not None:
                event = parse(device.action, device.subsystem, device.sys_name)
                if event is not None:
                    queue.put_nowait(event)

        loop.add_reader(monitor.fileno(), readable)
        stopper = asyncio.create_task(_put_on(stop, queue))
        try:
            while (event := await queue.get()) is not None:
                yield event
        finally:
            stopper.cancel()
            loop.remove_reader(monitor.fileno())


async def _put_on(stop: asyncio.Event, queue: asyncio.Queue[Uevent | None]) -> None:
    await stop.wait()
    queue.put_nowait(None)


def find_onlining_rules(dirs: Iterable[Path] = RULE_DIRS) -> list[Path]:
    """udev rules that online hot-added CPUs or memory (RHEL 8, SUSE images).

    vmtide works with them rather than against them: their onlining shows up
    as "already online" and is accounted as such.
    """
    found = []
    for directory in dirs:
        try:
            rules = sorted(directory.glob("*.rules"))
        except OSError:
            continue
        for rule in rules:
            try:
                text = rule.read_text(errors="replace")
            except OSError:
                continue
            for line in text.splitlines():
                if line.lstrip().startswith("#"):
                    continue
                if (
                    re.search(r'SUBSYSTEM=="(cpu|memory)"', line)
                    and "online" in line
                    and "ATTR" in line
                ):
                    found.append(rule)
                    break
    return found
