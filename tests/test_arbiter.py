"""The broker's arbitration: scenarios first, then properties over random states."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.arbiter import (
    Amount,
    GuestLimits,
    GuestView,
    Plan,
    Pool,
    arbitrate,
    footprint,
    plan_alone,
    uncontended,
)

GIB = 1 << 30
BLOCK = 128 << 20  # a common x86 memory block size
ZERO = Amount(0, 0)


def amount(cpus: int, gib: float) -> Amount:
    return Amount(cpus, int(gib * GIB))


def guest(
    guest_id: str,
    *,
    priority: int = 0,
    minimum: tuple[int, float] = (1, 1),
    maximum: tuple[int, float] = (4, 4),
    burst: tuple[int, float] | None = None,
    held: tuple[int, float] = (1, 1),
    demand: tuple[int, float] | None = None,
    releasing: tuple[int, float] = (0, 0),
    connected: bool = True,
) -> GuestView:
    """A guest in CPUs and GiB; demand defaults to held, burst to maximum."""
    return GuestView(
        guest_id=guest_id,
        limits=GuestLimits(
            minimum=amount(*minimum),
            maximum=amount(*maximum),
            burst=amount(*(burst or maximum)),
            priority=priority,
        ),
        held=amount(*held),
        demand=amount(*(demand or held)),
        releasing=amount(*releasing),
        connected=connected,
    )


def pool(cpus: int, gib: float) -> Pool:
    return Pool(amount(cpus, gib))


def acted(guests: Sequence[GuestView], plan: Plan) -> list[GuestView]:
    """The server's accounting after sending the plan: a reclaimed part moves to releasing."""
    out = []
    for g in guests:
        target = plan.targets[g.guest_id]
        given_back = (g.held - target).max_each(ZERO)
        out.append(replace(g, held=target, releasing=g.releasing + given_back))
    return out


def released(guests: Sequence[GuestView]) -> list[GuestView]:
    """Every reclaim acknowledged and unplugged."""
    return [replace(g, releasing=ZERO) for g in guests]


# ------------------------------------------------------------------ scenarios


def test_high_priority_wins_a_small_pool_and_low_is_reclaimed_to_minimum() -> None:
    guests = [
        guest("high", priority=10, held=(1, 1), demand=(4, 4)),
        guest("low", priority=1, held=(3, 3), demand=(4, 4)),
    ]
    plan = arbitrate(pool(4, 4), guests, BLOCK)

    assert plan.reclaims == {"low": amount(1, 1)}
    # "low" still holds its CPUs and memory until it acknowledges: nothing to grant yet.
    assert plan.grants == {}
    assert "pool short" in plan.reasons["low"]
    assert "more once reclaimed capacity is unplugged" in plan.reasons["high"]

    guests = acted(guests, plan)
    assert arbitrate(pool(4, 4), guests, BLOCK).grants == {}  # still releasing
    plan = arbitrate(pool(4, 4), released(guests), BLOCK)
    assert plan.grants == {"high": amount(3, 3)}
    assert plan.reclaims == {}


def test_surplus_goes_by_priority_from_a_fresh_start() -> None:
    guests = [
        guest("a", priority=1, held=(1, 1), demand=(4, 4)),
        guest("b", priority=5, held=(1, 1), demand=(4, 4)),
        guest("c", priority=3, held=(1, 1), demand=(4, 4)),
    ]
    plan = arbitrate(pool(8, 8), guests, BLOCK)
    assert plan.targets == {"a": amount(1, 1), "b": amount(4, 4), "c": amount(3, 3)}


@pytest.mark.parametrize(
    ("capacity", "demands", "expected"),
    [
        # Water-filling: "a" is satisfied, the other two share evenly.
        (10, (2, 8, 8), (2, 4, 4)),
        # The odd CPU goes to the first guest_id that can take it, every time.
        (9, (2, 8, 8), (2, 4, 3)),
        # Nobody goes above its demand while others are short.
        (12, (1, 8, 3), (1, 8, 3)),
        # Minimums first, whatever the demand.
        (3, (8, 8, 8), (1, 1, 1)),
    ],
)
def test_equal_priorities_share_fairly(
    capacity: int, demands: tuple[int, int, int], expected: tuple[int, int, int]
) -> None:
    guests = [
        guest(gid, minimum=(1, 1), maximum=(8, 8), held=(1, 1), demand=(d, 1))
        for gid, d in zip("abc", demands, strict=True)
    ]
    plan = arbitrate(pool(capacity, 3), guests, BLOCK)
    assert tuple(plan.targets[gid].cpus for gid in "abc") == expected


def test_burst_comes_from_idle_capacity_and_goes_first_when_another_guest_needs_it() -> None:
    bursty = guest("bursty", priority=5, maximum=(4, 4), burst=(8, 8), held=(4, 4), demand=(8, 8))
    quiet = guest("quiet", priority=1, maximum=(4, 4), held=(1, 1), demand=(1, 1))
    plan = arbitrate(pool(8, 8), [bursty, quiet], BLOCK)
    # Idle: 8 - 4 (bursty's normal claim) - 1 (quiet's) = 3.
    assert plan.grants == {"bursty": amount(7, 7)}
    assert "burst from idle capacity" in plan.reasons["bursty"]

    # quiet wants its maximum: its normal claim beats bursty's burst, although
    # bursty has the higher priority.
    bursty = replace(bursty, held=amount(7, 7))
    quiet = replace(quiet, demand=amount(4, 4))
    plan = arbitrate(pool(8, 8), [bursty, quiet], BLOCK)
    assert plan.reclaims == {"bursty": amount(4, 4)}
    assert "burst taken back" in plan.reasons["bursty"]
    assert plan.grants == {}  # bursty's CPUs and memory are not unplugged yet

    after = released(acted([bursty, quiet], plan))
    assert arbitrate(pool(8, 8), after, BLOCK).grants == {"quiet": amount(4, 4)}


def test_burst_is_not_granted_while_a_normal_claim_is_unmet() -> None:
    bursty = guest("bursty", priority=9, maximum=(4, 4), burst=(8, 8), held=(4, 4), demand=(8, 8))
    other = guest("other", priority=0, maximum=(6, 6), held=(1, 1), demand=(6, 6))
    plan = arbitrate(pool(8, 8), [bursty, other], BLOCK)
    assert plan.targets["bursty"] == amount(4, 4)
    assert plan.grants == {"other": amount(4, 4)}


def test_free_capacity_serves_normal_rises_before_burst() -> None:
    bursty = guest("bursty", priority=9, maximum=(4, 4), burst=(8, 8), held=(4, 4), demand=(8, 8))
    other = guest("other", priority=0, maximum=(4, 4), held=(1, 1), demand=(4, 4))
    leaving = guest("leaving", held=(1, 1), releasing=(3, 3))
    plan = arbitrate(pool(12, 12), [bursty, other, leaving], BLOCK)
    # Once all is unplugged there is idle capacity for bursty (3); today only 3 are
    # free, and they go to other's normal claim despite its lower priority.
    assert plan.grants == {"other": amount(4, 4)}
    assert "3 more once reclaimed capacity is unplugged" in plan.reasons["bursty"]


def test_releasing_capacity_is_not_reused_until_released() -> None:
    leaving = guest("leaving", held=(2, 2), demand=(2, 2), releasing=(3, 3))
    hungry = guest("hungry", maximum=(8, 8), held=(2, 2), demand=(6, 6))
    plan = arbitrate(pool(8, 8), [leaving, hungry], BLOCK)
    # Free now: 8 - (2 + 3) - 2 = 1.
    assert plan.grants == {"hungry": amount(3, 3)}
    assert "3 more once reclaimed capacity is unplugged" in plan.reasons["hungry"]

    plan = arbitrate(pool(8, 8), released([leaving, replace(hungry, held=amount(3, 3))]), BLOCK)
    assert plan.grants == {"hungry": amount(6, 6)}


def test_a_reclaim_frees_nothing_in_the_same_plan() -> None:
    low = guest("low", priority=0, held=(4, 4), demand=(4, 4))
    high = guest("high", priority=1, held=(1, 1), demand=(4, 4))
    plan = arbitrate(pool(5, 5), [low, high], BLOCK)
    assert plan.reclaims == {"low": amount(1, 1)}
    assert plan.grants == {}


def test_disconnected_guest_keeps_its_minimum_and_its_holdings() -> None:
    gone = guest("gone", priority=0, minimum=(2, 2), held=(4, 4), demand=(4, 4), connected=False)
    hungry = guest("hungry", priority=9, maximum=(8, 8), held=(1, 1), demand=(8, 8))
    plan = arbitrate(pool(8, 8), [gone, hungry], BLOCK)
    # Nobody can tell "gone" to give back: its 4 stay used, its minimum stays reserved.
    assert plan.targets["gone"] == amount(4, 4)
    assert "gone" not in plan.grants
    assert "gone" not in plan.reclaims
    assert plan.grants == {"hungry": amount(4, 4)}

    # Disconnected with nothing plugged: the minimum is still kept for its return.
    gone = replace(gone, held=ZERO)
    plan = arbitrate(pool(8, 8), [gone, hungry], BLOCK)
    assert plan.targets["gone"] == ZERO
    assert plan.grants == {"hungry": amount(6, 6)}

    # Back again: it gets its minimum at once.
    plan = arbitrate(pool(8, 8), [replace(gone, connected=True), hungry], BLOCK)
    assert plan.grants == {"gone": amount(2, 2), "hungry": amount(6, 6)}
    assert "up to its minimum" in plan.reasons["gone"]


@pytest.mark.parametrize(
    ("burst", "demand", "expected"),
    [
        # Limits lowered under a guest that still wants more: down to maximum.
        ((4, 4), (6, 6), (4, 4)),
        # Bursting is allowed and the pool is idle: it keeps what it asks for.
        ((8, 8), (6, 6), (6, 6)),
        # Bursting allowed but not asked for: holdings above maximum go.
        ((8, 8), (2, 2), (4, 4)),
    ],
)
def test_holdings_above_maximum_are_reclaimed(
    burst: tuple[int, float], demand: tuple[int, float], expected: tuple[int, float]
) -> None:
    over = guest("over", maximum=(4, 4), burst=burst, held=(6, 6), demand=demand)
    plan = arbitrate(pool(16, 16), [over], BLOCK)
    assert plan.targets["over"] == amount(*expected)
    assert plan.grants == {}


def test_holdings_above_demand_stay_until_someone_needs_them() -> None:
    idle = guest("idle", priority=5, maximum=(8, 8), held=(4, 4), demand=(2, 2))
    small = guest("small", priority=0, maximum=(8, 8), held=(1, 1), demand=(2, 2))
    plan = arbitrate(pool(8, 8), [idle, small], BLOCK)
    assert plan.reclaims == {}
    assert plan.grants == {"small": amount(2, 2)}

    # small now wants 6: idle's unasked-for holdings go first, despite its priority.
    small = replace(small, held=amount(2, 2), demand=amount(6, 6))
    plan = arbitrate(pool(8, 8), [idle, small], BLOCK)
    assert plan.reclaims == {"idle": amount(2, 2)}
    assert "holds more than it asked for" in plan.reasons["idle"]
    assert plan.grants == {"small": amount(4, 4)}  # the rest once idle's are unplugged


def test_holdings_above_demand_yield_even_to_burst() -> None:
    idle = guest("idle", priority=5, maximum=(8, 8), held=(6, 6), demand=(2, 2))
    bursty = guest("bursty", priority=0, maximum=(2, 2), burst=(6, 6), held=(2, 2), demand=(6, 6))
    plan = arbitrate(pool(8, 8), [idle, bursty], BLOCK)
    # Capacity held without being asked for is idle capacity.
    assert plan.reclaims == {"idle": amount(2, 2)}
    plan = arbitrate(pool(8, 8), released(acted([idle, bursty], plan)), BLOCK)
    assert plan.grants == {"bursty": amount(6, 6)}


def test_cpus_up_and_memory_down_is_both_a_grant_and_a_reclaim() -> None:
    g = guest("g", maximum=(8, 8), held=(2, 6), demand=(6, 2))
    other = guest("other", maximum=(8, 8), held=(1, 1), demand=(8, 8))
    plan = arbitrate(pool(8, 8), [g, other], BLOCK)
    assert plan.grants["g"] == plan.reclaims["g"] == plan.targets["g"]
    assert plan.targets["g"].cpus > 2
    assert plan.targets["g"].memory < 6 * GIB


def test_minimums_that_overflow_the_pool_go_by_priority_and_are_reported() -> None:
    guests = [
        guest("first", priority=2, minimum=(2, 2), held=(0, 0)),
        guest("second", priority=1, minimum=(2, 2), held=(0, 0)),
        guest("third", priority=0, minimum=(2, 2), held=(2, 2)),
    ]
    plan = arbitrate(pool(3, 3), guests, BLOCK)
    assert plan.targets["first"] == amount(2, 2)
    assert plan.targets["second"] == amount(1, 1)
    # A guest refuses a reclaim below its minimum, so none is sent.
    assert plan.targets["third"] == amount(2, 2)
    assert "third" not in plan.reclaims
    assert "not covered" in plan.reasons["second"]
    assert "not covered" in plan.reasons["third"]
    assert "first" not in plan.reasons or "not covered" not in plan.reasons["first"]


def test_memory_moves_in_whole_blocks() -> None:
    half = BLOCK // 2
    g = GuestView(
        guest_id="g",
        limits=GuestLimits(
            minimum=Amount(1, 3 * BLOCK + half),  # rounds up to 4 blocks
            maximum=Amount(4, 10 * BLOCK + half),  # rounds down to 10 blocks
            burst=Amount(4, 10 * BLOCK + half),
            priority=0,
        ),
        held=Amount(1, 0),
        demand=Amount(1, 6 * BLOCK + 1),  # one byte over 6 blocks: needs 7
        releasing=ZERO,
        connected=True,
    )
    plan = arbitrate(Pool(Amount(4, 100 * BLOCK)), [g], BLOCK)
    assert plan.targets["g"].memory == 7 * BLOCK

    plan = arbitrate(
        Pool(Amount(4, 100 * BLOCK)), [replace(g, demand=Amount(1, 99 * BLOCK))], BLOCK
    )
    assert plan.targets["g"].memory == 10 * BLOCK

    # A pool that ends mid-block: the partial block is never handed out.
    plan = arbitrate(Pool(Amount(4, 5 * BLOCK + half)), [g], BLOCK)
    assert plan.targets["g"].memory == 5 * BLOCK

    # Unaligned boot memory that does not change is left as it is.
    boot = replace(g, held=Amount(1, 7 * BLOCK - 4096), demand=Amount(1, 6 * BLOCK))
    plan = arbitrate(Pool(Amount(4, 100 * BLOCK)), [boot], BLOCK)
    assert plan.targets["g"] == boot.held
    assert plan.grants == plan.reclaims == {}


def test_same_input_same_plan_whatever_the_order() -> None:
    guests = [
        guest(gid, priority=p, maximum=(8, 8), held=(1, 1), demand=(8, 8))
        for gid, p in (("d", 0), ("a", 1), ("c", 0), ("b", 1))
    ]
    plans = [arbitrate(pool(11, 11), order, BLOCK) for order in (guests, guests[::-1], guests)]
    assert plans[0] == plans[1] == plans[2]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (
            lambda g: replace(g, held=Amount(-1, 0)),
            "guest 'g': held.cpus is -1",
        ),
        (
            lambda g: replace(g, releasing=Amount(0, -5)),
            "guest 'g': releasing.memory is -5",
        ),
        (
            lambda g: replace(g, limits=replace(g.limits, minimum=amount(1, 8))),
            "guest 'g': limits.minimum.memory",
        ),
        (
            lambda g: replace(g, limits=replace(g.limits, burst=amount(2, 4))),
            "guest 'g': limits.burst.cpus (2) < limits.maximum.cpus (4)",
        ),
        (
            lambda g: replace(g, demand=Amount(0, -1)),
            "guest 'g': demand.memory",
        ),
    ],
)
def test_invalid_guests_are_refused_with_guest_and_field(
    mutate: Callable[[GuestView], GuestView], message: str
) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        arbitrate(pool(8, 8), [mutate(guest("g"))], BLOCK)


def test_invalid_pool_block_size_and_duplicates_are_refused() -> None:
    with pytest.raises(ValueError, match="block_size"):
        arbitrate(pool(8, 8), [guest("g")], 0)
    with pytest.raises(ValueError, match=r"capacity\.cpus"):
        arbitrate(Pool(Amount(-1, 0)), [guest("g")], BLOCK)
    with pytest.raises(ValueError, match="guest 'g': guest_id appears twice"):
        arbitrate(pool(8, 8), [guest("g"), guest("g")], BLOCK)


def test_no_guests_no_plan() -> None:
    assert arbitrate(pool(8, 8), [], BLOCK) == Plan({}, {}, {}, {})


# ------------------------------------------------------------------ properties

FIELDS: tuple[tuple[str, Callable[[Amount], int]], ...] = (
    ("cpus", lambda a: a.cpus),
    ("memory", lambda a: a.memory),
)


@st.composite
def guest_views(draw: st.DrawFn, guest_id: str) -> GuestView:
    """A guest whose memory figures are whole blocks (as the kernel reports them)."""

    def limits_for(unit: int) -> tuple[int, int, int]:
        minimum = draw(st.integers(0, 4))
        maximum = minimum + draw(st.integers(0, 8))
        burst = maximum + draw(st.sampled_from([0, 0, 1, 4]))
        return minimum * unit, maximum * unit, burst * unit

    def some(unit: int, most: int) -> int:
        return draw(st.integers(0, most)) * unit

    cpus, memory = limits_for(1), limits_for(BLOCK)
    # Small holdings against large demands make crowded pools, where priorities matter.
    most_held = draw(st.sampled_from([2, 12]))
    return GuestView(
        guest_id=guest_id,
        limits=GuestLimits(
            minimum=Amount(cpus[0], memory[0]),
            maximum=Amount(cpus[1], memory[1]),
            burst=Amount(cpus[2], memory[2]),
            priority=draw(st.integers(0, 2)),
        ),
        held=Amount(some(1, most_held), some(BLOCK, most_held)),
        demand=Amount(some(1, 14), some(BLOCK, 14)),
        releasing=Amount(some(1, 2), some(BLOCK, 2)) if draw(st.booleans()) else ZERO,
        connected=draw(st.sampled_from([True, True, True, False])),
    )


@st.composite
def guest_lists(draw: st.DrawFn) -> list[GuestView]:
    count = draw(st.integers(1, 5))
    return [draw(guest_views(f"g{i}")) for i in range(count)]


def occupied(guests: Sequence[GuestView], field: Callable[[Amount], int]) -> int:
    """Plugged or reserved: held (at least the minimum) plus releasing."""
    return sum(max(field(g.held), field(g.limits.minimum)) + field(g.releasing) for g in guests)


@st.composite
def consistent_states(draw: st.DrawFn) -> tuple[Pool, list[GuestView]]:
    """States a correct broker can reach: what is plugged or reserved fits the pool."""
    guests = draw(guest_lists())
    spare = Amount(draw(st.integers(0, 8)), draw(st.integers(0, 8)) * BLOCK)
    used = Amount(occupied(guests, FIELDS[0][1]), occupied(guests, FIELDS[1][1]))
    return Pool(used + spare), guests


def minimums_overflow(capacity: Amount, guests: Sequence[GuestView], field: str) -> bool:
    """Minimums, plus what disconnected guests hold above theirs, exceed the pool."""
    get = dict(FIELDS)[field]
    need = sum(get(g.limits.minimum) for g in guests)
    stranded = sum(max(0, get(g.held) - get(g.limits.minimum)) for g in guests if not g.connected)
    return need + stranded > get(capacity)


def normal_claim(g: GuestView, field: Callable[[Amount], int]) -> int:
    lim = g.limits
    return min(max(field(g.demand), field(lim.minimum)), field(lim.maximum))


def check_plan(capacity: Amount, guests: Sequence[GuestView], plan: Plan) -> None:
    """Invariants every plan keeps, from any state."""
    assert set(plan.targets) == {g.guest_id for g in guests}
    for name, field in FIELDS:
        before = occupied(guests, field)
        after = sum(
            max(field(g.held), field(plan.targets[g.guest_id])) + field(g.releasing) for g in guests
        )
        # A plan never adds to what is plugged beyond capacity; overcommitment
        # (capacity lowered under the guests) only shrinks.
        assert after <= max(field(capacity), before), name

    for g in guests:
        target, gid = plan.targets[g.guest_id], g.guest_id
        assert (gid in plan.grants) == (not target.fits(g.held))
        assert (gid in plan.reclaims) == (not g.held.fits(target))
        if gid in plan.grants:
            assert plan.grants[gid] == target
        if gid in plan.reclaims:
            assert plan.reclaims[gid] == target
        if target != g.held:
            assert plan.reasons[gid]
        assert target.memory % BLOCK == 0
        if not g.connected:
            assert target == g.held
            continue
        for name, field in FIELDS:
            assert field(target) <= field(g.limits.burst), (gid, name)
            # Nobody is given more than it asked for (or its minimum).
            if field(target) > field(g.held):
                assert field(target) <= max(field(g.demand), field(g.limits.minimum)), (gid, name)
            # Never ask a guest to go below its minimum: it would refuse.
            assert field(target) >= min(field(g.held), field(g.limits.minimum)), (gid, name)
            if not minimums_overflow(capacity, guests, name):
                assert field(target) >= field(g.limits.minimum), (gid, name)

    # Burst only from idle: a rise above maximum means every normal claim is met.
    for name, field in FIELDS:
        bursting = [
            g
            for g in guests
            if g.connected
            and field(plan.targets[g.guest_id]) > max(field(g.held), field(g.limits.maximum))
        ]
        if bursting:
            for g in guests:
                if g.connected:
                    assert field(plan.targets[g.guest_id]) >= normal_claim(g, field), (g, name)


def shortfall(
    g: GuestView, target: Amount, field: Callable[[Amount], int]
) -> tuple[int, int] | None:
    """(got, wanted) above the minimum when the normal claim is unmet, else None."""
    claim, low = normal_claim(g, field), field(g.limits.minimum)
    return (field(target) - low, claim - low) if field(target) < claim else None


def check_fixed_point(guests: Sequence[GuestView], plan: Plan) -> None:
    """Properties of the entitlements the broker converges to."""
    connected = [g for g in guests if g.connected]
    for name, field in FIELDS:
        for a in connected:
            for b in connected:
                sa = shortfall(a, plan.targets[a.guest_id], field)
                sb = shortfall(b, plan.targets[b.guest_id], field)
                if sa is None or sb is None:
                    continue
                ta, tb = field(plan.targets[a.guest_id]), field(plan.targets[b.guest_id])
                if a.limits.priority > b.limits.priority:
                    # Higher priority never gets less relative to its demand.
                    assert sa[0] * sb[1] >= sb[0] * sa[1], (a, b, name)
                elif a.limits.priority == b.limits.priority:
                    # Water-filling: equal priorities end within one unit, unless
                    # one sits on its (larger) minimum.
                    unit = BLOCK if name == "memory" else 1
                    assert ta + unit >= tb or tb == field(b.limits.minimum), (a, b, name)

        if any(field(plan.targets[g.guest_id]) > field(g.limits.maximum) for g in connected):
            for g in connected:
                assert field(plan.targets[g.guest_id]) >= normal_claim(g, field), (g, name)


@settings(max_examples=400, deadline=None)
@given(guests=guest_lists(), cpus=st.integers(0, 40), blocks=st.integers(0, 40), data=st.data())
def test_any_state_keeps_the_invariants(
    guests: list[GuestView], cpus: int, blocks: int, data: st.DataObject
) -> None:
    capacity = Amount(cpus, blocks * BLOCK)
    plan = arbitrate(Pool(capacity), guests, BLOCK)
    check_plan(capacity, guests, plan)
    # Deterministic, and blind to the order the guests come in.
    assert arbitrate(Pool(capacity), guests, BLOCK) == plan
    assert arbitrate(Pool(capacity), data.draw(st.permutations(guests)), BLOCK) == plan


@settings(max_examples=400, deadline=None)
@given(state=consistent_states())
def test_a_consistent_state_stays_within_capacity_and_converges(
    state: tuple[Pool, list[GuestView]],
) -> None:
    capacity, guests = state[0].capacity, state[1]
    for _ in range(3):
        plan = arbitrate(Pool(capacity), guests, BLOCK)
        check_plan(capacity, guests, plan)
        for name, field in FIELDS:
            total = sum(field(plan.targets[g.guest_id]) + field(g.releasing) for g in guests)
            assert total <= field(capacity), name
        if not plan.grants and not plan.reclaims and all(g.releasing == ZERO for g in guests):
            break
        guests = acted(guests, plan)
        # Mid-way, reclaims not yet unplugged: nothing to do but wait (no
        # further reclaims for capacity that is already on its way back).
        waiting = arbitrate(Pool(capacity), guests, BLOCK)
        check_plan(capacity, guests, waiting)
        assert waiting.grants == waiting.reclaims == {}
        guests = released(guests)
    else:
        pytest.fail("still changing after two rounds")
    check_fixed_point(guests, plan)
    # Nobody is left waiting for capacity that will never be freed.
    assert not any("more once" in reason for reason in plan.reasons.values())


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_unaligned_limits_still_give_whole_blocks(data: st.DataObject) -> None:
    def bytes_(most: int) -> int:
        return data.draw(st.integers(0, most * BLOCK))

    minimum = bytes_(4)
    maximum = minimum + bytes_(4)
    burst = maximum + bytes_(2)
    g = GuestView(
        guest_id="g",
        limits=GuestLimits(Amount(1, minimum), Amount(1, maximum), Amount(1, burst), 0),
        held=Amount(1, data.draw(st.integers(0, 12)) * BLOCK),
        demand=Amount(1, bytes_(12)),
        releasing=ZERO,
        connected=True,
    )
    plan = arbitrate(Pool(Amount(1, 64 * BLOCK + bytes_(1))), [g], BLOCK)
    memory = plan.targets["g"].memory
    assert memory % BLOCK == 0
    assert memory >= minimum
    # Above burst only when no whole block lies between minimum and burst.
    assert memory <= max(burst, -(-minimum // BLOCK) * BLOCK)


# ------------------------------------------------------------------ the pool uncontended


def part(plan: Plan, guest_id: str) -> Plan:
    """One guest's share of a plan."""

    def only(mapping: Mapping[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in mapping.items() if k == guest_id}

    return Plan(only(plan.targets), only(plan.grants), only(plan.reclaims), only(plan.reasons))


@st.composite
def unaligned_views(draw: st.DrawFn, guest_id: str) -> GuestView:
    """Like `guest_views`, with memory figures off block boundaries (boot memory)."""
    view = draw(guest_views(guest_id))

    def nudge(amount: Amount) -> Amount:
        return Amount(amount.cpus, max(0, amount.memory + draw(st.integers(-BLOCK, BLOCK))))

    minimum = nudge(view.limits.minimum)
    maximum = Amount(view.limits.maximum.cpus, max(minimum.memory, view.limits.maximum.memory))
    burst = Amount(view.limits.burst.cpus, max(maximum.memory, view.limits.burst.memory))
    return replace(
        view,
        limits=replace(view.limits, minimum=minimum, maximum=maximum, burst=burst),
        held=nudge(view.held),
        demand=nudge(view.demand),
    )


@st.composite
def uncontended_states(draw: st.DrawFn) -> tuple[Pool, list[GuestView]]:
    """Any guests, and a pool their footprints fit, with some spare or none."""
    views = draw(st.sampled_from([guest_views, unaligned_views]))
    guests = [draw(views(f"g{i}")) for i in range(draw(st.integers(1, 12)))]
    total = ZERO
    for g in guests:
        total = total + footprint(g, BLOCK)
    spare = Amount(draw(st.integers(0, 3)), draw(st.integers(0, 3)) * BLOCK)
    return Pool(total + spare + Amount(0, draw(st.integers(0, BLOCK - 1)))), guests


@settings(max_examples=500, deadline=None)
@given(state=uncontended_states())
def test_an_uncontended_pool_gives_every_guest_its_plan_alone(
    state: tuple[Pool, list[GuestView]],
) -> None:
    capacity, guests = state
    plan = arbitrate(capacity, guests, BLOCK)
    for g in guests:
        assert plan_alone([g], BLOCK) == part(plan, g.guest_id), g
    assert plan_alone(guests, BLOCK) == plan


@settings(max_examples=300, deadline=None)
@given(state=consistent_states())
def test_uncontended_says_whether_the_footprints_fit(state: tuple[Pool, list[GuestView]]) -> None:
    capacity, guests = state
    total = ZERO
    for g in guests:
        total = total + footprint(g, BLOCK)
    fits = uncontended(capacity, total, BLOCK)
    assert fits == (
        total.cpus <= capacity.capacity.cpus
        and total.memory <= capacity.capacity.memory // BLOCK * BLOCK
    )
    plan = arbitrate(capacity, guests, BLOCK)
    if fits:
        for g in guests:
            assert plan_alone([g], BLOCK) == part(plan, g.guest_id), g


def test_a_short_pool_is_contended_and_the_plan_alone_would_be_wrong() -> None:
    guests = [
        guest("high", priority=10, held=(1, 1), demand=(4, 4)),
        guest("low", priority=1, held=(3, 3), demand=(4, 4)),
    ]
    total = footprint(guests[0], BLOCK) + footprint(guests[1], BLOCK)
    assert total == amount(8, 8)  # both at their demand
    assert not uncontended(pool(4, 4), total, BLOCK)
    assert plan_alone([guests[1]], BLOCK) != part(arbitrate(pool(4, 4), guests, BLOCK), "low")
    assert uncontended(pool(8, 8), total, BLOCK)


def test_plan_alone_refuses_what_arbitrate_refuses() -> None:
    with pytest.raises(ValueError, match=r"limits\.burst\.cpus"):
        plan_alone([guest("g", burst=(2, 4))], BLOCK)
    with pytest.raises(ValueError, match="block_size"):
        plan_alone([guest("g")], 0)
