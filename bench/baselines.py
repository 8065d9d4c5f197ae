"""Baseline sizing policies, written from their published algorithms, one resource each.

Every controller sees the same `Observation` per second (what a guest can
measure; bench/policy_quality.py derives it from demand with one signal model)
and returns the capacity it wants next, in whole units (CPUs, or bytes in
whole memory blocks) within the same `Bounds` as the agent's policy.

- `static_peak`, `static_p95`: oracles that know the whole trace's demand.
- `VpaLike`: Kubernetes VPA's recommender: P90 of a decaying histogram of
  usage (half-life 24 h in VPA; the benchmark scales it to the trace) plus a
  15 % safety margin, recomputed every minute.
- `HpaLike`: Kubernetes HPA's replica formula on whole units:
  desired = ceil(current * utilisation / target), 10 % tolerance, evaluated
  every 15 s, 5 min scale-down stabilization, default scale-up rate limit.
- `MomLike`: oVirt MOM's balloon rule: toward used + 20 % free, at most 5 %
  of the current size per 10 s step.
- `SenpaiLike`: facebookincubator/senpai: tighten 1 % per 6 s while PSI stall
  time is under 10 ms per interval, loosen by (err / 20)^2 above it.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

__all__ = [
    "Bounds",
    "Controller",
    "HpaLike",
    "MomLike",
    "Observation",
    "SenpaiLike",
    "StaticController",
    "VpaLike",
    "static_p95",
    "static_peak",
]

# Whole-unit rounding must not add a unit for float error (4.000000000001).
_EPSILON = 1e-9


@dataclass(frozen=True)
class Observation:
    """One second of what the guest can measure about one resource."""

    at: float  # seconds, end of the period
    capacity: int  # CPUs online, or bytes online
    usage: float  # busy CPUs, or used bytes: never above capacity
    psi_some: float  # PSI some avg10, percent
    psi_full: float  # PSI full avg10, percent
    psi_some_total_us: float  # PSI some total=, cumulative stall microseconds
    run_queue: int = 0  # runnable tasks (procs_running); 0 for memory


@dataclass(frozen=True)
class Bounds:
    """min/max of one resource in its own unit (CPUs, bytes) and its granule."""

    minimum: int
    maximum: int
    unit: int  # 1 CPU, or the memory block size

    def __post_init__(self) -> None:
        if self.unit <= 0:
            raise ValueError(f"unit: must be positive, got {self.unit}")
        if not 0 < self.minimum <= self.maximum:
            raise ValueError(f"bounds: need 0 < minimum {self.minimum} <= maximum {self.maximum}")

    @property
    def low(self) -> int:
        return math.ceil(self.minimum / self.unit - _EPSILON) * self.unit

    @property
    def high(self) -> int:
        return max(self.low, self.maximum // self.unit * self.unit)

    def clamp(self, value: float) -> int:
        """Round up to whole units, then keep within [minimum, maximum]."""
        whole = math.ceil(value / self.unit - _EPSILON) * self.unit
        return min(max(whole, self.low), self.high)


class Controller(Protocol):
    name: str

    def step(self, obs: Observation) -> int:
        """The capacity wanted from the next second on, within the bounds."""
        ...


# --- static oracles -----------------------------------------------------------


@dataclass
class StaticController:
    name: str
    capacity: int

    def step(self, obs: Observation) -> int:
        return self.capacity


def static_peak(demand: Sequence[float], bounds: Bounds) -> StaticController:
    """Sized once for the whole trace's peak demand: never short inside the bounds."""
    return StaticController("static-peak", bounds.clamp(max(demand)))


def static_p95(demand: Sequence[float], bounds: Bounds) -> StaticController:
    """Sized once for the 95th percentile (nearest rank) of the whole trace's demand."""
    ordered = sorted(demand)
    rank = max(1, math.ceil(0.95 * len(ordered)))
    return StaticController("static-p95", bounds.clamp(ordered[rank - 1]))


# --- VPA ----------------------------------------------------------------------


class DecayingHistogram:
    """VPA's histogram: bucket sizes grow geometrically, sample weights decay.

    Bucket i spans [first * (r^i - 1) / (r - 1), first * (r^(i+1) - 1) / (r - 1)).
    A sample's weight is 2^((at - reference) / half_life): newer samples weigh
    more, which is the same as older ones halving every half-life. The
    reference moves forward (all weights rescaled) before weights overflow.
    """

    def __init__(self, first_bucket: float, ratio: float, half_life: float) -> None:
        if first_bucket <= 0 or ratio <= 1 or half_life <= 0:
            raise ValueError(
                f"histogram: need first_bucket > 0 ({first_bucket}), ratio > 1 ({ratio}),"
                f" half_life > 0 ({half_life})"
            )
        self.first = first_bucket
        self.ratio = ratio
        self.half_life = half_life
        self.reference: float | None = None
        self.weights: dict[int, float] = {}

    def bucket(self, value: float) -> int:
        if value <= 0:
            return 0
        return int(math.log(1 + value * (self.ratio - 1) / self.first, self.ratio))

    def bucket_start(self, index: int) -> float:
        return self.first * (self.ratio**index - 1) / (self.ratio - 1)

    def add(self, value: float, at: float) -> None:
        if self.reference is None:
            self.reference = at
        exponent = (at - self.reference) / self.half_life
        if exponent > 100:
            scale = 2.0**-exponent
            self.weights = {i: w * scale for i, w in self.weights.items()}
            self.reference, exponent = at, 0.0
        index = self.bucket(value)
        self.weights[index] = self.weights.get(index, 0.0) + 2.0**exponent

    def percentile(self, p: float) -> float:
        """The end of the bucket where the cumulative weight reaches p (as VPA returns)."""
        if not self.weights:
            return 0.0
        total = sum(self.weights.values())
        seen = 0.0
        for index in sorted(self.weights):
            seen += self.weights[index]
            if seen >= p * total:
                return self.bucket_start(index + 1)
        return self.bucket_start(max(self.weights) + 1)


class VpaLike:
    """VPA's target: P90 of decaying usage histogram * 1.15, applied every minute.

    Simplified from VPA: every usage sample counts with weight 1 (VPA weighs
    CPU samples by the request), memory uses samples rather than per-interval
    peaks, and the recommendation is applied in place whenever it changes by
    a whole unit (no eviction, no lower/upper bound band).
    """

    def __init__(
        self,
        bounds: Bounds,
        initial: int,
        half_life: float,
        first_bucket: float,
        percentile: float = 0.9,
        margin: float = 0.15,
        interval: float = 60.0,
        ratio: float = 1.05,
    ) -> None:
        self.name = "vpa-like"
        self.bounds = bounds
        self.capacity = bounds.clamp(initial)
        self.histogram = DecayingHistogram(first_bucket, ratio, half_life)
        self.p = percentile
        self.margin = margin
        self.interval = interval
        self.next_at: float | None = None
        self.recommendation: float | None = None

    def step(self, obs: Observation) -> int:
        self.histogram.add(obs.usage, obs.at)
        if self.next_at is None:
            self.next_at = obs.at + self.interval
        elif obs.at >= self.next_at:
            self.next_at += self.interval
            self.recommendation = self.histogram.percentile(self.p) * (1 + self.margin)
            self.capacity = self.bounds.clamp(self.recommendation)
        return self.capacity


# --- HPA ----------------------------------------------------------------------


class HpaLike:
    """HPA's algorithm with whole units (CPUs, or memory blocks) as replicas.

    Every `sync` seconds: utilisation = mean usage since the last sync /
    capacity; ratio = utilisation / target; inside the tolerance nothing
    changes, else desired = ceil(current * ratio). Scale-up is immediate
    (window 0) but at most max(double, +4 units) per sync (HPA's default
    scale-up policies); scale-down takes the largest recommendation of the
    last `down_window` seconds (stabilization).
    """

    def __init__(
        self,
        bounds: Bounds,
        initial: int,
        target: float,
        tolerance: float = 0.1,
        sync: float = 15.0,
        down_window: float = 300.0,
    ) -> None:
        if not 0 < target <= 1:
            raise ValueError(f"target: must be in (0, 1], got {target}")
        self.name = "hpa-like"
        self.bounds = bounds
        self.capacity = bounds.clamp(initial)
        self.target = target
        self.tolerance = tolerance
        self.sync = sync
        self.down_window = down_window
        self.usage: list[float] = []
        self.next_at: float | None = None
        self.recommendations: deque[tuple[float, int]] = deque()

    def step(self, obs: Observation) -> int:
        self.usage.append(obs.usage)
        if self.next_at is None:
            self.next_at = obs.at + self.sync
            return self.capacity
        if obs.at < self.next_at:
            return self.capacity
        self.next_at += self.sync
        unit = self.bounds.unit
        current = self.capacity // unit
        ratio = sum(self.usage) / len(self.usage) / self.capacity / self.target
        self.usage = []
        if abs(ratio - 1) <= self.tolerance:
            desired = current
        else:
            desired = math.ceil(current * ratio - _EPSILON)
        while self.recommendations and self.recommendations[0][0] <= obs.at - self.down_window:
            self.recommendations.popleft()
        self.recommendations.append((obs.at, desired))
        if desired > current:
            desired = min(desired, max(2 * current, current + 4))
        elif desired < current:
            desired = min(current, max(r for _, r in self.recommendations))
        self.capacity = self.bounds.clamp(desired * unit)
        return self.capacity


# --- MOM ----------------------------------------------------------------------


class MomLike:
    """oVirt MOM's balloon rule, both ways, every `interval` seconds.

    Target = mean usage over the step + `free` of the current size (MOM's
    min_guest_free_percent, with the host at its pressure threshold);
    move toward it by at most `max_change` of the current size, and skip
    changes under `min_change` (MOM's min_balloon_change_percent). The size
    is kept as a float; capacity is that size rounded up to whole units.
    """

    def __init__(
        self,
        bounds: Bounds,
        initial: int,
        free: float = 0.20,
        max_change: float = 0.05,
        min_change: float = 0.0025,
        interval: float = 10.0,
    ) -> None:
        self.name = "mom-like"
        self.bounds = bounds
        self.size = float(bounds.clamp(initial))
        self.free = free
        self.max_change = max_change
        self.min_change = min_change
        self.interval = interval
        self.usage: list[float] = []
        self.next_at: float | None = None

    def step(self, obs: Observation) -> int:
        self.usage.append(obs.usage)
        if self.next_at is None:
            self.next_at = obs.at + self.interval
        elif obs.at >= self.next_at:
            self.next_at += self.interval
            used = sum(self.usage) / len(self.usage)
            self.usage = []
            wanted = used + self.free * self.size
            lowest = self.size * (1 - self.max_change)
            highest = self.size * (1 + self.max_change)
            new = min(max(wanted, lowest), highest)
            new = min(max(new, float(self.bounds.low)), float(self.bounds.high))
            if abs(new - self.size) > self.min_change * self.size:
                self.size = new
        return self.bounds.clamp(self.size)


# --- senpai -------------------------------------------------------------------


class SenpaiLike:
    """senpai's tick, once per second, on a limit kept as a float.

    The integral of PSI some stall time since the last adjustment is compared
    with `pressure_us`: above it, loosen by min((err / coeff_backoff)^2, 1) *
    max_backoff at once; otherwise, every `interval` ticks, tighten by
    min((err / coeff_probe)^2, 1) * max_probe, err = pressure / integral.
    Senpai drives memory.high; here the limit is the VM's capacity, rounded up
    to whole units, for memory and (with the same rule on CPU PSI) for CPUs.
    """

    def __init__(
        self,
        bounds: Bounds,
        initial: int,
        interval: int = 6,
        pressure_us: float = 10_000.0,
        max_probe: float = 0.01,
        max_backoff: float = 1.0,
        coeff_probe: float = 10.0,
        coeff_backoff: float = 20.0,
    ) -> None:
        self.name = "senpai-like"
        self.bounds = bounds
        self.limit = float(bounds.clamp(initial))
        self.interval = interval
        self.pressure = pressure_us
        self.max_probe = max_probe
        self.max_backoff = max_backoff
        self.coeff_probe = coeff_probe
        self.coeff_backoff = coeff_backoff
        self.last_total: float | None = None
        self.integral = 0.0
        self.grace = interval

    def step(self, obs: Observation) -> int:
        if self.last_total is None:
            self.last_total = obs.psi_some_total_us
        self.integral += obs.psi_some_total_us - self.last_total
        self.last_total = obs.psi_some_total_us
        if self.integral > self.pressure:
            err = self.integral / self.pressure
            self._adjust(min((err / self.coeff_backoff) ** 2, 1.0) * self.max_backoff)
        elif self.grace:
            self.grace -= 1
        else:
            err = self.pressure / max(self.integral, 1.0)
            self._adjust(-min((err / self.coeff_probe) ** 2, 1.0) * self.max_probe)
        return self.bounds.clamp(self.limit)

    def _adjust(self, factor: float) -> None:
        limit = self.limit * (1 + factor)
        self.limit = min(max(limit, float(self.bounds.low)), float(self.bounds.high))
        self.integral = 0.0
        self.grace = self.interval - 1
