"""Load sensing: what the guest's CPUs and memory are doing right now.

`Sensor.sample()` reads /proc/stat, /proc/meminfo, /proc/vmstat and
/proc/pressure/{cpu,memory,io} and returns one frozen `Reading`. Rates and busy
fractions are deltas against an earlier call at least `MIN_SPAN_SECONDS` back
(or the oldest one kept), so the first reading reports them as zero.
`PressureWatch` arms PSI poll triggers so the agent wakes as soon as the kernel
sees a stall instead of at its next periodic tick.

Everything reads files under a procfs root passed to the constructor, so tests
point it at a temporary tree. The parsers are pure functions over the file's
text and raise `ProcParseError` naming the file and the reason.

This runs while the guest may be thrashing, so a sample allocates only a few
small strings and records; nothing here caches history.

Total CPU times come from psutil, which reads only the first line of
/proc/stat. Per-CPU times do not: psutil.cpu_times(percpu=True) lists CPUs by
position, and once a guest offlines a CPU the position is no longer the CPU
number, so deltas would compare different CPUs. `parse_stat` keys them by
number and also gives procs_running, which psutil does not expose.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import logging
import math
import os
import select
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

logger = logging.getLogger("vmtide.agent.sensing")

PSI_RESOURCES = ("cpu", "memory", "io")

# /proc/stat cpu line fields (Documentation/filesystems/proc.rst, 1.7):
# user nice system idle iowait irq softirq steal guest guest_nice. guest and
# guest_nice are already counted in user and nice, so the total stops at steal.
_STAT_IDLE = 3
_STAT_IOWAIT = 4
_STAT_STEAL = 7
_STAT_FIELDS_IN_TOTAL = 8
# Linux 2.4 printed only user, nice, system and idle.
_STAT_MIN_FIELDS = 4

_MEMINFO_KIB_BYTES = 1024

# /proc/stat counts in ticks of 10 ms (USER_HZ), so a busy share over a few of
# them is mostly quantisation: a sample a PSI trigger takes 5 ms after the last
# one sees one tick, the agent's own, and calls the CPU 100 % busy. Busy
# shares and rates are measured over at least this span instead.
MIN_SPAN_SECONDS = 0.5
# Baselines younger than that span; a PSI trigger fires at most once per
# window per resource, so a handful suffices, and the bound holds regardless.
_BASELINES_KEPT = 8
_EXCERPT_CHARS = 60

# PSI poll triggers (Documentation/accounting/psi.rst, "Monitoring for pressure
# thresholds"): open /proc/pressure/<resource> O_RDWR and write
#     "<some|full> <stall threshold us> <tracking window us>"
# e.g. "some 150000 1000000": wake when tasks stalled >= 150 ms in any 1 s
# window. The kernel then signals POLLPRI on that fd, at most once per window,
# and drops the trigger when the fd is closed; one trigger per open file.
PSI_WINDOW_MIN_US = 500_000
PSI_WINDOW_MAX_US = 10_000_000
# Since Linux 6.5 ("sched/psi: Allow unprivileged polling of N*2s period") a
# writer without CAP_SYS_RESOURCE may only use windows that are multiples of
# 2 s and gets EINVAL otherwise; older kernels refuse such writers outright.
# Root is not enough: containers and systemd units often drop the capability.
PSI_UNPRIVILEGED_WINDOW_STEP_US = 2_000_000
DEFAULT_PSI_STALL_US = 150_000
DEFAULT_PSI_WINDOW_US = 1_000_000


class ProcParseError(ValueError):
    """A /proc file could not be read or made no sense."""

    def __init__(self, path: Path | str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = Path(path)
        self.reason = reason


def _excerpt(line: str) -> str:
    return repr(line if len(line) <= _EXCERPT_CHARS else line[:_EXCERPT_CHARS] + "...")


def _int(path: Path | str, lineno: int, line: str, field: str) -> int:
    try:
        return int(field)
    except ValueError:
        raise ProcParseError(
            path, f"line {lineno}: {field!r} is not an integer in {_excerpt(line)}"
        ) from None


# --- /proc/pressure/* --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PsiLine:
    """One line of a pressure file: share of wall time stalled, in percent."""

    avg10: float
    avg60: float
    avg300: float
    total_us: int  # cumulative stall time since boot


@dataclass(frozen=True, slots=True)
class Psi:
    some: PsiLine  # at least one task stalled
    # All non-idle tasks stalled at once. The cpu file gained a `full` line in
    # Linux 5.13 and it is all zeros at system level, so it may be None.
    full: PsiLine | None


_PSI_KEYS = ("avg10", "avg60", "avg300", "total")


def _psi_line(path: Path | str, lineno: int, line: str, pairs: Sequence[str]) -> PsiLine:
    values: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ProcParseError(path, f"line {lineno}: {pair!r} is not key=value")
        values[key] = value
    missing = [key for key in _PSI_KEYS if key not in values]
    if missing:
        raise ProcParseError(path, f"line {lineno}: missing {', '.join(missing)}")
    avgs: list[float] = []
    for key in _PSI_KEYS[:3]:
        try:
            avg = float(values[key])
        except ValueError:
            avg = math.nan
        if not 0.0 <= avg <= 100.0:
            raise ProcParseError(path, f"line {lineno}: {key}={values[key]!r} is not a percentage")
        avgs.append(avg)
    return PsiLine(avgs[0], avgs[1], avgs[2], _int(path, lineno, line, values["total"]))


def parse_psi(text: str, path: Path | str = "/proc/pressure") -> Psi:
    """Parse a pressure file: a `some` line and, usually, a `full` line."""
    lines: dict[str, PsiLine] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        kind = fields[0]
        if kind not in ("some", "full"):
            raise ProcParseError(path, f"line {lineno}: unknown kind in {_excerpt(line)}")
        if kind in lines:
            raise ProcParseError(path, f"line {lineno}: second {kind!r} line")
        lines[kind] = _psi_line(path, lineno, line, fields[1:])
    some = lines.get("some")
    if some is None:
        raise ProcParseError(path, "no 'some' line")
    return Psi(some=some, full=lines.get("full"))


# --- /proc/stat --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CpuJiffies:
    total: int  # user..steal
    idle: int  # idle + iowait + steal: time the guest did not run anything


@dataclass(frozen=True, slots=True)
class Stat:
    aggregate: CpuJiffies  # the `cpu` line: summed over every possible CPU
    per_cpu: Mapping[int, CpuJiffies]  # cpuN lines: online CPUs only, by N
    procs_running: int  # runnable tasks, including the reader itself


@dataclass(frozen=True, slots=True)
class CpuTimes:
    """Total CPU time in seconds (psutil's unit); like CpuJiffies, only deltas count."""

    total: float  # user..steal
    idle: float  # idle + iowait + steal


def read_cpu_times(procfs: Path) -> CpuTimes:
    """Total CPU times over every CPU, through psutil, from `procfs`/stat."""
    path = procfs / "stat"
    # psutil takes its procfs root from a module global: set it for this call
    # only, so the rest of the process (and other Sensors) keep their own. The
    # agent samples from its event loop thread alone. Its read buffer (32 KiB)
    # is freed at once, and malloc usually hands the same pages back next time.
    saved = psutil.PROCFS_PATH
    psutil.PROCFS_PATH = str(procfs)
    try:
        times = psutil.cpu_times()
    except OSError as err:
        raise ProcParseError(path, f"unreadable: {err.strerror or err}") from err
    except (TypeError, ValueError) as err:  # too few fields, or not numbers
        raise ProcParseError(path, f"line 1: bad aggregate cpu line ({err})") from None
    finally:
        psutil.PROCFS_PATH = saved
    if not all(math.isfinite(value) for value in times):
        raise ProcParseError(path, "line 1: CPU times are not finite numbers")
    # guest and guest_nice are already counted in user and nice.
    busy = times.user + times.nice + times.system + times.irq + times.softirq
    # Steal is the host running someone else on this vCPU (see _cpu_jiffies).
    idle = times.idle + times.iowait + times.steal
    return CpuTimes(total=busy + idle, idle=idle)


def _cpu_jiffies(path: Path | str, lineno: int, line: str, fields: list[str]) -> CpuJiffies:
    if len(fields) < _STAT_MIN_FIELDS:
        raise ProcParseError(
            path, f"line {lineno}: {len(fields)} time fields, need {_STAT_MIN_FIELDS}"
        )
    counted = [_int(path, lineno, line, f) for f in fields[:_STAT_FIELDS_IN_TOTAL]]
    idle = counted[_STAT_IDLE]
    if len(counted) > _STAT_IOWAIT:
        idle += counted[_STAT_IOWAIT]
    # Steal is the host running someone else on this vCPU: the guest was not
    # busy then, and more vCPUs on a contended host would not win it back.
    if len(counted) > _STAT_STEAL:
        idle += counted[_STAT_STEAL]
    return CpuJiffies(total=sum(counted), idle=idle)


def parse_stat(text: str, path: Path | str = "/proc/stat") -> Stat:
    """Parse the CPU time lines and procs_running; skip the rest (intr is huge)."""
    aggregate: CpuJiffies | None = None
    per_cpu: dict[int, CpuJiffies] = {}
    procs_running: int | None = None
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.startswith("cpu"):
            name, *fields = line.split()
            if name == "cpu":
                aggregate = _cpu_jiffies(path, lineno, line, fields)
                continue
            digits = name[3:]
            if not (digits.isascii() and digits.isdigit()):
                raise ProcParseError(path, f"line {lineno}: bad CPU name {name!r}")
            per_cpu[int(digits)] = _cpu_jiffies(path, lineno, line, fields)
        elif line.startswith("procs_running"):
            fields = line.split()
            if len(fields) != 2:
                raise ProcParseError(path, f"line {lineno}: malformed {_excerpt(line)}")
            procs_running = _int(path, lineno, line, fields[1])
    if aggregate is None:
        raise ProcParseError(path, "no aggregate 'cpu' line")
    if not per_cpu:
        raise ProcParseError(path, "no 'cpuN' lines")
    if procs_running is None:
        raise ProcParseError(path, "no 'procs_running' line")
    return Stat(aggregate=aggregate, per_cpu=per_cpu, procs_running=procs_running)


# --- /proc/meminfo and /proc/vmstat --------------------------------------------


def parse_meminfo(
    text: str, path: Path | str = "/proc/meminfo", keys: Collection[str] | None = None
) -> dict[str, int]:
    """Map each field to bytes (for `kB` lines) or to a plain count (HugePages_*);
    with `keys`, keep (and check) only those: the sensing loop needs seven of 50."""
    fields: dict[str, int] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        name, sep, rest = line.partition(":")
        if keys is not None and name not in keys:
            continue
        if not sep or not name:
            raise ProcParseError(path, f"line {lineno}: no 'Name:' in {_excerpt(line)}")
        value = rest.split()
        if len(value) == 1:
            fields[name] = _int(path, lineno, line, value[0])
        elif len(value) == 2 and value[1] == "kB":
            fields[name] = _int(path, lineno, line, value[0]) * _MEMINFO_KIB_BYTES
        else:
            raise ProcParseError(path, f"line {lineno}: bad value in {_excerpt(line)}")
    if keys is None and not fields:
        raise ProcParseError(path, "empty")
    return fields


def parse_vmstat(
    text: str, path: Path | str = "/proc/vmstat", keys: Collection[str] | None = None
) -> dict[str, int]:
    """Map counter names to values; with `keys`, keep (and check) only those:
    the sensing loop needs two of some 180."""
    counters: dict[str, int] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        if keys is not None and line.partition(" ")[0] not in keys:
            continue
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2:
            raise ProcParseError(path, f"line {lineno}: not 'name value': {_excerpt(line)}")
        name, value = fields
        if keys is None or name in keys:
            counters[name] = _int(path, lineno, line, value)
    if keys is None and not counters:
        raise ProcParseError(path, "empty")
    return counters


# --- Sensor ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Reading:
    """One sample of the guest's load. Busy shares and rates cover the time since
    a baseline sample at least `MIN_SPAN_SECONDS` older, when there is one."""

    at: float  # time.monotonic() seconds
    since: float  # start of the span busy shares and rates cover (`at` for the first)
    cpu_busy: float  # CPUs' worth of non-idle time (0..online_cpus)
    per_cpu_busy: tuple[float, ...]  # 0..1 per online CPU, in cpuN order
    online_cpus: int
    run_queue: int  # procs_running, counting the agent itself
    psi_available: bool  # False: every PSI field below is 0
    cpu_some: float  # PSI avg10, percent
    memory_some: float
    memory_full: float
    io_some: float
    io_full: float
    cpu_some_total_us: int  # PSI cumulative stall time, microseconds
    memory_some_total_us: int
    memory_full_total_us: int
    io_some_total_us: int
    io_full_total_us: int
    memory_total: int  # bytes
    memory_available: int  # bytes
    swap_total: int  # bytes
    swap_free: int  # bytes
    swap_in_per_s: float  # pages swapped in per second
    swap_out_per_s: float  # pages swapped out per second


_NO_PSI = Psi(some=PsiLine(0.0, 0.0, 0.0, 0), full=None)
_VMSTAT_KEYS = frozenset({"pswpin", "pswpout"})
# What Sensor.sample reads of meminfo (MemFree, Buffers, Cached: for kernels
# without MemAvailable).
_MEMINFO_KEYS = frozenset(
    {"MemTotal", "MemAvailable", "MemFree", "Buffers", "Cached", "SwapTotal", "SwapFree"}
)


def _read_text(path: Path) -> str:
    # Bytes, decoded at once: a text-mode open builds a decoder per file.
    with open(path, "rb") as f:
        return f.read().decode("ascii", errors="replace")


def _busy_fraction(before: CpuJiffies | CpuTimes, after: CpuJiffies | CpuTimes) -> float:
    total = after.total - before.total
    if total <= 0:
        return 0.0
    # Clamped: iowait may go backwards on NO_HZ kernels (proc.rst calls it
    # unreliable), which would otherwise push the fraction past 1.
    busy = (total - (after.idle - before.idle)) / total
    return min(1.0, max(0.0, busy))


@dataclass(frozen=True, slots=True)
class _Previous:
    at: float
    stat: Stat
    cpu_times: CpuTimes
    pswpin: int
    pswpout: int


class Sensor:
    """Samples /proc under `procfs`; keeps the few recent samples deltas need."""

    def __init__(
        self, procfs: Path = Path("/proc"), *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._procfs = procfs
        self._clock = clock
        # Joined once: a Path join costs as much as parsing a PSI file.
        self._stat_path = procfs / "stat"
        self._meminfo_path = procfs / "meminfo"
        self._vmstat_path = procfs / "vmstat"
        self._psi_paths = tuple(procfs / "pressure" / r for r in PSI_RESOURCES)
        # Oldest first: the newest at least MIN_SPAN_SECONDS old, then younger ones.
        self._baselines: collections.deque[_Previous] = collections.deque(maxlen=_BASELINES_KEPT)
        self._psi_warned = False

    def _baseline(self, at: float) -> _Previous | None:
        """The newest kept sample at least MIN_SPAN_SECONDS before `at`, else the
        oldest; the ones before it will never be the baseline again."""
        baselines = self._baselines
        while len(baselines) > 1 and at - baselines[1].at >= MIN_SPAN_SECONDS:
            baselines.popleft()
        return baselines[0] if baselines else None

    def _read(self, path: Path) -> str:
        try:
            return _read_text(path)
        except OSError as err:
            raise ProcParseError(path, f"unreadable: {err.strerror or err}") from err

    def _read_psi(self) -> tuple[Psi, Psi, Psi] | None:
        """Read the three pressure files, or None when this kernel has no PSI.

        No /proc/pressure (CONFIG_PSI=n, or psi=0 on the command line) or
        EOPNOTSUPP (PSI disabled at boot) both mean "sample without PSI". Any
        other read error is treated the same for this sample and retried next
        time, since EMFILE or ENOMEM under memory pressure are transient.
        """
        texts: list[tuple[Path, str]] = []
        for path in self._psi_paths:
            try:
                texts.append((path, _read_text(path)))
            except OSError as err:
                if not self._psi_warned:
                    self._psi_warned = True
                    logger.warning(
                        "PSI unavailable (%s: %s); sensing without pressure stall information",
                        path,
                        err.strerror or err,
                    )
                return None
        cpu, memory, io = (parse_psi(text, path) for path, text in texts)
        return cpu, memory, io

    def sample(self) -> Reading:
        at = self._clock()
        stat_path = self._stat_path
        stat = parse_stat(self._read(stat_path), stat_path)
        cpu_times = read_cpu_times(self._procfs)
        meminfo_path = self._meminfo_path
        meminfo = parse_meminfo(self._read(meminfo_path), meminfo_path, _MEMINFO_KEYS)
        vmstat_path = self._vmstat_path
        # pswpin/pswpout are absent without CONFIG_VM_EVENT_COUNTERS: rates 0.
        vmstat = parse_vmstat(self._read(vmstat_path), vmstat_path, _VMSTAT_KEYS)
        psi = self._read_psi()

        try:
            memory_total = meminfo["MemTotal"]
        except KeyError:
            raise ProcParseError(meminfo_path, "no MemTotal") from None
        # MemAvailable exists since Linux 3.14; before that, estimate it the
        # way free(1) did: free plus page cache.
        memory_available = meminfo.get("MemAvailable")
        if memory_available is None:
            memory_available = (
                meminfo.get("MemFree", 0) + meminfo.get("Buffers", 0) + meminfo.get("Cached", 0)
            )

        pswpin = vmstat.get("pswpin", 0)
        pswpout = vmstat.get("pswpout", 0)
        online_cpus = len(stat.per_cpu)
        previous = self._baseline(at)
        self._baselines.append(
            _Previous(at=at, stat=stat, cpu_times=cpu_times, pswpin=pswpin, pswpout=pswpout)
        )
        if previous is None:
            cpu_busy = 0.0
            per_cpu_busy = (0.0,) * online_cpus
            swap_in_per_s = swap_out_per_s = 0.0
        else:
            cpu_busy = _busy_fraction(previous.cpu_times, cpu_times) * online_cpus
            # A CPU onlined since the baseline has no time of its own yet: report 0.
            per_cpu_busy = tuple(
                _busy_fraction(before, jiffies)
                if (before := previous.stat.per_cpu.get(cpu)) is not None
                else 0.0
                for cpu, jiffies in stat.per_cpu.items()
            )
            elapsed_s = at - previous.at
            if elapsed_s > 0:
                swap_in_per_s = max(0, pswpin - previous.pswpin) / elapsed_s
                swap_out_per_s = max(0, pswpout - previous.pswpout) / elapsed_s
            else:
                swap_in_per_s = swap_out_per_s = 0.0

        cpu_psi, memory_psi, io_psi = psi if psi is not None else (_NO_PSI, _NO_PSI, _NO_PSI)
        memory_full = memory_psi.full if memory_psi.full is not None else _NO_PSI.some
        io_full = io_psi.full if io_psi.full is not None else _NO_PSI.some
        return Reading(
            at=at,
            since=previous.at if previous is not None else at,
            cpu_busy=cpu_busy,
            per_cpu_busy=per_cpu_busy,
            online_cpus=online_cpus,
            run_queue=stat.procs_running,
            psi_available=psi is not None,
            cpu_some=cpu_psi.some.avg10,
            memory_some=memory_psi.some.avg10,
            memory_full=memory_full.avg10,
            io_some=io_psi.some.avg10,
            io_full=io_full.avg10,
            cpu_some_total_us=cpu_psi.some.total_us,
            memory_some_total_us=memory_psi.some.total_us,
            memory_full_total_us=memory_full.total_us,
            io_some_total_us=io_psi.some.total_us,
            io_full_total_us=io_full.total_us,
            memory_total=memory_total,
            memory_available=memory_available,
            swap_total=meminfo.get("SwapTotal", 0),
            swap_free=meminfo.get("SwapFree", 0),
            swap_in_per_s=swap_in_per_s,
            swap_out_per_s=swap_out_per_s,
        )


# --- PressureWatch -------------------------------------------------------------


def _write_trigger(fd: int, trigger: str) -> None:
    # psi_write() overwrites the last byte written with NUL, so the terminator
    # must be sent or the window loses its last digit (and usually its validity).
    os.write(fd, trigger.encode("ascii") + b"\0")


class PressureWatch:
    """Wakes the agent when PSI stall crosses a threshold (see the trigger note above).

    asyncio's add_reader watches POLLIN, which a pressure file always reports,
    while triggers signal POLLPRI. So the pressure fds go into one epoll set
    watching EPOLLPRI only, and that epoll fd, which turns readable when any
    of them fires, is what the event loop watches.
    """

    def __init__(
        self,
        procfs: Path = Path("/proc"),
        *,
        resources: Sequence[str] = ("memory", "cpu"),
        kind: str = "some",
        stall_us: int = DEFAULT_PSI_STALL_US,
        window_us: int = DEFAULT_PSI_WINDOW_US,
    ) -> None:
        # Bad settings are a configuration bug, not a kernel without PSI: raise.
        if not resources or any(r not in PSI_RESOURCES for r in resources):
            raise ValueError(f"resources must be some of {PSI_RESOURCES}, got {resources!r}")
        if kind not in ("some", "full"):
            raise ValueError(f"kind must be 'some' or 'full', got {kind!r}")
        if not PSI_WINDOW_MIN_US <= window_us <= PSI_WINDOW_MAX_US:
            raise ValueError(
                f"window_us must be {PSI_WINDOW_MIN_US}..{PSI_WINDOW_MAX_US}, got {window_us}"
            )
        if not 0 < stall_us <= window_us:
            raise ValueError(f"stall_us must be 1..window_us ({window_us}), got {stall_us}")
        self._trigger = f"{kind} {stall_us} {window_us}"
        self._fds: list[int] = []
        self._epoll: select.epoll | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiter: asyncio.Future[bool] | None = None
        self._arm(procfs, resources, kind, stall_us, window_us)

    def _arm(
        self, procfs: Path, resources: Sequence[str], kind: str, stall_us: int, window_us: int
    ) -> None:
        # Without CAP_SYS_RESOURCE, retry once with the window rounded up to a
        # multiple of 2 s and the stall scaled alike (the same stalled share):
        # slower to fire, but better than no trigger.
        steps = -(-window_us // PSI_UNPRIVILEGED_WINDOW_STEP_US)
        retry_window_us = steps * PSI_UNPRIVILEGED_WINDOW_STEP_US
        retry: str | None = None
        if retry_window_us != window_us and retry_window_us <= PSI_WINDOW_MAX_US:
            retry = f"{kind} {stall_us * retry_window_us // window_us} {retry_window_us}"
        path = procfs / "pressure"
        try:
            self._epoll = select.epoll()
            for resource in resources:
                path = procfs / "pressure" / resource
                fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
                self._fds.append(fd)
                try:
                    _write_trigger(fd, self._trigger)
                except OSError as err:
                    if err.errno != errno.EINVAL or retry is None:
                        raise
                    # A failed write leaves the fd without a trigger: reuse it.
                    _write_trigger(fd, retry)
                    logger.warning(
                        "PSI trigger %r refused by %s (no CAP_SYS_RESOURCE?); using %r",
                        self._trigger,
                        path,
                        retry,
                    )
                    self._trigger, retry = retry, None
                # EPERM here means the file cannot be polled: not a pressure file.
                self._epoll.register(fd, select.EPOLLPRI)
        except OSError as err:
            # EPERM/EACCES: not privileged; EINVAL: trigger refused; ENOENT:
            # no PSI; EOPNOTSUPP: psi=0 at boot. All mean "tick periodically".
            self.close()
            name = errno.errorcode.get(err.errno or 0, str(err.errno))
            logger.warning(
                "PSI triggers unavailable (%s: %s, writing %r); waking only periodically",
                path,
                name,
                self._trigger,
            )

    @property
    def available(self) -> bool:
        return self._epoll is not None

    @property
    def trigger(self) -> str:
        """The trigger as written, e.g. "some 150000 1000000" (or its 2 s retry)."""
        return self._trigger

    async def wait(self, timeout: float) -> bool:
        """True once a trigger fires (or fired since the last wait), False on timeout.

        Without triggers it simply sleeps out the timeout, so callers can use it
        as their tick either way.
        """
        if self._epoll is None:
            await asyncio.sleep(timeout)
            return False
        if self._waiter is not None:
            raise RuntimeError("PressureWatch.wait() is already in progress")
        # An event that fired while nobody waited is still pending on its fd.
        if self._epoll.poll(0):
            return True
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[bool] = loop.create_future()
        loop.add_reader(self._epoll.fileno(), self._on_readable, waiter)
        self._loop, self._waiter = loop, waiter
        try:
            async with asyncio.timeout(timeout):
                return await waiter
        except TimeoutError:
            return False
        finally:
            self._stop_reading()

    def _on_readable(self, waiter: asyncio.Future[bool]) -> None:
        # Drain the epoll set so the fd stops being readable. The result may
        # well be empty: psi_trigger_poll() clears the event when polled, and
        # the loop's epoll already polled it through ours. Our fd turning
        # readable is itself the event.
        if self._epoll is not None:
            self._epoll.poll(0)
        if not waiter.done():
            waiter.set_result(True)

    def _stop_reading(self) -> None:
        if self._loop is not None and self._epoll is not None and not self._loop.is_closed():
            self._loop.remove_reader(self._epoll.fileno())
        self._loop = self._waiter = None

    def close(self) -> None:
        """Drop the triggers; a wait in progress returns False. Idempotent."""
        waiter = self._waiter
        # Unregister before closing, so the loop never watches a reused fd number.
        self._stop_reading()
        if waiter is not None and not waiter.done():
            waiter.set_result(False)
        if self._epoll is not None:
            self._epoll.close()
            self._epoll = None
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()
