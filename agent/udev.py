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


@dataclass(frozen=True)
class OnliningRule:
    """A udev rules file that onlines hot-added CPUs or memory by itself."""

    path: Path
    subsystems: frozenset[str]  # of "cpu", "memory"

    @property
    def onlines_memory(self) -> bool:
        return "memory" in self.subsystems

    def __str__(self) -> str:
        names = {"cpu": "CPUs", "memory": "memory"}
        return f"{self.path} ({' and '.join(names[s] for s in sorted(self.subsystems))})"


# One `KEY{attr}<op>"value"` of a rule line.
_RULE_PAIR = re.compile(r'([A-Za-z_]+(?:\{[^}]*\})?)\s*(==|!=|\+=|-=|:=|=)\s*"([^"]*)"')
_ASSIGN = ("=", ":=", "+=")


def find_onlining_rules(dirs: Iterable[Path] = RULE_DIRS) -> list[OnliningRule]:
    """udev rules that online hot-added CPUs or memory (RHEL, SUSE images).

    vmtide works with them rather than against them: their onlining shows up
    as "already online" and is accounted as such. As udev does, a file in an
    earlier directory hides one of the same name in a later one (a link to
    /dev/null masks it).
    """
    found = []
    seen: set[str] = set()
    for directory in dirs:
        try:
            rules = sorted(directory.glob("*.rules"))
        except OSError:
            continue
        for rule in rules:
            if rule.name in seen:
                continue
            seen.add(rule.name)
            try:
                text = rule.read_text(errors="replace")
            except OSError:
                continue
            if subsystems := onlining_subsystems(text):
                found.append(OnliningRule(rule, subsystems))
    return found


def onlining_subsystems(text: str) -> frozenset[str]:
    """The subsystems ("cpu", "memory") whose devices these rules online.

    Two shapes occur: a line that matches the subsystem and assigns the state
    (SUSE, RHEL 7), and a section the other subsystems jump over (RHEL 8's
    `SUBSYSTEM!="memory", GOTO="memory_hotplug_end"`, then
    `ATTR{state}="$env{.state}"`, up to its LABEL). Tests such as
    `ATTR{state}=="online"` assign nothing and do not count.
    """
    found: set[str] = set()
    sections: list[tuple[str, str]] = []  # (GOTO label, the subsystem it is limited to)
    for line in text.replace("\\\n", " ").splitlines():
        if line.lstrip().startswith("#"):
            continue
        pairs = _RULE_PAIR.findall(line)
        values = {(key, op): value for key, op, value in pairs}
        if (label := values.get(("LABEL", "="))) is not None:
            sections = [s for s in sections if s[0] != label]
        skip_unless = values.get(("SUBSYSTEM", "!="))
        if skip_unless is not None and ("GOTO", "=") in values:
            sections.append((values[("GOTO", "=")], skip_unless))
            continue
        subsystem = values.get(("SUBSYSTEM", "=="), sections[-1][1] if sections else "")
        for key, op, value in pairs:
            if op in _ASSIGN and subsystem in _SUBSYSTEMS and _onlines(subsystem, key, value):
                found.add(subsystem)
    return frozenset(found)


def _onlines(subsystem: str, key: str, value: str) -> bool:
    """Whether assigning `value` to `key` onlines a CPU or memory block."""
    if key == "RUN":
        return "online" in value  # "/bin/sh -c 'echo online > /sys$devpath/state'"
    if subsystem == "memory":
        return key == "ATTR{state}" and value != "offline"  # or "$env{.state}"
    return key == "ATTR{online}" and value == "1"
