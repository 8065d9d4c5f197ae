"""The sizing policy: how many CPUs and how much memory the guest should have.

Pure: `decide()` reads the recent samples, the limits, the parameters and the
previous `PolicyState`, and returns one `Decision` per resource and the next
state. No I/O, no clock (time is `Sample.at`), no module-level state.
`Policy.decide()` returns exactly the same, for a caller (the daemon) that
decides every period on a history that slides by a sample: it keeps what each
sample says between calls instead of reading the whole history again.

Grow fast, shrink slowly (docs/policy.md has the why of every number):

- Each sample yields a *need*: CPUs for its busy time at the target
  utilisation (plus one, or the run queue, when PSI shows tasks stalling);
  memory for what is used plus headroom (more on memory pressure, by how far
  PSI is over its threshold, squared, as senpai does).
- Grow to the smallest need over a short window (CPU 2 s; memory at once), or
  at once to the newest need when PSI shows stalls: one jump, not steps.
- Shrink toward the largest sustained need over a long window (CPU 60 s,
  memory 90 s), by bounded steps, one step per interval, never while PSI is
  elevated. A load that alternates faster than the window holds its peak.
- Minimum, maximum and burst clamp the result. Above maximum is paid for with
  credits earned below it; as credits run low the ceiling steps back down.
"""

from __future__ import annotations

import bisect
import collections
import enum
import functools
import itertools
import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, Literal, NamedTuple, Protocol, TypeVar

__all__ = [
    "CpuParams",
    "Decision",
    "Decisions",
    "Limits",
    "MemoryParams",
    "Policy",
    "PolicyParams",
    "PolicyState",
    "ResourceState",
    "Sample",
    "Urgency",
    "decide",
]

MiB = 1 << 20
GiB = 1 << 30

# ceil() of a quotient that is a whole number up to float error (3.2 / 0.8 is
# 4.000000000000001) must not add a whole CPU or block.
_EPSILON = 1e-9


# Busy time at or above this share of the online CPUs is "all CPUs busy".
_SATURATED = 0.95


# --- inputs -------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """One sensing period's observation. NaN, infinite or negative values are
    "no information", never an error."""

    at: float  # monotonic seconds, end of the period
    cpu_busy: float  # CPUs' worth of busy time over the period, e.g. 2.5
    online_cpus: int
    run_queue: int  # procs_running
    cpu_some: float  # PSI cpu some avg10, percent 0-100
    memory_some: float  # PSI memory some avg10, percent
    memory_full: float  # PSI memory full avg10, percent
    memory_total: int  # bytes online (MemTotal, or the online blocks' bytes)
    memory_available: int  # MemAvailable, bytes
    swap_in_per_s: float = 0.0  # pages/s
    swap_out_per_s: float = 0.0
    # Bytes in online memory blocks, which memory targets count. MemTotal is
    # smaller (kernel code, reserved and memmap pages are not in it). 0 means
    # unknown: memory_total rounded up to whole blocks stands in.
    memory_online: int = 0
    # PSI stall share of this period alone, percent, from the cumulative
    # `total` counters: what avg10 says ten seconds late. NaN: unknown (the
    # first period, or a kernel without totals).
    cpu_some_now: float = math.nan
    memory_some_now: float = math.nan
    memory_full_now: float = math.nan
    # The agent's own reclaims: offlining a memory block migrates its pages,
    # which keeps the CPUs busy, the run queue long and CPU PSI up while it
    # lasts (over a second under TCG). `offlining`: a reclaim ran during this
    # period, whose CPU figures then say nothing about the load. `offlined_at`:
    # when the last one ended (NaN: none yet).
    offlining: bool = False
    offlined_at: float = math.nan


@dataclass(frozen=True)
class Limits:
    """Bounds for one resource: CPUs count CPUs, memory counts bytes."""

    minimum: int
    maximum: int
    burst: int  # >= maximum; == maximum means no bursting

    def __post_init__(self) -> None:
        if self.minimum < 0:
            raise ValueError(f"minimum: must not be negative, got {self.minimum}")
        if self.maximum < self.minimum:
            raise ValueError(f"maximum: {self.maximum} is below minimum {self.minimum}")
        if self.burst < self.maximum:
            raise ValueError(f"burst: {self.burst} is below maximum {self.maximum}")


# --- outputs ------------------------------------------------------------------


class Urgency(enum.Enum):
    """How soon the broker should serve a request; values match vmtide.v1.Urgency."""

    LOW = 1  # could use more (or can give back), nothing stalls
    NORMAL = 2  # utilisation is over target or headroom is short
    HIGH = 3  # tasks are stalling (PSI) or memory is nearly gone


@dataclass(frozen=True)
class Decision:
    target: int  # CPUs, or memory bytes (a whole number of blocks)
    current: int
    reason: str  # one line, with the numbers that drove the decision
    urgency: Urgency
    bursting: bool  # target above maximum (spending burst credits)

    @property
    def direction(self) -> Literal["grow", "shrink", "hold"]:
        if self.target > self.current:
            return "grow"
        if self.target < self.current:
            return "shrink"
        return "hold"


@dataclass(frozen=True)
class Decisions:
    cpu: Decision
    memory: Decision


# --- parameters ---------------------------------------------------------------


def _check(
    obj: object,
    name: str,
    low: float,
    high: float = math.inf,
    *,
    low_open: bool = False,
    high_open: bool = False,
    integer: bool = False,
    infinite_ok: bool = False,
) -> None:
    """Raise ValueError("name: reason") unless obj.name is a number in range."""
    value = getattr(obj, name)
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, int if integer else int | float):
        raise ValueError(f"{name}: must be {kind}, got {value!r}")
    if math.isnan(value) or (math.isinf(value) and not infinite_ok):
        raise ValueError(f"{name}: must be a finite number, got {value!r}")
    below = value <= low if low_open else value < low
    above = value >= high if high_open else value > high
    if below or above:
        lo = f"{'(' if low_open else '['}{low:g}"
        hi = f"{high:g}{')' if high_open else ']'}"
        raise ValueError(f"{name}: must be in {lo}, {hi}, got {value!r}")


def _check_common(p: _Common) -> None:
    for name in ("grow_window_seconds", "psi_settle_seconds", "shrink_interval_seconds"):
        _check(p, name, 0, 3600)
    _check(p, "shrink_window_seconds", 0, 3600)
    _check(p, "shrink_step_ratio", 0, 1, low_open=True)
    _check(p, "shrink_hold_psi_some_percent", 0, 100, low_open=True)
    _check(p, "burst_earn_ratio", 0, 100)
    _check(p, "burst_credit_max_seconds", 0, 86400)
    _check(p, "burst_reserve_seconds", 0, 86400)


@dataclass(frozen=True)
class CpuParams:
    """CPU tunables ([policy.cpu]); docs/policy.md says why each default."""

    # Size so busy time fills this share of the online CPUs.
    target_utilisation_ratio: float = 0.9
    # Utilisation must be over target this long before a grow (PSI stalls
    # grow at once).
    grow_window_seconds: float = 2.0
    # PSI cpu some avg10 at or above this means tasks stall: grow past need.
    psi_some_threshold_percent: float = 10.0
    # ...but only with the CPUs busy at least this share of the period: tasks
    # that wait while the CPUs idle most of it wait on a host that ran the
    # vCPU late or a quota, which more CPUs do not answer, or on bursts, which
    # they answer only by idling.
    stall_busy_min_ratio: float = 0.5
    # After a grow, avg10 still shows the stalls from before for about its
    # 10 s window: a stall counts then only while avg10 is still rising.
    psi_settle_seconds: float = 10.0
    # Shrink only to the peak sustained need over this long (HPA's scale-down
    # window, shorter: onlining a CPU again takes milliseconds).
    shrink_window_seconds: float = 60.0
    # At most one shrink step per this long, so PSI shows each step's effect.
    shrink_interval_seconds: float = 10.0
    # One shrink step gives back at most this share of the CPUs (at least one).
    shrink_step_ratio: float = 0.5
    # No shrink while PSI some reached this within the last shrink interval.
    shrink_hold_psi_some_percent: float = 5.0
    # Credits (CPU-seconds above maximum) earned per CPU-second below maximum.
    burst_earn_ratio: float = 0.5
    # Credit cap, in seconds of a full burst (all of burst - maximum).
    burst_credit_max_seconds: float = 600.0
    # Burst only as far as the credits can pay for this long.
    burst_reserve_seconds: float = 30.0

    def __post_init__(self) -> None:
        _check(self, "target_utilisation_ratio", 0, 1, low_open=True)
        _check(self, "psi_some_threshold_percent", 0, 100, low_open=True)
        _check(self, "stall_busy_min_ratio", 0, 1)
        _check_common(self)


@dataclass(frozen=True)
class MemoryParams:
    """Memory tunables ([policy.memory]); docs/policy.md says why each default."""

    # Keep MemAvailable >= max(headroom_min_bytes, headroom_percent of total).
    headroom_min_bytes: int = 384 * MiB
    headroom_percent: float = 10.0
    # MemAvailable under this share of the headroom is urgent (nearly gone).
    urgent_headroom_ratio: float = 0.5
    # Memory grows on the newest sample alone: running out cannot wait.
    grow_window_seconds: float = 0.0
    # Memory pressure: PSI some or full avg10 at or above these, or swap-in at
    # or above this rate, grows memory by stall_grow_ratio times the square of
    # how many times over its threshold PSI some (or swap-in) is, at most double.
    psi_some_threshold_percent: float = 5.0
    psi_full_threshold_percent: float = 1.0
    swap_in_threshold_pages_per_second: float = 1000.0
    stall_grow_ratio: float = 0.05
    # The rest as in CpuParams, in bytes: memory comes back more slowly
    # (offlining migrates pages) and bursts only when worth a hot-add.
    psi_settle_seconds: float = 10.0
    shrink_window_seconds: float = 90.0
    shrink_interval_seconds: float = 10.0
    shrink_step_ratio: float = 0.25
    shrink_hold_psi_some_percent: float = 1.0
    burst_earn_ratio: float = 0.5
    burst_credit_max_seconds: float = 600.0
    burst_reserve_seconds: float = 60.0

    def __post_init__(self) -> None:
        _check(self, "headroom_min_bytes", 0, integer=True)
        _check(self, "headroom_percent", 0, 100, high_open=True)
        _check(self, "urgent_headroom_ratio", 0, 1)
        _check(self, "psi_some_threshold_percent", 0, 100, low_open=True)
        _check(self, "psi_full_threshold_percent", 0, 100, low_open=True)
        _check(self, "swap_in_threshold_pages_per_second", 0, low_open=True, infinite_ok=True)
        _check(self, "stall_grow_ratio", 0, 10, low_open=True)
        _check_common(self)


@dataclass(frozen=True)
class PolicyParams:
    cpu: CpuParams = field(default_factory=CpuParams)
    memory: MemoryParams = field(default_factory=MemoryParams)

    @property
    def history_seconds(self) -> float:
        """How much sample history decide() reads: keep at least this much.

        With less, the shrink window is never covered and nothing shrinks.
        """
        windows = [
            getattr(p, name)
            for p in (self.cpu, self.memory)
            for name in (
                "grow_window_seconds",
                "psi_settle_seconds",
                "shrink_window_seconds",
                "shrink_interval_seconds",
            )
        ]
        # A few sensing periods of slack: the window's edge must hold a sample.
        return float(max(windows)) + 10.0


class _Common(Protocol):
    """The tunables CpuParams and MemoryParams share, read by the common core."""

    @property
    def grow_window_seconds(self) -> float: ...
    @property
    def psi_settle_seconds(self) -> float: ...
    @property
    def shrink_window_seconds(self) -> float: ...
    @property
    def shrink_interval_seconds(self) -> float: ...
    @property
    def shrink_step_ratio(self) -> float: ...
    @property
    def shrink_hold_psi_some_percent(self) -> float: ...
    @property
    def burst_earn_ratio(self) -> float: ...
    @property
    def burst_credit_max_seconds(self) -> float: ...
    @property
    def burst_reserve_seconds(self) -> float: ...


# --- state --------------------------------------------------------------------


@dataclass(frozen=True)
class ResourceState:
    # Burst credits in resource-seconds above maximum (CPU-seconds, byte-seconds).
    credits: float = 0.0
    # `at` of the newest sample already counted into credits; None: none yet.
    accounted_at: float | None = None


@dataclass(frozen=True)
class PolicyState:
    """What decide() carries between calls; PolicyState() starts with no credits.

    Stabilization windows and last-change times are read from the samples,
    so the state holds only what samples cannot tell: burst credits.
    """

    cpu: ResourceState = field(default_factory=ResourceState)
    memory: ResourceState = field(default_factory=ResourceState)


# --- sample cleaning ----------------------------------------------------------


# Larger than any counter here can honestly reach (2**53 bytes is 8 PiB), and
# the last integer a float holds exactly: bigger is garbage, not information.
_LARGEST = float(2**53)


def _amount(value: object) -> float | None:
    """value as a number in [0, 2**53], or None (no information)."""
    # Exact type checks first: this runs for every field of every sample.
    if type(value) is not float and type(value) is not int:
        if isinstance(value, bool) or not isinstance(value, int | float):
            return None
        value = float(value)
    # NaN fails both comparisons.
    return value if 0 <= value <= _LARGEST else None


def _whole(value: object, minimum: int = 0) -> int | None:
    """value as an int >= minimum, or None (no information)."""
    if type(value) is int:  # the common case, checked cheaply
        return value if minimum <= value <= _LARGEST else None
    number = _amount(value)
    if number is None or number < minimum or number != int(number):
        return None
    return int(number)


def _percent(value: object) -> float | None:
    number = _amount(value)
    return number if number is not None and number <= 100 else None


def _bad(name: str, value: object) -> str:
    return f"{name}={value!r}"


class _Reading(NamedTuple):
    """What one sample says about one resource, in that resource's unit.

    A NamedTuple, not a dataclass: decide() builds hundreds on a fresh history.
    """

    at: float
    current: int  # online CPUs or online memory bytes
    need: float | None  # None: the sample says nothing about the need
    # The need without a stall's guess (what the sample measured): the shrink
    # side reads this, so a blind stall grow does not hold for a window.
    measured: float | None
    stall: bool  # pressure that counts (after the settle rule)
    # Evidence enough to grow on this sample alone (a stall, or CPUs saturated
    # with tasks queued): no grow window.
    sure: bool
    urgent: bool  # stalling now, or memory nearly gone
    psi_some: float | None
    why: str  # the signals behind `need`, for reasons; newest sample only


def _why_not(
    stalled: bool, rising: bool, settling: bool, falling: bool, ongoing: bool | None
) -> str:
    """Whether a stall counts ("" where it does, else why not): avg10 lags, so
    right after a grow it still shows the stalls the grow answered; only a
    rising avg10 is news then. Later, an avg10 that does not rise is a stall
    that has eased (avg10 takes ~20 s to decay from a spike) and does not grow
    the guest either, unless the period itself still stalled over the
    threshold (`ongoing`, from the totals): a shortage nobody answered keeps
    counting while its avg10 drifts down. The kernel updates avg10 every 2 s,
    so samples half a second apart often read the same value: not falling,
    yet the totals say whether the period stalled. Without totals (None),
    only a falling avg10 eases."""
    if not stalled:
        return "no stall"
    if rising:
        return ""
    if settling:
        return "settling after grow"
    if ongoing is False or (falling and not ongoing):
        return "easing"
    return ""


def _ongoing(*shares: tuple[float, float]) -> bool | None:
    """Whether the period stalled at or over a threshold by any (share, threshold)
    of the totals; None when none of the shares is known."""
    known = [(number, limit) for value, limit in shares if (number := _percent(value)) is not None]
    if not known:
        return None
    return any(number >= limit for number, limit in known)


def _rose(now: float | None, before: float | None) -> bool:
    return now is not None and before is not None and now > before


def _fell(now: float | None, before: float | None) -> bool:
    return now is not None and before is not None and now < before


def _ceil(x: float) -> int:
    return math.ceil(x - _EPSILON)


def _round_up(x: float, unit: int) -> int:
    if isinstance(x, int):
        return -(-x // unit) * unit
    return _ceil(x / unit) * unit


def _round_down(x: float, unit: int) -> int:
    if isinstance(x, int):
        return x // unit * unit
    return math.floor(x / unit + _EPSILON) * unit


def _fmt_cpus(n: float) -> str:
    return f"{n:g}"


def _fmt_bytes(n: float) -> str:
    if abs(n) >= GiB:
        return f"{n / GiB:.3f}".rstrip("0").rstrip(".") + " GiB"
    return f"{n / MiB:.0f} MiB"


def _fmt_cpu_seconds(credits: float) -> str:
    return f"{credits:.0f} CPU-s"


def _fmt_byte_seconds(credits: float) -> str:
    return f"{credits / GiB:.1f} GiB-s"


# Memory PSI some, PSI full (percent), swap-in (pages/s); None: no information.
_Pressure = tuple[float | None, float | None, float | None]


@dataclass(frozen=True)
class _Readings:
    rows: tuple[_Reading, ...]  # samples with a usable current, oldest first
    newest: _Reading | None  # the newest sample's, when it has a usable current
    newest_bad: tuple[str, ...]  # the newest sample's broken fields
    # Each row's measured need held over the grow window (None: no measure).
    held: tuple[float | None, ...] = ()
    changed: float | None = None  # when the online count last changed


class _CpuFacts(NamedTuple):
    """What one sample says about CPUs by itself, whatever its neighbours say."""

    at: float
    current: int  # online CPUs
    busy: float | None
    run_queue: int | None
    psi: float | None
    stalled: bool  # PSI at or over the threshold, before the settle rule
    ongoing: bool | None  # the period itself stalled over the threshold (None: no totals)
    util_need: int | None
    # Every CPU busy all period and more tasks runnable than CPUs: tasks are
    # waiting now, a measurement, not noise; avg10 shows it a second late.
    saturated: bool
    # Within the settle time of the agent's own reclaim: avg10 still shows
    # the stalls its page migration made, and the host's unplug makes more.
    after_reclaim: bool
    reclaiming: bool  # the sample overlaps a reclaim: no load figures at all


class _MemoryFacts(NamedTuple):
    """What one sample says about memory by itself."""

    at: float
    current: int  # online memory bytes
    total: int | None
    available: int | None
    pressure: _Pressure
    stalled: bool  # memory pressure over a threshold, before the settle rule
    ongoing: bool | None
    measured: float | None  # used + headroom, without a stall's guess
    headroom: float
    urgent: bool


_Facts = TypeVar("_Facts", _CpuFacts, _MemoryFacts)

# NamedTuples built from a tuple without their generated __new__ (a Python
# call, half the cost of a reading): done once or twice per sample.
_new = tuple.__new__


def _cpu_bad(s: Sample) -> tuple[str, ...]:
    checks = (
        ("online_cpus", _whole(s.online_cpus, 1)),
        ("cpu_busy", _amount(s.cpu_busy)),
        ("run_queue", _whole(s.run_queue)),
        ("cpu_some", _percent(s.cpu_some)),
    )
    return tuple(_bad(name, getattr(s, name)) for name, value in checks if value is None)


def _cpu_facts(s: Sample, p: CpuParams) -> _CpuFacts | None:
    online = _whole(s.online_cpus, 1)
    if online is None:
        return None
    if s.offlining:
        blind = (s.at, online, None, None, None, False, None, None, False, False, True)
        return _new(_CpuFacts, blind)
    threshold = p.psi_some_threshold_percent
    busy, psi, run_queue = _amount(s.cpu_busy), _percent(s.cpu_some), _whole(s.run_queue)
    saturated = (
        busy is not None
        and run_queue is not None
        and busy >= _SATURATED * online
        and run_queue > online
    )
    stalled = psi is not None and psi >= threshold
    ongoing = _ongoing((s.cpu_some_now, threshold))
    util_need = _ceil(busy / p.target_utilisation_ratio) if busy is not None else None
    offlined_at = _amount(s.offlined_at)
    after_reclaim = offlined_at is not None and s.at - offlined_at < p.psi_settle_seconds
    # Positional: this runs for every sample read.
    facts = (
        s.at,
        online,
        busy,
        run_queue,
        psi,
        stalled,
        ongoing,
        util_need,
        saturated,
        after_reclaim,
        False,
    )
    return _new(_CpuFacts, facts)


def _cpu_row(
    f: _CpuFacts, before: _CpuFacts | None, settling: bool, p: CpuParams
) -> tuple[_Reading, str]:
    """The sample's reading given the one before it, and why a stall does not count."""
    if f.reclaiming:
        # Keep what is online: no grow, and within the grow window after the
        # reclaim none on utilisation either. Nothing measured for the shrink.
        return _new(_Reading, (f.at, f.current, f.current, None, False, False, False, None, "")), ""
    rising = before is not None and _rose(f.psi, before.psi)
    falling = before is not None and _fell(f.psi, before.psi)
    target = p.target_utilisation_ratio
    not_counted = _why_not(f.stalled, rising, settling, falling, f.ongoing)
    if not not_counted and f.after_reclaim:
        # avg10 rises for an update or two after the migration stopped, and
        # the host's unplug that follows the Ack stalls tasks in the guest's
        # kernel with its CPUs mostly idle: more CPUs answer neither. A stall
        # counts when the period itself stalled with the CPUs busy.
        busy = f.busy is not None and f.busy > target * f.current
        if not (f.ongoing and busy):
            not_counted = "after the agent's own reclaim"
    elif not not_counted and f.busy is not None and f.busy < p.stall_busy_min_ratio * f.current:
        not_counted = "CPUs mostly idle"
    stall = not not_counted
    need: float | None = f.util_need
    if stall:
        # More than we had, and room for every task the run queue holds.
        need = max(f.current + 1, (f.util_need or 0) + 1, _ceil((f.run_queue or 0) / target))
    elif f.saturated:
        need = max(f.util_need or 0, _ceil((f.run_queue or 0) / target))
    sure = stall or f.saturated
    row = _new(_Reading, (f.at, f.current, need, need, stall, sure, f.stalled, f.psi, ""))
    return row, not_counted


def _cpu_why(f: _CpuFacts, row: _Reading, not_counted: str, p: CpuParams) -> str:
    if f.reclaiming:
        return "the agent's own reclaim ran, which loads the CPUs itself"
    target = p.target_utilisation_ratio
    threshold = p.psi_some_threshold_percent
    busy, online, psi, run_queue = f.busy, f.current, f.psi, f.run_queue
    parts = []
    if busy is not None:
        part = f"busy {busy:.1f}/{online} ({busy / online:.0%})"
        parts.append(part + (f" > {target:.0%}" if busy > target * online else ""))
    if psi is not None and psi >= threshold:
        settling = "" if row.stall else f" ({not_counted})"
        parts.append(f"psi some {psi:.1f}% > {threshold:g}%{settling}")
    if (row.stall or f.saturated) and run_queue is not None and run_queue > online:
        parts.append(f"run queue {run_queue}")
    return ", ".join(parts)


def _memory_bad(s: Sample) -> tuple[str, ...]:
    checks = (
        ("memory_total", _whole(s.memory_total, 1)),
        ("memory_available", _whole(s.memory_available)),
        ("memory_online", _whole(s.memory_online)),
        ("memory_some", _percent(s.memory_some)),
        ("memory_full", _percent(s.memory_full)),
        ("swap_in_per_s", _amount(s.swap_in_per_s)),
        ("swap_out_per_s", _amount(s.swap_out_per_s)),
    )
    bad = [_bad(name, getattr(s, name)) for name, value in checks if value is None]
    total, available = checks[0][1], checks[1][1]
    if total is not None and available is not None and available > total:
        bad.append(f"memory_available={available} > memory_total")
    return tuple(bad)


def _memory_facts(s: Sample, block: int, p: MemoryParams) -> _MemoryFacts | None:
    total = _whole(s.memory_total, 1)
    available = _whole(s.memory_available)
    if total is not None and available is not None and available > total:
        available = None
    current = _whole(s.memory_online) or (_round_up(total, block) if total is not None else None)
    if current is None:
        return None
    some_limit, full_limit = p.psi_some_threshold_percent, p.psi_full_threshold_percent
    some, full, swap_in = _percent(s.memory_some), _percent(s.memory_full), _amount(s.swap_in_per_s)
    stalled = (
        (some is not None and some >= some_limit)
        or (full is not None and full >= full_limit)
        or (swap_in is not None and swap_in >= p.swap_in_threshold_pages_per_second)
    )
    urgent = (some is not None and some >= some_limit) or (full is not None and full >= full_limit)
    need: float | None = None
    headroom = 0.0
    if total is not None and available is not None:
        share = p.headroom_percent / 100
        used = total - available
        # Blocks hold more than MemTotal shows (kernel, memmap): keep that.
        overhead = max(0, current - total)
        # Headroom counts against the total the target will give:
        # target - overhead - used >= share * (target - overhead).
        need = overhead + max(used + p.headroom_min_bytes, used / (1 - share))
        headroom = max(p.headroom_min_bytes, share * total)
        urgent = urgent or available < p.urgent_headroom_ratio * headroom
    ongoing = _ongoing((s.memory_some_now, some_limit), (s.memory_full_now, full_limit))
    pressure = (some, full, swap_in)
    facts = (s.at, current, total, available, pressure, stalled, ongoing, need, headroom, urgent)
    return _new(_MemoryFacts, facts)


def _memory_row(
    f: _MemoryFacts, before: _MemoryFacts | None, settling: bool, block: int, p: MemoryParams
) -> tuple[_Reading, str]:
    swap_limit = p.swap_in_threshold_pages_per_second
    some, _, swap_in = f.pressure
    rising = before is not None and any(map(_rose, f.pressure, before.pressure))
    # Eased: both avg10s fell and swap-in (a rate, not an average) is quiet.
    falling = (
        before is not None
        and all(map(_fell, f.pressure[:2], before.pressure[:2]))
        and not (swap_in is not None and swap_in >= swap_limit)
    )
    not_counted = _why_not(f.stalled, rising, settling, falling, f.ongoing)
    stall = not not_counted
    need = f.measured
    if stall:
        # How much more a stall wants is not measurable (MemAvailable is
        # gone): grow by a share that rises with the square of how far
        # pressure is over its threshold (senpai's rule), at most double.
        # Just over the threshold buys little; thrashing buys a lot at once.
        # (PSI full is at most some: some alone measures how far over.)
        severity = max((some or 0) / p.psi_some_threshold_percent, (swap_in or 0) / swap_limit, 1.0)
        grow = min(1.0, p.stall_grow_ratio * severity**2)
        need = max(need or 0, f.current + max(block, grow * f.current))
    row = _new(_Reading, (f.at, f.current, need, f.measured, stall, stall, f.urgent, some, ""))
    return row, not_counted


def _memory_why(f: _MemoryFacts, row: _Reading, not_counted: str, p: MemoryParams) -> str:
    some_limit, full_limit = p.psi_some_threshold_percent, p.psi_full_threshold_percent
    swap_limit = p.swap_in_threshold_pages_per_second
    some, full, swap_in = f.pressure
    parts = []
    if f.total is not None and f.available is not None:
        if f.available < f.headroom:
            parts.append(f"available {_fmt_bytes(f.available)} < headroom {_fmt_bytes(f.headroom)}")
        else:
            parts.append(f"available {_fmt_bytes(f.available)} of {_fmt_bytes(f.total)}")
    if some is not None and some >= some_limit:
        parts.append(f"psi some {some:.1f}% > {some_limit:g}%")
    if full is not None and full >= full_limit:
        parts.append(f"psi full {full:.1f}% > {full_limit:g}%")
    if swap_in is not None and swap_in >= swap_limit:
        parts.append(f"swap-in {swap_in:.0f}/s > {swap_limit:g}/s")
    if f.stalled and not row.stall:
        parts.append(f"({not_counted})")
    return ", ".join(parts)


class _Memo(Generic[_Facts]):
    """One resource's readings of the last history, kept for the next call.

    A sample's facts depend on the sample alone, and its reading only on the
    sample, the usable sample before it and whether a grow settles it (the
    latest rise of the online count within the history). So a history that
    slides (the oldest samples gone, new ones appended) keeps every reading
    but the new ones and the oldest few: the first lost its predecessor, and
    those after it a rise that left the history. The same holds for each
    reading's need held over the grow window, which the shrink side reads.
    Any other history is read afresh.
    """

    def __init__(
        self,
        facts: Callable[[Sample], _Facts | None],
        row: Callable[[_Facts, _Facts | None, bool], tuple[_Reading, str]],
        why: Callable[[_Facts, _Reading, str], str],
        bad: Callable[[Sample], tuple[str, ...]],
        p: _Common,
    ) -> None:
        self._facts_of: Callable[[Sample], _Facts | None] = facts
        self._row_of: Callable[[_Facts, _Facts | None, bool], tuple[_Reading, str]] = row
        self._why_of: Callable[[_Facts, _Reading, str], str] = why
        self._bad = bad
        self._settle = p.psi_settle_seconds
        self._grow = p.grow_window_seconds
        # The history read last, and each sample's facts (None: no usable current).
        self._timed: list[Sample] = []
        self._facts: list[_Facts | None] = []
        # One entry per sample with facts: its reading, the facts (for the next
        # sample's reading), why a stall did not count, the latest rise of the
        # online count up to it, whether that rise settled it, and its
        # measured need held over the grow window (see _sustained_peak).
        self._rows: list[_Reading] = []
        self._row_facts: list[_Facts] = []
        self._why_not: list[str] = []
        self._grew_at: list[float | None] = []
        self._settling: list[bool] = []
        self._held: list[float | None] = []
        # Where the online count changed, by reading number (the first
        # reading is number `_first`).
        self._first = 0
        self._changes: collections.deque[int] = collections.deque()

    def readings(self, timed: list[Sample]) -> _Readings:
        kept = self._kept(timed)
        if kept is None:
            self._timed, self._facts, self._rows, self._row_facts = [], [], [], []
            self._why_not, self._grew_at, self._settling, self._held = [], [], [], []
            self._first, self._changes = 0, collections.deque()
            kept = 0
        for s in itertools.islice(timed, kept, None):
            self._append(s)
        if not timed:
            return _Readings((), None, ())
        newest = None
        rows = self._rows.copy()
        if self._facts[-1] is not None:
            # Only the newest sample's reading carries the why (its reason).
            why = self._why_of(self._row_facts[-1], rows[-1], self._why_not[-1])
            newest = rows[-1] = rows[-1]._replace(why=why)
        changed = rows[self._changes[-1] - self._first].at if self._changes else None
        return _Readings(tuple(rows), newest, self._bad(timed[-1]), tuple(self._held), changed)

    def _kept(self, timed: list[Sample]) -> int | None:
        """How many of `timed` the last history ends with, or None when it
        does not slide into `timed`; forgets what left the history."""
        old = self._timed
        if not old or not timed:
            return None
        gone = 0
        while gone < len(old) and old[gone] is not timed[0]:
            gone += 1
        kept = len(old) - gone
        if kept == 0 or kept > len(timed):
            return None
        if not all(map(operator.is_, itertools.islice(old, gone, None), timed)):
            return None
        if gone:
            lost = gone - self._facts[:gone].count(None)  # readings among them
            del old[:gone], self._facts[:gone]
            if lost:
                del self._rows[:lost], self._row_facts[:lost], self._why_not[:lost]
                del self._grew_at[:lost], self._settling[:lost], self._held[:lost]
                self._first += lost
                # A change at the first reading is not one: nothing before it.
                while self._changes and self._changes[0] <= self._first:
                    self._changes.popleft()
                if self._rows:
                    self._refresh_front()
        return kept

    def _refresh_front(self) -> None:
        """Redo what the oldest samples' departure changed."""
        facts, grew_at, settling = self._row_facts, self._grew_at, self._settling
        rise: float | None = None
        redone = 0  # the last reading redone
        for i, f in enumerate(facts):
            if i and f.current > facts[i - 1].current:
                rise = f.at
            now_settling = rise is not None and f.at - rise < self._settle
            if i and rise == grew_at[i] and now_settling == settling[i]:
                break  # from here on, the same readings as before
            grew_at[i] = rise
            if not i or now_settling != settling[i]:
                before = facts[i - 1] if i else None
                self._rows[i], self._why_not[i] = self._row_of(f, before, now_settling)
                settling[i] = now_settling
                redone = i
        # The redone readings' held needs, and any reaching back to one (or to
        # the departed ones, which lie before it), are held again.
        edge = self._rows[redone].at
        for i, r in enumerate(self._rows):
            if i > redone and not r.at - self._grow < edge:
                break
            self._held[i] = self._hold(i)

    def _append(self, s: Sample) -> None:
        f = self._facts_of(s)
        self._timed.append(s)
        self._facts.append(f)
        if f is None:
            return
        rows = self._rows
        before, rise = None, None
        if rows:
            before, rise = self._row_facts[-1], self._grew_at[-1]
            if f.current != before.current:
                if f.current > before.current:
                    rise = f.at
                self._changes.append(self._first + len(rows))
        # avg10 still shows the stalls a grow answered for a while after it.
        now_settling = rise is not None and f.at - rise < self._settle
        row, not_counted = self._row_of(f, before, now_settling)
        rows.append(row)
        self._row_facts.append(f)
        self._why_not.append(not_counted)
        self._grew_at.append(rise)
        self._settling.append(now_settling)
        held = row.measured
        if held is not None and self._grow:
            held = self._hold(len(rows) - 1)
        self._held.append(held)

    def _hold(self, i: int) -> float | None:
        """Reading i's measured need, or a smaller one measured within the
        grow window before it (the latest of equal ones): what held that long."""
        rows = self._rows
        held = rows[i].measured
        if held is None:
            return None
        edge = rows[i].at - self._grow
        for j in range(i - 1, -1, -1):
            need = rows[j].measured
            if need is None:
                continue
            if not rows[j].at > edge:
                break
            held = min(held, need)
        return held


# --- the common core ----------------------------------------------------------

_AT = operator.attrgetter("at")


def _account(
    rows: Sequence[_Reading], limits: Limits, p: _Common, state: ResourceState
) -> ResourceState:
    """Earn credits below maximum, spend them above, for samples not yet counted."""
    span = limits.burst - limits.maximum
    cap = p.burst_credit_max_seconds * span
    credits = min(max(state.credits, 0.0), cap)
    last = state.accounted_at
    start = 0
    if rows and last is not None:
        if rows[-1].at < last:
            last = None  # the clock went back (a new boot): count afresh
        else:
            # Rows are oldest first: those already counted are a prefix.
            start = bisect.bisect_right(rows, last, key=_AT)
    for r in itertools.islice(rows, start, None):
        if last is not None:
            if r.at <= last:
                continue
            gap = r.at - last
            if r.current < limits.maximum:
                credits += p.burst_earn_ratio * (limits.maximum - r.current) * gap
            else:
                credits -= (r.current - limits.maximum) * gap
            credits = min(max(credits, 0.0), cap)
        last = r.at
    return ResourceState(credits=credits, accounted_at=last)


def _tail(rows: Sequence[_Reading], after: float) -> Sequence[_Reading]:
    """The rows later than `after`: a suffix, rows being oldest first."""
    return rows[bisect.bisect_right(rows, after, key=_AT) :]


def _shrink_blocker(readings: _Readings, since: float, now: float, p: _Common) -> str:
    """Why a shrink must wait, or "" when it may go ahead.

    `since` is the oldest sample with information: broken samples do not
    count toward covering the window.
    """
    window = p.shrink_window_seconds
    history = now - since
    if history < window:
        return f"only {history:.0f} s of usable history < {window:g} s window"
    changed = readings.changed
    if changed is not None and now - changed < p.shrink_interval_seconds:
        return f"last change {now - changed:.0f} s ago < {p.shrink_interval_seconds:g} s"
    # Quiet for one interval is enough: the window's peak need already holds
    # what the stalls asked for, and the interval is how long a step's own
    # effect takes to show in avg10.
    quiet = p.shrink_interval_seconds
    pressures = [r.psi_some for r in _tail(readings.rows, now - quiet) if r.psi_some is not None]
    if pressures and max(pressures) >= p.shrink_hold_psi_some_percent:
        return (
            f"psi some {max(pressures):.1f}% >= {p.shrink_hold_psi_some_percent:g}%"
            f" within {quiet:g} s"
        )
    return ""


def _sustained_peak(readings: _Readings, since: float) -> float:
    """The largest measured need after `since` that held for the grow window.

    That is the largest size the grow rule would have asked for: shrinking
    below it would be undone by the next such sample (a flap), while one
    noisy sample above it never bought a grow and does not hold a shrink.
    """
    start = bisect.bisect_right(readings.rows, since, key=_AT)
    held = [need for need in readings.held[start:] if need is not None]
    if not held:
        # The newest measure counts whatever its age.
        held = [next((need for need in reversed(readings.held) if need is not None), 0.0)]
    return max(0.0, *held)


def _decide_resource(
    kind: str,
    readings: _Readings,
    limits: Limits,
    unit: int,
    p: _Common,
    state: ResourceState,
    fmt: Callable[[float], str],
    fmt_credits: Callable[[float], str],
) -> tuple[Decision, ResourceState]:
    rows = readings.rows
    state = _account(rows, limits, p, state)
    span = limits.burst - limits.maximum
    low = _round_up(limits.minimum, unit)
    top = max(low, _round_down(limits.maximum, unit))
    excess = 0.0
    if span > 0 and state.credits > 0:
        # Burst only as far as the credits pay for burst_reserve_seconds: as
        # they run low the ceiling steps down, and at zero it is maximum.
        reserve = p.burst_reserve_seconds
        excess = span if reserve == 0 else min(span, state.credits / reserve)
    high = max(top, _round_down(limits.maximum + excess, unit))
    if span == 0:
        ceiling = f"maximum {fmt(top)}"
    elif high >= limits.burst:
        ceiling = f"burst {fmt(high)}"
    elif high > top:
        ceiling = f"{fmt(high)} by burst credits ({fmt_credits(state.credits)})"
    else:
        ceiling = (
            f"maximum {fmt(top)} (burst credits {fmt_credits(state.credits)},"
            f" +{fmt(unit)} needs {fmt_credits(unit * p.burst_reserve_seconds)})"
        )

    newest = readings.newest
    parts: list[str] = []
    if newest is None or newest.need is None:
        # No information: keep what is online, within the limits.
        current = newest.current if newest else (rows[-1].current if rows else low)
        desired = current
        what = ", ".join(readings.newest_bad) or "no signal"
        parts.append(f"no usable {kind} data in the newest sample ({what})")
        urgent = False
    else:
        now, current, urgent = newest.at, newest.current, newest.urgent
        # Rows are oldest first and the newest is the last: the grow window
        # is a suffix, and the newest counts whatever its age.
        oldest_known = next(r for r in rows if r.need is not None)
        recent = bisect.bisect_right(rows, now - p.grow_window_seconds, 0, len(rows) - 1, key=_AT)
        up = [(r, r.need) for r in rows[recent:] if r.need is not None]
        up_need = min(need for _, need in up)
        # A stall grows at once; utilisation and headroom must hold over the
        # grow window (HPA's scale-up stabilization).
        immediate = newest.sure and newest.need > up_need
        grow_to = _round_up(newest.need if immediate else up_need, unit)
        window = p.shrink_window_seconds
        # One sample alone is not "over target for a while": at start, wait
        # for a second before growing on utilisation or headroom.
        lone = oldest_known is newest and p.grow_window_seconds > 0 and not immediate
        if grow_to > current and lone:
            desired = current
            parts.append(f"{newest.why}; need {fmt(grow_to)}, waiting for a second sample")
        elif grow_to > current:
            desired = grow_to
            span_note = ""
            before = bisect.bisect_left(rows, up[0][0].at, key=_AT)  # rows before the window
            if not immediate and p.grow_window_seconds > 0 and before:
                span_note = f" for {now - rows[before - 1].at:.0f} s"
            parts.append(f"{newest.why}{span_note}: need {fmt(grow_to)}")
        elif (shrink_to := _round_up(_sustained_peak(readings, now - window), unit)) < current:
            blocker = _shrink_blocker(readings, oldest_known.at, now, p)
            if blocker:
                desired = current
                parts.append(f"{newest.why}; would shrink to {fmt(shrink_to)} but {blocker}")
            else:
                step = max(unit, _round_down(current * p.shrink_step_ratio, unit))
                desired = max(shrink_to, current - step)
                parts.append(
                    f"peak need {fmt(shrink_to)} over {window:g} s, step {fmt(step)}; {newest.why}"
                )
        else:
            desired = current
            parts.append(newest.why)
        if readings.newest_bad:
            parts.append(f"ignored {', '.join(readings.newest_bad)}")
    # Whole units (blocks) first, then the limits, which are whole units too.
    target = min(max(_round_up(desired, unit), low), high)
    if target > desired:
        parts.append(f"raised to minimum {fmt(low)}")
    elif target < desired:
        parts.append(f"capped at {ceiling}")
    if target > limits.maximum:
        left = state.credits / (target - limits.maximum)
        parts.append(
            f"bursting above maximum {fmt(limits.maximum)}:"
            f" credits {fmt_credits(state.credits)}, {left:.0f} s at this size"
        )
    head = (
        f"{kind} {fmt(current)}->{fmt(target)}"
        if target != current
        else f"{kind} hold {fmt(current)}"
    )
    if urgent:
        urgency = Urgency.HIGH
    elif target > current:
        urgency = Urgency.NORMAL
    else:
        urgency = Urgency.LOW
    decision = Decision(
        target=target,
        current=current,
        reason=f"{head}: {'; '.join(part for part in parts if part)}",
        urgency=urgency,
        bursting=target > limits.maximum,
    )
    return decision, state


# --- entry point --------------------------------------------------------------


class Policy:
    """decide() for a caller that calls it again and again on a sliding history.

    The result is exactly decide()'s (tests/test_policy.py checks it on random
    histories); what one sample says is worked out once, not once per call,
    which matters at a sensing period of a second and a window of minutes.
    It remembers only the samples of the last call's history, and forgets
    them all when the parameters or the block size change.
    """

    def __init__(self) -> None:
        self._key: tuple[PolicyParams, int] | None = None
        self._cpu: _Memo[_CpuFacts] | None = None
        self._memory: _Memo[_MemoryFacts] | None = None
        # The last call's samples when every one had a usable time, in order.
        self._ordered: list[Sample] = []

    def _timed(self, samples: Sequence[Sample]) -> list[Sample]:
        """The samples with a usable time, by time (ties in their given order)."""
        old, new = self._ordered, list(samples)
        gone = 0
        if old and new:
            while gone < len(old) and old[gone] is not new[0]:
                gone += 1
        kept = len(old) - gone
        if (
            0 < kept <= len(new)
            and all(map(operator.is_, itertools.islice(old, gone, None), new))
            and all(_amount(s.at) is not None for s in itertools.islice(new, kept, None))
            and all(map(operator.le, [s.at for s in new[kept - 1 :]], [s.at for s in new[kept:]]))
        ):
            # The daemon's case: the same samples, the oldest gone, newer ones
            # appended in order. They are in order already.
            self._ordered = new
            return new
        timed = sorted((s for s in new if _amount(s.at) is not None), key=_AT)
        in_order = len(timed) == len(new) and all(map(operator.is_, timed, new))
        self._ordered = new if in_order else []
        return timed

    def _memos(
        self, params: PolicyParams, block: int
    ) -> tuple[_Memo[_CpuFacts], _Memo[_MemoryFacts]]:
        if (
            self._cpu is None
            or self._memory is None
            or self._key is None
            or self._key[0] is not params
            or self._key[1] != block
        ):
            cpu, memory = params.cpu, params.memory
            # partial, not lambda: called for every sample, one frame fewer.
            self._cpu = _Memo(
                functools.partial(_cpu_facts, p=cpu),
                functools.partial(_cpu_row, p=cpu),
                functools.partial(_cpu_why, p=cpu),
                _cpu_bad,
                cpu,
            )
            self._memory = _Memo(
                functools.partial(_memory_facts, block=block, p=memory),
                functools.partial(_memory_row, block=block, p=memory),
                functools.partial(_memory_why, p=memory),
                _memory_bad,
                memory,
            )
            self._key = (params, block)
        return self._cpu, self._memory

    def decide(
        self,
        samples: Sequence[Sample],
        cpu_limits: Limits,
        memory_limits: Limits,
        block_size: int,
        params: PolicyParams,
        state: PolicyState,
    ) -> tuple[Decisions, PolicyState]:
        """As decide() (its docstring says what this returns)."""
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
            raise ValueError(f"block_size: must be a positive integer, got {block_size!r}")
        cpu_memo, memory_memo = self._memos(params, block_size)
        timed = self._timed(samples)
        if timed:
            since = timed[-1].at - params.history_seconds
            timed = timed[bisect.bisect_left(timed, since, key=_AT) :]
        cpu = cpu_memo.readings(timed)
        memory = memory_memo.readings(timed)
        if not samples:
            cpu = memory = _Readings((), None, ("no samples",))
        elif _amount(samples[-1].at) is None:
            # A newest sample without a usable time is no information: hold.
            bad = (_bad("at", samples[-1].at),)
            cpu = _Readings(cpu.rows, None, bad)
            memory = _Readings(memory.rows, None, bad)
        cpu_decision, cpu_state = _decide_resource(
            "cpu", cpu, cpu_limits, 1, params.cpu, state.cpu, _fmt_cpus, _fmt_cpu_seconds
        )
        memory_decision, memory_state = _decide_resource(
            "memory",
            memory,
            memory_limits,
            block_size,
            params.memory,
            state.memory,
            _fmt_bytes,
            _fmt_byte_seconds,
        )
        return (
            Decisions(cpu=cpu_decision, memory=memory_decision),
            PolicyState(cpu=cpu_state, memory=memory_state),
        )


def decide(
    samples: Sequence[Sample],
    cpu_limits: Limits,
    memory_limits: Limits,
    block_size: int,
    params: PolicyParams,
    state: PolicyState,
) -> tuple[Decisions, PolicyState]:
    """Decide CPU and memory targets from `samples` (oldest first, newest last).

    Reads only the last `params.history_seconds` of samples. A broken sample
    field is ignored and named in the reason; when the newest sample says
    nothing about a resource, that resource holds (within its limits).
    Raises ValueError only for a block_size that is not a positive integer.
    """
    return Policy().decide(samples, cpu_limits, memory_limits, block_size, params, state)
