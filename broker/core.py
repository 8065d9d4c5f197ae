"""The broker's bookkeeping: what each guest holds, wants and is giving back.

`Broker` owns one `GuestRecord` per configured guest and the capacity pool.
Sessions feed it guest messages; it runs the arbiter and turns the plan into
hot-plugs and Grants, or Reclaims whose acknowledgements lead to unplugs.

Accounting rules:
- a guest's truth comes from its Hello and Acks (what its kernel has online);
- capacity a Reclaim asks back stays counted ("releasing") until the guest has
  acknowledged and the backend has unplugged it, so it is never handed out twice;
- a guest that disconnects keeps what it holds; its next Hello corrects the books;
- a guest whose hypervisor cannot be reached is neither grown nor shrunk (nothing
  could be plugged or unplugged) until it answers again, and then what it has
  plugged is read afresh; one the broker never reached is counted at its burst
  limit, the most it could hold;
- memory a reclaim could not unplug may be squeezed by the guest's balloon
  (`balloon_fallback`), but stays counted as the guest's.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import json
import logging
import math
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from broker.arbiter import (
    Amount,
    GuestLimits,
    GuestView,
    Pool,
    arbitrate,
    footprint,
    plan_alone,
    uncontended,
)
from broker.backend import Backend, BackendError, EjectRefused, PlugState
from broker.config import BrokerConfig, GuestConfig
from broker.metrics import BrokerMetrics
from vmtide.v1 import broker_pb2 as pb

log = logging.getLogger("vmtide.broker")

ZERO = Amount(0, 0)
# After a reclaim's deadline the guest gets this long for its Ack to arrive
# before the broker stops waiting (the capacity stays counted either way).
_ACK_GRACE_SECONDS = 5.0
# A guest that could not give everything back (pinned pages, EBUSY) is not
# asked again at once: the kernel would refuse the same blocks again.
SHORT_RECLAIM_BACKOFF_SECONDS = 30.0
# The state file is for `vmtide-broker status` and operators. Only the entries
# of guests that changed are encoded again, but joining and writing it is still
# O(guests), so it is written at most this often and never between a request
# and its Grant.
STATE_WRITE_INTERVAL_SECONDS = 1.0
# A hot-plug the hypervisor refused is not tried again on every arbitration:
# the refusal is often lasting (no free slot, TCG out of vCPUs, host memory).
PLUG_BACKOFF_SECONDS = 15.0
# How long a session's opening waits for the hypervisor to say what is plugged.
_PLUGGED_TIMEOUT_SECONDS = 5.0
# Listed memory blocks may exceed plugged bytes by partial blocks (RAM
# regions and devices that do not end on a block boundary): this many.
_PLUGGED_SLACK_BLOCKS = 2
# An Ack reporting a vanished CPU or block prompts a hypervisor query, at most this often.
_VANISHED_CHECK_SECONDS = 1.0
# A guest names the request's urgency; an unknown value is logged as a number.
_URGENCIES = {value: name for name, value in pb.Urgency.items()}
# A request's reason is the guest's words: only this much of it reaches the log.
_REASON_CHARS = 200
# While the pool is uncontended, a round plans for at most this many guests,
# those that asked first: a thousand sessions opening at once (a broker
# restart), or their first reports, would otherwise hold every request behind
# a quarter-second round. The rest wait for the rounds that follow at once.
ROUND_GUESTS = 64


@dataclass
class PendingReclaim:
    reclaim_id: int
    target: Amount
    releasing: Amount
    deadline: float
    # Its Ack came and the unplugs are under way: not expired meanwhile.
    acknowledged: bool = False


@dataclass
class GuestRecord:
    config: GuestConfig
    backend: Backend
    limits: GuestLimits
    outbox: asyncio.Queue[pb.BrokerMessage | None] | None = None
    session_id: str = ""
    online: Amount = ZERO  # the guest kernel's truth, from Hello and Acks
    entitled: Amount = ZERO  # what the last Grant or Reclaim allowed
    demand: Amount = ZERO  # the last request
    present_cpus: frozenset[int] = frozenset()
    present_memory: int = 0  # bytes of listed blocks, online or not
    block_size: int = 128 << 20
    pending: dict[int, PendingReclaim] = field(default_factory=dict)
    last_report: pb.LoadReport | None = None
    last_request_at: float = 0.0
    last_grant_id: int = 0  # the latest Grant sent in this session
    reclaim_backoff_until: float = 0.0
    # What the hypervisor said it has plugged when the latest Hello was
    # checked: the session's books start from it, not from the guest's word.
    hello_state: PlugState | None = None
    vanished_checked_at: float = -math.inf  # the last hypervisor query for a NOT_FOUND
    # After a failed hot-plug of a resource ("cpus", "memory"), not again before
    # this: a guest out of vCPU slots still gets memory, and the reverse.
    plug_backoff_until: dict[str, float] = field(default_factory=dict)
    # Counted as plugged when the hypervisor never said (unreachable at start).
    assumed_plugged: Amount = ZERO
    # Why the hypervisor is unreachable ("" while it answers).
    backend_error: str = ""
    # What the broker last asked the guest's balloon to hold.
    balloon_bytes: int = 0
    balloon_backoff_until: float = 0.0
    # The newest request that came over the rate limit, taken up in its turn.
    deferred_request: pb.ResourceRequest | None = None
    # Whether this session's guest has asked yet: until then what is plugged
    # but offline is neither granted nor taken back (it may be standby).
    asked: bool = False

    @property
    def id(self) -> str:
        return self.config.id

    @property
    def connected(self) -> bool:
        return self.outbox is not None

    @property
    def releasing(self) -> Amount:
        total = ZERO
        for reclaim in self.pending.values():
            total = total + reclaim.releasing
        return total

    @property
    def plugged(self) -> Amount:
        """What is plugged into the guest, online or not."""
        return Amount(len(self.present_cpus), self.present_memory).max_each(self.assumed_plugged)

    @property
    def changeable(self) -> bool:
        """Whether the guest can be granted or reclaimed anything: it has a
        session, and its hypervisor answers (to plug and unplug)."""
        # backend_error is cleared only once what is plugged has been re-read
        # after a reconnection: until then the books may describe the old QEMU.
        return self.connected and self.backend.available and not self.backend_error

    @property
    def held(self) -> Amount:
        """Capacity in use, disjoint from `releasing` as the arbiter wants.

        Plugged counts even where nothing is online: a grant the agent never
        finished, or what an agent killed before its Ack had offlined, is not
        free until unplugged (arbiter rule 8), and counted it is reclaimed.
        """
        if self.pending:
            return self.entitled  # the reclaim's target; the rest is releasing
        return self.online.max_each(self.entitled).max_each(self.plugged)

    def send(self, message: pb.BrokerMessage) -> None:
        if self.outbox is not None:
            self.outbox.put_nowait(message)


def _amount(a: Amount) -> dict[str, int]:
    return {"cpus": a.cpus, "memory_bytes": a.memory}


def limits_from_config(guest: GuestConfig) -> GuestLimits:
    cpus, memory = guest.cpus, guest.memory
    return GuestLimits(
        minimum=Amount(cpus.minimum, memory.minimum_bytes),
        maximum=Amount(cpus.maximum, memory.maximum_bytes),
        burst=Amount(cpus.burst or cpus.maximum, memory.burst_bytes or memory.maximum_bytes),
        priority=guest.priority,
    )


def limits_to_proto(limits: GuestLimits) -> pb.Limits:
    return pb.Limits(
        cpus=pb.ResourceLimits(
            minimum=limits.minimum.cpus, maximum=limits.maximum.cpus, burst=limits.burst.cpus
        ),
        memory_bytes=pb.ResourceLimits(
            minimum=limits.minimum.memory,
            maximum=limits.maximum.memory,
            burst=limits.burst.memory,
        ),
    )


def guest_words(text: str) -> str:
    """A guest's free text, fit for one log line: cut short, and with newlines
    and other control characters escaped, so a guest cannot forge log lines."""
    cut = text[:_REASON_CHARS]
    words = "".join(c if c.isprintable() else repr(c)[1:-1] for c in cut)
    return words + ("..." if len(text) > _REASON_CHARS else "")


class ProtocolViolationError(Exception):
    """A guest message that makes no sense; the message is refused, the session goes on."""


class Broker:
    def __init__(
        self,
        config: BrokerConfig,
        backends: dict[str, Backend],
        metrics: BrokerMetrics,
        clock: Callable[[], float] = time.monotonic,
        *,
        incremental: bool = True,
        round_guests: int = ROUND_GUESTS,
    ) -> None:
        """`incremental=False` runs the arbiter over every guest in every round:
        the reference the incremental rounds are tested against. `round_guests`
        caps the guests an incremental round plans for (ROUND_GUESTS)."""
        if round_guests < 1:
            raise ValueError(f"round_guests must be at least 1, not {round_guests}")
        self.config = config
        self.metrics = metrics
        self.pool = Pool(capacity=Amount(config.pool.cpus, config.pool.memory_bytes))
        self.guests = {
            g.id: GuestRecord(g, backends[g.id], limits_from_config(g)) for g in config.guests
        }
        self._clock = clock
        for guest_id in self.guests:
            metrics.add_guest(guest_id)
        # Grant, reclaim and session ids: unique across restarts too, so that
        # logs on both sides never mix two brokers' messages up.
        self._ids = itertools.count(int(time.time() * 1000))
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        # Incremental rounds (docs/broker.md, "Rounds"): while the footprints
        # of all guests fit the pool, each guest's plan is its own, so a round
        # looks only at the guests that changed since the last one (`_dirty`,
        # oldest change first) and at those it left with something to do
        # (`_active`): the arbiter would plan nothing for the others. Of the
        # changed guests, those with a request (`_asking`) come first, and
        # past `round_guests` the rest stay dirty for the next round. A
        # contended pool, or `incremental=False`, makes it look at every guest
        # (`_everyone`).
        self._incremental = incremental
        self._round_guests = round_guests
        self._dirty: dict[str, None] = dict.fromkeys(self.guests)
        self._active: set[str] = set()
        self._asking: set[str] = set()
        self._everyone = True
        # Each guest's footprint and use (held + releasing) as last computed,
        # and their sums: what the pool's contention and gauges are read from;
        # `_unrefreshed` changed since.
        self._unrefreshed: set[str] = set(self.guests)
        self._footprints: dict[str, Amount] = {}
        self._footprint_total = ZERO
        self._used: dict[str, Amount] = {}
        self._used_total = ZERO
        # Each guest's entry in the state file, encoded; re-encoded when stale.
        self._status_parts = dict.fromkeys(self.guests, "")
        self._status_stale: set[str] = set(self.guests)
        self._state_timer: asyncio.TimerHandle | None = None
        self._state_written_at = -STATE_WRITE_INTERVAL_SECONDS
        # What the metrics last showed of each guest's books: a round updates
        # only the guests that changed, not every guest's gauges.
        self._books_shown: dict[str, tuple[Amount, Amount]] = {}

    # --------------------------------------------------------------- sessions

    async def check_plugged(self, guest_id: str, hello: pb.Hello) -> str | None:
        """Why a Hello's topology cannot be true of what the hypervisor has
        plugged into the guest, or None.

        The Hello is the guest's word, and its books start from it: a guest
        claiming CPUs or memory it does not have would hold capacity that
        others need. What the hypervisor says bounds it; when the hypervisor
        cannot answer, the Hello is believed (and the failure logged).
        """
        self.guests[guest_id].hello_state = None
        try:
            state = await asyncio.wait_for(
                self.guests[guest_id].backend.state(), _PLUGGED_TIMEOUT_SECONDS
            )
        except (BackendError, TimeoutError) as err:
            log.warning(
                "guest %s: cannot check its hello against the hypervisor: %s", guest_id, err
            )
            return None
        self.guests[guest_id].hello_state = state
        present = len(hello.topology.cpus.present)
        if present > len(state.cpus):
            return (
                f"topology: {present} CPUs present, but the hypervisor has plugged "
                f"{len(state.cpus)}"
            )
        memory = hello.topology.memory
        listed = len(memory.blocks) * memory.block_size_bytes
        block = memory.block_size_bytes
        ceiling = -(-state.max_memory_bytes // block) * block + _PLUGGED_SLACK_BLOCKS * block
        if listed > ceiling:
            return (
                f"topology: {listed >> 20} MiB of memory blocks listed, but this guest "
                f"can have at most {state.max_memory_bytes >> 20} MiB"
            )
        return None

    def open_session(
        self, guest_id: str, hello: pb.Hello
    ) -> tuple[GuestRecord, asyncio.Queue[pb.BrokerMessage | None]]:
        guest = self.guests[guest_id]
        if guest.outbox is not None:
            log.warning("guest %s opened a new session; closing the old one", guest_id)
            guest.outbox.put_nowait(None)
        outbox: asyncio.Queue[pb.BrokerMessage | None] = asyncio.Queue()
        guest.outbox = outbox
        guest.session_id = f"{guest_id}-{next(self._ids)}"
        self._apply_topology(guest, hello.topology)
        # The books follow the guest: what it has online is what it holds. A
        # reclaim in flight before the disconnect is over: its capacity is
        # either still online (counted) or gone.
        guest.pending.clear()
        guest.deferred_request = None
        guest.entitled = guest.online
        # Until its first request the guest asks for nothing more and offers
        # nothing back: CPUs plugged but offline may be standby it keeps
        # ([limits.cpus] standby), and the agent restates what it wants at
        # once. Taken back here, they would be unplugged before it could say.
        guest.demand = guest.held
        guest.asked = False
        guest.send(
            pb.BrokerMessage(
                welcome=pb.Welcome(
                    session_id=guest.session_id,
                    protocol_version=min(hello.protocol_version, 1),
                    guest_id=guest_id,
                    limits=limits_to_proto(guest.limits),
                    report_interval_ms=1000,
                )
            )
        )
        # Tell the agent what it may hold (it forgets on restart).
        guest.send(pb.BrokerMessage(grant=self._grant_message(guest, guest.entitled, [], 0)))
        self.metrics.session(guest_id, connected=True)
        log.info(
            "guest %s: session %s, %d cpus and %d MiB online",
            guest_id,
            guest.session_id,
            guest.online.cpus,
            guest.online.memory >> 20,
        )
        self.changed(guest)
        return guest, outbox

    def close_session(
        self, guest: GuestRecord, outbox: asyncio.Queue[pb.BrokerMessage | None]
    ) -> None:
        if guest.outbox is outbox:
            guest.outbox = None
            guest.demand = guest.held  # asks for nothing more while away
            self.metrics.session(guest.id, connected=False)
            log.info("guest %s: session %s closed", guest.id, guest.session_id)
            self.changed(guest)

    def _apply_topology(self, guest: GuestRecord, topology: pb.Topology) -> None:
        memory = topology.memory
        if memory.block_size_bytes:
            guest.block_size = memory.block_size_bytes
        online_blocks = sum(b.state == pb.BLOCK_STATE_ONLINE for b in memory.blocks)
        guest.online = Amount(len(topology.cpus.online), online_blocks * guest.block_size)
        state, guest.hello_state = guest.hello_state, None
        if state is not None:
            # Plugged is the hypervisor's word: a guest listing fewer CPUs or
            # blocks than QEMU holds for it must not have them handed out
            # twice. Online is the guest's, bounded by what is plugged.
            self._count_plugged(guest, state)
        else:
            guest.present_cpus = frozenset(topology.cpus.present)
            guest.present_memory = len(memory.blocks) * guest.block_size

    # --------------------------------------------------------------- messages

    async def on_message(self, guest: GuestRecord, message: pb.GuestMessage) -> None:
        body = message.WhichOneof("body")
        if body == "report":
            guest.last_report = message.report
            # The guest's kernel is the truth; a report also catches onlining
            # no Ack told of (a distribution's udev rule, a rescan).
            report = message.report
            online = self._believe(guest, "report", report.online_cpus, report.online_memory_bytes)
            if online != guest.online:
                guest.online = online
                self.noted(guest)
            self.metrics.report(guest.id, report)
        elif body == "request":
            self._on_request(guest, message.request)
        elif body == "ack":
            await self._on_ack(guest, message.ack)
        elif body == "hello":
            raise ProtocolViolationError("a second hello in one session")
        else:
            raise ProtocolViolationError("a message with no known body")

    def _on_request(self, guest: GuestRecord, request: pb.ResourceRequest) -> None:
        now = self._clock()
        rate = self.config.broker.max_requests_per_second
        wait = self._request_wait(guest, now)
        if wait > 0:
            # Over the rate: the newest request waits for its turn and
            # supersedes any that waited before it (requests are totals, so
            # only the last one matters); one log line per wait, not per request.
            self.metrics.failure(guest.id, "rate_limited")
            if guest.deferred_request is None:
                log.warning(
                    "guest %s: request %d held back %.2f s (over %g requests/s)",
                    guest.id,
                    request.request_id,
                    wait,
                    rate,
                )
                asyncio.get_running_loop().call_later(wait, functools.partial(self.changed, guest))
            guest.deferred_request = request
            self.noted(guest)  # rounds watch it until it is taken up
            return
        self._take_request(guest, request, now)

    def _request_wait(self, guest: GuestRecord, now: float) -> float:
        """Seconds before this guest's next request may be taken up."""
        return guest.last_request_at + 1.0 / self.config.broker.max_requests_per_second - now

    def _take_request(self, guest: GuestRecord, request: pb.ResourceRequest, now: float) -> None:
        guest.deferred_request = None
        guest.last_request_at = now
        guest.asked = True
        limits = guest.limits
        wanted = Amount(request.cpus, request.memory_bytes // guest.block_size * guest.block_size)
        if request.seen_grant_id != guest.last_grant_id:
            # Asked before our latest grant reached it: less than that grant is
            # not an offer to give back, only more is news.
            wanted = wanted.max_each(guest.entitled)
        demand = Amount(
            min(max(wanted.cpus, limits.minimum.cpus), limits.burst.cpus),
            min(max(wanted.memory, limits.minimum.memory), limits.burst.memory),
        )
        if demand != wanted:
            log.info(
                "guest %s: request %d for %d cpus, %d MiB clamped to its limits "
                "(minimum %d cpus, %d MiB; burst %d cpus, %d MiB)",
                guest.id,
                request.request_id,
                request.cpus,
                request.memory_bytes >> 20,
                limits.minimum.cpus,
                limits.minimum.memory >> 20,
                limits.burst.cpus,
                limits.burst.memory >> 20,
            )
        guest.demand = demand
        log.info(
            "guest %s: request %d for %d cpus, %d MiB (%s; %s)",
            guest.id,
            request.request_id,
            demand.cpus,
            demand.memory >> 20,
            _URGENCIES.get(request.urgency, f"urgency {request.urgency}"),
            guest_words(request.reason),
        )
        self._asking.add(guest.id)
        self.changed(guest)

    def _believe(self, guest: GuestRecord, what: str, cpus: int, memory: int) -> Amount:
        """What a guest says it has online, never more than is plugged into it.

        A guest is untrusted: counted above what is plugged, it would hold
        capacity it does not have and starve the others.
        """
        claimed = Amount(cpus, memory)
        block = guest.block_size
        plugged = Amount(len(guest.present_cpus), -(-guest.present_memory // block) * block)
        if claimed.fits(plugged):
            return claimed
        self.metrics.failure(guest.id, "bad_message")
        log.warning(
            "guest %s: its %s claims %d cpus, %d MiB online, more than is plugged "
            "(%d cpus, %d MiB); counting what is plugged",
            guest.id,
            what,
            cpus,
            memory >> 20,
            plugged.cpus,
            plugged.memory >> 20,
        )
        return claimed.min_each(plugged)

    async def _on_ack(self, guest: GuestRecord, ack: pb.Ack) -> None:
        seen = (guest.held, guest.releasing)
        if any(item.outcome == pb.OUTCOME_NOT_FOUND for item in ack.items):
            await self._forget_vanished(guest)
        guest.online = self._believe(guest, "ack", ack.online_cpus, ack.online_memory_bytes)
        self.noted(guest)  # whatever follows: its online figure, maybe what is plugged
        if ack.WhichOneof("answers") != "reclaim_id":
            # The Ack of a grant usually changes nothing the arbiter sees (held
            # counts what is plugged): no round for it, only fresher status.
            if (guest.held, guest.releasing) != seen:
                self.changed(guest)
            else:
                self.state_changed()
            return
        pending = guest.pending.get(ack.reclaim_id)
        if pending is not None and pending.acknowledged:
            log.info(
                "guest %s: reclaim %d acknowledged twice; once is enough", guest.id, ack.reclaim_id
            )
            return
        if pending is None:
            log.warning("guest %s: ack for unknown reclaim %d ignored", guest.id, ack.reclaim_id)
            self.metrics.failure(guest.id, "unknown_ack")
            return
        offline_cpus = []
        offline_blocks = []
        for item in ack.items:
            if item.action != pb.ACTION_OFFLINE or item.outcome not in (
                pb.OUTCOME_DONE,
                pb.OUTCOME_ALREADY,
            ):
                if item.outcome in (pb.OUTCOME_REFUSED, pb.OUTCOME_TIMED_OUT):
                    self.metrics.failure(guest.id, "offline_refused")
                continue
            # Listed twice is offered once: the books subtract what the
            # backend removed, item by item.
            if (
                item.kind == pb.RESOURCE_KIND_CPU
                and item.index in guest.present_cpus
                and item.index
                and item.index not in offline_cpus
            ):
                offline_cpus.append(item.index)
            elif item.kind == pb.RESOURCE_KIND_MEMORY_BLOCK and item.index not in offline_blocks:
                offline_blocks.append(item.index)
        pending.acknowledged = True
        backend = guest.backend

        def left() -> float:  # the two unplugs share what is left of the deadline
            return max(1.0, pending.deadline - self._clock())

        removed_cpus = (
            await self._unplug(guest, lambda: backend.unplug_cpus(offline_cpus, left()))
            if offline_cpus
            else []
        )
        removed_blocks = (
            await self._unplug(
                guest, lambda: backend.unplug_memory(offline_blocks, guest.block_size, left())
            )
            if offline_blocks
            else []
        )
        guest.present_cpus = guest.present_cpus - set(removed_cpus)
        guest.present_memory -= len(removed_blocks) * guest.block_size
        # What went is not online any more, whatever the Ack said.
        guest.online = self._believe(guest, "ack", ack.online_cpus, ack.online_memory_bytes)
        # A new session may have cleared it while the unplugs ran.
        guest.pending.pop(ack.reclaim_id, None)
        # A guest that gave back more than asked (a block vanished under it,
        # and it offlined one more) holds no more than is plugged: an
        # entitlement above that would keep counting capacity nobody has.
        # Still wanting it, it is granted it again the usual way.
        guest.entitled = guest.entitled.min_each(guest.plugged)
        if not guest.held.fits(pending.target):
            # Refused offline, or offline but not unplugged: not again at once.
            guest.reclaim_backoff_until = self._clock() + SHORT_RECLAIM_BACKOFF_SECONDS
        # `entitled` already came down to the target when the reclaim was sent
        # (fields that rise wait for their grant); what did not go offline is
        # still online, Ack.online says so, and `held` counts it.
        self.metrics.reclaimed(
            guest.id, Amount(len(removed_cpus), len(removed_blocks) * guest.block_size)
        )
        log.info(
            "guest %s: reclaim %d acknowledged: unplugged cpus %s and %d blocks; "
            "%d cpus, %d MiB online%s",
            guest.id,
            ack.reclaim_id,
            removed_cpus or "none",
            len(removed_blocks),
            guest.online.cpus,
            guest.online.memory >> 20,
            f" ({guest_words(ack.note)})" if ack.note else "",
        )
        self.changed(guest)

    async def _unplug(
        self, guest: GuestRecord, unplug: Callable[[], Awaitable[list[int]]]
    ) -> list[int]:
        """What an unplug removed; a failure is logged and counted, never raised."""
        try:
            return await unplug()
        except EjectRefused as err:
            # The guest said no (an ACPI _OST failure): what it refused stays
            # plugged and counted, and the reclaim is short.
            log.error("guest %s: %s", guest.id, err)
            self.metrics.failure(guest.id, "eject_refused")
            return err.removed
        except BackendError as err:
            log.error("guest %s: unplug failed: %s", guest.id, err)
            self.metrics.failure(guest.id, "unplug_failed")
            return []

    async def _forget_vanished(self, guest: GuestRecord) -> None:
        """A CPU or block vanished under the agent: drop from the books what the
        hypervisor no longer has plugged (the guest's word alone lowers nothing).
        At most once a second per guest: Acks cost a guest nothing to send."""
        now = self._clock()
        if now - guest.vanished_checked_at < _VANISHED_CHECK_SECONDS:
            return
        guest.vanished_checked_at = now
        try:
            state = await guest.backend.state()
        except BackendError as err:
            log.warning("guest %s: cannot check what vanished: %s", guest.id, err)
            return
        guest.present_cpus = guest.present_cpus & state.cpus
        guest.present_memory = min(
            guest.present_memory, state.boot_memory_bytes + state.memory_bytes
        )

    async def load_plugged(self) -> None:
        """Count what the hypervisor has plugged into each guest before any Hello.

        After a broker restart a guest holds what the last broker gave it; a
        guest that reconnects late must not have that handed to another guest
        meanwhile. Its Hello then tells what is online.
        """
        for guest in self.guests.values():
            try:
                state = await guest.backend.state()
            except BackendError as err:
                # It may hold anything up to its burst limit, from the last
                # broker: count that until its hypervisor says, rather than
                # hand it to others and overcommit the host.
                guest.assumed_plugged = guest.limits.burst
                guest.demand = guest.held
                log.warning(
                    "guest %s: cannot read what is plugged (%s); counting it at its burst "
                    "limit, %d cpus and %d MiB, until its hypervisor answers",
                    guest.id,
                    err,
                    guest.limits.burst.cpus,
                    guest.limits.burst.memory >> 20,
                )
                self.noted(guest)
                continue
            self._count_plugged(guest, state)
            self.noted(guest)
            log.info(
                "guest %s: %d cpus and %d MiB plugged before its session",
                guest.id,
                len(state.cpus),
                guest.present_memory >> 20,
            )

    def _count_plugged(self, guest: GuestRecord, state: PlugState) -> None:
        """Take the hypervisor's word for what is plugged into the guest."""
        guest.present_cpus = state.cpus
        guest.present_memory = state.boot_memory_bytes + state.memory_bytes
        guest.assumed_plugged = ZERO
        guest.balloon_bytes = state.balloon_bytes
        block = guest.block_size
        plugged = Amount(len(state.cpus), -(-guest.present_memory // block) * block)
        guest.online = guest.online.min_each(plugged)
        if not guest.connected:
            guest.demand = guest.held  # asks for nothing more while away

    async def backend_up(self, guest_id: str) -> None:
        """The guest's hypervisor answers again (QEMU started, or restarted):
        read what it has plugged before anything is plugged into it."""
        guest = self.guests[guest_id]
        async with self._lock:
            try:
                state = await guest.backend.state()
            except BackendError as err:
                log.warning("guest %s: cannot read what is plugged: %s", guest_id, err)
                raise  # the supervisor counts the channel as down and retries
            self._count_plugged(guest, state)
            guest.backend_error = ""
            guest.plug_backoff_until.clear()
            log.info(
                "guest %s: hypervisor back: %d cpus and %d MiB plugged",
                guest_id,
                len(state.cpus),
                guest.present_memory >> 20,
            )
        self.changed(guest)

    def backend_down(self, guest_id: str, reason: str) -> None:
        """The guest's hypervisor cannot be reached: no plugging for it until
        `backend_up`; what it holds stays counted."""
        guest = self.guests[guest_id]
        guest.backend_error = reason
        self.metrics.failure(guest_id, "backend_unavailable")
        self.changed(guest)

    # ------------------------------------------------------------ arbitration

    def changed(self, guest: GuestRecord | None = None) -> None:
        """Run an arbitration round soon: `guest`'s books changed (None: anybody's
        may have, and the round looks at every guest)."""
        if guest is None:
            self._everyone = True
        else:
            self._touch(guest)
        self._wake.set()

    def noted(self, guest: GuestRecord) -> None:
        """`guest` changed in a way that needs no round of its own (a report's
        online figure, a grant's Ack): the next round and the state file see it."""
        self._touch(guest)

    def _touch(self, guest: GuestRecord) -> None:
        self._dirty.setdefault(guest.id)
        self._unrefreshed.add(guest.id)
        self._status_stale.add(guest.id)

    def _view(self, guest: GuestRecord) -> GuestView:
        return GuestView(
            guest_id=guest.id,
            limits=guest.limits,
            held=guest.held,
            demand=guest.demand,
            releasing=guest.releasing,
            # One whose hypervisor is away can neither grow nor shrink: the
            # arbiter keeps it as it is, as for a disconnected guest.
            connected=guest.changeable,
        )

    def _refresh(self, guest: GuestRecord, view: GuestView | None = None) -> None:
        """Bring the guest's footprint and use in the running totals up to date."""
        view = view or self._view(guest)
        gid = guest.id
        fits = footprint(view, self.config.broker.block_size_bytes)
        used = view.held + view.releasing
        self._footprint_total = self._footprint_total - self._footprints.get(gid, ZERO) + fits
        self._used_total = self._used_total - self._used.get(gid, ZERO) + used
        self._footprints[gid] = fits
        self._used[gid] = used
        self._unrefreshed.discard(gid)

    def _refresh_changed(self) -> None:
        """Refresh every guest that changed since its last refresh: the pool's
        contention and gauges are sums over every guest, planned for or not."""
        for gid in list(self._unrefreshed):
            self._refresh(self.guests[gid])

    async def run(self, stop: asyncio.Event) -> None:
        """Re-arbitrate on every change, and periodically for deadlines."""
        interval = self.config.broker.arbitrate_interval_seconds
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), interval)
            self._wake.clear()
            if stop.is_set():
                break
            try:
                if await self.rebalance():
                    self._wake.set()  # guests left for the next round, after the loop's other work
                    await asyncio.sleep(0)
            except Exception:
                log.exception("arbitration failed; guests keep what they hold")
                self._everyone = True  # whatever it left half-done is looked at again
            self.state_changed()
        if self._state_timer is not None:
            self._state_timer.cancel()  # the caller writes the final state
            self._state_timer = None

    async def rebalance(self) -> bool:
        """One arbitration round, and acting on its plan. Returns whether it left
        guests for the next round (at most `round_guests` are planned for).

        While the pool is uncontended the round plans only for the guests that
        changed or still have something to do, each alone (`plan_alone`), which
        gives what `arbitrate` over every guest would: the others would get no
        grant, no reclaim and no balloon change. Otherwise it runs the arbiter
        over every guest, as does the round after it.
        """
        async with self._lock:
            now = self._clock()
            block = self.config.broker.block_size_bytes
            if self._everyone or not self._incremental:
                self._everyone = False
                batch = list(self.guests.values())
                left: list[str] = []
            else:
                batch, left = self._next_batch()
                if not batch:
                    return False  # nobody changed, nobody has anything to do
            self._dirty = dict.fromkeys(left)
            self._take_due(batch, now)
            views = {g.id: self._view(g) for g in batch}
            for guest in batch:
                self._refresh(guest, views[guest.id])
            self._refresh_changed()
            contended = not self._incremental or not uncontended(
                self.pool, self._footprint_total, block
            )
            if contended:
                if len(batch) < len(self.guests):
                    rest = [g for g in self.guests.values() if g.id not in views]
                    self._take_due(rest, now)
                    batch = list(self.guests.values())
                    views = {g.id: views.get(g.id) or self._view(g) for g in batch}
                plan = arbitrate(self.pool, list(views.values()), block)
            else:
                plan = plan_alone(list(views.values()), block)
            reclaims = dict(plan.reclaims)
            reasons = dict(plan.reasons)
            for guest in batch:
                # A request below what the guest holds is a release offer: take
                # it up (the arbiter only reclaims what the pool needs).
                offer = guest.demand.min_each(guest.held)
                if guest.connected and offer != guest.held:
                    target = reclaims.get(guest.id, plan.targets.get(guest.id, guest.held))
                    reclaims[guest.id] = target.min_each(offer)
                    reasons.setdefault(guest.id, "the guest offered to release")
            for guest_id, target in reclaims.items():
                await self._reclaim(self.guests[guest_id], target, reasons.get(guest_id, ""))
            for guest_id, target in plan.grants.items():
                await self._grant(self.guests[guest_id], target, reasons.get(guest_id, ""))
            for guest in batch:
                planned = plan.targets.get(guest.id)
                if (
                    planned is not None
                    and guest.id not in plan.grants
                    and self._owed_plugged_cpus(guest, planned)
                ):
                    await self._grant(
                        guest,
                        Amount(planned.cpus, guest.entitled.memory),
                        reasons.get(guest.id) or "CPUs already plugged",
                    )
            for guest in batch:
                await self._fit_balloon(guest, guest.entitled)
            for guest in batch:
                self._refresh(guest)
                self._status_stale.add(guest.id)
                books = (guest.entitled, guest.demand)
                if self._books_shown.get(guest.id) != books:
                    self._books_shown[guest.id] = books
                    self.metrics.books(guest.id, *books)
            self.metrics.pool(self.pool.capacity, self.allocated())
            if contended:
                # Any guest's plan may change with anybody's: the next round
                # looks at every guest again.
                self._everyone = True
                self._active = set()
            else:
                self._active = {g.id for g in batch if not self._idle(g)}
            return bool(left) and not contended

    def _next_batch(self) -> tuple[list[GuestRecord], list[str]]:
        """The guests this round plans for, and the changed ones left for the
        next: at most `round_guests` that changed, those with a request first,
        then in the order they changed; and every guest a round left with
        something to do (few, and waiting on time: a deadline, a backoff)."""
        changed = list(self._dirty)
        if len(changed) > self._round_guests:
            changed.sort(key=lambda gid: not self._is_asking(gid))  # stable: in order of change
        chosen = changed[: self._round_guests]
        left = [gid for gid in changed[self._round_guests :] if gid not in self._active]
        chosen += sorted(self._active.difference(chosen))
        return [self.guests[gid] for gid in chosen], left

    def _is_asking(self, gid: str) -> bool:
        return gid in self._asking or self.guests[gid].deferred_request is not None

    def _take_due(self, guests: Sequence[GuestRecord], now: float) -> None:
        """Take up the held-back requests whose turn has come and give up on the
        reclaims past their deadline, before planning for `guests` (which then
        no longer come first as asking)."""
        for guest in guests:
            deferred = guest.deferred_request
            if deferred is not None and self._request_wait(guest, now) <= 0:
                self._take_request(guest, deferred, now)
            self._asking.discard(guest.id)
        self._expire_reclaims(guests)

    def _idle(self, guest: GuestRecord) -> bool:
        """Whether a round would do nothing for `guest`, however long it waited,
        while the pool stays uncontended and the guest unchanged: no reclaim
        under way, no request held back, nothing to grant or reclaim (a backoff
        or a failed plug only delays it), no release offer and the balloon as
        it should be. Such a guest is planned for again once it changes."""
        if guest.pending or guest.deferred_request is not None:
            return False
        view = self._view(guest)
        plan = plan_alone([view], self.config.broker.block_size_bytes)
        if plan.grants or plan.reclaims:
            return False
        if self._owed_plugged_cpus(guest, plan.targets[guest.id]):
            return False
        offer = guest.demand.min_each(view.held)
        if guest.connected and self._reclaim_size(guest, offer)[1] != ZERO:
            return False
        return self._balloon_hold(guest, guest.entitled) is None

    @staticmethod
    def _owed_plugged_cpus(guest: GuestRecord, planned: Amount) -> bool:
        """Whether the plan gives `guest` more CPUs than its entitlement says
        without a grant of its own: the arbiter counts plugged CPUs as held,
        so it grants none within them (standby the guest asked to keep, or a
        grant it has not onlined yet). Memory within what is plugged is the
        balloon's business. Not before the session's first request."""
        return guest.asked and planned.cpus > guest.entitled.cpus

    def allocated(self) -> Amount:
        """Held plus releasing, over every guest."""
        self._refresh_changed()
        return self._used_total

    def _expire_reclaims(self, guests: Sequence[GuestRecord]) -> None:
        now = self._clock()
        for guest in guests:
            for reclaim_id, pending in list(guest.pending.items()):
                if now > pending.deadline + _ACK_GRACE_SECONDS and not pending.acknowledged:
                    # No Ack: the guest is stuck or gone. Its capacity stays
                    # counted (held via online) until a Hello or Ack says otherwise.
                    log.warning("guest %s: reclaim %d got no answer", guest.id, reclaim_id)
                    self.metrics.failure(guest.id, "reclaim_timeout")
                    del guest.pending[reclaim_id]
                    guest.entitled = guest.online

    async def _grant(self, guest: GuestRecord, target: Amount, reason: str) -> None:
        if not guest.changeable or guest.pending:
            return
        new_cpus: list[int] = []
        if target.memory > guest.entitled.memory:
            # Ballooned memory first: it is plugged already, and counted.
            await self._fit_balloon(guest, target)
        missing_cpus = target.cpus - len(guest.present_cpus)
        if missing_cpus > 0 and self._may_plug(guest, "cpus"):
            started = time.monotonic()
            try:
                new_cpus = await guest.backend.plug_cpus(missing_cpus)
            except BackendError as err:
                await self._plug_failed(guest, "cpus", err)
            else:
                guest.present_cpus = guest.present_cpus | set(new_cpus)
                self.metrics.hotplugged(guest.id, "cpus", time.monotonic() - started)
        missing_memory = target.memory - guest.present_memory
        if missing_memory > 0 and self._may_plug(guest, "memory"):
            started = time.monotonic()
            step = guest.config.memory_step_bytes
            try:
                while missing_memory > 0:
                    added = await guest.backend.plug_memory(min(step, missing_memory))
                    if added <= 0:
                        break
                    guest.present_memory += added
                    missing_memory -= added
            except BackendError as err:
                await self._plug_failed(guest, "memory", err)
            else:
                self.metrics.hotplugged(guest.id, "memory", time.monotonic() - started)
        granted = Amount(
            min(target.cpus, len(guest.present_cpus)),
            min(target.memory, guest.present_memory),
        )
        if granted.cpus <= guest.entitled.cpus and granted.memory <= guest.entitled.memory:
            return
        granted = Amount(
            max(granted.cpus, guest.entitled.cpus), max(granted.memory, guest.entitled.memory)
        )
        guest.entitled = granted
        message = self._grant_message(guest, granted, new_cpus, 0)
        guest.send(pb.BrokerMessage(grant=message))
        self.metrics.granted(guest.id)
        log.info(
            "guest %s: grant %d: %d cpus, %d MiB (%s)",
            guest.id,
            message.grant_id,
            granted.cpus,
            granted.memory >> 20,
            reason,
        )

    def _may_plug(self, guest: GuestRecord, resource: str) -> bool:
        return self._clock() >= guest.plug_backoff_until.get(resource, 0.0)

    async def _plug_failed(self, guest: GuestRecord, resource: str, err: BackendError) -> None:
        log.error(
            "guest %s: hot-plug of %s failed (not tried again for %.0f s): %s",
            guest.id,
            resource,
            PLUG_BACKOFF_SECONDS,
            err,
        )
        self.metrics.failure(guest.id, "plug_failed")
        guest.plug_backoff_until[resource] = self._clock() + PLUG_BACKOFF_SECONDS
        # A plug can fail half-way (the second device_add refused): what QEMU
        # did plug must be in the books, or it would be handed out twice.
        try:
            self._count_plugged(guest, await guest.backend.state())
        except BackendError as read_err:
            log.warning("guest %s: cannot read what is plugged: %s", guest.id, read_err)

    def _grant_message(
        self, guest: GuestRecord, amount: Amount, cpu_ids: Sequence[int], request_id: int
    ) -> pb.Grant:
        guest.last_grant_id = next(self._ids)
        return pb.Grant(
            grant_id=guest.last_grant_id,
            request_id=request_id,
            cpus=amount.cpus,
            memory_bytes=amount.memory,
            cpu_ids=cpu_ids,
        )

    def _reclaim_size(self, guest: GuestRecord, target: Amount) -> tuple[Amount, Amount]:
        """A reclaim's target (never below the minimum: the guest would refuse)
        and what it asks back."""
        target = target.max_each(guest.limits.minimum)
        held = guest.held
        return target, Amount(max(0, held.cpus - target.cpus), max(0, held.memory - target.memory))

    async def _reclaim(self, guest: GuestRecord, target: Amount, reason: str) -> None:
        if not guest.changeable or guest.pending or self._clock() < guest.reclaim_backoff_until:
            return
        target, releasing = self._reclaim_size(guest, target)
        if releasing == ZERO:
            return
        reclaim_id = next(self._ids)
        deadline_s = guest.config.reclaim_deadline_seconds
        guest.pending[reclaim_id] = PendingReclaim(
            reclaim_id, target, releasing, self._clock() + deadline_s
        )
        guest.entitled = Amount(
            min(guest.entitled.cpus, target.cpus), min(guest.entitled.memory, target.memory)
        )
        guest.send(
            pb.BrokerMessage(
                reclaim=pb.Reclaim(
                    reclaim_id=reclaim_id,
                    cpus=target.cpus,
                    memory_bytes=target.memory,
                    deadline_ms=int(deadline_s * 1000),
                )
            )
        )
        self.metrics.reclaim_sent(guest.id)
        log.info(
            "guest %s: reclaim %d: down to %d cpus, %d MiB (%s)",
            guest.id,
            reclaim_id,
            target.cpus,
            target.memory >> 20,
            reason,
        )

    async def _fit_balloon(self, guest: GuestRecord, entitled: Amount) -> None:
        """Make the balloon hold what the guest has online beyond `entitled`.

        Only with `balloon_fallback`, a balloon device, a session (its online
        figure is fresh) and no reclaim under way (the agent is offlining; the
        Ack says what is left). The guest keeps its entitlement, never less
        than its minimum (a reclaim's target never is). Ballooned memory stays
        counted as the guest's: only its driver says what it gave.
        """
        hold = self._balloon_hold(guest, entitled)
        if hold is None or self._clock() < guest.balloon_backoff_until:
            return
        backend = guest.backend
        floor = max(entitled.memory, guest.limits.minimum.memory)
        try:
            await backend.set_balloon(hold)
        except BackendError as err:
            log.warning(
                "guest %s: balloon to %d MiB failed (not tried again for %.0f s): %s",
                guest.id,
                hold >> 20,
                PLUG_BACKOFF_SECONDS,
                err,
            )
            self.metrics.failure(guest.id, "balloon_failed")
            guest.balloon_backoff_until = self._clock() + PLUG_BACKOFF_SECONDS
            return
        log.info(
            "guest %s: balloon %s to %d MiB: %d MiB online, entitled to %d MiB",
            guest.id,
            "inflated" if hold > guest.balloon_bytes else "deflated",
            hold >> 20,
            guest.online.memory >> 20,
            floor >> 20,
        )
        guest.balloon_bytes = hold

    def _balloon_hold(self, guest: GuestRecord, entitled: Amount) -> int | None:
        """What the balloon should hold now, when that is not what it holds."""
        backend = guest.backend
        if (
            not guest.config.balloon_fallback
            or not backend.available
            or not backend.has_balloon
            or not guest.connected
            or guest.pending
        ):
            return None
        floor = max(entitled.memory, guest.limits.minimum.memory)
        hold = max(0, guest.online.memory - floor)
        return None if hold == guest.balloon_bytes else hold

    # ----------------------------------------------------------------- status

    def status(self) -> dict[str, Any]:
        return {
            "pool": self._pool_status(),
            "guests": {g.id: self._guest_status(g) for g in self.guests.values()},
        }

    def _pool_status(self) -> dict[str, Any]:
        return {"capacity": _amount(self.pool.capacity), "allocated": _amount(self.allocated())}

    def _guest_status(self, g: GuestRecord) -> dict[str, Any]:
        return {
            "connected": g.connected,
            "session": g.session_id,
            "priority": g.limits.priority,
            "limits": {
                "minimum": _amount(g.limits.minimum),
                "maximum": _amount(g.limits.maximum),
                "burst": _amount(g.limits.burst),
            },
            "granted": _amount(g.entitled),
            "online": _amount(g.online),
            "requested": _amount(g.demand),
            "releasing": _amount(g.releasing),
            "pending_reclaims": sorted(g.pending),
            "backend": {"available": g.backend.available, "error": g.backend_error},
            "balloon_bytes": g.balloon_bytes,
        }

    def status_json(self) -> str:
        """`json.dumps(self.status())`, re-encoding only the guests that changed
        since the last call: encoding every guest is most of the cost."""
        stale, self._status_stale = self._status_stale, set()
        for gid in stale:
            entry = json.dumps(self._guest_status(self.guests[gid]))
            self._status_parts[gid] = f"{json.dumps(gid)}: {entry}"
        guests = ", ".join(self._status_parts.values())
        return f'{{"pool": {json.dumps(self._pool_status())}, "guests": {{{guests}}}}}'

    def state_changed(self) -> None:
        """Write the state file soon: at once when the last write is a second
        old, else a second after it; changes meanwhile share that write."""
        if self._state_timer is not None:
            return
        delay = self._state_written_at + STATE_WRITE_INTERVAL_SECONDS - time.monotonic()
        self._state_timer = asyncio.get_running_loop().call_later(
            max(0.0, delay), self._write_state_due
        )

    def _write_state_due(self) -> None:
        self._state_timer = None
        self.write_state()

    def write_state(self) -> None:
        path: Path = self.config.broker.state_file
        self._state_written_at = time.monotonic()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp")
            # Compact: the C encoder is four times faster than an indented dump;
            # `vmtide-broker status --json` prints it indented.
            tmp.write_text(self.status_json())
            os.replace(tmp, path)
        except OSError as err:
            log.warning("cannot write the state file %s: %s", path, err)
