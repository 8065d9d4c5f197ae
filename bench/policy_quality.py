"""Policy quality: replay load traces through agent/policy.py and through baselines.

    python -m bench.policy_quality [--quick] [--out DIR] [--trace NAME ...]

Writes DIR/policy-quality.md (a table per trace and resource) and
DIR/policy-<trace>.png (demand against each policy's allocation). DIR is
docs/bench by default, .cache/bench with --quick (a few seconds on a tiny
input, so a quick run never overwrites the committed report).

Every policy sees the same per-second signals, derived from the trace's
demand and the capacity the policy chose by one signal model (`SignalModel`);
a decision is in force after the sensing second plus an actuation delay
(CPU_DELAY_SECONDS, MEMORY_DELAY_SECONDS), the same for every policy.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import itertools
import math
import platform
import statistics
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from agent.policy import (
    CpuParams,
    Decision,
    Limits,
    MemoryParams,
    PolicyParams,
    PolicyState,
    Sample,
    decide,
)
from bench import traces
from bench.baselines import (
    Bounds,
    Controller,
    HpaLike,
    MomLike,
    Observation,
    SenpaiLike,
    VpaLike,
    static_p95,
    static_peak,
)
from bench.traces import GiB, MiB, Spike, Trace

BLOCK = 128 * MiB
CPU_BOUNDS = Bounds(minimum=1, maximum=traces.VM_CPUS, unit=1)
MEMORY_BOUNDS = Bounds(minimum=1 * GiB, maximum=traces.VM_MEMORY, unit=BLOCK)
# Where every dynamic policy starts.
INITIAL_CPUS = 2
INITIAL_MEMORY = 4 * GiB
# A decision takes this long to be online, on top of the one-second
# sensing period: the broker's round trip and a hot-plug for a CPU; the
# hot-add and onlining of blocks for memory ("a second or two", docs/policy.md).
# The same for shrinks and for every policy.
CPU_DELAY_SECONDS = 1
MEMORY_DELAY_SECONDS = 2
# Not scored: every dynamic policy first grows from the common start to the
# trace's level, a cold start that says nothing about steady sizing.
WARMUP_SECONDS = 60

# A leaner point on the same policy, reported next to the defaults to show
# what the parameters trade; never applied to the agent (the signal model has
# no page cache and charges nothing per resize, the costs these savings carry
# on a real guest). Every change is in the lean direction
# (tests/test_bench_policy.py checks it against the defaults): CPUs held for
# half the window and given back in one step; memory with 5 % / 256 MiB
# headroom, a 45 s window and steps of half.
LEAN = PolicyParams(
    cpu=CpuParams(shrink_window_seconds=30.0, shrink_step_ratio=1.0),
    memory=MemoryParams(
        headroom_min_bytes=256 * MiB,
        headroom_percent=5.0,
        shrink_window_seconds=45.0,
        shrink_step_ratio=0.5,
    ),
)
PROFILES = {"vmtide": PolicyParams(), "vmtide-lean": LEAN}

# Hand-written, for agent/policy.py and its defaults as of this benchmark's
# commit: re-read it against the tables after any change to the policy, the
# defaults, LEAN or the traces. "Side run" figures come from small scripts
# over the same traces, replay() and score(), not from this report's run.
FINDINGS = (
    "Hand-written for `agent/policy.py` and its defaults as of this benchmark's commit."
    ' "Side run" figures come from small scripts over the same traces, replay and scoring;'
    " they are not in the tables. Per-second averages on the envelopes are over / 3,540"
    " scored seconds.",
    "",
    "- **The target cannot be met as stated.** static-peak, sized in advance for the whole"
    " trace's peak, is short only where demand exceeds the 8-CPU maximum that binds every"
    " policy (7, 35 and 1 CPU-s on google2019, azure_v2 and spike CPU; 0 on the other 13"
    ' pairs). "No more under than the best baseline" thus asks a policy that reacts to what'
    " it measures never to be short, yet a rise faster than its headroom is seen after a"
    " sensing second and served 1 s (CPU) or 2 s (memory) later. The other half of the"
    " target is held by the opposite extreme: every baseline with less over than vmtide on a"
    " pair also has more under there, 4 to 72 times as much for the dynamic ones and 1.6 to"
    " 62 times for static-p95 (on leak's CPU every policy but senpai-like ties at 2 CPUs and"
    ' zero under). The informative columns are "beaten by" and "dyn.".',
    "- **Where vmtide wins.** No baseline beats it on both over and under on any of the 16"
    " pairs. It covers every marked spike, in 1-2 s on average (at most 3 s) for CPU and 2-7"
    " s (at most 7 s) for memory, where vpa-like, hpa-like and mom-like cover none of the"
    " spike trace's spikes and mom-like none of square's CPU highs. Its under-provisioning"
    " is no more than vpa-like's, hpa-like's or mom-like's on any pair (ties at zero on leak"
    " and ramp's memory). Against senpai-like, the only baseline as quick, it has less over"
    " on all 16 pairs and no more under on 10. On memory it has less over than static-peak"
    " and every dynamic baseline on six of the eight traces (not square or spike), and than"
    " every baseline on step, ramp and leak; the target is met on ramp's and leak's memory.",
    "- **Where it loses, and to whom.** Less over: mom-like on every CPU pair but leak's"
    " (with 4 to 72 times the under, and spikes left uncovered on alibaba2018, azure_v2,"
    " square and spike); static-p95 on the three envelopes' memory; mom-like on square's and"
    " spike's memory; vpa-like and hpa-like on spike's CPU and memory, where they never"
    " cover a spike. Less under: static-peak on every pair where vmtide is short at all;"
    " senpai-like on alibaba2018, square and spike CPU and on step, square and spike memory,"
    " at 1.6 to 2.5 times the over; static-p95 on square and spike CPU and on step, square"
    " and spike memory.",
    "- **CPU: where the over-provisioning comes from.** On the three envelopes vmtide holds"
    " about 2.1 CPUs above demand on average. A side run on the smooth envelopes alone (no"
    " bursts, no noise) leaves 0.9-1.1 of it: 0.8-0.9 is the floor of ceil(busy / 0.9)"
    " followed every second with no delay (0.5-0.65 of that whole-CPU rounding), and"
    " 0.1-0.25 the 60 s shrink window and the delays. Adding back the 15 % per-second noise"
    " costs 0.5-1.1 CPUs more, a margin any size that is rarely short must keep above noisy"
    " demand rather than a window artefact: feeding the policy a 5 s moving average of busy"
    " time (saturated seconds as measured) cut the envelopes' over by only 4-5 %. The bursts"
    " cost about 0.4 more. On spike, 6,490 of the 7,786 CPU-s of over (83 %) fall in the 100"
    " s after a spike ends: the window holds the spike's need for 60 s, then steps down by"
    " halves; the slow baselines never cover these spikes at all.",
    "- **Memory: the headroom on the envelopes, stall grows and holds on spike.** On each"
    " envelope vmtide holds about 11.8 blocks (1.5 GiB) above demand on average. A side run"
    " splits each second's over into the rule's floor (used / 0.9 in whole blocks for that"
    " second's demand: the 10 % headroom and block rounding), the window (up to the largest"
    " such need of the last 90 s) and the rest (capacity above anything measured: stall"
    " grows' guesses and the holds after them): 68-77 % floor, 19-26 % window and 4-6 % rest"
    " on the envelopes. A cluster mean moves so little that one size at its 95th percentile"
    " sits 1.0-1.3 GiB above demand on average, less than vmtide's 1.5 GiB: hence"
    " static-p95's lower over there, at 1.6 to 62 times the under. On spike the split is 21"
    " / 49 / 31 %. In its first memory spike (2 to 7 GiB), stall grows asked each second"
    " while earlier ones are still landing reach 12 GiB; the shrink hold then waits about 45"
    " s, until avg10 has been under 1 % for 10 s, so the 12 GiB stays until 10 s after the"
    " 45 s spike ends; the window then holds the measured 7.875 GiB for 90 s after the"
    " spike's last second, and steps of a quarter bring it down to 2.625 GiB about 40 s"
    " later.",
    "- **vmtide-lean** (the table below) cuts memory over by a third to nearly a half on"
    " every trace and CPU over by 5-32 % (leak's CPU unchanged), for at most 55 block-s"
    " (azure_v2) and 17 CPU-s (spike) more under, and more resizes on the envelopes. No"
    " baseline beats it on both counts, but on alibaba2018's and azure_v2's memory its under"
    ' passes senpai-like\'s, so "dyn." is lost there. The model charges nothing for what it'
    " gives up: a real guest's headroom is page cache (the model has none), and each memory"
    " shrink is an offline that migrates pages. It maps what the parameters trade; it is not"
    " a proposed default.",
    "",
    "Proposed changes (not applied; agent/policy.py is not edited here):",
    "",
    "1. Memory: judge the shrink hold (`shrink_hold_psi_some_percent`) by the period's own"
    " stall share from the PSI totals, which the easing rule already reads, instead of"
    " avg10, which takes about 40 s to decay from 50 % to 1 % once a shortage is over. A"
    " side run doing so (the avg10 check skipped once that share stayed under 1 % for 10 s)"
    " cut memory over by 14 % on spike, 13 % on square and 4.5 % on step, under 1 %"
    " elsewhere, with the under unchanged on every trace.",
    "2. Memory: re-decide `headroom_percent` on a guest with page cache. It is the largest"
    " single source of memory over on the envelopes: a side run with 5 % (the 384 MiB floor"
    " kept) cut their memory over by a quarter to a third, at 65, 21 and 74 block-s of under"
    " instead of 14, 9 and 19 (a guest using under about 3.4 GiB is unaffected: the floor"
    " exceeds both percentages there). This model cannot say what the cache it gives up is"
    " worth.",
    '3. The target: restate it as "beaten on both over and under by no baseline" (met on 16'
    " of 16 pairs today) plus a bound on under-provisioning relative to the quickest dynamic"
    " baseline; as written it asks for the static-peak oracle's zero under.",
    "",
    "Tried in side runs and not proposed: a 5 s CPU grow window (so the shrink holds the"
    " largest need sustained for 5 s) cut the envelopes' CPU over by 6-9 % but raised their"
    " under 1.7-2.6 times and their resizes 2.4-4.2 times; a 5 s moving average of busy"
    " time, above.",
)

REPORT = "policy-quality.md"
# Plots only for these: one per envelope and the two sharpest synthetic shapes.
PLOTTED = ("alibaba2018", "google2019", "azure_v2", "spike", "leak", "step")


# --- the demand -> signal model -----------------------------------------------

# The kernel's avg10: an exponential average with a 10 s time constant.
_AVG10_DECAY = math.exp(-1 / 10)
# Memory stalls saturate once this share of the working set does not fit.
MEMORY_SHORT_SATURATES = 0.10


@dataclass
class SignalModel:
    """What a guest would measure, given demand and the capacity it has (one second).

    CPU: busy = min(demand, CPUs); the run queue holds ceil(demand) tasks;
    PSI some counts the share of the second with a task waiting, modelled as
    the excess demand in CPUs, capped at 1 (an excess of one whole CPU means
    some task always waits).

    Memory: used = min(demand, capacity), MemAvailable = capacity - used
    (no page cache, no kernel overhead: every byte online is usable). When
    the working set exceeds capacity the excess refaults: PSI some is the
    short share of capacity over MEMORY_SHORT_SATURATES, capped at 1; PSI
    full is a quarter of some. No swap and no OOM kill: a shortage shows as
    stalls and as under-provisioned byte-seconds, never as a dead process.

    avg10 values follow the kernel's 10 s exponential average, updated each
    second; the `total` counters accumulate stall microseconds (senpai reads them).
    """

    cpu_avg10: float = 0.0
    cpu_total_us: float = 0.0
    memory_avg10: float = 0.0
    memory_full_avg10: float = 0.0
    memory_total_us: float = 0.0

    @staticmethod
    def _avg(avg10: float, share: float) -> float:
        return 100.0 * share + (avg10 - 100.0 * share) * _AVG10_DECAY

    def observe(
        self, at: float, cpu_demand: float, cpus: int, memory_demand: float, memory: int
    ) -> tuple[Observation, Observation]:
        cpu_share = min(1.0, max(0.0, cpu_demand - cpus))
        self.cpu_avg10 = self._avg(self.cpu_avg10, cpu_share)
        self.cpu_total_us += cpu_share * 1e6
        short = max(0.0, memory_demand - memory) / memory
        memory_share = min(1.0, short / MEMORY_SHORT_SATURATES)
        self.memory_avg10 = self._avg(self.memory_avg10, memory_share)
        self.memory_full_avg10 = self._avg(self.memory_full_avg10, memory_share / 4)
        self.memory_total_us += memory_share * 1e6
        cpu = Observation(
            at=at,
            capacity=cpus,
            usage=min(cpu_demand, float(cpus)),
            psi_some=self.cpu_avg10,
            psi_full=0.0,
            psi_some_total_us=self.cpu_total_us,
            run_queue=math.ceil(cpu_demand),
        )
        mem = Observation(
            at=at,
            capacity=memory,
            usage=min(memory_demand, float(memory)),
            psi_some=self.memory_avg10,
            psi_full=self.memory_full_avg10,
            psi_some_total_us=self.memory_total_us,
        )
        return cpu, mem


# --- the policies under test --------------------------------------------------


class Sizer(Protocol):
    name: str
    initial: tuple[int, int]  # CPUs and bytes in force in the first second

    def step(self, cpu: Observation, memory: Observation) -> tuple[int, int]: ...


def _ask(decision: Decision, granted: int) -> int:
    """What the daemon asks for (agent/daemon.py `_ask`): a change only in the
    policy's direction; a "hold" at what is online while a grant is still
    on its way keeps the grant."""
    if decision.direction == "grow" and decision.target > granted:
        return decision.target
    if decision.direction == "shrink" and decision.target < granted:
        return decision.target
    return granted


@dataclass
class AgentSizer:
    """agent/policy.py's decide(), fed one Sample a second, and asking as the daemon does."""

    name: str = "vmtide"
    params: PolicyParams = field(default_factory=PolicyParams)
    initial: tuple[int, int] = (INITIAL_CPUS, INITIAL_MEMORY)
    state: PolicyState = field(default_factory=PolicyState)
    samples: list[Sample] = field(default_factory=list)
    granted: tuple[int, int] | None = None  # what was last asked for (and granted at once)
    # The previous second's (at, cpu, memory) PSI some totals, for the period's own stall.
    totals: tuple[float, float, float] | None = None

    def step(self, cpu: Observation, memory: Observation) -> tuple[int, int]:
        # The stall share of this period, from the totals, as agent/daemon.py
        # derives it; the model's PSI full is a quarter of some.
        cpu_now = memory_now = math.nan
        if self.totals is not None and cpu.at > self.totals[0]:
            span_us = (cpu.at - self.totals[0]) * 1e6
            cpu_now = 100.0 * (cpu.psi_some_total_us - self.totals[1]) / span_us
            memory_now = 100.0 * (memory.psi_some_total_us - self.totals[2]) / span_us
        self.totals = (cpu.at, cpu.psi_some_total_us, memory.psi_some_total_us)
        self.samples.append(
            Sample(
                at=cpu.at,
                cpu_busy=cpu.usage,
                online_cpus=cpu.capacity,
                run_queue=cpu.run_queue,
                cpu_some=cpu.psi_some,
                memory_some=memory.psi_some,
                memory_full=memory.psi_full,
                memory_total=memory.capacity,
                memory_available=int(memory.capacity - memory.usage),
                memory_online=memory.capacity,
                cpu_some_now=cpu_now,
                memory_some_now=memory_now,
                memory_full_now=memory_now / 4,
            )
        )
        # Keep what the policy says it reads, no more (decide() costs O(history)).
        since = cpu.at - self.params.history_seconds
        while self.samples[0].at < since:
            self.samples.pop(0)
        decisions, self.state = decide(
            self.samples,
            Limits(CPU_BOUNDS.minimum, CPU_BOUNDS.maximum, CPU_BOUNDS.maximum),
            Limits(MEMORY_BOUNDS.minimum, MEMORY_BOUNDS.maximum, MEMORY_BOUNDS.maximum),
            BLOCK,
            self.params,
            self.state,
        )
        cpus, memory_bytes = self.granted or self.initial
        self.granted = _ask(decisions.cpu, cpus), _ask(decisions.memory, memory_bytes)
        return self.granted


@dataclass
class BaselineSizer:
    """One baseline algorithm, one controller per resource."""

    name: str
    cpu: Controller
    memory: Controller
    initial: tuple[int, int] = (INITIAL_CPUS, INITIAL_MEMORY)

    def step(self, cpu: Observation, memory: Observation) -> tuple[int, int]:
        return self.cpu.step(cpu), self.memory.step(memory)


def baselines(trace: Trace) -> list[BaselineSizer]:
    # VPA keeps 8 days of history with a 24 h half-life: the same ratio here.
    half_life = trace.seconds / 8
    peak = static_peak(trace.cpu, CPU_BOUNDS), static_peak(trace.memory, MEMORY_BOUNDS)
    p95 = static_p95(trace.cpu, CPU_BOUNDS), static_p95(trace.memory, MEMORY_BOUNDS)
    return [
        BaselineSizer("static-peak", *peak, initial=(peak[0].capacity, peak[1].capacity)),
        BaselineSizer("static-p95", *p95, initial=(p95[0].capacity, p95[1].capacity)),
        BaselineSizer(
            "vpa-like",
            VpaLike(CPU_BOUNDS, INITIAL_CPUS, half_life, first_bucket=0.01),
            VpaLike(MEMORY_BOUNDS, INITIAL_MEMORY, half_life, first_bucket=1e7),
        ),
        BaselineSizer(
            "hpa-like",
            # HPA's usual targets (kubectl autoscale's 80 % CPU), not the agent's 90 % / 10 %.
            HpaLike(CPU_BOUNDS, INITIAL_CPUS, target=0.80),
            HpaLike(MEMORY_BOUNDS, INITIAL_MEMORY, target=0.85),
        ),
        BaselineSizer(
            "mom-like", MomLike(CPU_BOUNDS, INITIAL_CPUS), MomLike(MEMORY_BOUNDS, INITIAL_MEMORY)
        ),
        BaselineSizer(
            "senpai-like",
            SenpaiLike(CPU_BOUNDS, INITIAL_CPUS),
            SenpaiLike(MEMORY_BOUNDS, INITIAL_MEMORY),
        ),
    ]


DYNAMIC_BASELINES = ("vpa-like", "hpa-like", "mom-like", "senpai-like")
BASELINES = ("static-peak", "static-p95", *DYNAMIC_BASELINES)


# --- replay and scoring -------------------------------------------------------


@dataclass(frozen=True)
class Allocation:
    """Capacity in force during each second of the trace."""

    cpu: tuple[int, ...]
    memory: tuple[int, ...]
    seconds: float  # wall time the replay took


def replay(trace: Trace, sizer: Sizer) -> Allocation:
    """Run `sizer` over `trace`: what it decides after second t is in force from
    second t + 1 + the resource's actuation delay on."""
    started = time.perf_counter()
    model = SignalModel()
    cpus = CPU_BOUNDS.clamp(sizer.initial[0])
    memory = MEMORY_BOUNDS.clamp(sizer.initial[1])
    cpu_pending = deque([cpus] * CPU_DELAY_SECONDS)
    memory_pending = deque([memory] * MEMORY_DELAY_SECONDS)
    cpu_caps, memory_caps = [], []
    for t in range(trace.seconds):
        cpu_caps.append(cpus)
        memory_caps.append(memory)
        cpu_obs, mem_obs = model.observe(float(t + 1), trace.cpu[t], cpus, trace.memory[t], memory)
        cpu_target, memory_target = sizer.step(cpu_obs, mem_obs)
        cpu_pending.append(cpu_target)
        memory_pending.append(memory_target)
        cpus, memory = cpu_pending.popleft(), memory_pending.popleft()
    return Allocation(tuple(cpu_caps), tuple(memory_caps), time.perf_counter() - started)


@dataclass(frozen=True)
class Score:
    over: float  # unit-seconds of capacity above demand
    under: float  # unit-seconds of demand above capacity
    demand: float  # unit-seconds of demand
    spikes: int
    covered: tuple[float, ...]  # seconds to cover each spike that was covered
    resizes: int

    @property
    def uncovered(self) -> int:
        return self.spikes - len(self.covered)


def score(
    demand: Sequence[float],
    capacity: Sequence[int],
    unit: int,
    spikes: Sequence[Spike],
    maximum: int,
    warmup: int = 0,
) -> Score:
    """Resource-seconds over and under demand, in `unit`s; spike cover times; resizes.

    The first `warmup` seconds (and spikes starting in them) are not scored.
    A spike is covered once capacity reaches its median demand (capped at
    the maximum, which no policy may exceed); the cover time counts from the
    spike's first second. A spike never covered before it ends is uncovered.
    """
    pairs = list(zip(capacity[warmup:], demand[warmup:], strict=True))
    over = sum(max(0.0, c - d) for c, d in pairs) / unit
    under = sum(max(0.0, d - c) for c, d in pairs) / unit
    scored = [s for s in spikes if s.start >= warmup]
    covered = []
    for spike in scored:
        level = min(statistics.median(demand[spike.start : spike.end]), maximum)
        when = next(
            (t for t in range(spike.start, spike.end) if capacity[t] >= level),
            None,
        )
        if when is not None:
            covered.append(float(when - spike.start))
    kept = capacity[warmup:]
    resizes = sum(1 for a, b in itertools.pairwise(kept) if a != b)
    total = sum(d for _, d in pairs) / unit
    return Score(over, under, total, len(scored), tuple(covered), resizes)


@dataclass(frozen=True)
class Result:
    trace: Trace
    allocations: dict[str, Allocation]
    cpu: dict[str, Score]
    memory: dict[str, Score]


def run_trace(trace: Trace, agent_params: dict[str, PolicyParams]) -> Result:
    sizers: list[Sizer] = [AgentSizer(name, params) for name, params in agent_params.items()]
    sizers += baselines(trace)
    allocations = {s.name: replay(trace, s) for s in sizers}
    cpu = {
        name: score(trace.cpu, a.cpu, 1, trace.cpu_spikes, CPU_BOUNDS.high, WARMUP_SECONDS)
        for name, a in allocations.items()
    }
    memory = {
        name: score(
            trace.memory, a.memory, BLOCK, trace.memory_spikes, MEMORY_BOUNDS.high, WARMUP_SECONDS
        )
        for name, a in allocations.items()
    }
    return Result(trace, allocations, cpu, memory)


# --- the target ---------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    met: bool  # over < every baseline's over, under <= the best baseline's under
    met_dynamic: bool  # the same against the dynamic baselines only
    over_rival: str  # the baseline with the least over-provisioning
    under_rival: str  # the baseline with the least under-provisioning
    dominated_by: tuple[str, ...]  # baselines with less over AND less under


def verdict(scores: dict[str, Score], agent: str = "vmtide") -> Verdict:
    mine = scores[agent]
    others = {n: scores[n] for n in BASELINES}

    def meets(names: Sequence[str]) -> bool:
        return all(mine.over < others[n].over for n in names) and mine.under <= min(
            others[n].under for n in names
        )

    over_rival = min(others, key=lambda n: others[n].over)
    under_rival = min(others, key=lambda n: others[n].under)
    dominated = tuple(
        n
        for n, s in others.items()
        if s.over <= mine.over
        and s.under <= mine.under
        and (s.over, s.under) != (mine.over, mine.under)
    )
    return Verdict(
        meets(list(others)),
        meets([n for n in others if n in DYNAMIC_BASELINES]),
        over_rival,
        under_rival,
        dominated,
    )


# --- the report ---------------------------------------------------------------


def machine() -> tuple[str, str]:
    """`uname -a` and the CPU model from /proc/cpuinfo."""
    try:
        uname = subprocess.run(
            ["uname", "-a"], capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        uname = " ".join(platform.uname())
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return uname, model


def _num(value: float) -> str:
    return f"{value:,.0f}"


def _cover(s: Score) -> str:
    if not s.spikes:
        return "-"
    if not s.covered:
        return f"never ({s.spikes} of {s.spikes} uncovered)"
    text = f"{statistics.mean(s.covered):.0f} / {max(s.covered):.0f}"
    if s.uncovered:
        text += f" ({s.uncovered} of {s.spikes} uncovered)"
    return text


def _table(scores: dict[str, Score], unit: str) -> list[str]:
    lines = [
        f"| policy | over ({unit}) | over % of demand | under ({unit}) | spike cover mean / max (s)"
        " | resizes |",
        "|---|---:|---:|---:|---|---:|",
    ]
    for name, s in scores.items():
        share = 100 * s.over / s.demand if s.demand else 0.0
        bold = "**" if name.startswith("vmtide") else ""
        lines.append(
            f"| {bold}{name}{bold} | {_num(s.over)} | {share:.0f} % | {_num(s.under)}"
            f" | {_cover(s)} | {s.resizes} |"
        )
    return lines


def _verdict_line(v: Verdict) -> str:
    if v.met:
        return (
            "Target met: less over-provisioning than every baseline, no more under than the best."
        )
    why = f"Target not met (least over: {v.over_rival}; least under: {v.under_rival})"
    if v.met_dynamic:
        why += "; met against the dynamic baselines alone"
    if v.dominated_by:
        why += f"; beaten on both over and under by {', '.join(v.dominated_by)}"
    return why + "."


@dataclass(frozen=True)
class RunInfo:
    command: str
    started: datetime.datetime
    wall_seconds: float
    quick: bool
    profiles: dict[str, str]  # name -> what differs from the defaults


def _differences(params: PolicyParams) -> str:
    """The parameters that differ from the defaults, as `section.key` old -> new."""
    base = PolicyParams()
    parts = []
    for section in ("cpu", "memory"):
        mine, default = getattr(params, section), getattr(base, section)
        for f in dataclasses.fields(mine):
            new, old = getattr(mine, f.name), getattr(default, f.name)
            if new != old:
                if f.name.endswith("_bytes"):
                    new, old = f"{new // MiB} MiB", f"{old // MiB} MiB"
                parts.append(f"`{section}.{f.name}` {old} -> {new}")
    return ", ".join(parts) or "default parameters"


def _pairs(results: Sequence[Result]) -> list[tuple[Result, str, dict[str, Score], str]]:
    return [
        (r, resource, scores, unit)
        for r in results
        for resource, scores, unit in (("CPU", r.cpu, "CPU-s"), ("memory", r.memory, "block-s"))
    ]


def _summary(results: Sequence[Result], profiles: Sequence[str]) -> list[str]:
    head = "| trace | resource | least over (baseline) | least under (baseline) |"
    rule = "|---|---|---|---|"
    for name in profiles:
        head += f" {name} over / under | target | dyn. | beaten by |"
        rule += "---|---|---|---|"
    lines = [head, rule]
    met = {name: [0, 0, 0] for name in profiles}  # met, met vs dynamic, beaten
    pairs = _pairs(results)
    for r, resource, scores, _ in pairs:
        first = verdict(scores, profiles[0])
        o, u = first.over_rival, first.under_rival
        row = (
            f"| {r.trace.name} | {resource} | {_num(scores[o].over)} ({o})"
            f" | {_num(scores[u].under)} ({u}) |"
        )
        for name in profiles:
            v = verdict(scores, name)
            mine = scores[name]
            met[name][0] += v.met
            met[name][1] += v.met_dynamic
            met[name][2] += bool(v.dominated_by)
            row += (
                f" {_num(mine.over)} / {_num(mine.under)} | {'met' if v.met else 'no'}"
                f" | {'met' if v.met_dynamic else 'no'} | {', '.join(v.dominated_by) or '-'} |"
            )
        lines.append(row)
    lines.append("")
    for name in profiles:
        m, d, b = met[name]
        lines.append(
            f"- **{name}**: target met on {m} of {len(pairs)} trace-resource pairs;"
            f" against the dynamic baselines alone on {d}; beaten on both over and under by"
            f" some baseline on {b}."
        )
    return lines


def _findings(results: Sequence[Result], info: RunInfo) -> list[str]:
    # The hand-written findings are about the full run, not the quick one.
    out = ["## Findings", "", *(() if info.quick else (*FINDINGS, ""))]
    lean = [name for name in info.profiles if name != "vmtide"]
    if not lean:
        return out
    name = lean[0]
    out += [
        f"{name} against vmtide's defaults (over: relative change; under: CPU-s or block-s;"
        " resizes: count):",
        "",
        "| trace | resource | over | under | resizes |",
        "|---|---|---:|---:|---:|",
    ]
    for r, resource, scores, _ in _pairs(results):
        base, tuned = scores["vmtide"], scores[name]
        change = 100 * (tuned.over - base.over) / base.over if base.over else 0.0
        out.append(
            f"| {r.trace.name} | {resource} | {change:+.0f} %"
            f" | {_num(base.under)} -> {_num(tuned.under)}"
            f" | {base.resizes} -> {tuned.resizes} |"
        )
    out.append("")
    return out


def render(results: Sequence[Result], info: RunInfo, plots: dict[str, str]) -> str:
    uname, model = machine()
    total = traces.total_seconds([r.trace for r in results])
    out = [
        "# Policy quality: the agent's sizing policy against baselines",
        "",
        "Generated by `bench/policy_quality.py`; do not edit by hand, re-run it.",
        "",
        f"- Command: `{info.command}`",
        f"- Run: {info.started:%Y-%m-%d %H:%M:%S} UTC, {info.wall_seconds:.0f} s wall time"
        f"{' (quick mode: a tiny input, for CI)' if info.quick else ''}",
        f"- Machine: `{uname}`",
        f"- CPU: {model}",
        f"- Python {platform.python_version()}; {traces.describe_package()}",
        f"- Simulated: {len(results)} traces, {traces.duration(total)} at one sample per second",
        "",
        "## Summary",
        "",
        "The target (vmtide issue 6): on every trace, less over-provisioning than every baseline"
        " at no more under-provisioning than the best baseline. Over / under are in CPU-s or"
        ' block-s (below); "dyn." is the same target against the four dynamic baselines'
        ' only; "beaten by" lists baselines with less over and less under at once.',
        "",
        *_summary(results, list(info.profiles)),
        "",
        *_findings(results, info),
        "## What runs",
        "",
        "Every policy replays each trace second by second. Each second it is shown what a"
        " guest would measure over it (below) and returns the capacity it wants; that"
        f" capacity is in force {CPU_DELAY_SECONDS} s later for CPUs and"
        f" {MEMORY_DELAY_SECONDS} s later for memory (the broker's round trip and the hot-plug"
        " or hot-add), for grows and shrinks alike: a demand step is answered at best"
        f" {1 + CPU_DELAY_SECONDS} s (CPU) or {1 + MEMORY_DELAY_SECONDS} s (memory) after it"
        " starts."
        " All policies share the limits: CPUs in [1, 8], whole CPUs; memory in [1, 16] GiB,"
        " whole 128 MiB blocks; no burst above maximum (burst = maximum: the baselines have"
        " no credit scheme). Dynamic policies start at 2 CPUs and 4 GiB.",
        "",
        "Policies:",
        "",
        "- **vmtide**: `agent.policy.decide()` with default `PolicyParams` (docs/policy.md),"
        " fed a `Sample` per second with the history it asks for, asking as the daemon does"
        ' (a change only in the policy\'s direction: a "hold" while a grant is on its way'
        " keeps the grant).",
    ]
    for name, what in info.profiles.items():
        if name != "vmtide":
            out.append(
                f"- **{name}**: the same policy with {what}: a leaner point, to show what"
                " the parameters trade; not the agent's default and not a proposed one."
            )
    out += [
        "- **static-peak** / **static-p95**: oracles: one size for the whole trace, its peak"
        " or 95th-percentile demand (nearest rank), rounded up to whole units.",
        "- **vpa-like**: Kubernetes VPA recommender: P90 of a decaying usage histogram"
        " (geometric buckets, ratio 1.05) plus a 15 % margin, every 60 s, applied in place."
        " VPA's 24 h half-life over 8 days of history becomes trace length / 8 here.",
        "- **hpa-like**: Kubernetes HPA: every 15 s, desired = ceil(current * utilisation /"
        " target) over whole units, no change within 10 % tolerance, scale-up at most"
        " max(double, +4) per 15 s, scale-down to the highest recommendation of the last"
        " 300 s. Targets: 80 % CPU utilisation (kubectl autoscale's default), 85 % memory"
        " use; the agent's defaults are 90 % and 10 % headroom.",
        "- **mom-like**: oVirt MOM balloon rule, both ways: every 10 s move toward mean"
        " usage + 20 % of the current size, by at most 5 % of the current size; changes"
        " under 0.25 % skipped. (MOM's own rules move a guest at once up to its guaranteed"
        " minimum; this is the 5 %-per-step reading that docs/policy.md compares with.)",
        "- **senpai-like**: facebookincubator/senpai's tick each second on PSI some stall"
        " time: over 10 ms since the last adjustment, grow by min((err/20)^2, 1); else every"
        " 6 s shrink by min((err/10)^2, 1) * 1 %. Applied to memory (its own domain) and,"
        " with the same rule on CPU PSI, to CPUs.",
        "",
        "Signal model (`SignalModel`), the same for every policy:",
        "",
        "- CPU: busy = min(demand, CPUs); run queue = ceil(demand); PSI some share of a"
        " second = min(1, demand - CPUs) when demand exceeds the CPUs, else 0.",
        "- Memory: used = min(demand, capacity); MemAvailable = capacity - used (no page"
        " cache or kernel overhead); PSI some share = min(1, shortfall / (10 % of"
        " capacity)); PSI full = some / 4; no swap, no OOM kill.",
        "- PSI avg10 is the kernel's 10 s exponential average, updated every second; the"
        " `total` counter accumulates stall microseconds (what senpai reads).",
        "",
        "Scores, per resource:",
        "",
        "- **over** / **under**: capacity above / below demand, summed over seconds:"
        " CPU-seconds, or block-seconds (128 MiB blocks). Over % is over divided by the"
        " demand's own integral.",
        "- **spike cover**: for each marked spike (a trace's bursts, steps, square-wave"
        " highs, spikes), seconds from its start until capacity reaches its median demand"
        " (capped at the maximum); a spike still not covered when it ends is uncovered.",
        "- **resizes**: how many times the capacity changed.",
        f"- The first {WARMUP_SECONDS} s of each trace (every dynamic policy climbing from"
        " the common start) are replayed but not scored.",
        "",
        "## Traces",
        "",
    ]
    for r in results:
        out += [
            f"### {r.trace.name}",
            "",
            r.trace.description + ".",
            "",
        ]
        if r.trace.name in plots:
            out += [f"![{r.trace.name}]({plots[r.trace.name]})", ""]
        for resource, scores, unit in (("CPU", r.cpu, "CPU-s"), ("Memory", r.memory, "block-s")):
            out += [
                f"{resource}:",
                "",
                *_table(scores, unit),
                "",
                _verdict_line(verdict(scores)),
                "",
            ]
    out += [
        "Replay wall time per policy (s): "
        + "; ".join(
            f"{name} {sum(r.allocations[name].seconds for r in results):.1f}"
            for name in results[0].allocations
        )
        + ".",
        "",
    ]
    return "\n".join(out)


def plot(result: Result, path: Path) -> None:
    """Demand against each policy's allocation, CPU above memory, small."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trace = result.trace
    step = max(1, trace.seconds // 1500)  # a point per `step` seconds keeps the PNG small
    xs = [t / 60 for t in range(0, trace.seconds, step)]

    def series(values: Sequence[float], scale: float) -> list[float]:
        return [values[t] / scale for t in range(0, trace.seconds, step)]

    fig, axes = plt.subplots(2, 1, figsize=(8, 5), sharex=True, dpi=80)
    styles = {
        "static-peak": ("tab:gray", "--"),
        "static-p95": ("tab:brown", ":"),
        "vpa-like": ("tab:purple", "-"),
        "hpa-like": ("tab:orange", "-"),
        "mom-like": ("tab:green", "-"),
        "vmtide-lean": ("tab:pink", "-"),
        "senpai-like": ("tab:cyan", "-"),
    }
    for ax, demand, resource, scale, label in (
        (axes[0], trace.cpu, "cpu", 1.0, "CPUs"),
        (axes[1], trace.memory, "memory", float(GiB), "GiB"),
    ):
        ax.fill_between(xs, series(demand, scale), color="lightgray", label="demand", step="post")
        for name, allocation in result.allocations.items():
            color, style = styles.get(name, ("tab:red", "-"))
            width = 1.6 if name.startswith("vmtide") else 0.9
            values = allocation.cpu if resource == "cpu" else allocation.memory
            ax.step(
                xs,
                series([float(v) for v in values], scale),
                where="post",
                color=color,
                linestyle=style,
                linewidth=width,
                label=name,
            )
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{trace.name}: demand and allocation", fontsize=10)
    axes[1].set_xlabel("minutes")
    # Above the plots, where it hides no line.
    axes[0].legend(fontsize=7, ncol=5, loc="lower left", bbox_to_anchor=(0, 1.0), frameon=False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# --- entry point --------------------------------------------------------------


def _select(all_traces: Callable[[], list[Trace]], names: Sequence[str]) -> list[Trace]:
    chosen = all_traces()
    if not names:
        return chosen
    known = {t.name for t in chosen}
    unknown = sorted(set(names) - known)
    if unknown:
        raise SystemExit(
            f"--trace: unknown {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )
    return [t for t in chosen if t.name in names]


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="python -m bench.policy_quality", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="a tiny input in a few seconds")
    parser.add_argument(
        "--out", type=Path, help="report directory (docs/bench; quick: .cache/bench)"
    )
    parser.add_argument("--trace", action="append", default=[], help="run only this trace")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    args = parser.parse_args(args_list)
    out: Path = args.out or Path(".cache/bench" if args.quick else "docs/bench")
    started = datetime.datetime.now(datetime.UTC)
    clock = time.perf_counter()
    try:
        chosen = _select(traces.quick_traces if args.quick else traces.full_traces, args.trace)
    except traces.TraceError as exc:
        print(f"policy_quality: {exc}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    params = PROFILES
    profiles = {name: _differences(p) for name, p in params.items()}
    results = []
    for trace in chosen:
        print(f"{trace.name}: {trace.seconds} s ...", file=sys.stderr, flush=True)
        results.append(run_trace(trace, params))
    plots: dict[str, str] = {}
    if not args.no_plots:
        for r in results:
            if args.quick or r.trace.name in PLOTTED:
                name = f"policy-{r.trace.name}.png"
                plot(r, out / name)
                plots[r.trace.name] = name
    info = RunInfo(
        command=" ".join(["python -m bench.policy_quality", *args_list]),
        started=started,
        wall_seconds=time.perf_counter() - clock,
        quick=args.quick,
        profiles=profiles,
    )
    (out / REPORT).write_text(render(results, info, plots), encoding="utf-8")
    print(f"wrote {out / REPORT}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
