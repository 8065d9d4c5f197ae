"""The soak: several simulated guests under random load, random faults, invariants checked.

    python -m tests.soak --minutes 30 --guests 4 --seed 1

Each guest is a FakeGuest tree with the real agent in its own process; one
real broker process serves them all with the simulated backend, from a pool
too small for everybody's peak. Loads change at random (idle, CPU, memory,
both, spikes) and faults are injected at random: the broker SIGKILLed or
stopped and restarted, agents SIGKILLed or armed with a crash point
(agent/crashpoint.py) and restarted, sysfs writes refused with EBUSY or EIO,
blocks vanishing as they are offlined.

Every second the invariants that always hold are checked (the broker's books
never over-allocate the pool, what is plugged fits in the pool, no guest
below its minimum or above its limits). Every few minutes, and at the end,
the faults stop, the loads hold still, and once the system has settled the
broker's books must equal every guest's kernel, with nothing plugged but
offline (tests/fault_helpers.py). Exit status 0 when nothing was violated;
a summary is printed either way. The seed fixes the sequence of choices, not
the timing.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import errno
import json
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # simulation, fault_helpers

from fault_helpers import (
    AgentProcess,
    BrokerProcess,
    Watch,
    guest_truth,
    wait_settled,
)
from simulation import broker_config

from agent.crashpoint import POINTS
from broker.config import CpuLimits, GuestConfig, MemoryLimits
from vmtide.fakesys import Fault, Load

MiB = 1 << 20
GiB = 1 << 30
BOOT_BLOCKS = 8  # 1 GiB of boot memory in 128 MiB blocks, the guests' minimum
# How long a settle may take: a reclaim the kernel refused is retried after
# the broker's 30 s backoff, and shrinking waits for the policy's window.
SETTLE_TIMEOUT_SECONDS = 150.0
FAULT_WEIGHTS = {
    "broker_kill": 2,
    "broker_restart": 1,
    "agent_kill": 3,
    "agent_crash_point": 3,
    "sysfs_ebusy": 3,
    "sysfs_eio": 3,
    "block_vanish": 2,
}


@dataclasses.dataclass(frozen=True)
class SoakOptions:
    seconds: float
    guests: int
    seed: int
    workdir: Path
    fault_every: float = 12.0  # mean seconds between faults
    settle_every: float = 180.0  # seconds of chaos between settle checks
    progress_every: float = 30.0
    output: Callable[[str], None] = lambda line: print(line, flush=True)


@dataclasses.dataclass
class Summary:
    options: SoakOptions
    elapsed: float = 0.0
    faults: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    loads: int = 0
    checks: int = 0
    settles: int = 0
    settle_seconds: list[float] = dataclasses.field(default_factory=list)
    agent_starts: int = 0
    broker_starts: int = 0
    crash_points_hit: collections.Counter[str] = dataclasses.field(
        default_factory=collections.Counter
    )
    violations: list[str] = dataclasses.field(default_factory=list)
    tracebacks: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations and not self.tracebacks

    def text(self) -> str:
        o = self.options
        settles = self.settle_seconds
        lines = [
            f"soak: {self.elapsed / 60:.1f} min, {o.guests} guests, seed {o.seed}: "
            + ("PASS" if self.ok else "FAIL"),
            f"  faults injected: {sum(self.faults.values())} "
            f"({', '.join(f'{k} {v}' for k, v in sorted(self.faults.items())) or 'none'})",
            f"  crash points hit: {sum(self.crash_points_hit.values())} "
            f"({', '.join(f'{k} {v}' for k, v in sorted(self.crash_points_hit.items())) or '-'})",
            f"  load changes: {self.loads}; agent starts: {self.agent_starts}; "
            f"broker starts: {self.broker_starts}",
            f"  invariant checks: {self.checks}; settles: {self.settles}"
            + (
                f" (settled in {min(settles):.0f}-{max(settles):.0f} s, "
                f"mean {sum(settles) / len(settles):.0f} s)"
                if settles
                else ""
            ),
            f"  violations: {len(self.violations)}; tracebacks in logs: {len(self.tracebacks)}",
        ]
        lines += [f"    {v}" for v in self.violations[:20]]
        lines += [f"    {t}" for t in self.tracebacks[:10]]
        return "\n".join(lines)

    def as_json(self) -> dict[str, Any]:
        return {
            "seconds": round(self.elapsed),
            "guests": self.options.guests,
            "seed": self.options.seed,
            "ok": self.ok,
            "faults": dict(self.faults),
            "crash_points_hit": dict(self.crash_points_hit),
            "load_changes": self.loads,
            "agent_starts": self.agent_starts,
            "broker_starts": self.broker_starts,
            "checks": self.checks,
            "settles": self.settles,
            "settle_seconds": [round(s, 1) for s in self.settle_seconds],
            "violations": self.violations,
            "tracebacks": self.tracebacks,
        }


LOAD_PATTERNS: dict[str, Callable[[random.Random], Load]] = {
    "idle": lambda r: Load(cpus=r.uniform(0.1, 0.5), memory_bytes=r.randint(200, 400) * MiB),
    "cpu": lambda r: Load(cpus=r.uniform(1.5, 3.5), memory_bytes=r.randint(200, 400) * MiB),
    "memory": lambda r: Load(cpus=r.uniform(0.1, 0.5), memory_bytes=r.randint(900, 1800) * MiB),
    "both": lambda r: Load(cpus=r.uniform(1.5, 3.5), memory_bytes=r.randint(900, 1800) * MiB),
}


class Soak:
    def __init__(self, options: SoakOptions) -> None:
        self.o = options
        self.rng = random.Random(options.seed)
        self.summary = Summary(options)
        tmp = options.workdir
        self.guests = {
            f"g{i}": AgentProcess(tmp, f"g{i}", max_cpus=3, shrink_window_seconds=4.0)
            for i in range(options.guests)
        }
        self.limits: dict[str, GuestConfig] = {
            name: dataclasses.replace(
                g.guest_config(priority=self.rng.randint(0, 10)),
                cpus=CpuLimits(minimum=1, maximum=3),
                memory=MemoryLimits(minimum_bytes=1 * GiB, maximum_bytes=2 * GiB),
            )
            for name, g in self.guests.items()
        }
        # Everybody's minimum and half a peak more each: guests compete.
        n = options.guests
        self.pool = (2 * n, n * GiB + n * 512 * MiB)
        config = broker_config(tmp, list(self.limits.values()), *self.pool)
        self.broker = BrokerProcess(tmp, config)
        self.watch = Watch(
            self.broker.state,
            {name: g.fake for name, g in self.guests.items()},
            self.limits,
            self.pool,
        )
        self._reported: set[str] = set()  # what the last check found
        # Processes down on purpose, with when to start them again.
        self.restart_at: dict[str, float] = {}
        self.chaos = True

    # ------------------------------------------------------------- running

    async def run(self) -> Summary:
        started = time.monotonic()
        self.broker.start()
        self.summary.broker_starts += 1
        for guest in self.guests.values():
            guest.start()
            self.summary.agent_starts += 1
        stop = asyncio.Event()
        tasks = [
            asyncio.create_task(self._drive(stop)),
            asyncio.create_task(self._supervise(stop)),
        ]
        try:
            await self._chaos(started)
            await self._settle("final")
        finally:
            stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)
            for guest in self.guests.values():
                guest.stop()
            self.broker.stop()
            self.summary.elapsed = time.monotonic() - started
            self._collect_tracebacks()
        return self.summary

    async def _chaos(self, started: float) -> None:
        end = started + self.o.seconds
        next_fault = started + self.rng.expovariate(1 / self.o.fault_every)
        next_settle = started + self.o.settle_every
        next_progress = started + self.o.progress_every
        next_loads = {name: started for name in self.guests}
        while (now := time.monotonic()) < end:
            for name, when in next_loads.items():
                if now >= when:
                    self._new_load(name)
                    next_loads[name] = now + self.rng.uniform(4.0, 20.0)
            if now >= next_fault:
                self._inject()
                next_fault = now + self.rng.expovariate(1 / self.o.fault_every)
            if now >= next_settle and end - now > self.o.settle_every / 2:
                await self._settle(f"after {(now - started) / 60:.1f} min")
                next_settle = time.monotonic() + self.o.settle_every
            if now >= next_progress:
                self._progress(now - started)
                next_progress = now + self.o.progress_every
            self._check()
            await asyncio.sleep(1.0)

    async def _drive(self, stop: asyncio.Event) -> None:
        """Advance every guest's clock under its load, ten times a second."""
        last = time.monotonic()
        while not stop.is_set():
            await asyncio.sleep(0.1)
            now = time.monotonic()
            for guest in self.guests.values():
                with contextlib.suppress(FileNotFoundError, ValueError):
                    guest.fake.tick(now - last, guest.load)  # races a plug: next tick
            last = now

    async def _supervise(self, stop: asyncio.Event) -> None:
        """Restart what died or was stopped, when its time comes."""
        while not stop.is_set():
            await asyncio.sleep(0.25)
            now = time.monotonic()
            for name, guest in self.guests.items():
                code = guest.returncode()
                if code is not None and name not in self.restart_at:
                    if code == -9 and guest.crash_at:
                        self.summary.crash_points_hit[guest.crash_at] += 1
                    else:
                        self._violation(f"{name}'s agent exited with status {code} on its own")
                    guest.process = None
                    self.restart_at[name] = now + self.rng.uniform(0.0, 2.0)
                if guest.process is None and now >= self.restart_at.get(name, now):
                    self.restart_at.pop(name, None)
                    guest.start()
                    self.summary.agent_starts += 1
            if self.broker.process is not None and self.broker.process.poll() is not None:
                self._violation(f"the broker exited with status {self.broker.process.poll()}")
                self.broker.process = None
                self.restart_at["broker"] = now
            if self.broker.process is None and now >= self.restart_at.get("broker", now):
                self.restart_at.pop("broker", None)
                self.broker.start()
                self.summary.broker_starts += 1

    # --------------------------------------------------------------- loads

    def _new_load(self, name: str) -> None:
        pattern = self.rng.choices(list(LOAD_PATTERNS), weights=[3, 2, 2, 1])[0]
        self.guests[name].load = LOAD_PATTERNS[pattern](self.rng)
        self.summary.loads += 1

    # -------------------------------------------------------------- faults

    def _inject(self) -> None:
        kind = self.rng.choices(list(FAULT_WEIGHTS), weights=list(FAULT_WEIGHTS.values()))[0]
        name = self.rng.choice(sorted(self.guests))
        guest = self.guests[name]
        now = time.monotonic()
        if kind in ("broker_kill", "broker_restart"):
            if self.broker.process is None:
                return  # already down
            if kind == "broker_kill":
                self.broker.kill()
            else:
                self.broker.stop()
            self.restart_at["broker"] = now + self.rng.uniform(0.0, 4.0)
        elif kind == "agent_kill":
            if guest.process is None:
                return
            guest.kill()
            self.restart_at[name] = now + self.rng.uniform(0.0, 3.0)
        elif kind == "agent_crash_point":
            point = self.rng.choice(POINTS)
            if point.startswith("grant."):
                point += "@2"  # the first grant of a session only restates what is online
            guest.stop()
            guest.start(crash_at=point)
            self.summary.agent_starts += 1
        else:
            fault = self._sysfs_fault(kind, guest)
            if fault is None:
                return
            guest.fake.set_faults([fault])
        self.summary.faults[kind] += 1

    def _sysfs_fault(self, kind: str, guest: AgentProcess) -> Fault | None:
        fake = guest.fake
        try:
            cpus = sorted(fake.online_cpus() - {0})
            blocks = [i for i in fake.online_blocks() if i >= BOOT_BLOCKS]
        except (FileNotFoundError, ValueError):
            return None
        targets = [("memory", i) for i in blocks]
        if kind != "block_vanish":
            targets += [("cpu", c) for c in cpus]
        if kind == "sysfs_eio":
            # Onlining what the next grant brings, as well as offlining.
            targets += [("cpu", c) for c in range(1, 4)]
        if not targets:
            return None
        target, index = self.rng.choice(targets)
        if kind == "sysfs_ebusy":
            value = "offline" if target == "memory" else "0"
            return {
                "kind": target,
                "index": index,
                "effect": errno.EBUSY,
                "value": value,
                "times": self.rng.randint(1, 3),
            }
        if kind == "sysfs_eio":
            return {
                "kind": target,
                "index": index,
                "effect": errno.EIO,
                "times": self.rng.randint(1, 2),
            }
        return {"kind": target, "index": index, "effect": "vanish", "value": "offline", "times": 1}

    # ------------------------------------------------------------ checking

    def _check(self) -> None:
        try:
            found = self.watch.check()
        except AssertionError as err:  # a tree that would not hold still
            found = [str(err)]
        for problem in found:
            if problem not in self._reported:  # once while it lasts
                self._violation(problem)
        self._reported = set(found)
        self.summary.checks += 1

    async def _settle(self, when: str) -> None:
        """Stop the faults, let the loads hold, and compare the books with the guests."""
        for guest in self.guests.values():
            guest.fake.set_faults([])
            if guest.crash_at and guest.alive:
                guest.stop()  # restarted clean by the supervisor
        started = time.monotonic()
        while "broker" in self.restart_at or any(not g.alive for g in self.guests.values()):
            await asyncio.sleep(0.25)
            if time.monotonic() - started > 30:
                self._violation(f"settle {when}: processes did not come back")
                return
        fakes = {name: g.fake for name, g in self.guests.items()}
        try:
            await wait_settled(self.broker.state, fakes, SETTLE_TIMEOUT_SECONDS, stable_reads=5)
        except AssertionError as err:
            self._violation(f"settle {when}: {err}")
            self._snapshot(f"settle-{self.summary.settles}")
        else:
            took = time.monotonic() - started
            self.summary.settle_seconds.append(took)
            self.o.output(f"settled {when} in {took:.0f} s: {self._sizes()}")
        self.summary.settles += 1

    def _violation(self, problem: str) -> None:
        stamp = f"[{time.strftime('%H:%M:%S')}] {problem}"
        self.summary.violations.append(stamp)
        self.o.output(f"VIOLATION {stamp}")

    def _snapshot(self, name: str) -> None:
        """Keep the broker's state and every guest's view for the post-mortem."""
        state = self.broker.state()
        path = self.o.workdir / f"{name}.json"
        path.write_text(
            json.dumps(
                {
                    "broker": state,
                    "guests": {n: str(guest_truth(g.fake)) for n, g in self.guests.items()},
                },
                indent=1,
            )
        )
        self.o.output(f"snapshot in {path}")

    def _sizes(self) -> str:
        parts = []
        for name, guest in self.guests.items():
            try:
                truth = guest_truth(guest.fake)
            except AssertionError:
                parts.append(f"{name} ?")
                continue
            parts.append(f"{name} {truth.online_cpus}c/{truth.online_memory / GiB:.2f}G")
        return " ".join(parts)

    def _progress(self, elapsed: float) -> None:
        s = self.summary
        self.o.output(
            f"[{elapsed:5.0f}s/{self.o.seconds:.0f}s] faults {sum(s.faults.values())}, "
            f"crash points {sum(s.crash_points_hit.values())}, checks {s.checks}, "
            f"settles {s.settles}, violations {len(s.violations)} | {self._sizes()}"
        )

    def _collect_tracebacks(self) -> None:
        for log in [self.broker.log, *(g.log for g in self.guests.values())]:
            try:
                lines = log.read_text(errors="replace").splitlines()
            except OSError:
                continue
            for i, line in enumerate(lines):
                if line.startswith("Traceback"):
                    # The last line of a traceback names the error.
                    tail = next((t for t in lines[i + 1 :] if not t.startswith(" ")), "?")
                    self.summary.tracebacks.append(f"{log.name}: {lines[i - 1][:120]} / {tail}")


def run(options: SoakOptions) -> Summary:
    return asyncio.run(Soak(options).run())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.soak", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--guests", type=int, default=4)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--fault-every", type=float, default=12.0, help="mean seconds between faults"
    )
    parser.add_argument("--settle-every", type=float, default=180.0, help="seconds between settles")
    parser.add_argument("--workdir", type=Path, help="keep trees, logs and snapshots here")
    parser.add_argument("--json", type=Path, help="also write the summary here")
    args = parser.parse_args(argv)
    if args.guests < 1 or args.minutes <= 0:
        parser.error("--guests must be at least 1 and --minutes positive")
    if args.workdir:
        shutil.rmtree(args.workdir, ignore_errors=True)
        args.workdir.mkdir(parents=True)
        workdir = args.workdir
    else:
        workdir = Path(tempfile.mkdtemp(prefix="vmtide-soak-"))
    print(f"soak: {args.minutes:g} min, {args.guests} guests, seed {args.seed}, in {workdir}")
    summary = run(
        SoakOptions(
            seconds=args.minutes * 60,
            guests=args.guests,
            seed=args.seed,
            workdir=workdir,
            fault_every=args.fault_every,
            settle_every=args.settle_every,
        )
    )
    print(summary.text())
    if args.json:
        args.json.write_text(json.dumps(summary.as_json(), indent=2) + "\n")
    if summary.ok and not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if summary.ok else 1


if __name__ == "__main__":
    sys.exit(main())
