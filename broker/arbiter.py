"""Arbitration: how the host's capacity is divided among guests.

A pure function of what the broker knows at one instant (`arbitrate`): no I/O,
no clock, no asyncio, no state between calls. The server collects guest views,
calls `arbitrate`, then acts on the returned `Plan` (Grants, Reclaims, QEMU
hot-plug). docs/broker.md explains each rule and why it is there.

CPUs and memory are divided independently, by the same algorithm, in whole
units: one CPU, or one memory block of `block_size` bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

_MIB = 1 << 20
_GIB = 1 << 30


@dataclass(frozen=True)
class Amount:
    """CPUs (logical CPUs) and memory (bytes), as one value."""

    cpus: int
    memory: int

    def __add__(self, other: Amount) -> Amount:
        return Amount(self.cpus + other.cpus, self.memory + other.memory)

    def __sub__(self, other: Amount) -> Amount:
        return Amount(self.cpus - other.cpus, self.memory - other.memory)

    def fits(self, within: Amount) -> bool:
        """True when both fields are at most those of `within`."""
        return self.cpus <= within.cpus and self.memory <= within.memory

    def max_each(self, other: Amount) -> Amount:
        return Amount(max(self.cpus, other.cpus), max(self.memory, other.memory))

    def min_each(self, other: Amount) -> Amount:
        return Amount(min(self.cpus, other.cpus), min(self.memory, other.memory))


@dataclass(frozen=True)
class GuestLimits:
    """Bounds for one guest: minimum <= maximum <= burst, field by field."""

    minimum: Amount  # guaranteed and reserved, even while disconnected
    maximum: Amount  # ceiling for normal surplus
    burst: Amount  # ceiling when capacity is idle; equal to maximum when bursting is off
    priority: int  # higher wins the surplus and is reclaimed last


@dataclass(frozen=True)
class GuestView:
    """What the broker knows of one guest at one instant.

    `held` and `releasing` are disjoint: once a Reclaim is sent the server moves
    the difference from `held` to `releasing`, and drops it from `releasing`
    when the guest has acknowledged and the backend has unplugged it. A guest
    that has not asked for anything yet should carry `demand == held`.
    """

    guest_id: str
    limits: GuestLimits
    held: Amount  # current entitlement, plugged (counts as used)
    demand: Amount  # desired totals from the guest's last request
    releasing: Amount  # reclaimed, not yet acknowledged and unplugged (still used)
    connected: bool


@dataclass(frozen=True)
class Pool:
    capacity: Amount  # what the broker may hand out in total across guests


@dataclass(frozen=True)
class Plan:
    """The arbiter's answer; every mapping is keyed by guest_id.

    A guest whose CPUs rise while its memory falls (or the reverse) is in both
    `grants` and `reclaims` with the same totals: entitlements, not deltas, so
    the two messages commute.
    """

    targets: Mapping[str, Amount]  # new entitlement of every guest
    grants: Mapping[str, Amount]  # guests with a field that rises: their new totals
    reclaims: Mapping[str, Amount]  # guests with a field that falls: their target totals
    # One line per guest that changes, waits for releases, or lacks its minimum.
    reasons: Mapping[str, str]


def arbitrate(pool: Pool, guests: Sequence[GuestView], block_size: int) -> Plan:
    """Divide `pool` among `guests`; see docs/broker.md for the rules.

    Raises ValueError (naming the guest and the field) on negative amounts,
    minimum > maximum, burst < maximum, duplicate guest ids or a block_size
    that is not positive.
    """
    _validate(pool, guests, block_size)
    ordered = sorted(guests, key=lambda g: g.guest_id)
    cpus = _divide(pool.capacity.cpus, _claims(ordered, _cpus, 1))
    memory = _divide(_down(pool.capacity.memory, block_size), _claims(ordered, _memory, block_size))

    return _plan((g, _settle(g, cpus[g.guest_id], memory[g.guest_id], block_size)) for g in ordered)


def footprint(guest: GuestView, block_size: int) -> Amount:
    """What `guest` takes from the pool once every guest has its own ideal.

    Whole CPUs and whole memory blocks (in bytes): a connected guest's ideal
    alone (rules 2-5 with nobody else asking) or what it holds, whichever is
    more, plus what it is releasing; a disconnected guest's holdings, at least
    its minimum. When the footprints of all guests fit the pool
    (`uncontended`), every tier of `arbitrate` is served in full and every rise
    fits in free capacity: no guest's plan depends on another's, and
    `plan_alone` gives each guest's part of the plan.
    """
    return Amount(
        _footprint(_claim(guest, _cpus, 1)),
        _footprint(_claim(guest, _memory, block_size)) * block_size,
    )


def uncontended(pool: Pool, total: Amount, block_size: int) -> bool:
    """Whether `total`, the sum of every guest's `footprint`, fits `pool`."""
    return total.cpus <= pool.capacity.cpus and total.memory <= (
        _down(pool.capacity.memory, block_size) * block_size
    )


def plan_alone(guests: Sequence[GuestView], block_size: int) -> Plan:
    """The parts of `guests` in `arbitrate(pool, all_guests, block_size)` while
    the pool is `uncontended` (the footprints of all guests fit it): each guest's
    part is computed alone, in O(1), so a caller can plan only for the guests
    that changed.

    Raises ValueError as `arbitrate` does for these guests.
    """
    _validate_block_size(block_size)
    settled = []
    for g in guests:
        _validate_guest(g)
        cpus = _alone(_claim(g, _cpus, 1))
        memory = _alone(_claim(g, _memory, block_size))
        settled.append((g, _settle(g, cpus, memory, block_size)))
    return _plan(settled)


def _settle(
    guest: GuestView, cpus: _Outcome, memory: _Outcome, block_size: int
) -> tuple[Amount, str]:
    """One guest's target from its two outcomes, and why ("": nothing to say)."""
    target = Amount(_exact(cpus, guest, _cpus, 1), _exact(memory, guest, _memory, block_size))
    clauses = [
        clause
        for clause in (
            _explain("cpus", cpus, str),
            _explain("memory", memory, lambda n: _bytes(n * block_size)),
        )
        if clause
    ]
    if clauses:
        return target, "; ".join(clauses)
    if target != guest.held:
        # Same whole blocks, but a held figure below the minimum is rounded up.
        return target, "memory rounded up to the whole blocks that cover its minimum"
    return target, ""


def _plan(settled: Iterable[tuple[GuestView, tuple[Amount, str]]]) -> Plan:
    targets: dict[str, Amount] = {}
    grants: dict[str, Amount] = {}
    reclaims: dict[str, Amount] = {}
    reasons: dict[str, str] = {}
    for guest, (target, reason) in settled:
        gid = guest.guest_id
        targets[gid] = target
        if not target.fits(guest.held):
            grants[gid] = target
        if not guest.held.fits(target):
            reclaims[gid] = target
        if reason:
            reasons[gid] = reason
    return Plan(targets=targets, grants=grants, reclaims=reclaims, reasons=reasons)


# ------------------------------------------------------------------ one resource


@dataclass(frozen=True)
class _Claim:
    """One guest's view for one resource, in whole units (rounded: see `_claims`)."""

    guest_id: str
    priority: int
    connected: bool
    minimum: int
    maximum: int
    burst: int
    held: int
    want: int
    releasing: int


@dataclass(frozen=True)
class _Outcome:
    """What `_divide` decided for one guest and one resource, with the steps that explain it."""

    claim: _Claim
    reserved: int  # minimum actually reserved: below claim.minimum only when minimums overflow
    normal: int  # the normal claim: want clamped to [minimum, maximum]
    ideal: int  # entitlement once every pending release has landed
    target: int  # entitlement now
    pool: int  # what the guests could share (capacity less stranded holdings)


@dataclass(frozen=True)
class _Request:
    guest_id: str
    priority: int
    start: int  # level the guest already has
    cap: int  # level it may reach in this round


def _divide(capacity: int, claims: Sequence[_Claim]) -> dict[str, _Outcome]:
    """Divide `capacity` units among `claims` (sorted by guest_id)."""
    connected = [c for c in claims if c.connected]
    # A disconnected guest cannot answer a Reclaim, so what it holds above its
    # minimum stays plugged until the backend takes it back: not ours to divide.
    stranded = sum(max(0, c.held - c.minimum) for c in claims if not c.connected)
    pool = max(0, capacity - stranded)

    # Pass 1, the ideal: tiers in order, each by priority then water-filling.
    # 1. Minimums, for every guest: they are guarantees, so reserved while disconnected.
    reserved = _fill(pool, [_Request(c.guest_id, c.priority, 0, c.minimum) for c in claims])
    left = pool - sum(reserved.values())
    # 2. Normal demand, up to maximum.
    normal = {c.guest_id: min(max(c.want, c.minimum), c.maximum) for c in connected}
    level = {c.guest_id: reserved[c.guest_id] for c in connected}
    left = _raise(level, left, connected, lambda c: normal[c.guest_id])
    # 3. Burst demand (maximum..burst): only reached when every normal claim is
    # met, so it is served from idle capacity, and it is the first demand to go
    # when the pool gets short.
    left = _raise(level, left, connected, lambda c: min(c.want, c.burst))
    # 4. Holdings above demand, up to maximum: not the arbiter's business (the
    # agent releases them) unless a demand above needs the capacity.
    _raise(level, left, connected, lambda c: min(c.held, c.maximum))
    ideal = level

    # Pass 2, what may happen now. Capacity is free only once unplugged: a
    # guest's held (even while it is being reclaimed) and releasing stay used,
    # and minimums stay reserved. Rises beyond that wait for releases.
    occupied = sum(max(c.held, reserved[c.guest_id]) + c.releasing for c in claims)
    free = max(0, capacity - occupied)
    growers = [c for c in connected if ideal[c.guest_id] > max(c.held, reserved[c.guest_id])]
    now = {c.guest_id: max(c.held, reserved[c.guest_id]) for c in growers}
    # Normal rises first, so that burst never takes capacity a normal claim wants.
    free = _raise(now, free, growers, lambda c: min(ideal[c.guest_id], normal[c.guest_id]))
    _raise(now, free, growers, lambda c: ideal[c.guest_id])

    outcomes: dict[str, _Outcome] = {}
    for c in claims:
        gid = c.guest_id
        if not c.connected:
            # No session to send a Grant or Reclaim to: nothing changes.
            target = c.held
        elif ideal[gid] < c.held:
            # A guest refuses a Reclaim below its minimum, so never ask for one
            # (this only binds when minimums overflow the pool).
            target = max(ideal[gid], min(c.held, c.minimum))
        else:
            target = now.get(gid, max(c.held, reserved[gid]))
        outcomes[gid] = _Outcome(
            claim=c,
            reserved=reserved[gid],
            normal=normal.get(gid, c.minimum),
            ideal=ideal.get(gid, c.held),
            target=target,
            pool=pool,
        )
    return outcomes


def _alone(c: _Claim) -> _Outcome:
    """`_divide`'s outcome for `c` when every guest's footprint fits the pool:
    the minimum is reserved, every tier is served in full (the ideal is the
    guest's own), and every rise fits in free capacity (the target is the ideal,
    which never lies below the minimum, so no reclaim is clamped)."""
    if not c.connected:
        # `pool` only words a minimum that is not covered, which cannot happen here.
        return _Outcome(
            c, reserved=c.minimum, normal=c.minimum, ideal=c.held, target=c.held, pool=0
        )
    normal = min(max(c.want, c.minimum), c.maximum)
    ideal = max(normal, min(c.want, c.burst), min(c.held, c.maximum))
    return _Outcome(c, reserved=c.minimum, normal=normal, ideal=ideal, target=ideal, pool=0)


def _footprint(c: _Claim) -> int:
    """Units `c` occupies once at its own ideal (see `footprint`)."""
    if not c.connected:
        return max(c.held, c.minimum) + c.releasing
    return max(c.held, _alone(c).ideal) + c.releasing


def _raise(
    level: dict[str, int], amount: int, claims: Sequence[_Claim], cap: Callable[[_Claim], int]
) -> int:
    """Raise `level` towards `cap` with up to `amount` units; return what is left."""
    given = _fill(
        amount, [_Request(c.guest_id, c.priority, level[c.guest_id], cap(c)) for c in claims]
    )
    for gid, units in given.items():
        level[gid] += units
    return amount - sum(given.values())


def _fill(amount: int, requests: Sequence[_Request]) -> dict[str, int]:
    """Units each request receives out of `amount`: by priority, then water-filling.

    A higher priority is served in full before a lower one gets anything. Within
    one priority, levels rise together (max-min fairness on totals), and the
    units that cannot be split evenly go one each in guest_id order, so the same
    input always yields the same answer and the odd unit does not hop between
    guests from one call to the next.
    """
    given = {r.guest_id: 0 for r in requests}
    for priority in sorted({r.priority for r in requests}, reverse=True):
        if amount <= 0:
            break
        tier = sorted((r for r in requests if r.priority == priority), key=lambda r: r.guest_id)
        shares = _water_fill(amount, tier)
        given.update(shares)
        amount -= sum(shares.values())
    return given


def _water_fill(amount: int, tier: Sequence[_Request]) -> dict[str, int]:
    def cost(level: int) -> int:
        return sum(max(0, min(r.cap, level) - r.start) for r in tier)

    top = max(r.cap for r in tier)
    if cost(top) <= amount:
        return {r.guest_id: max(0, r.cap - r.start) for r in tier}
    # Highest common level that fits: cost(low) <= amount < cost(high).
    low, high = 0, top
    while high - low > 1:
        mid = (low + high) // 2
        if cost(mid) <= amount:
            low = mid
        else:
            high = mid
    shares = {r.guest_id: max(0, min(r.cap, low) - r.start) for r in tier}
    left = amount - sum(shares.values())
    # Fewer units are left than guests that could take one more at `low`.
    for r in tier:
        if left == 0:
            break
        if r.start <= low < r.cap:
            shares[r.guest_id] += 1
            left -= 1
    return shares


# ------------------------------------------------------------------ units, checks, words


def _cpus(amount: Amount) -> int:
    return amount.cpus


def _memory(amount: Amount) -> int:
    return amount.memory


def _up(value: int, unit: int) -> int:
    return -(-value // unit)


def _down(value: int, unit: int) -> int:
    return value // unit


def _claims(guests: Sequence[GuestView], field: Callable[[Amount], int], unit: int) -> list[_Claim]:
    return [_claim(g, field, unit) for g in guests]


def _claim(g: GuestView, field: Callable[[Amount], int], unit: int) -> _Claim:
    """One guest's whole-unit claim for one resource.

    Rounding never lets a guest fall below its minimum nor the pool be
    overcommitted: minimum, demand, held and releasing round up; maximum, burst
    and capacity round down (but never below the rounded minimum).
    """
    minimum = _up(field(g.limits.minimum), unit)
    maximum = max(_down(field(g.limits.maximum), unit), minimum)
    return _Claim(
        guest_id=g.guest_id,
        priority=g.limits.priority,
        connected=g.connected,
        minimum=minimum,
        maximum=maximum,
        burst=max(_down(field(g.limits.burst), unit), maximum),
        held=_up(field(g.held), unit),
        want=_up(field(g.demand), unit),
        releasing=_up(field(g.releasing), unit),
    )


def _exact(outcome: _Outcome, guest: GuestView, field: Callable[[Amount], int], unit: int) -> int:
    """The target in the caller's unit (bytes for memory)."""
    held = field(guest.held)
    # An unchanged entitlement keeps its exact figure: boot memory need not be
    # block-aligned, and rounding it would send a Grant or Reclaim for nothing.
    if not guest.connected or (
        outcome.target == outcome.claim.held and held >= field(guest.limits.minimum)
    ):
        return held
    return outcome.target * unit


def _explain(name: str, o: _Outcome, fmt: Callable[[int], str]) -> str:
    """Why this resource changes, waits or misses its minimum; empty when nothing to say."""
    c = o.claim
    why: list[str] = []
    if o.reserved < c.minimum:
        why.append(
            f"minimum {fmt(c.minimum)} not covered: the minimums of all guests "
            f"exceed the pool ({fmt(o.pool)}) and are served by priority"
        )
    if c.connected and o.target < o.ideal:
        why.append(f"{fmt(o.ideal - o.target)} more once reclaimed capacity is unplugged")
    if o.target > c.held:
        if o.target > c.maximum:
            why.append(f"burst from idle capacity (asked {fmt(c.want)}, maximum {fmt(c.maximum)})")
        elif c.held < c.minimum and o.target <= c.minimum:
            why.append("up to its minimum")
        elif o.ideal < o.normal:
            why.append(f"pool short (asked {fmt(c.want)}, priority {c.priority})")
        elif c.want > c.maximum:
            why.append(f"asked {fmt(c.want)}, capped at maximum {fmt(c.maximum)}")
        else:
            why.append(f"asked {fmt(c.want)}")
    elif o.target < c.held:
        # What it could keep were every other guest idle: more is a limit matter.
        keep = max(o.normal, min(c.want, c.burst), min(c.held, c.maximum))
        if c.held > c.burst:
            why.append(f"held above its burst limit {fmt(c.burst)} (limits lowered)")
        elif c.held > keep:
            why.append(
                f"holds burst it did not ask for (asked {fmt(c.want)}, maximum {fmt(c.maximum)})"
            )
        if o.ideal < o.normal:
            why.append(
                f"pool short: needed by guests of higher or equal priority (its {c.priority})"
            )
        elif o.ideal < min(c.want, c.burst):
            why.append("burst taken back: a normal claim needs the capacity")
        elif o.ideal < keep:
            why.append(f"holds more than it asked for ({fmt(c.want)}) and others need it")
    if not why:
        return ""
    change = f" {fmt(c.held)} -> {fmt(o.target)}" if o.target != c.held else ""
    return f"{name}{change}: {', '.join(why)}"


def _bytes(n: int) -> str:
    if n and n % _GIB == 0:
        return f"{n // _GIB} GiB"
    if n and n % _MIB == 0:
        return f"{n // _MIB} MiB"
    return f"{n} B"


def _validate(pool: Pool, guests: Sequence[GuestView], block_size: int) -> None:
    _validate_block_size(block_size)
    for field, value in (("cpus", pool.capacity.cpus), ("memory", pool.capacity.memory)):
        if value < 0:
            raise ValueError(f"pool: capacity.{field} is {value}, must be >= 0")
    seen: set[str] = set()
    for g in guests:
        if g.guest_id in seen:
            raise ValueError(f"guest {g.guest_id!r}: guest_id appears twice")
        seen.add(g.guest_id)
        _validate_guest(g)


def _validate_block_size(block_size: int) -> None:
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")


def _validate_guest(g: GuestView) -> None:
    amounts = {
        "limits.minimum": g.limits.minimum,
        "limits.maximum": g.limits.maximum,
        "limits.burst": g.limits.burst,
        "held": g.held,
        "demand": g.demand,
        "releasing": g.releasing,
    }
    for name, amount in amounts.items():
        for field, value in (("cpus", amount.cpus), ("memory", amount.memory)):
            if value < 0:
                raise ValueError(f"guest {g.guest_id!r}: {name}.{field} is {value}, must be >= 0")
    lim = g.limits
    for field, low, high in (
        ("cpus", lim.minimum.cpus, lim.maximum.cpus),
        ("memory", lim.minimum.memory, lim.maximum.memory),
    ):
        if low > high:
            raise ValueError(
                f"guest {g.guest_id!r}: limits.minimum.{field} ({low}) "
                f"> limits.maximum.{field} ({high})"
            )
    for field, high, top in (
        ("cpus", lim.maximum.cpus, lim.burst.cpus),
        ("memory", lim.maximum.memory, lim.burst.memory),
    ):
        if top < high:
            raise ValueError(
                f"guest {g.guest_id!r}: limits.burst.{field} ({top}) "
                f"< limits.maximum.{field} ({high})"
            )
