"""bench/: the policy-quality benchmark runs, and each baseline follows its published algorithm."""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

# bench/ is not an installed package: import it from this checkout.
ROOT = str(Path(__file__).resolve().parents[1])
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from agent.policy import PolicyParams  # noqa: E402
from bench import policy_quality, traces  # noqa: E402
from bench.baselines import (  # noqa: E402
    Bounds,
    Controller,
    DecayingHistogram,
    HpaLike,
    MomLike,
    Observation,
    SenpaiLike,
    VpaLike,
    static_p95,
    static_peak,
)
from bench.policy_quality import Score, SignalModel, replay, score, verdict  # noqa: E402
from bench.traces import GiB, Spike, Trace  # noqa: E402

CPUS = Bounds(minimum=1, maximum=8, unit=1)
BLOCK = 128 << 20
MEMORY = Bounds(minimum=1 * GiB, maximum=16 * GiB, unit=BLOCK)


def obs(at: float, capacity: int, usage: float, total_us: float = 0.0) -> Observation:
    return Observation(
        at=at,
        capacity=capacity,
        usage=min(usage, float(capacity)),
        psi_some=0.0,
        psi_full=0.0,
        psi_some_total_us=total_us,
    )


# --- the quick run and its report ---------------------------------------------


def test_quick_mode_writes_a_well_formed_report(tmp_path: Path) -> None:
    assert policy_quality.main(["--quick", "--out", str(tmp_path)]) == 0
    report = (tmp_path / "policy-quality.md").read_text(encoding="utf-8")
    assert f"- Command: `python -m bench.policy_quality --quick --out {tmp_path}`" in report
    assert re.search(r"^- Run: \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", report, re.M)
    assert re.search(r"^- Machine: `\S+.*`$", report, re.M)
    assert re.search(r"^- CPU: \S+", report, re.M)
    names = [t.name for t in traces.quick_traces()]
    policies = [*policy_quality.PROFILES, *policy_quality.BASELINES]
    for name in names:
        assert f"\n### {name}\n" in report
        # The summary has one row per trace and resource.
        assert re.search(rf"^\| {name} \| CPU \| ", report, re.M)
        assert re.search(rf"^\| {name} \| memory \| ", report, re.M)
        png = tmp_path / f"policy-{name}.png"
        assert f"](policy-{name}.png)" in report
        data = png.read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) < 300_000
    # Every table: rows as wide as their header, and each policy once per table.
    tables = re.findall(r"(\| policy \|.*?)\n\n", report, re.S)
    assert len(tables) == 2 * len(names)
    for table in tables:
        rows = table.splitlines()
        assert all(row.count("|") == rows[0].count("|") for row in rows)
        assert [row.split("|")[1].strip().strip("*") for row in rows[2:]] == policies
        for row in rows[2:]:
            over, share, under = (cell.strip() for cell in row.split("|")[2:5])
            assert re.fullmatch(r"[\d,]+", over) and re.fullmatch(r"[\d,]+", under), row
            assert re.fullmatch(r"\d+ %", share), row
    for name in policy_quality.PROFILES:
        assert re.search(
            rf"^- \*\*{name}\*\*: target met on \d+ of 4 trace-resource pairs;", report, re.M
        )


# Which way each parameter LEAN may move is leaner: +1 larger, -1 smaller.
_LEANER = {
    "target_utilisation_ratio": +1,
    "headroom_min_bytes": -1,
    "headroom_percent": -1,
    "stall_grow_ratio": -1,
    "shrink_window_seconds": -1,
    "shrink_interval_seconds": -1,
    "shrink_step_ratio": +1,
    "shrink_hold_psi_some_percent": +1,
}


def test_lean_profile_is_leaner_than_the_defaults() -> None:
    """The report calls it leaner: once the defaults overtake it, it must be re-tuned."""
    lean, base = policy_quality.LEAN, PolicyParams()
    changed = []
    for section in ("cpu", "memory"):
        mine, default = getattr(lean, section), getattr(base, section)
        for f in dataclasses.fields(mine):
            new, old = getattr(mine, f.name), getattr(default, f.name)
            if new != old:
                assert f.name in _LEANER, f"{section}.{f.name}: no lean direction known"
                assert (new - old) * _LEANER[f.name] > 0, f"{section}.{f.name}: {old} -> {new}"
                changed.append(f"{section}.{f.name}")
    assert changed


def test_unknown_trace_is_refused_by_name() -> None:
    with pytest.raises(SystemExit, match="--trace: unknown nosuch"):
        policy_quality.main(["--quick", "--trace", "nosuch", "--no-plots", "--out", "/dev/null"])


# --- the signal model, replay and scoring -------------------------------------


def test_signal_model_shows_stalls_only_when_demand_exceeds_capacity() -> None:
    model = SignalModel()
    cpu, mem = model.observe(1.0, 1.5, 2, 3.0 * GiB, 4 * GiB)
    assert cpu.usage == 1.5 and cpu.run_queue == 2 and cpu.psi_some == 0.0
    assert mem.usage == 3.0 * GiB and mem.capacity - mem.usage == 1 * GiB
    assert mem.psi_some == 0.0 and mem.psi_some_total_us == 0.0
    cpu, mem = model.observe(2.0, 2.5, 2, 4.2 * GiB, 4 * GiB)
    assert cpu.usage == 2.0 and cpu.run_queue == 3
    # Half a CPU of excess: tasks wait half the second; avg10 moves 1 - e^-0.1 of the way.
    assert cpu.psi_some == pytest.approx(50.0 * (1 - math.exp(-0.1)))
    assert cpu.psi_some_total_us == pytest.approx(500_000)
    assert mem.usage == 4 * GiB  # MemAvailable 0
    # 0.2 GiB short of 4 GiB is 5 %: half of the 10 % where stalls saturate.
    assert mem.psi_some == pytest.approx(50.0 * (1 - math.exp(-0.1)))
    assert mem.psi_full == pytest.approx(mem.psi_some / 4)


class _Fixed:
    """A sizer that always wants 6 CPUs and 8 GiB."""

    name = "fixed"
    initial = (2, 4 * GiB)

    def step(self, cpu: Observation, memory: Observation) -> tuple[int, int]:
        return 6, 8 * GiB


def test_replay_applies_a_decision_after_the_actuation_delay() -> None:
    trace = Trace("flat", "flat", (1.0,) * 6, (1.0 * GiB,) * 6, (), ())
    allocation = replay(trace, _Fixed())
    cpu_delay, mem_delay = policy_quality.CPU_DELAY_SECONDS, policy_quality.MEMORY_DELAY_SECONDS
    # Second 0 runs on the initial size; the decision after it lands delay seconds later.
    assert allocation.cpu == (2,) * (1 + cpu_delay) + (6,) * (5 - cpu_delay)
    assert allocation.memory == (4 * GiB,) * (1 + mem_delay) + (8 * GiB,) * (5 - mem_delay)


def test_agent_keeps_a_pending_grow_through_a_hold_as_the_daemon_does() -> None:
    sizer = policy_quality.AgentSizer(initial=(3, 4 * GiB))
    model = SignalModel()
    wanted = []
    # Online stays at 3 CPUs (the grant is still on its way): 2.8 busy twice is a grow
    # to ceil(2.8 / 0.9) = 4; then 2.3 (77 %) makes the policy "hold 3".
    for at, busy in enumerate([2.0] * 20 + [2.8, 2.8, 2.3, 2.3], start=1):
        cpu, mem = model.observe(float(at), busy, 3, 1.0 * GiB, 4 * GiB)
        wanted.append(sizer.step(cpu, mem)[0])
    assert wanted[:21] == [3] * 21
    assert wanted[21:] == [4, 4, 4]  # not back to 3: a hold is not a release


def test_score_counts_over_under_cover_and_resizes() -> None:
    demand = [1.0, 1.0, 3.0, 3.0, 3.0, 1.0]
    capacity = [2, 2, 2, 2, 3, 3]
    s = score(demand, capacity, 1, [Spike(2, 5), Spike(5, 6)], maximum=8)
    assert s.over == 1 + 1 + 2 and s.under == 1 + 1
    assert s.demand == 12.0
    assert s.covered == (2.0, 0.0) and s.uncovered == 0
    assert s.resizes == 1
    # A spike above the maximum counts as covered at the maximum; one never reached is not.
    capped = score([1.0, 9.0, 9.0], [1, 1, 8], 1, [Spike(1, 3)], maximum=8)
    assert capped.covered == (1.0,)
    missed = score([1.0, 5.0, 5.0], [1, 1, 4], 1, [Spike(1, 3)], maximum=8)
    assert missed.covered == () and missed.uncovered == 1
    # The warm-up is not scored, nor spikes that start inside it.
    warm = score(demand, capacity, 1, [Spike(2, 5)], maximum=8, warmup=3)
    assert warm.over == 2 and warm.under == 1 and warm.spikes == 0


def _score(over: float, under: float) -> Score:
    return Score(over, under, 100.0, 0, (), 0)


def test_verdict_needs_least_over_and_no_more_under_than_the_best() -> None:
    scores = {name: _score(50, 10) for name in policy_quality.BASELINES}
    scores["vmtide"] = _score(40, 10)
    assert verdict(scores).met
    scores["static-peak"] = _score(60, 0)
    v = verdict(scores)
    assert not v.met and v.met_dynamic and v.under_rival == "static-peak"
    scores["senpai-like"] = _score(30, 5)
    v = verdict(scores)
    assert not v.met_dynamic and v.dominated_by == ("senpai-like",)


# --- the baselines on hand-made traces ----------------------------------------


def test_static_oracles_take_the_peak_and_the_95th_percentile() -> None:
    demand = [float(i) / 10 for i in range(1, 101)]  # 0.1 .. 10.0
    assert static_peak(demand, CPUS).capacity == 8  # 10 CPUs, capped at the maximum
    assert static_p95(demand, CPUS).capacity == 8  # ceil(9.5) = 10, capped
    assert static_p95([0.5] * 95 + [7.0] * 5, CPUS).capacity == 1
    assert static_p95([0.5] * 94 + [7.0] * 6, CPUS).capacity == 7


def test_hpa_holds_inside_tolerance_and_scales_up_at_once() -> None:
    hpa = HpaLike(CPUS, initial=4, target=0.8)
    # 85 % of 4 CPUs: ratio 1.0625 is within 10 %, so no ceil(4.25) = 5.
    assert [hpa.step(obs(t, 4, 3.4)) for t in range(1, 61)] == [4] * 60
    # 97.5 %: ratio 1.22, ceil(4 * 1.22) = 5 at the next sync (every 15 s).
    sizes = [hpa.step(obs(t, hpa.capacity, 3.9)) for t in range(61, 77)]
    assert sizes[:15] == [4] * 15 and sizes[15] == 5  # t = 76


def test_hpa_scale_up_is_rate_limited_to_double_or_plus_four() -> None:
    hpa = HpaLike(Bounds(1, 64, 1), initial=2, target=0.1)
    sizes = [hpa.step(obs(t, hpa.capacity, 2.0)) for t in range(1, 17)]
    # Wanted ceil(2 * 10) = 20; at most max(2 * 2, 2 + 4) = 6 per sync.
    assert sizes[-1] == 6


def test_hpa_does_not_scale_down_inside_its_window() -> None:
    hpa = HpaLike(CPUS, initial=4, target=0.8)
    t = 0
    sizes: list[tuple[int, int]] = []
    for _ in range(30):  # 30 s at 100 %: grows to 5 at the second sync
        t += 1
        sizes.append((t, hpa.step(obs(t, hpa.capacity, 4.0))))
    assert hpa.capacity == 5
    high_at = max(at for at, rec in hpa.recommendations if rec == 5)
    for _ in range(600):  # then idle: each sync recommends 2
        t += 1
        sizes.append((t, hpa.step(obs(t, hpa.capacity, 1.0))))
    inside = [size for at, size in sizes if 30 < at < high_at + 300]
    assert inside and min(inside) == 5
    # The first sync past the window takes the idle recommendation, ceil(5 * 1 / 4) = 2.
    first_drop = next(at for at, size in sizes if at > 30 and size < 5)
    assert high_at + 300 <= first_drop <= high_at + 315
    assert sizes[-1][1] == 2


def test_mom_never_changes_more_than_five_percent_per_step() -> None:
    mom = MomLike(MEMORY, initial=4 * GiB)
    sizes = [mom.size]
    changed_at = []
    used = [1.0 * GiB] * 300 + [12.0 * GiB] * 600  # shrink, then a step up
    for t, u in enumerate(used, start=1):
        mom.step(obs(t, MEMORY.clamp(mom.size), u))
        if mom.size != sizes[-1]:
            changed_at.append(t)
        sizes.append(mom.size)
    steps = [(b - a) / a for a, b in itertools.pairwise(sizes) if a != b]
    assert max(abs(s) for s in steps) <= 0.05 + 1e-12
    assert all(t % 10 == 1 for t in changed_at)  # one step per 10 s
    # It did move both ways: down toward 1 GiB + 20 %, then up, slowly.
    assert min(sizes[:301]) < 2 * GiB
    assert sizes[-1] > 12 * GiB
    assert sizes[400] < 12 * GiB  # 100 s after the step: 1.05^10 is not enough


def test_vpa_recommends_p90_plus_margin_and_forgets_with_the_half_life() -> None:
    vpa = VpaLike(Bounds(1, 64, 1), initial=8, half_life=60.0, first_bucket=0.01)
    t = 0
    for _ in range(600):
        t += 1
        vpa.step(obs(t, 64, 4.0))
    # A bucket ends at most 5 % + 0.01 above what it holds.
    assert vpa.recommendation is not None
    assert 4.0 * 1.15 <= vpa.recommendation <= (4.0 * 1.05 + 0.01) * 1.15
    assert vpa.capacity == 5
    for _ in range(61):  # a half-life of low usage (to the t = 661 update): half the weight
        t += 1
        vpa.step(obs(t, 64, 1.0))
    assert vpa.recommendation >= 4.0 * 1.15
    assert vpa.capacity == 5
    for _ in range(300):  # five more (to t = 961): the old samples weigh ~3 %
        t += 1
        vpa.step(obs(t, 64, 1.0))
    assert 1.0 * 1.15 <= vpa.recommendation <= (1.0 * 1.05 + 0.01) * 1.15
    assert vpa.capacity == 2


def test_vpa_recommends_only_once_a_minute() -> None:
    vpa = VpaLike(CPUS, initial=2, half_life=600.0, first_bucket=0.01)
    sizes = [vpa.step(obs(t, 8, 4.0)) for t in range(1, 62)]
    assert sizes[:60] == [2] * 60 and sizes[60] == 5  # ceil(4.0..4.21 * 1.15)


def test_decaying_histogram_buckets_grow_geometrically() -> None:
    h = DecayingHistogram(first_bucket=0.01, ratio=1.05, half_life=100.0)
    for i in range(1, 50):
        start, end = h.bucket_start(i), h.bucket_start(i + 1)
        assert end - start == pytest.approx(0.01 * 1.05**i)
        assert h.bucket((start + end) / 2) == i
    for value in (0.5, 2.0, 37.0):
        h = DecayingHistogram(0.01, 1.05, 100.0)
        h.add(value, 0.0)
        assert value <= h.percentile(0.9) <= value * 1.05 + 0.01


def _senpai_limits(senpai: SenpaiLike, totals: Sequence[float]) -> list[float]:
    limits = []
    for t, total in enumerate(totals, start=1):
        senpai.step(obs(t, MEMORY.clamp(senpai.limit), 0.0, total_us=total))
        limits.append(senpai.limit)
    return limits


def test_senpai_probes_down_one_percent_per_six_seconds_without_pressure() -> None:
    senpai = SenpaiLike(MEMORY, initial=8 * GiB)
    limits = _senpai_limits(senpai, [0.0] * 61)
    changes = [i + 1 for i in range(1, len(limits)) if limits[i] != limits[i - 1]]
    assert changes == [7, 13, 19, 25, 31, 37, 43, 49, 55, 61]
    assert limits[6] == pytest.approx(8 * GiB * 0.99)  # grace of 6 ticks, then the first probe
    for a, b in itertools.pairwise(limits):
        assert b == a or b == pytest.approx(a * 0.99)


@pytest.mark.parametrize(("stall_us", "factor"), [(200_000, 2.0), (100_000, 1.25), (20_000, 1.01)])
def test_senpai_backs_off_by_the_square_of_the_pressure_error(
    stall_us: float, factor: float
) -> None:
    senpai = SenpaiLike(MEMORY, initial=4 * GiB)
    # err = stall / 10 ms; growth = (err / 20)^2: 20x -> +100 %, 10x -> +25 %, 2x -> +1 %.
    limits = _senpai_limits(senpai, [0.0, stall_us])
    assert limits[1] == pytest.approx(4 * GiB * factor)


def test_every_baseline_stays_within_the_bounds() -> None:
    controllers: list[Controller] = [
        HpaLike(CPUS, initial=2, target=0.8),
        MomLike(CPUS, initial=2),
        SenpaiLike(CPUS, initial=2),
        VpaLike(CPUS, initial=2, half_life=60.0, first_bucket=0.01),
    ]
    for c in controllers:
        size, stall = 2, 0.0
        for t in range(1, 1200):
            demand = 20.0 if (t // 100) % 2 else 0.0
            stall += min(1.0, max(0.0, demand - size)) * 1e6
            size = c.step(obs(t, size, demand, total_us=stall))
            assert CPUS.minimum <= size <= CPUS.maximum, (c.name, t, size)


# --- traces ---------------------------------------------------------------------


def test_envelope_traces_are_reproducible_from_their_seed() -> None:
    a = traces.from_envelope("google2019", start_row=288, rows=21, seconds_per_row=15, seed=7)
    b = traces.from_envelope("google2019", start_row=288, rows=21, seconds_per_row=15, seed=7)
    c = traces.from_envelope("google2019", start_row=288, rows=21, seconds_per_row=15, seed=8)
    assert a == b and a.cpu != c.cpu
    assert a.seconds == 300
    # The envelope's peak is 60 % of the VM before bursts and noise.
    assert max(a.cpu) <= (0.6 * traces.VM_CPUS + 3.0) * 1.9
    assert all(v >= 0 for v in a.cpu + a.memory)


def test_envelope_window_outside_the_data_is_refused() -> None:
    with pytest.raises(traces.TraceError, match=r"azure_v2.*outside its 8640 rows"):
        traces.from_envelope("azure_v2", start_row=8600, rows=100, seconds_per_row=15, seed=1)
    with pytest.raises(traces.TraceError, match="unknown"):
        traces.load_envelope("borg1970")


def test_synthetic_patterns_mark_their_spikes() -> None:
    step = traces.step(seconds=600, up=100, down=400)
    assert step.cpu_spikes == (Spike(100, 400),)
    assert all(step.cpu[t] > 2.0 for t in range(100, 400))
    spike = traces.spike()
    assert spike.cpu_spikes and all(s.end - s.start == 15 for s in spike.cpu_spikes)
    leak = traces.leak()
    assert leak.memory[1999] > 8 * GiB > 2 * GiB > leak.memory[2000]
