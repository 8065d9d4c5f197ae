"""The agent daemon: sense, decide, negotiate, act.

One asyncio loop runs four tasks: sensing (every period, or at once when a PSI
trigger fires), the broker link, uevents, and a periodic sysfs rescan. Kernel
writes run in a worker thread, one batch at a time, so the loop never blocks on
memory migration, and sensing never waits for a batch in progress: it feeds
systemd's watchdog and publishes the live state `vmtide-agent status` shows.

Rules the daemon keeps whatever the broker says:
- never below the configured minimum: missing CPUs or memory are onlined from
  standby at once, and a reclaim below the minimum is refused;
- standby resources are onlined when the broker has granted them (and at once
  when the grant arrives); without a broker the guest stays as it is, except
  that resources the host hot-adds meanwhile are onlined;
- nothing is offlined without a reclaim from the broker, which then unplugs
  exactly the items the acknowledgement lists as offline.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import AsyncIterator, Callable, Collection, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent import policy
from agent.actuator import Actuator
from agent.config import AgentConfig
from agent.crashpoint import crash_point
from agent.kernel import Action, ItemResult, KernelReadError, Kind, Outcome
from agent.metrics import AgentMetrics
from agent.sensing import MIN_SPAN_SECONDS, PressureWatch, ProcParseError, Reading, Sensor
from agent.session import BrokerLink
from agent.topology import Topology
from agent.udev import OnliningRule, Uevent, UeventSource
from vmtide import PROTOCOL_VERSION, __version__
from vmtide.v1 import broker_pb2 as pb

log = logging.getLogger("vmtide.agent")

# `vmtide-agent status` reads the live state; more often would be wasted writes.
STATE_WRITE_INTERVAL_SECONDS = 1.0
# Decision changes kept for `status`.
RECENT_DECISIONS = 10
# A warning that repeats (a file unreadable every cycle) is logged once per
# this long, with how often it was seen meanwhile.
REPEAT_WARNING_SECONDS = 60.0
# What a reclaim's offlining holds the resize lock as: samples taken while it
# runs measure the agent's own page migration, not the guest's load.
_RECLAIM = "reclaim"

_URGENCY = {
    policy.Urgency.LOW: pb.URGENCY_LOW,
    policy.Urgency.NORMAL: pb.URGENCY_NORMAL,
    policy.Urgency.HIGH: pb.URGENCY_HIGH,
}
_OUTCOMES = {
    Outcome.DONE: pb.OUTCOME_DONE,
    Outcome.ALREADY: pb.OUTCOME_ALREADY,
    Outcome.REFUSED: pb.OUTCOME_REFUSED,
    Outcome.TIMED_OUT: pb.OUTCOME_TIMED_OUT,
    Outcome.NOT_FOUND: pb.OUTCOME_NOT_FOUND,
}


@dataclass(frozen=True)
class Amount:
    cpus: int
    memory_bytes: int


@dataclass(frozen=True)
class EffectiveLimits:
    cpus: policy.Limits
    memory: policy.Limits


def effective_limits(
    config: AgentConfig, topo: Topology, broker: pb.Limits | None
) -> EffectiveLimits:
    """The guest's own limits, tightened by the host's, in whole blocks.

    The guest's minimum always wins: the broker may lower the ceiling, never
    the floor.
    """
    block = topo.block_size
    cpu_cfg, mem_cfg = config.limits.cpus, config.limits.memory
    cpu_max = cpu_cfg.maximum or len(topo.possible_cpus)
    mem_max = mem_cfg.maximum_bytes
    cpu_burst = cpu_cfg.burst or cpu_max
    mem_burst = mem_cfg.burst_bytes
    if broker is not None and broker.HasField("cpus") and broker.cpus.maximum:
        cpu_max = min(cpu_max, broker.cpus.maximum)
        cpu_burst = min(cpu_burst, broker.cpus.burst or broker.cpus.maximum)
    if broker is not None and broker.HasField("memory_bytes") and broker.memory_bytes.maximum:
        host = broker.memory_bytes
        mem_max = min(mem_max, host.maximum) if mem_max else host.maximum
        mem_burst = min(mem_burst or mem_max, host.burst or host.maximum)
    # Without a ceiling from either side, what the guest lists is the ceiling.
    mem_max = mem_max or max(topo.max_memory_bytes, topo.online_memory_bytes)
    mem_burst = mem_burst or mem_max
    cpu_min = min(cpu_cfg.minimum, len(topo.possible_cpus))
    mem_min = -(-mem_cfg.minimum_bytes // block) * block  # whole blocks, rounded up
    cpu_max, mem_max = max(cpu_max, cpu_min), max(mem_max // block * block, mem_min)
    return EffectiveLimits(
        cpus=policy.Limits(cpu_min, cpu_max, max(cpu_burst, cpu_max)),
        memory=policy.Limits(mem_min, mem_max, max(mem_burst // block * block, mem_max)),
    )


def make_sample(
    reading: Reading,
    topo: Topology,
    previous: Reading | None = None,
    *,
    offlining: bool = False,
    offlined_at: float = math.nan,
) -> policy.Sample:
    """The policy's view of one sensing period (since `previous`, when known);
    `offlining` and `offlined_at` tell it of the agent's own reclaims."""
    cpu_now = memory_now = memory_full_now = math.nan
    if previous is not None and reading.psi_available and reading.at > previous.at:
        span_us = (reading.at - previous.at) * 1e6

        def share(now: int, before: int) -> float:
            # Percent of the period stalled; a counter that went back is unknown.
            return 100.0 * (now - before) / span_us if now >= before else math.nan

        cpu_now = share(reading.cpu_some_total_us, previous.cpu_some_total_us)
        memory_now = share(reading.memory_some_total_us, previous.memory_some_total_us)
        memory_full_now = share(reading.memory_full_total_us, previous.memory_full_total_us)
    return policy.Sample(
        at=reading.at,
        cpu_busy=reading.cpu_busy,
        online_cpus=topo.online_cpus,
        run_queue=reading.run_queue,
        cpu_some=reading.cpu_some,
        memory_some=reading.memory_some,
        memory_full=reading.memory_full,
        memory_total=reading.memory_total,
        memory_available=reading.memory_available,
        swap_in_per_s=reading.swap_in_per_s,
        swap_out_per_s=reading.swap_out_per_s,
        memory_online=topo.online_memory_bytes,
        cpu_some_now=cpu_now,
        memory_some_now=memory_now,
        memory_full_now=memory_full_now,
        offlining=offlining,
        offlined_at=offlined_at,
    )


def item_to_proto(item: ItemResult) -> pb.ItemResult:
    return pb.ItemResult(
        kind=pb.RESOURCE_KIND_CPU if item.kind is Kind.CPU else pb.RESOURCE_KIND_MEMORY_BLOCK,
        index=item.index,
        action=pb.ACTION_ONLINE if item.action is Action.ONLINE else pb.ACTION_OFFLINE,
        outcome=_OUTCOMES[item.outcome],
        errno=item.errno,
        detail=item.detail,
    )


class RepeatedWarnings:
    """Log a warning once per interval however often it recurs (WALinuxAgent's
    periodic operations): a sysfs file unreadable for an hour is 60 lines, not
    3,600."""

    def __init__(
        self, interval: float = REPEAT_WARNING_SECONDS, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._interval = interval
        self._clock = clock
        self._seen: dict[str, tuple[float, int]] = {}  # message: (last logged, repeats since)

    def warn(self, message: str) -> None:
        now = self._clock()
        logged, repeats = self._seen.get(message, (-math.inf, 0))
        if now - logged < self._interval:
            self._seen[message] = (logged, repeats + 1)
            return
        if len(self._seen) > 64:  # messages naming ever new files stay bounded
            self._seen.clear()
        self._seen[message] = (now, 0)
        extra = f" (and {repeats} times more since it was last logged)" if repeats else ""
        log.warning("%s%s", message, extra)


class LiveStateFile:
    """What the daemon sees and does, as JSON for `vmtide-agent status`.

    Replaced atomically (write, then rename), so a reader never sees half a
    file. A write that fails is logged once and retried at the next one: the
    state file is a convenience, never a reason to stop resizing.
    """

    def __init__(self, path: Path, clock: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self._clock = clock
        self._written_at = -math.inf
        self._failing = False

    def due(self) -> bool:
        return self._clock() - self._written_at >= STATE_WRITE_INTERVAL_SECONDS

    def write(self, state: dict[str, Any]) -> None:
        self._written_at = self._clock()
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        text = json.dumps(state)
        try:
            try:
                tmp.write_text(text)
            except FileNotFoundError:
                # The first write, or the directory was cleaned away: made
                # only then, as a mkdir every second costs a syscall for nothing.
                self.path.parent.mkdir(parents=True, exist_ok=True)
                tmp.write_text(text)
            os.replace(tmp, self.path)
        except OSError as err:
            if not self._failing:
                log.warning("cannot write the live state %s: %s", self.path, err)
            self._failing = True
        else:
            self._failing = False

    def remove(self) -> None:
        """On a clean stop: `status` then says at once that no daemon runs."""
        with contextlib.suppress(OSError):
            self.path.unlink()


class Agent:
    """Composition of the daemon's parts; `run()` drives them until stopped."""

    def __init__(
        self,
        config: AgentConfig,
        actuator: Actuator,
        sensor: Sensor,
        metrics: AgentMetrics,
        *,
        guest_id: str,
        pressure: PressureWatch | None = None,
        uevents: UeventSource | None = None,
        link_factory: Callable[[Agent], BrokerLink] | None = None,
        notify: Callable[[str], None] = lambda state: None,
        onlining_rules: Sequence[OnliningRule] = (),
        state_file: LiveStateFile | None = None,
    ) -> None:
        self.config = config
        self.actuator = actuator
        self.sensor = sensor
        self.metrics = metrics
        self.guest_id = guest_id
        self.pressure = pressure
        self.uevents = uevents
        self.notify = notify
        self.onlining_rules = tuple(onlining_rules)
        self.state_file = state_file
        self.topo = actuator.topology()
        # Bumped at every new snapshot, so a slower read never replaces a newer one.
        self._topo_generation = 0
        self.broker_limits: pb.Limits | None = None
        self.limits = effective_limits(config, self.topo, None)
        # What the broker lets this guest hold; None until it says (then the
        # guest keeps what it has).
        self.entitlement: Amount | None = None
        # CPUs kept plugged but offline, entitled, for a load step to take at
        # once ([limits.cpus] standby); 0 shrinks through the broker only.
        self._standby = config.limits.cpus.standby
        # The first request of a session says what the guest wants even when
        # that is what it holds: the broker waits for it to take back what is
        # plugged and not wanted (or to keep it as standby).
        self._restate = False
        # A trigger wakes the agent some 150 ms into a stall, too early for a
        # busy share to show the load (sensing.MIN_SPAN_SECONDS): the sensing
        # loop looks again once one can, not a whole period later.
        self._follow_up_seconds = min(config.agent.sensing_interval_seconds, MIN_SPAN_SECONDS)
        # The history the policy reads (shrinking needs a full window) at a
        # sample per follow-up: under pressure a trigger's wake and its
        # follow-up come between the periodic samples. More wakes than that
        # shorten the history, which can only delay a shrink.
        history = config.policy.history_seconds / self._follow_up_seconds
        self.samples: collections.deque[policy.Sample] = collections.deque(
            maxlen=math.ceil(history) + 1
        )
        self.policy_state = policy.PolicyState()
        # decide() on the sliding history, keeping each sample's work between cycles.
        self.policy_engine = policy.Policy()
        self.decisions: policy.Decisions | None = None
        self.recent_decisions: collections.deque[dict[str, Any]] = collections.deque(
            maxlen=RECENT_DECISIONS
        )
        self.last_reading: Reading | None = None
        self.last_request: dict[str, Any] | None = None
        # Sensing cycles that failed on sysfs or procfs changing underfoot
        # (expected), and on anything else (a bug).
        self.cycle_errors = {"expected": 0, "unexpected": 0}
        self._warnings = RepeatedWarnings()
        self._act_lock = asyncio.Lock()
        self._lock_wanted = 0  # holders and waiters of _act_lock (see _exclusive)
        self._acting: tuple[str, float] | None = None  # what holds the lock, since when
        # When the last reclaim that wrote to sysfs ended (policy.Sample.offlining).
        self._offlined_at = math.nan
        self._seen_ids: collections.deque[tuple[str, int]] = collections.deque(maxlen=256)
        self._request_id = 0
        self._last_request: tuple[int, int, float] | None = None  # cpus, bytes, when
        self._grow_started: dict[str, float] = {}
        self._last_grant_id = 0
        self._known_standby = self.topo.standby
        factory = link_factory or (
            lambda agent: BrokerLink(
                agent.config.broker, agent.hello, agent.on_broker_message, agent.on_link_state
            )
        )
        self.link: BrokerLink | None = factory(self) if config.broker.enabled else None
        if self.topo.auto_online != "offline":
            log.info(
                "the kernel onlines hot-added memory itself (auto_online_blocks=%s): "
                "vmtide leaves onlining to it and only offlines what the broker reclaims",
                self.topo.auto_online,
            )
        for rule in self.onlining_rules:
            log.info("udev rule %s onlines hot-added resources; vmtide works alongside it", rule)

    def _set_topology(self, topo: Topology) -> None:
        self.topo = topo
        self._topo_generation += 1
        self.limits = effective_limits(self.config, topo, self.broker_limits)

    # ------------------------------------------------------------------ run

    async def run(self, stop: asyncio.Event) -> None:
        await self.ensure_minimum("start")
        self.notify("READY=1")
        try:
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self._sensing_loop(stop))
                tasks.create_task(self._rescan_loop(stop))
                if self.link is not None:
                    tasks.create_task(self.link.run(stop))
                if self.uevents is not None:
                    tasks.create_task(self._uevent_loop(stop))
        finally:
            if self.state_file is not None:
                self.state_file.remove()
        log.info("agent stopped")

    async def _sensing_loop(self, stop: asyncio.Event) -> None:
        interval = self.config.agent.sensing_interval_seconds
        woken = False
        while not stop.is_set():
            started = time.monotonic()
            try:
                await self.sense_and_decide(woken)
                self.metrics.observe_cycle(ok=True)
            except (KernelReadError, ProcParseError) as err:
                # sysfs and procfs change under the agent's feet (a CPU
                # ejected mid-read): one line, and the next cycle reads again.
                self.cycle_errors["expected"] += 1
                self._warnings.warn(f"sensing cycle: {err}; the guest keeps its current size")
                self.metrics.observe_cycle(ok=False)
            except Exception:
                # A broken cycle must not stop resizing silently (MOM's policy
                # crash did): log loudly, count it, keep the guest as it is.
                self.cycle_errors["unexpected"] += 1
                log.exception("sensing cycle failed; the guest keeps its current size")
                self.metrics.observe_cycle(ok=False)
            self.notify("WATCHDOG=1")
            self._publish()
            period = self._follow_up_seconds if woken else interval
            remaining = max(period - (time.monotonic() - started), 0.0)
            if self.pressure is not None and self.pressure.available:
                # A PSI trigger ends the wait early: the next cycle sees the spike.
                woken = await self.pressure.wait(remaining)
                if woken:
                    log.debug("pressure trigger fired")
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), remaining)

    def _publish(self) -> None:
        if self.state_file is None or not self.state_file.due():
            return
        try:
            state = self.live_state()
        except Exception:
            # A bug here must not stop the sensing loop (and with it the watchdog).
            log.exception("cannot build the live state")
            return
        self.state_file.write(state)

    async def _rescan_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.config.agent.rescan_interval_seconds)
            if not stop.is_set():
                await self._contained("rescan", self.reconcile("rescan"))

    async def _uevent_loop(self, stop: asyncio.Event) -> None:
        """A uevent only prompts a rescan, and a burst of them prompts one.

        A large hot-add sends a uevent per block, and every rescan reads every
        block: one rescan per event would fall further behind with each block
        (5,000 events on 16 blocks took 40 s). Events that arrive during a
        rescan are taken up together by the next one.
        """
        assert self.uevents is not None
        first: Uevent | None = None  # names the burst in the log
        count = 0
        wake = asyncio.Event()

        async def rescan() -> None:
            nonlocal first, count
            while True:
                await wake.wait()
                wake.clear()
                why = f"uevent {first}" + (f" and {count - 1} more" if count > 1 else "")
                first, count = None, 0
                await self._contained(why, self.reconcile(why))

        worker = asyncio.create_task(rescan())
        try:
            async for event in self.uevents.events(stop):
                log.debug("uevent %s", event)
                if event.action in ("add", "online", "offline", "remove"):
                    first = first or event
                    count += 1
                    wake.set()
        finally:
            worker.cancel()

    async def _contained(self, what: str, work: Coroutine[Any, Any, None]) -> None:
        """Run one unit of work; a failure is logged and the daemon goes on.

        sysfs changes under the agent's feet (a CPU ejected mid-read answers
        ENODEV): that is logged in one line, and the next rescan sees the
        settled state. Anything else is a bug and gets its traceback.
        """
        try:
            await work
        except KernelReadError as err:
            log.warning("%s: %s; will look again at the next rescan", what, err)
        except Exception:
            log.exception("%s failed; the guest keeps its current size", what)

    # --------------------------------------------------------------- sensing

    async def sense_and_decide(self, woken: bool = False) -> policy.Decisions:
        """One sensing cycle; `woken` when a PSI trigger started it."""
        reading = self.sensor.sample()
        previous, self.last_reading = self.last_reading, reading
        topo = self.topo
        # A reclaim running now, or one that ended within the span this
        # reading's busy shares cover, loaded the CPUs itself.
        reclaiming = self._acting is not None and self._acting[0] == _RECLAIM
        offlining = reclaiming or self._offlined_at > reading.since
        sample = make_sample(
            reading, topo, previous, offlining=offlining, offlined_at=self._offlined_at
        )
        self.samples.append(sample)
        decisions, self.policy_state = self.policy_engine.decide(
            list(self.samples),
            self.limits.cpus,
            self.limits.memory,
            topo.block_size,
            self.config.policy,
            self.policy_state,
        )
        self._log_decisions(decisions)
        self.decisions = decisions
        self.metrics.observe_decisions(decisions)
        self.metrics.observe_reading(reading)
        self._send_report(reading)
        if woken and self._standby and await self._take_standby(sample):
            return decisions
        await self.pursue(decisions)
        return decisions

    async def _take_standby(self, sample: policy.Sample) -> bool:
        """Online one entitled standby CPU at once when a trigger caught tasks
        waiting; True when it did.

        The policy wants a busy share over half a second before it grows
        (sensing.MIN_SPAN_SECONDS): the trigger's wake comes too early for one,
        and the follow-up half a second later is what a hot-plug pays anyway.
        A standby CPU costs the host nothing more to use, so the trigger's own
        evidence is enough: tasks stalled this period and more runnable than
        CPUs online. Were it noise, the policy's shrink gives the CPU back to
        standby, not to the host.
        """
        granted, topo = self.entitlement, self.topo
        online = topo.online_cpus
        if granted is None or granted.cpus <= online or not topo.standby_cpus:
            return False
        if sample.offlining:
            return False  # the stalls are the agent's own reclaim's
        threshold = self.config.policy.cpu.psi_some_threshold_percent
        if not (sample.run_queue > online and sample.cpu_some_now >= threshold):
            return False
        if self._lock_wanted:
            return False  # a reclaim or rescan is acting; the policy follows up
        reason = (
            f"pressure trigger: psi some {sample.cpu_some_now:.0f}% this period, run queue "
            f"{sample.run_queue} > {online} online (a standby CPU: no request)"
        )
        grow = policy.Decision(online + 1, online, reason, policy.Urgency.HIGH, bursting=False)
        self._record_decision("cpus", grow)
        await self.act("standby", Amount(online + 1, topo.online_memory_bytes))
        return True

    def _log_decisions(self, decisions: policy.Decisions) -> None:
        previous = self.decisions
        for name, decision, before in (
            ("cpus", decisions.cpu, previous.cpu if previous else None),
            ("memory", decisions.memory, previous.memory if previous else None),
        ):
            if decision.direction == "hold" and (before is None or before.direction == "hold"):
                continue
            if before is not None and before.target == decision.target:
                continue
            self._record_decision(name, decision)

    def _record_decision(self, resource: str, decision: policy.Decision) -> None:
        """Log a decision and keep it for the live state."""
        self.recent_decisions.append(
            {"at": time.time(), "resource": resource, **_decision_state(decision)}
        )
        log.info(
            "decision %s %s %s -> %s: %s",
            resource,
            decision.direction,
            _fmt(resource, decision.current),
            _fmt(resource, decision.target),
            decision.reason,
        )

    def _send_report(self, reading: Reading) -> None:
        if self.link is None:
            return
        self.link.send(
            pb.GuestMessage(
                report=pb.LoadReport(
                    cpu_busy=reading.cpu_busy,
                    run_queue=reading.run_queue,
                    cpu_some_avg10=reading.cpu_some,
                    memory_some_avg10=reading.memory_some,
                    memory_full_avg10=reading.memory_full,
                    io_some_avg10=reading.io_some,
                    io_full_avg10=reading.io_full,
                    memory_available_bytes=reading.memory_available,
                    memory_total_bytes=reading.memory_total,
                    swap_in_per_second=reading.swap_in_per_s,
                    swap_out_per_second=reading.swap_out_per_s,
                    online_cpus=self.topo.online_cpus,
                    online_memory_bytes=self.topo.online_memory_bytes,
                )
            )
        )

    # ---------------------------------------------------------------- pursue

    async def pursue(self, decisions: policy.Decisions) -> None:
        """Move toward the policy's targets within what the broker granted."""
        want = Amount(decisions.cpu.target, decisions.memory.target)
        have = Amount(self.topo.online_cpus, self.topo.online_memory_bytes)
        now = time.monotonic()
        for resource, wanted, held in (
            ("cpus", want.cpus, have.cpus),
            ("memory", want.memory_bytes, have.memory_bytes),
        ):
            if wanted > held:
                self._grow_started.setdefault(resource, now)
            else:
                self._grow_started.pop(resource, None)
        granted = self.entitlement
        if (
            self._standby
            and granted is not None  # a broker's word: without one, nothing grows back
            and decisions.cpu.direction == "shrink"
            and want.cpus < have.cpus
        ):
            await self._to_standby(want.cpus)
        if granted is not None and (
            min(want.cpus, granted.cpus) > have.cpus
            or min(want.memory_bytes, granted.memory_bytes) > have.memory_bytes
        ):
            target = Amount(
                min(want.cpus, granted.cpus), min(want.memory_bytes, granted.memory_bytes)
            )
            if not self._lock_wanted:
                await self.act("policy", target)
            else:
                # A reclaim's offlining can hold the lock for its whole
                # deadline plus the kill grace: waiting here would stop the
                # sampling, the reports and the watchdog (WatchdogSec=30s)
                # with it. The next cycle tries again.
                busy = self._acting[0] if self._acting else "a rescan"
                log.debug("%s in progress; growing at a later cycle", busy)
        self._request(want, decisions)

    async def _to_standby(self, target: int) -> None:
        """Offline CPUs down to `target` (never below the minimum), keeping
        them plugged and entitled: the standby a load step takes at once."""
        if self._lock_wanted:
            return  # the next cycle shrinks
        floor = self.limits.cpus.minimum
        await self._exclusively(
            "to standby", lambda: (self.actuator.offline_cpus(target, floor), "")
        )

    def _request(self, want: Amount, decisions: policy.Decisions) -> None:
        if self.link is None or not self.link.connected:
            return
        granted = self.entitlement or Amount(self.topo.online_cpus, self.topo.online_memory_bytes)
        # Ask only for what the policy decided to change. A "hold" at what is
        # online while a grant is still being onlined is not a release offer
        # (a real guest flapped on that: grant 4, hold at 2, reclaim to 2).
        restate = self._restate
        want = Amount(
            _ask(
                decisions.cpu,
                granted.cpus,
                restate,
                standby=self._standby,
                ceiling=self.limits.cpus.maximum,
            ),
            _ask(decisions.memory, granted.memory_bytes, restate),
        )
        self._restate = False
        if want == granted and not restate:
            self._last_request = None
            return
        now = time.monotonic()
        last = self._last_request
        # A grow the outstanding request already covers is not news: a noisy
        # need (2, 3, 4, 3 CPUs while nothing is granted) would otherwise send
        # a request every period. Asking for more, or giving back, goes at once;
        # the retry interval re-sends the current want.
        if (
            last is not None
            and now - last[2] < self.config.broker.request_retry_seconds
            and granted.cpus <= want.cpus <= last[0]
            and granted.memory_bytes <= want.memory_bytes <= last[1]
        ):
            return
        self._request_id += 1
        urgency = max(decisions.cpu.urgency, decisions.memory.urgency, key=lambda u: _URGENCY[u])
        reasons = [
            f"{name}: {d.reason}"
            for name, d in (("cpus", decisions.cpu), ("memory", decisions.memory))
            if d.direction != "hold"
        ]
        self.link.send(
            pb.GuestMessage(
                request=pb.ResourceRequest(
                    request_id=self._request_id,
                    cpus=want.cpus,
                    memory_bytes=want.memory_bytes,
                    reason="; ".join(reasons) or "holding",
                    urgency=_URGENCY[urgency],
                    seen_grant_id=self._last_grant_id,
                )
            )
        )
        self._last_request = (want.cpus, want.memory_bytes, now)
        self.last_request = {
            "request_id": self._request_id,
            "at": time.time(),
            "cpus": want.cpus,
            "memory_bytes": want.memory_bytes,
            "urgency": urgency.name.lower(),
            "reason": "; ".join(reasons) or "holding",
        }
        log.info(
            "request %d: %d cpus, %s (%s)",
            self._request_id,
            want.cpus,
            _fmt("memory", want.memory_bytes),
            "; ".join(reasons) or "holding",
        )

    # ------------------------------------------------------------------ act

    @contextlib.asynccontextmanager
    async def _exclusive(self) -> AsyncIterator[None]:
        """The act lock, counted from the moment it is wanted: the sensing
        loop skips acting while anyone holds or awaits it. (`locked()` alone
        is False in the gap between one holder's release and the next
        waiter's wake-up, and acquiring then would queue behind a reclaim.)"""
        self._lock_wanted += 1
        try:
            async with self._act_lock:
                yield
        finally:
            self._lock_wanted -= 1

    async def _exclusively(
        self, why: str, writes: Callable[[], tuple[list[ItemResult], str]]
    ) -> tuple[list[ItemResult], str]:
        """Run `writes` (sysfs, in a thread) under the act lock, shown in the
        live state as `why`, then read back what the kernel did."""
        async with self._exclusive():
            self._acting = (why, time.monotonic())
            try:
                results, note = await asyncio.to_thread(writes)
                await self._after_act(why, results, note)
            finally:
                self._acting = None
        return results, note

    async def act(
        self,
        why: str,
        target: Amount,
        only: tuple[Collection[int], Collection[int]] | None = None,
    ) -> tuple[list[ItemResult], str]:
        """Online standby resources up to `target` (never offlines); `only`
        restricts it to these CPUs and blocks. Returns the items and a note
        on why it stopped short, if it did."""
        return await self._exclusively(why, lambda: self._online_up_to(target, only))

    def _online_up_to(
        self, target: Amount, only: tuple[Collection[int], Collection[int]] | None
    ) -> tuple[list[ItemResult], str]:
        cpus, blocks = only if only is not None else (None, None)
        results: list[ItemResult] = []
        try:
            results += self.actuator.online_cpus(target.cpus, cpus)
            results += self.actuator.online_memory(target.memory_bytes, blocks)
        except KernelReadError as err:
            # What was onlined before the read failed is still reported.
            return results, f"stopped: {err}"
        return results, ""

    async def release(self, target: Amount, deadline: float) -> tuple[list[ItemResult], str]:
        """Offline down to `target`, never below the minimum; returns items and a note."""
        floor = Amount(self.limits.cpus.minimum, self.limits.memory.minimum)
        notes = []
        if target.cpus < floor.cpus:
            notes.append(f"the guest's minimum is {floor.cpus} CPUs")
        if target.memory_bytes < floor.memory_bytes:
            notes.append(f"the guest's minimum is {_fmt('memory', floor.memory_bytes)}")
        results, note = await self._exclusively(
            _RECLAIM, lambda: self._offline_down_to(target, floor, deadline)
        )
        if any(item.outcome is not Outcome.ALREADY for item in results):
            self._offlined_at = time.monotonic()
        if note:
            notes.append(note)
        topo = self.topo
        if topo.online_memory_bytes > max(target.memory_bytes, floor.memory_bytes):
            notes.append(
                f"memory stayed at {_fmt('memory', topo.online_memory_bytes)}: "
                "no more movable blocks would go offline"
            )
        if topo.online_cpus > max(target.cpus, floor.cpus):
            notes.append(f"cpus stayed at {topo.online_cpus}")
        return results + self._unused_standby(target), "; ".join(notes)

    def _unused_standby(self, target: Amount) -> list[ItemResult]:
        """Plugged but offline CPUs and blocks beyond `target`, as already offline.

        Standby the guest holds its target without was plugged for a grant it
        never onlined, or offlined by an agent killed before its Ack: listed,
        the broker unplugs it instead of leaving it plugged and unused.
        """
        topo = self.topo
        # Standby within the target is the guest's to keep, lowest ids first
        # (the ones onlining takes): the rest goes back.
        kept = max(target.cpus - topo.online_cpus, 0)
        items = [
            ItemResult(Kind.CPU, c, Action.OFFLINE, Outcome.ALREADY, detail="standby")
            for c in sorted(topo.standby_cpus)[kept:]
        ]
        if topo.online_memory_bytes >= target.memory_bytes:
            items += [
                ItemResult(Kind.MEMORY_BLOCK, b, Action.OFFLINE, Outcome.ALREADY, detail="standby")
                for b in topo.standby_blocks
            ]
        if items:
            log.info("standby the guest does not need: %s", ", ".join(map(str, items)))
        return items

    def _offline_down_to(
        self, target: Amount, floor: Amount, deadline: float
    ) -> tuple[list[ItemResult], str]:
        results: list[ItemResult] = []
        try:
            results += self.actuator.offline_cpus(target.cpus, floor.cpus)
            results += self.actuator.offline_memory(
                target.memory_bytes, floor.memory_bytes, deadline
            )
        except KernelReadError as err:
            # CPUs offlined before the block list failed to read must still be
            # in the Ack, or the broker never unplugs them.
            return results, f"stopped: {err}"
        return results, ""

    async def _after_act(self, why: str, results: Sequence[ItemResult], note: str) -> None:
        if note:
            log.warning("resize (%s): %s", why, note)
        try:
            topo = await asyncio.to_thread(self.actuator.topology)
        except KernelReadError as err:
            # The Ack must still go out, with the items the kernel reported:
            # without it the broker never unplugs what went offline. The next
            # rescan reads the truth.
            log.warning("resize (%s): %s; counting from the items instead", why, err)
            topo = self.topo.applied(results)
        self._set_topology(topo)
        self._known_standby = topo.standby
        now = time.monotonic()
        for item in results:
            self.metrics.observe_item(item)
            level = logging.INFO if item.ok else logging.WARNING
            log.log(level, "resize (%s): %s", why, item)
        for resource, reached in (
            ("cpus", self.decisions is None or self.topo.online_cpus >= self.decisions.cpu.target),
            (
                "memory",
                self.decisions is None
                or self.topo.online_memory_bytes >= self.decisions.memory.target,
            ),
        ):
            started = self._grow_started.get(resource)
            if reached and started is not None and results:
                self.metrics.observe_grow_latency(resource, now - started)
                del self._grow_started[resource]

    async def ensure_minimum(self, why: str) -> None:
        """Online standby resources until the guest holds at least its minimum."""
        floor = Amount(self.limits.cpus.minimum, self.limits.memory.minimum)
        if self.topo.online_cpus < floor.cpus or self.topo.online_memory_bytes < floor.memory_bytes:
            log.warning(
                "guest below its minimum (%d cpus, %s online; minimum %d cpus, %s): onlining",
                self.topo.online_cpus,
                _fmt("memory", self.topo.online_memory_bytes),
                floor.cpus,
                _fmt("memory", floor.memory_bytes),
            )
            await self.act(f"minimum, {why}", floor)

    async def reconcile(self, why: str) -> None:
        """Rescan sysfs: uevents get lost, and hot-plug may finish after a grant."""
        async with self._exclusive():
            self._set_topology(await asyncio.to_thread(self.actuator.topology))
        await self.ensure_minimum(why)
        granted = self.entitlement
        connected = self.link is not None and self.link.connected
        if connected and granted is not None:
            have = Amount(self.topo.online_cpus, self.topo.online_memory_bytes)
            short = granted.cpus > have.cpus or granted.memory_bytes > have.memory_bytes
            if short and (self.topo.standby_cpus or self.topo.standby_blocks):
                await self._act_and_ack(why, self._online_goal())
        elif not connected:
            await self._online_hot_added(why)
        else:
            self._known_standby = self.topo.standby

    def _online_goal(self) -> Amount:
        """What to hold online of the entitlement: all of it, but for CPUs
        kept as standby (only what the policy wants, at least the minimum)."""
        granted = self.entitlement
        assert granted is not None
        if not self._standby:
            return granted
        wanted = self.decisions.cpu.target if self.decisions else self.topo.online_cpus
        wanted = max(wanted, self.limits.cpus.minimum)
        return Amount(min(granted.cpus, wanted), granted.memory_bytes)

    async def _online_hot_added(self, why: str) -> None:
        """Without a broker, online what the host added since we last looked."""
        cpus, blocks = self._known_standby
        new_cpus = set(self.topo.standby_cpus) - cpus
        new_blocks = set(self.topo.standby_blocks) - blocks
        if not new_cpus and not new_blocks:
            return
        target = Amount(
            self.topo.online_cpus + len(new_cpus),
            self.topo.online_memory_bytes + len(new_blocks) * self.topo.block_size,
        )
        log.info(
            "host hot-added %d cpus and %d blocks while no broker session: onlining",
            len(new_cpus),
            len(new_blocks),
        )
        await self.act(f"hot-add, {why}", target, only=(new_cpus, new_blocks))

    async def _act_and_ack(self, why: str, target: Amount) -> None:
        results, note = await self.act(why, target)
        if results and self._last_grant_id:
            self._send_ack(pb.Ack(grant_id=self._last_grant_id, note=note), results)

    # --------------------------------------------------------------- broker

    async def hello(self) -> pb.Hello:
        """The first message of a session, with the topology as sysfs shows it now.

        The cached snapshot may be a rescan interval old, and the host may have
        plugged or unplugged while the session was down: the broker checks the
        Hello against what it plugged and reconciles its books from it.
        """
        generation = self._topo_generation
        try:
            topo = await asyncio.to_thread(self.actuator.topology)
        except KernelReadError as err:
            log.warning("hello: %s; sending the last topology read", err)
            topo = self.topo
        else:
            # An act that finished meanwhile read after this: keep its snapshot.
            if generation == self._topo_generation and not self._act_lock.locked():
                self._set_topology(topo)
        proto = topo.to_proto()
        if any(rule.onlines_memory for rule in self.onlining_rules):
            # auto_online means the kernel or a udev rule onlines hot-added memory.
            proto.memory.auto_online = True
        cpus, memory = self.limits.cpus, self.limits.memory
        return pb.Hello(
            protocol_version=PROTOCOL_VERSION,
            guest_id=self.guest_id,
            agent_version=__version__,
            topology=proto,
            limits=pb.Limits(
                cpus=pb.ResourceLimits(
                    minimum=cpus.minimum, maximum=cpus.maximum, burst=cpus.burst
                ),
                memory_bytes=pb.ResourceLimits(
                    minimum=memory.minimum, maximum=memory.maximum, burst=memory.burst
                ),
            ),
        )

    def on_link_state(self, connected: bool) -> None:
        self.metrics.broker_connected(connected)
        self._restate = connected
        if not connected:
            # A new session starts from the truth; the old entitlement stands
            # until the broker says otherwise (never shrink on a disconnect).
            self._last_request = None

    async def on_broker_message(self, message: pb.BrokerMessage) -> None:
        await self._contained(
            f"broker message {message.WhichOneof('body')}", self._on_broker_message(message)
        )

    async def _on_broker_message(self, message: pb.BrokerMessage) -> None:
        body = message.WhichOneof("body")
        if body == "welcome":
            welcome = message.welcome
            # Ids are unique within a session; a restarted broker counts anew.
            self._seen_ids.clear()
            self._set_broker_limits(welcome.limits if welcome.HasField("limits") else None)
            await self.reconcile("reconnect")
        elif body == "grant":
            await self._on_grant(message.grant)
        elif body == "reclaim":
            await self._on_reclaim(message.reclaim)
        elif body == "limits":
            self._set_broker_limits(message.limits.limits)
            log.info("broker changed the limits: %s", self._fmt_limits())
        else:
            log.warning("ignoring a broker message with no known body")

    def _set_broker_limits(self, limits: pb.Limits | None) -> None:
        self.broker_limits = limits
        self.limits = effective_limits(self.config, self.topo, limits)

    def _fmt_limits(self) -> str:
        c, m = self.limits.cpus, self.limits.memory
        return (
            f"cpus {c.minimum}-{c.maximum} (burst {c.burst}), memory "
            f"{_fmt('memory', m.minimum)}-{_fmt('memory', m.maximum)} "
            f"(burst {_fmt('memory', m.burst)})"
        )

    def _seen(self, kind: str, ident: int) -> bool:
        if (kind, ident) in self._seen_ids:
            return True
        self._seen_ids.append((kind, ident))
        return False

    async def _on_grant(self, grant: pb.Grant) -> None:
        if self._seen("grant", grant.grant_id):
            log.info("grant %d seen before; ignoring the duplicate", grant.grant_id)
            return
        block = self.topo.block_size
        limits = self.limits
        problems = []
        cpus, memory = grant.cpus, grant.memory_bytes // block * block
        if cpus > limits.cpus.burst:
            problems.append(f"{cpus} cpus is above this guest's burst limit {limits.cpus.burst}")
            cpus = limits.cpus.burst
        if memory > limits.memory.burst:
            problems.append(
                f"{_fmt('memory', memory)} is above the burst limit "
                f"{_fmt('memory', limits.memory.burst)}"
            )
            memory = limits.memory.burst
        if grant.memory_bytes % block:
            problems.append(f"memory {grant.memory_bytes} is not a whole number of blocks")
        self.entitlement = Amount(
            max(cpus, limits.cpus.minimum), max(memory, limits.memory.minimum)
        )
        self._last_grant_id = grant.grant_id
        log.info(
            "grant %d: may hold %d cpus and %s%s",
            grant.grant_id,
            self.entitlement.cpus,
            _fmt("memory", self.entitlement.memory_bytes),
            f" (capped: {'; '.join(problems)})" if problems else "",
        )
        crash_point("grant.received")
        results, note = await self.act(f"grant {grant.grant_id}", self._online_goal())
        crash_point("grant.before-ack")
        if note:
            problems.append(note)
        self._send_ack(pb.Ack(grant_id=grant.grant_id, note="; ".join(problems)), results)

    async def _on_reclaim(self, reclaim: pb.Reclaim) -> None:
        if self._seen("reclaim", reclaim.reclaim_id):
            log.info("reclaim %d seen before; ignoring the duplicate", reclaim.reclaim_id)
            return
        deadline_s = reclaim.deadline_ms / 1000 if reclaim.deadline_ms else 30.0
        target = Amount(reclaim.cpus, reclaim.memory_bytes)
        log.info(
            "reclaim %d: come down to %d cpus and %s within %.1f s",
            reclaim.reclaim_id,
            target.cpus,
            _fmt("memory", target.memory_bytes),
            deadline_s,
        )
        crash_point("reclaim.received")
        results, note = await self.release(target, time.monotonic() + deadline_s)
        crash_point("reclaim.before-ack")
        # The broker's decision stands even where the kernel refused: the
        # guest will not grow back into it, and the Ack says what stayed. A
        # reclaim only lowers: a field above what was granted keeps the grant
        # (a rise comes as a Grant), and nothing goes below the minimum.
        floor = self.limits
        held = self.entitlement or Amount(self.topo.online_cpus, self.topo.online_memory_bytes)
        self.entitlement = Amount(
            max(min(target.cpus, held.cpus), floor.cpus.minimum),
            max(min(target.memory_bytes, held.memory_bytes), floor.memory.minimum),
        )
        if note:
            log.warning("reclaim %d: %s", reclaim.reclaim_id, note)
        self._send_ack(pb.Ack(reclaim_id=reclaim.reclaim_id, note=note), results)

    # --------------------------------------------------------------- status

    def live_state(self) -> dict[str, Any]:
        """What `vmtide-agent status` shows of the running daemon.

        The cpus, memory and pressure sections have the keys of the one-shot
        status, so a reader of either finds the counts in the same place.
        """
        topo, limits, reading, decisions = self.topo, self.limits, self.last_reading, self.decisions
        now = time.monotonic()
        link = self.link
        granted = self.entitlement
        acting = None
        if self._acting is not None:
            acting = {"what": self._acting[0], "seconds": round(now - self._acting[1], 1)}
        short: dict[str, int] = {}
        if granted is not None:
            short = {
                "cpus": max(0, granted.cpus - topo.online_cpus),
                "memory_bytes": max(0, granted.memory_bytes - topo.online_memory_bytes),
            }
        return {
            "source": "daemon",
            "pid": os.getpid(),
            "written_at": time.time(),
            "sensing_interval_seconds": self.config.agent.sensing_interval_seconds,
            "guest_id": self.guest_id,
            "cpus": {
                "possible": len(topo.possible_cpus),
                "present": len(topo.cpus),
                "online": topo.online_cpus,
                "standby": list(topo.standby_cpus),
                "limits": dataclasses.asdict(limits.cpus),
                "busy": round(reading.cpu_busy, 3) if reading else None,
                "decision": _decision_state(decisions.cpu) if decisions else None,
            },
            "memory": {
                "block_size_bytes": topo.block_size,
                "online_bytes": topo.online_memory_bytes,
                "movable_online_bytes": sum(b.movable for b in topo.blocks) * topo.block_size,
                "standby_blocks": list(topo.standby_blocks),
                "available_bytes": reading.memory_available if reading else None,
                "auto_online_blocks": topo.auto_online,
                "udev_onlining_rules": [str(r.path) for r in self.onlining_rules],
                "limits": dataclasses.asdict(limits.memory),
                "decision": _decision_state(decisions.memory) if decisions else None,
            },
            "pressure": {
                "available": reading.psi_available if reading else False,
                "cpu_some": reading.cpu_some if reading else 0.0,
                "memory_some": reading.memory_some if reading else 0.0,
                "memory_full": reading.memory_full if reading else 0.0,
                "io_some": reading.io_some if reading else 0.0,
            },
            "broker": {
                "enabled": link is not None,
                "target": self.config.broker.target,
                "connected": link is not None and link.connected,
                "session_id": link.session_id if link is not None and link.connected else "",
                "reconnects": link.reconnects if link is not None else 0,
                "last_grant_id": self._last_grant_id,
            },
            "entitlement": dataclasses.asdict(granted) if granted is not None else None,
            "last_request": self.last_request,
            "pending": {"acting": acting, "granted_not_online": short},
            "recent_decisions": list(self.recent_decisions),
            "cycle_errors": dict(self.cycle_errors),
        }

    def _send_ack(self, ack: pb.Ack, results: Sequence[ItemResult]) -> None:
        ack.items.extend(item_to_proto(r) for r in results)
        ack.online_cpus = self.topo.online_cpus
        ack.online_memory_bytes = self.topo.online_memory_bytes
        if self.link is not None:
            self.link.send(pb.GuestMessage(ack=ack))


def _decision_state(decision: policy.Decision) -> dict[str, Any]:
    return {
        "direction": decision.direction,
        "current": decision.current,
        "target": decision.target,
        "urgency": decision.urgency.name.lower(),
        "bursting": decision.bursting,
        "reason": decision.reason,
    }


def _ask(
    decision: policy.Decision, granted: int, restate: bool, standby: int = 0, ceiling: int = 0
) -> int:
    """What to ask the broker for one resource: the target (and `standby` more,
    up to `ceiling`) when the policy wants a change in that direction or the
    session's first request restates it, else what is granted."""
    want = min(decision.target + standby, max(decision.target, ceiling))
    if restate:
        return want
    if decision.direction == "grow" and want > granted:
        return want
    if decision.direction == "shrink" and want < granted:
        return want
    return granted


def _fmt(resource: str, value: int) -> str:
    if resource == "memory":
        return f"{value / (1 << 20):.0f} MiB"
    return str(value)
