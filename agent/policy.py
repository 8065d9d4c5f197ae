"""The sizing policy: how many CPUs and how much memory the guest should have.

Pure: `decide()` reads the recent samples, the limits, the parameters and the
previous `PolicyState`, and returns one `Decision` per resource and the next
state. No I/O, no clock (time is `Sample.at`), no module-level state.

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

import enum
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, NamedTuple, Protocol

__all__ = [
    "CpuParams",
    "Decision",
    "Decisions",
    "Limits",
    "MemoryParams",
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

    A NamedTuple, not a dataclass: decide() builds hundreds per call.
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


def _settled(
    ats: Sequence[float],
    currents: Sequence[int],
    stalled: Sequence[bool],
    rising: Sequence[bool],
    falling: Sequence[bool],
    ongoing: Sequence[bool],
    settle_seconds: float,
) -> list[str]:
    """Which stalls count ("" where one does, else why not): avg10 lags, so
    right after a grow it still shows the stalls the grow answered; only a
    rising avg10 is news then. Later, a falling avg10 is a stall that has
    eased (avg10 takes ~20 s to decay from a spike) and does not grow the
    guest either, unless the period itself still stalled over the threshold
    (`ongoing`, from the totals): a shortage nobody answered keeps counting
    while its avg10 drifts down."""
    why_not = []
    grew_at: float | None = None
    for i, at in enumerate(ats):
        if i and currents[i] > currents[i - 1]:
            grew_at = at
        settling = grew_at is not None and at - grew_at < settle_seconds
        if not stalled[i]:
            why_not.append("no stall")
        elif rising[i]:
            why_not.append("")
        elif settling:
            why_not.append("settling after grow")
        elif falling[i] and not ongoing[i]:
            why_not.append("easing")
        else:
            why_not.append("")
    return why_not


def _at_least(value: float, threshold: float) -> bool:
    """A percentage known and at or over the threshold (NaN and junk are unknown)."""
    number = _percent(value)
    return number is not None and number >= threshold


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


def _cpu_bad(s: Sample) -> tuple[str, ...]:
    checks = (
        ("online_cpus", _whole(s.online_cpus, 1)),
        ("cpu_busy", _amount(s.cpu_busy)),
        ("run_queue", _whole(s.run_queue)),
        ("cpu_some", _percent(s.cpu_some)),
    )
    return tuple(_bad(name, getattr(s, name)) for name, value in checks if value is None)


def _cpu_readings(samples: Sequence[Sample], p: CpuParams) -> _Readings:
    target = p.target_utilisation_ratio
    threshold = p.psi_some_threshold_percent
    last = samples[-1] if samples else None
    parsed = []
    for s in samples:
        online = _whole(s.online_cpus, 1)
        if online is not None:
            busy, psi = _amount(s.cpu_busy), _percent(s.cpu_some)
            parsed.append((s, online, busy, _whole(s.run_queue), psi))
    why_not = _settled(
        [row[0].at for row in parsed],
        [row[1] for row in parsed],
        [row[4] is not None and row[4] >= threshold for row in parsed],
        [i > 0 and _rose(row[4], parsed[i - 1][4]) for i, row in enumerate(parsed)],
        [i > 0 and _fell(row[4], parsed[i - 1][4]) for i, row in enumerate(parsed)],
        [_at_least(row[0].cpu_some_now, threshold) for row in parsed],
        p.psi_settle_seconds,
    )
    rows = []
    for (s, online, busy, run_queue, psi), not_counted in zip(parsed, why_not, strict=True):
        stall = not not_counted
        util_need = _ceil(busy / target) if busy is not None else None
        need: float | None = util_need
        # Every CPU busy all period and more tasks runnable than CPUs: tasks
        # are waiting now, a measurement, not noise; avg10 shows it a second late.
        saturated = (
            busy is not None
            and run_queue is not None
            and busy >= _SATURATED * online
            and run_queue > online
        )
        if stall:
            # More than we had, and room for every task the run queue holds.
            need = max(online + 1, (util_need or 0) + 1, _ceil((run_queue or 0) / target))
        elif saturated:
            need = max(util_need or 0, _ceil((run_queue or 0) / target))
        parts = []
        if s is last and busy is not None:
            part = f"busy {busy:.1f}/{online} ({busy / online:.0%})"
            parts.append(part + (f" > {target:.0%}" if busy > target * online else ""))
        if s is last and psi is not None and psi >= threshold:
            settling = "" if stall else f" ({not_counted})"
            parts.append(f"psi some {psi:.1f}% > {threshold:g}%{settling}")
        if s is last and (stall or saturated) and run_queue is not None and run_queue > online:
            parts.append(f"run queue {run_queue}")
        urgent = psi is not None and psi >= threshold
        sure = stall or saturated
        rows.append(_Reading(s.at, online, need, need, stall, sure, urgent, psi, ", ".join(parts)))
    newest = rows[-1] if parsed and parsed[-1][0] is last else None
    return _Readings(tuple(rows), newest, _cpu_bad(last) if last is not None else ())


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


def _memory_readings(samples: Sequence[Sample], block: int, p: MemoryParams) -> _Readings:
    share = p.headroom_percent / 100
    some_limit = p.psi_some_threshold_percent
    full_limit = p.psi_full_threshold_percent
    swap_limit = p.swap_in_threshold_pages_per_second
    last = samples[-1] if samples else None
    parsed: list[tuple[Sample, int, int | None, int | None, _Pressure]] = []
    for s in samples:
        total = _whole(s.memory_total, 1)
        available = _whole(s.memory_available)
        if total is not None and available is not None and available > total:
            available = None
        current = _whole(s.memory_online) or (
            _round_up(total, block) if total is not None else None
        )
        if current is not None:
            pressure = (_percent(s.memory_some), _percent(s.memory_full), _amount(s.swap_in_per_s))
            parsed.append((s, current, total, available, pressure))

    def stalled(pressure: _Pressure) -> bool:
        some, full, swap_in = pressure
        return (
            (some is not None and some >= some_limit)
            or (full is not None and full >= full_limit)
            or (swap_in is not None and swap_in >= swap_limit)
        )

    why_not = _settled(
        [row[0].at for row in parsed],
        [row[1] for row in parsed],
        [stalled(row[4]) for row in parsed],
        [i > 0 and any(map(_rose, row[4], parsed[i - 1][4])) for i, row in enumerate(parsed)],
        # Eased: both avg10s fell and swap-in (a rate, not an average) is quiet.
        [
            i > 0
            and all(map(_fell, row[4][:2], parsed[i - 1][4][:2]))
            and not (row[4][2] is not None and row[4][2] >= swap_limit)
            for i, row in enumerate(parsed)
        ],
        [
            _at_least(row[0].memory_some_now, some_limit)
            or _at_least(row[0].memory_full_now, full_limit)
            for row in parsed
        ],
        p.psi_settle_seconds,
    )
    rows = []
    for (s, current, total, available, pressure), not_counted in zip(parsed, why_not, strict=True):
        stall = not not_counted
        some, full, swap_in = pressure
        need: float | None = None
        urgent = (some is not None and some >= some_limit) or (
            full is not None and full >= full_limit
        )
        headroom = 0.0
        if total is not None and available is not None:
            used = total - available
            # Blocks hold more than MemTotal shows (kernel, memmap): keep that.
            overhead = max(0, current - total)
            # Headroom counts against the total the target will give:
            # target - overhead - used >= share * (target - overhead).
            need = overhead + max(used + p.headroom_min_bytes, used / (1 - share))
            headroom = max(p.headroom_min_bytes, share * total)
            urgent = urgent or available < p.urgent_headroom_ratio * headroom
        measured = need
        if stall:
            # How much more a stall wants is not measurable (MemAvailable is
            # gone): grow by a share that rises with the square of how far
            # pressure is over its threshold (senpai's rule), at most double.
            # Just over the threshold buys little; thrashing buys a lot at once.
            # (PSI full is at most some: some alone measures how far over.)
            severity = max((some or 0) / some_limit, (swap_in or 0) / swap_limit, 1.0)
            grow = min(1.0, p.stall_grow_ratio * severity**2)
            need = max(need or 0, current + max(block, grow * current))
        parts = []
        if s is last and total is not None and available is not None:
            if available < headroom:
                parts.append(f"available {_fmt_bytes(available)} < headroom {_fmt_bytes(headroom)}")
            else:
                parts.append(f"available {_fmt_bytes(available)} of {_fmt_bytes(total)}")
        if s is last and some is not None and some >= some_limit:
            parts.append(f"psi some {some:.1f}% > {some_limit:g}%")
        if s is last and full is not None and full >= full_limit:
            parts.append(f"psi full {full:.1f}% > {full_limit:g}%")
        if s is last and swap_in is not None and swap_in >= swap_limit:
            parts.append(f"swap-in {swap_in:.0f}/s > {swap_limit:g}/s")
        if s is last and stalled(pressure) and not stall:
            parts.append(f"({not_counted})")
        rows.append(
            _Reading(s.at, current, need, measured, stall, stall, urgent, some, ", ".join(parts))
        )
    newest = rows[-1] if parsed and parsed[-1][0] is last else None
    return _Readings(tuple(rows), newest, _memory_bad(last) if last is not None else ())


# --- the common core ----------------------------------------------------------


def _account(
    rows: Sequence[_Reading], limits: Limits, p: _Common, state: ResourceState
) -> ResourceState:
    """Earn credits below maximum, spend them above, for samples not yet counted."""
    span = limits.burst - limits.maximum
    cap = p.burst_credit_max_seconds * span
    credits = min(max(state.credits, 0.0), cap)
    last = state.accounted_at
    if rows and last is not None and rows[-1].at < last:
        last = None  # the clock went back (a new boot): count afresh
    for r in rows:
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


def _shrink_blocker(rows: Sequence[_Reading], since: float, now: float, p: _Common) -> str:
    """Why a shrink must wait, or "" when it may go ahead.

    `since` is the oldest sample with information: broken samples do not
    count toward covering the window.
    """
    window = p.shrink_window_seconds
    history = now - since
    if history < window:
        return f"only {history:.0f} s of usable history < {window:g} s window"
    changed = next(
        (rows[i].at for i in range(len(rows) - 1, 0, -1) if rows[i].current != rows[i - 1].current),
        None,
    )
    if changed is not None and now - changed < p.shrink_interval_seconds:
        return f"last change {now - changed:.0f} s ago < {p.shrink_interval_seconds:g} s"
    # Quiet for one interval is enough: the window's peak need already holds
    # what the stalls asked for, and the interval is how long a step's own
    # effect takes to show in avg10.
    quiet = p.shrink_interval_seconds
    pressures = [r.psi_some for r in rows if r.at > now - quiet and r.psi_some is not None]
    if pressures and max(pressures) >= p.shrink_hold_psi_some_percent:
        return (
            f"psi some {max(pressures):.1f}% >= {p.shrink_hold_psi_some_percent:g}%"
            f" within {quiet:g} s"
        )
    return ""


def _sustained_peak(rows: Sequence[_Reading], since: float, grow_window: float) -> float:
    """The largest measured need after `since` that held for the grow window.

    That is the largest size the grow rule would have asked for: shrinking
    below it would be undone by the next such sample (a flap), while one
    noisy sample above it never bought a grow and does not hold a shrink.
    """
    measured = [(r.at, r.measured) for r in rows if r.measured is not None]
    peak = 0.0
    for i, (at, need) in enumerate(measured):
        if at <= since and i < len(measured) - 1:
            continue
        held, j = need, i - 1
        while j >= 0 and measured[j][0] > at - grow_window:
            held = min(held, measured[j][1])
            j -= 1
        peak = max(peak, held)
    return peak


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
        known = [(r, r.need) for r in rows if r.need is not None]
        up = [(r, need) for r, need in known if r is newest or r.at > now - p.grow_window_seconds]
        up_need = min(need for _, need in up)
        # A stall grows at once; utilisation and headroom must hold over the
        # grow window (HPA's scale-up stabilization).
        immediate = newest.sure and newest.need > up_need
        grow_to = _round_up(newest.need if immediate else up_need, unit)
        window = p.shrink_window_seconds
        shrink_to = _round_up(_sustained_peak(rows, now - window, p.grow_window_seconds), unit)
        # One sample alone is not "over target for a while": at start, wait
        # for a second before growing on utilisation or headroom.
        lone = len(known) == 1 and p.grow_window_seconds > 0 and not immediate
        if grow_to > current and lone:
            desired = current
            parts.append(f"{newest.why}; need {fmt(grow_to)}, waiting for a second sample")
        elif grow_to > current:
            desired = grow_to
            span_note = ""
            before = [r.at for r in rows if r.at < up[0][0].at]
            if not immediate and p.grow_window_seconds > 0 and before:
                span_note = f" for {now - before[-1]:.0f} s"
            parts.append(f"{newest.why}{span_note}: need {fmt(grow_to)}")
        elif shrink_to < current:
            blocker = _shrink_blocker(rows, known[0][0].at, now, p)
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
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"block_size: must be a positive integer, got {block_size!r}")
    timed = sorted((s for s in samples if _amount(s.at) is not None), key=lambda s: s.at)
    if timed:
        since = timed[-1].at - params.history_seconds
        timed = [s for s in timed if s.at >= since]
    cpu = _cpu_readings(timed, params.cpu)
    memory = _memory_readings(timed, block_size, params.memory)
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
