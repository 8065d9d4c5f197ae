"""Broker scale: decision latency of one vmtide-broker process against many guests.

The broker runs as its own process (`python -m broker.cli run`) with the
simulated backend: every guest is a FakeGuest tree the broker hot-plugs into.
Load generators run in other processes; each holds, per guest, the agent's own
session code (`agent.session.BrokerLink`: one channel and one Session stream
per guest, the agent's keepalive options) and plays the agent's side of the
flow: Hello with the topology read from the guest's tree (as the agent reads
sysfs), a LoadReport every second, and now and then a ResourceRequest, grow
and shrink in turn. A Grant is acknowledged item by item, as the agent does
after onlining; a Reclaim is acknowledged with the offlined items, and the
broker then unplugs them from the tree.

Decision latency: from a request's hand-over to the session (where the agent
hands it over) to the Grant (grow) or Reclaim (shrink) read from the stream.
The window opens `--warmup` seconds after the last guest got its session, the
guests reporting meanwhile: it measures the broker's steady state, not its
start-up (a round for every new session and every first report).

Identity: the broker binds a session to a guest by the listener it arrived on,
so every guest has its own listener; unix sockets by default (`--transport
tcp` for 127.0.0.1 ports). Each guest costs the broker two descriptors (its
listener and its connection), so one broker under a 20,000-descriptor limit
tops out near 9,900 guests this way.

Run `python -m bench.broker_scale --help`; results go to broker-scale.json,
.md and .png in --out.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import json
import math
import multiprocessing
import os
import platform
import random
import resource
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psutil

from agent.config import BrokerSection
from agent.kernel import MEMORY_DIR, Kernel
from agent.session import BrokerLink
from agent.topology import Topology
from bench.machine import revision, run_text
from vmtide import __version__
from vmtide.fakesys import FakeGuest
from vmtide.v1 import broker_pb2 as pb

REPO = Path(__file__).resolve().parent.parent
MiB = 1 << 20
BLOCK_SIZE = 128 * MiB
# Every guest boots with 1 CPU (of 4 possible) and 8 blocks (1 GiB); a grow
# asks for 3 CPUs and 12 blocks, a shrink for the boot size again.
POSSIBLE_CPUS = 4
BOOT_CPUS = 1
BOOT_BLOCKS = 8
GROW = (3, 12)
SHRINK = (BOOT_CPUS, BOOT_BLOCKS)
MAX_CPUS = 4
MAX_BLOCKS = 16
DEFAULT_COUNTS = (100, 300, 1000, 3000, 9000)
WORKER_LINE_LIMIT = 64 * MiB
NAME = "broker-scale"  # the report's files: NAME.json, .md, .png, and NAME-notes.md


class BenchError(Exception):
    """The benchmark could not run as asked (the message says what failed)."""


@dataclasses.dataclass(frozen=True)
class Settings:
    guests: int
    duration: float  # measurement window, seconds
    request_interval: float  # mean seconds between one guest's requests
    report_interval: float = 1.0
    workers: int = 0  # load-generator processes; 0: one per 2,500 guests, at most 4
    transport: str = "unix"
    log_level: str = "INFO"
    grace: float = 10.0  # how long replies to the window's last requests may take
    # Reports only, from every guest, between the last session's start and the
    # window: the broker's start-up (a round for every new session, and for
    # every first report) is not its steady state.
    warmup: float = 5.0
    profile: Path | None = None  # run the broker under cProfile, writing here

    def __post_init__(self) -> None:
        if self.guests < 1:
            raise BenchError(f"--guests: need at least 1 guest, got {self.guests}")
        if self.duration <= 0 or self.request_interval <= 0 or self.report_interval <= 0:
            raise BenchError("--duration, --request-interval: must be positive")
        if self.warmup < 0:
            raise BenchError(f"--warmup: must not be negative, got {self.warmup}")
        if self.transport not in ("unix", "tcp"):
            raise BenchError(f"--transport: {self.transport!r} is not one of unix, tcp")

    @property
    def worker_count(self) -> int:
        return self.workers or max(1, min(4, math.ceil(self.guests / 2500)))


# ------------------------------------------------------------------ guest trees


def guest_id(index: int) -> str:
    return f"g{index:05d}"


def _build_tree(root: str) -> None:
    FakeGuest(
        Path(root),
        possible_cpus=POSSIBLE_CPUS,
        boot_cpus=BOOT_CPUS,
        block_size=BLOCK_SIZE,
        boot_blocks=BOOT_BLOCKS,
    )


def _reset_tree(root: str) -> None:
    """Back to the boot topology: unplug what an earlier run's broker plugged."""
    guest = FakeGuest.open(Path(root))
    for cpu in sorted(guest.present_cpus() - set(range(BOOT_CPUS))):
        guest.unplug_cpu(cpu)
    for index in guest.block_indexes():
        if index >= BOOT_BLOCKS:
            guest.remove_block(index)


def prepare_trees(base: Path, count: int) -> list[Path]:
    """`count` guest trees under `base`, built once and reset to boot state on reuse."""
    roots = [base / guest_id(i) for i in range(count)]
    missing = [str(r) for r in roots if not r.exists()]
    existing = [str(r) for r in roots if r.exists()]
    with multiprocessing.get_context("spawn").Pool(min(2, os.cpu_count() or 1)) as pool:
        pool.map(_build_tree, missing, chunksize=64)
        pool.map(_reset_tree, existing, chunksize=64)
    return roots


# ------------------------------------------------------------------ broker


def free_tcp_ports(count: int) -> list[int]:
    """Ports the kernel has free now (the broker binds them a moment later)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def listen_addresses(workdir: Path, settings: Settings) -> list[str]:
    if settings.transport == "tcp":
        return [f"127.0.0.1:{port}" for port in free_tcp_ports(settings.guests)]
    sockets = workdir / "sockets"
    sockets.mkdir(exist_ok=True)
    return [f"unix:{sockets / guest_id(i)}.sock" for i in range(settings.guests)]


def write_broker_config(workdir: Path, roots: Sequence[Path], listens: Sequence[str]) -> Path:
    """A broker.toml whose pool covers every guest at its maximum: every request is granted."""
    count = len(roots)
    lines = [
        "[broker]",
        f'state_file = "{workdir / "broker.json"}"',
        "metrics_port = 0",
        "",
        "[pool]",
        f"cpus = {count * MAX_CPUS}",
        f"memory_bytes = {count * MAX_BLOCKS * BLOCK_SIZE}",
    ]
    for index, (root, listen) in enumerate(zip(roots, listens, strict=True)):
        lines += [
            "",
            "[[guests]]",
            f'id = "{guest_id(index)}"',
            f'listen = "{listen}"',
            'backend = "simulated"',
            f'simulated_root = "{root}"',
            f"cpus = {{ minimum = {BOOT_CPUS}, maximum = {MAX_CPUS} }}",
            f"memory = {{ minimum_bytes = {BOOT_BLOCKS * BLOCK_SIZE}, "
            f"maximum_bytes = {MAX_BLOCKS * BLOCK_SIZE} }}",
        ]
    path = workdir / "broker.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def broker_command(config: Path, settings: Settings) -> list[str]:
    command = [sys.executable]
    if settings.profile is not None:
        command += ["-m", "cProfile", "-o", str(settings.profile)]
    return [
        *command,
        "-m",
        "broker.cli",
        "run",
        "--config",
        str(config),
        "--log-level",
        settings.log_level,
        "--metrics-port",
        "0",
    ]


async def wait_for(path: Path, process: asyncio.subprocess.Process, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.returncode is not None:
            raise BenchError(f"the broker exited with status {process.returncode} before ready")
        if time.monotonic() > deadline:
            raise BenchError(f"the broker wrote no {path.name} within {timeout:.0f} s")
        await asyncio.sleep(0.1)


async def stop_process(process: asyncio.subprocess.Process, timeout: float) -> None:
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()


# ------------------------------------------------------------------ one run


async def run_once(settings: Settings, workdir: Path, roots: Sequence[Path]) -> dict[str, Any]:
    """Start a broker and the load generators, measure one window, stop everything."""
    listens = listen_addresses(workdir, settings)
    config = write_broker_config(workdir, roots, listens)
    state = workdir / "broker.json"
    state.unlink(missing_ok=True)
    log_path = workdir / "broker.log"
    started = time.monotonic()
    with log_path.open("wb") as log_file:
        broker = await asyncio.create_subprocess_exec(
            *broker_command(config, settings),
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
        )
    workers: list[asyncio.subprocess.Process] = []
    try:
        await wait_for(state, broker, timeout=60 + settings.guests / 50)
        broker_ready = time.monotonic() - started
        workers = await start_workers(settings, roots, listens, workdir)
        connect_timeout = 60 + settings.guests / 50
        readies = await asyncio.gather(*(read_json(w, connect_timeout) for w in workers))
        connected = sum(r["ready"] for r in readies)
        if connected < settings.guests:
            raise BenchError(
                f"only {connected} of {settings.guests} guests got a session "
                f"within {connect_timeout:.0f} s; see {log_path}"
            )
        sessions_ready = time.monotonic() - started - broker_ready
        await asyncio.sleep(settings.warmup)
        window = await measure_window(settings, broker, workers)
        results = await asyncio.gather(
            *(read_json(w, settings.duration + settings.grace + 60) for w in workers)
        )
    finally:
        for worker in workers:
            if worker.stdin is not None:
                worker.stdin.close()
        await asyncio.gather(*(stop_process(w, 30) for w in workers))
        await stop_process(broker, 60)
    if broker.returncode not in (0, -signal.SIGTERM):
        raise BenchError(f"the broker exited with status {broker.returncode}; see {log_path}")
    return summarize(settings, results, window, broker_ready, sessions_ready)


async def start_workers(
    settings: Settings, roots: Sequence[Path], listens: Sequence[str], workdir: Path
) -> list[asyncio.subprocess.Process]:
    count = settings.worker_count
    workers = []
    for n in range(count):
        spec = {
            "guests": [
                [guest_id(i), listens[i], str(roots[i])] for i in range(n, settings.guests, count)
            ],
            "duration": settings.duration,
            "request_interval": settings.request_interval,
            "report_interval": settings.report_interval,
            "grace": settings.grace,
            "connect_timeout": 60 + settings.guests / 50,
            "seed": n,
        }
        spec_path = workdir / f"worker-{n}.json"
        spec_path.write_text(json.dumps(spec))
        with (workdir / f"worker-{n}.log").open("wb") as log_file:
            workers.append(
                await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    "bench.broker_scale",
                    "--worker",
                    str(spec_path),
                    cwd=REPO,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=log_file,
                    # A generator's results are one JSON line: 6,000 latencies
                    # at 2,000 guests are more than the default 64 KiB.
                    limit=WORKER_LINE_LIMIT,
                )
            )
    return workers


async def read_json(process: asyncio.subprocess.Process, timeout: float) -> dict[str, Any]:
    assert process.stdout is not None
    try:
        line = await asyncio.wait_for(process.stdout.readline(), timeout)
    except TimeoutError:
        raise BenchError(f"load generator {process.pid} said nothing for {timeout:.0f} s") from None
    if not line:
        await process.wait()
        raise BenchError(f"load generator {process.pid} exited with status {process.returncode}")
    result: dict[str, Any] = json.loads(line)
    return result


async def measure_window(
    settings: Settings,
    broker: asyncio.subprocess.Process,
    workers: Sequence[asyncio.subprocess.Process],
) -> dict[str, float]:
    """Start the window in every generator; sample the broker's CPU time and RSS."""
    broker_ps = psutil.Process(broker.pid)
    cpu0 = _cpu_seconds(broker_ps)
    host0 = psutil.cpu_times()
    rss_max = broker_ps.memory_info().rss
    start = time.monotonic()
    for worker in workers:
        assert worker.stdin is not None
        worker.stdin.write(b"go\n")
        await worker.stdin.drain()
    while (left := start + settings.duration - time.monotonic()) > 0:
        await asyncio.sleep(min(0.5, left))
        rss_max = max(rss_max, broker_ps.memory_info().rss)
    wall = time.monotonic() - start
    host1 = psutil.cpu_times()
    idle = (host1.idle + host1.iowait) - (host0.idle + host0.iowait)
    total = sum(host1) - sum(host0)
    return {
        "broker_cpu_percent": 100 * (_cpu_seconds(broker_ps) - cpu0) / wall,
        "broker_rss_mib": rss_max / MiB,
        # Busy time of every CPU of the host, in % of one core: what is left after
        # the broker and the generators is other load on a shared machine.
        "host_cpu_percent": 100 * (os.cpu_count() or 1) * (total - idle) / total,
    }


def _cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def percentile(values: Sequence[float], q: float) -> float:
    """The nearest-rank percentile (q in 0-100) of a non-empty sequence."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def summarize(
    settings: Settings,
    results: Sequence[dict[str, Any]],
    window: dict[str, float],
    broker_ready: float,
    sessions_ready: float,
) -> dict[str, Any]:
    latencies = [ms for r in results for kind in ("grow", "shrink") for ms in r[kind]]
    grows = [ms for r in results for ms in r["grow"]]
    shrinks = [ms for r in results for ms in r["shrink"]]
    if not latencies:
        raise BenchError("no request was answered in the window")
    return {
        "guests": settings.guests,
        "decisions": len(latencies),
        "requests": sum(r["requests"] for r in results),
        "unanswered": sum(r["unanswered"] for r in results),
        "unexpected": sum(r["unexpected"] for r in results),
        "reconnects": sum(r["reconnects"] for r in results),
        "guests_granted": sum(r["guests_granted"] for r in results),
        "p50_ms": percentile(latencies, 50),
        "p99_ms": percentile(latencies, 99),
        "max_ms": max(latencies),
        "grow_p50_ms": percentile(grows, 50) if grows else None,
        "grow_p99_ms": percentile(grows, 99) if grows else None,
        "shrink_p50_ms": percentile(shrinks, 50) if shrinks else None,
        "shrink_p99_ms": percentile(shrinks, 99) if shrinks else None,
        "generator_lag_max_ms": max(r["lag_max_ms"] for r in results),
        "generators_cpu_percent": sum(r["cpu_percent"] for r in results),
        "broker_ready_s": broker_ready,
        "sessions_ready_s": sessions_ready,
        **window,
    }


# ------------------------------------------------------------------ the simulated agent


class SimGuest:
    """The agent's side of one session, with the guest's kernel state kept in memory.

    The tree tells the Hello's topology and which blocks the broker plugged;
    onlining and offlining are bookkeeping only, so the tree keeps plugged
    resources offline and the broker may unplug whatever a Reclaim's Ack lists.
    """

    def __init__(self, guest: str, target: str, root: Path) -> None:
        self.id = guest
        self.root = root
        self.kernel = Kernel(root / "sys", root / "proc")
        self.memory_dir = root / "sys" / MEMORY_DIR
        self.link = BrokerLink(
            BrokerSection(target=target, reconnect_min_seconds=0.5, reconnect_max_seconds=5.0),
            self.hello,
            self.on_message,
        )
        self.block_size = BLOCK_SIZE
        self.present_cpus: set[int] = set()
        self.online_cpus: set[int] = set()
        self.online_blocks: set[int] = set()
        self.last_grant_id = 0
        self.request_id = 0
        self.pending: tuple[str, float] | None = None  # kind, when handed over
        self.measuring = False
        self.ready = asyncio.Event()  # welcomed and holding its first grant
        self.latencies: dict[str, list[float]] = {"grow": [], "shrink": []}
        self.requests = 0
        self.unexpected = 0
        self.granted = 0  # grows answered by a Grant in the window

    def hello(self) -> pb.Hello:
        topo = Topology.read(self.kernel)
        self.block_size = topo.block_size
        self.present_cpus = {c.id for c in topo.cpus}
        self.online_cpus = {c.id for c in topo.cpus if c.online}
        self.online_blocks = {b.index for b in topo.blocks if b.online}
        return pb.Hello(
            protocol_version=1,
            guest_id=self.id,
            agent_version=__version__,
            topology=topo.to_proto(),
            limits=pb.Limits(
                cpus=pb.ResourceLimits(minimum=BOOT_CPUS, maximum=MAX_CPUS, burst=MAX_CPUS),
                memory_bytes=pb.ResourceLimits(
                    minimum=BOOT_BLOCKS * BLOCK_SIZE,
                    maximum=MAX_BLOCKS * BLOCK_SIZE,
                    burst=MAX_BLOCKS * BLOCK_SIZE,
                ),
            ),
        )

    @property
    def online_memory(self) -> int:
        return len(self.online_blocks) * self.block_size

    def report(self) -> pb.GuestMessage:
        busy = random.uniform(0.1, 0.9) * len(self.online_cpus)
        return pb.GuestMessage(
            report=pb.LoadReport(
                cpu_busy=busy,
                run_queue=math.ceil(busy),
                cpu_some_avg10=random.uniform(0, 5),
                memory_some_avg10=random.uniform(0, 1),
                io_some_avg10=random.uniform(0, 1),
                memory_available_bytes=self.online_memory // 2,
                memory_total_bytes=self.online_memory,
                online_cpus=len(self.online_cpus),
                online_memory_bytes=self.online_memory,
            )
        )

    def request(self, kind: str) -> None:
        cpus, blocks = GROW if kind == "grow" else SHRINK
        self.request_id += 1
        message = pb.GuestMessage(
            request=pb.ResourceRequest(
                request_id=self.request_id,
                cpus=cpus,
                memory_bytes=blocks * self.block_size,
                reason=f"bench {kind}",
                urgency=pb.URGENCY_NORMAL,
                seen_grant_id=self.last_grant_id,
            )
        )
        self.pending = (kind, time.monotonic())
        if self.link.send(message):
            self.requests += 1
        else:
            self.pending = None

    async def on_message(self, message: pb.BrokerMessage) -> None:
        now = time.monotonic()
        body = message.WhichOneof("body")
        if body == "grant":
            self._answered("grow", now)
            self._on_grant(message.grant)
            self.ready.set()
        elif body == "reclaim":
            self._answered("shrink", now)
            self._on_reclaim(message.reclaim)

    def _answered(self, kind: str, now: float) -> None:
        if self.pending is None:
            return  # the broker's own grant (a new session's entitlement)
        asked, since = self.pending
        if asked != kind:
            self.unexpected += 1
            return
        self.pending = None
        if self.measuring:
            self.latencies[kind].append((now - since) * 1000)
            self.granted += kind == "grow"

    def _on_grant(self, grant: pb.Grant) -> None:
        self.last_grant_id = grant.grant_id
        self.present_cpus |= set(grant.cpu_ids)
        items = []
        for cpu in sorted(self.present_cpus - self.online_cpus):
            if len(self.online_cpus) >= grant.cpus:
                break
            self.online_cpus.add(cpu)
            items.append(_item(pb.RESOURCE_KIND_CPU, cpu, pb.ACTION_ONLINE))
        if grant.memory_bytes > self.online_memory:
            # The grant names no blocks: look for them as the agent does, in sysfs.
            listed = {int(n[6:]) for n in os.listdir(self.memory_dir) if n[6:].isdigit()}
            for index in sorted(listed - self.online_blocks):
                if self.online_memory >= grant.memory_bytes:
                    break
                self.online_blocks.add(index)
                items.append(_item(pb.RESOURCE_KIND_MEMORY_BLOCK, index, pb.ACTION_ONLINE))
        self._ack(pb.Ack(grant_id=grant.grant_id, items=items))

    def _on_reclaim(self, reclaim: pb.Reclaim) -> None:
        items = []
        for cpu in sorted(self.online_cpus - set(range(BOOT_CPUS)), reverse=True):
            if len(self.online_cpus) <= reclaim.cpus:
                break
            self.online_cpus.discard(cpu)
            self.present_cpus.discard(cpu)  # the broker unplugs it on the Ack
            items.append(_item(pb.RESOURCE_KIND_CPU, cpu, pb.ACTION_OFFLINE))
        for index in sorted(self.online_blocks - set(range(BOOT_BLOCKS)), reverse=True):
            if self.online_memory <= reclaim.memory_bytes:
                break
            self.online_blocks.discard(index)
            items.append(_item(pb.RESOURCE_KIND_MEMORY_BLOCK, index, pb.ACTION_OFFLINE))
        self._ack(pb.Ack(reclaim_id=reclaim.reclaim_id, items=items))

    def _ack(self, ack: pb.Ack) -> None:
        ack.online_cpus = len(self.online_cpus)
        ack.online_memory_bytes = self.online_memory
        self.link.send(pb.GuestMessage(ack=ack))

    async def send_reports(self, interval: float) -> None:
        """A report every `interval` from a random phase, until cancelled."""
        await self.ready.wait()
        loop = asyncio.get_running_loop()
        at = loop.time() + random.uniform(0, interval)
        while True:
            await asyncio.sleep(at - loop.time())
            self.link.send(self.report())
            at += interval

    async def send_requests(self, end: float, interval: float, rng: random.Random) -> None:
        """Grow and shrink in turn until `end`; the first request comes early in the
        window so that every guest asks at least once."""
        loop = asyncio.get_running_loop()
        at = loop.time() + rng.uniform(0, min(interval, (end - loop.time()) / 2))
        kind = "grow"
        while at < end:
            await asyncio.sleep(at - loop.time())
            if self.pending is None:  # one decision in flight at a time, as the agent
                self.request(kind)
                kind = "shrink" if kind == "grow" else "grow"
            at += rng.uniform(0.5, 1.5) * interval


def _item(
    kind: pb.ResourceKind.ValueType, index: int, action: pb.Action.ValueType
) -> pb.ItemResult:
    return pb.ItemResult(kind=kind, index=index, action=action, outcome=pb.OUTCOME_DONE)


async def _lag_probe(stop: asyncio.Event, lags: list[float]) -> None:
    """How late this generator's event loop wakes: late wakes inflate the latencies."""
    period = 0.05
    while not stop.is_set():
        before = time.monotonic()
        await asyncio.sleep(period)
        lags.append((time.monotonic() - before - period) * 1000)


def _emit(payload: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(payload) + "\n")
    sys.stdout.flush()


async def worker_main(spec_path: Path) -> int:
    spec = json.loads(spec_path.read_text())
    guests = [SimGuest(g, target, Path(root)) for g, target, root in spec["guests"]]
    stop = asyncio.Event()
    tasks = [asyncio.create_task(g.link.run(stop)) for g in guests]
    reporters = [asyncio.create_task(g.send_reports(spec["report_interval"])) for g in guests]
    try:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                asyncio.gather(*(g.ready.wait() for g in guests)), spec["connect_timeout"]
            )
        _emit({"ready": sum(g.ready.is_set() for g in guests)})
        loop = asyncio.get_running_loop()
        stdin = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
        if (await stdin.readline()).strip() != b"go":
            return 1
        for g in guests:
            g.measuring = True
        lags: list[float] = []
        window_over = asyncio.Event()
        probe = asyncio.create_task(_lag_probe(window_over, lags))
        me = psutil.Process()
        cpu0, start = _cpu_seconds(me), loop.time()
        end = start + spec["duration"]
        rng = random.Random(spec["seed"])
        await asyncio.gather(*(g.send_requests(end, spec["request_interval"], rng) for g in guests))
        window_over.set()
        await probe
        cpu_percent = 100 * (_cpu_seconds(me) - cpu0) / (loop.time() - start)
        deadline = time.monotonic() + spec["grace"]
        while any(g.pending for g in guests) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        _emit(
            {
                "grow": [ms for g in guests for ms in g.latencies["grow"]],
                "shrink": [ms for g in guests for ms in g.latencies["shrink"]],
                "requests": sum(g.requests for g in guests),
                "unanswered": sum(g.pending is not None for g in guests),
                "unexpected": sum(g.unexpected for g in guests),
                "reconnects": sum(g.link.reconnects for g in guests),
                "guests_granted": sum(g.granted > 0 for g in guests),
                "lag_max_ms": max(lags, default=0.0),
                "cpu_percent": cpu_percent,
            }
        )
        return 0
    finally:
        for reporter in reporters:
            reporter.cancel()
        stop.set()
        _, pending = await asyncio.wait(tasks, timeout=10)
        for task in pending:
            task.cancel()


# ------------------------------------------------------------------ the sweep


def raise_fd_limit() -> int:
    """Raise the soft descriptor limit to the hard one (inherited by the broker)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


# ------------------------------------------------------------------ component costs


async def component_costs(
    workdir: Path, roots: Sequence[Path], repeats: int = 5
) -> dict[str, float]:
    """CPU time (this thread's, so other load on the host barely counts) of the
    broker's per-event work at this many guests, in-process on the same trees:
    an arbitration round after one guest changed (what a request or an Ack
    costs while the pool is uncontended), a round over every guest (after a
    session change the broker cannot pin on one guest, or on a contended pool),
    the arbiter alone over every guest, the state file, and one LoadReport."""
    from prometheus_client import CollectorRegistry

    from broker import config as broker_config
    from broker.arbiter import GuestView, arbitrate
    from broker.core import Broker
    from broker.metrics import BrokerMetrics
    from broker.simulated import SimulatedBackend

    listens = [f"unix:{workdir}/unused-{i}.sock" for i in range(len(roots))]
    config = broker_config.load(write_broker_config(workdir, roots, listens))
    backends: dict[str, Any] = {
        g.id: SimulatedBackend(FakeGuest.open(root), g.id)
        for g, root in zip(config.guests, roots, strict=True)
    }
    broker = Broker(config, backends, BrokerMetrics(CollectorRegistry()))
    for g, root in zip(config.guests, roots, strict=True):
        sim = SimGuest(g.id, "unix:/unused", root)
        broker.open_session(g.id, sim.hello())
    await broker.rebalance()  # the sessions' first round

    def cpu_ms(seconds: float) -> float:
        return 1000 * seconds / repeats

    guests = list(broker.guests.values())
    t = time.thread_time()
    for i in range(repeats):
        broker.changed(guests[i % len(guests)])
        await broker.rebalance()
    round_one = cpu_ms(time.thread_time() - t)
    t = time.thread_time()
    for _ in range(repeats):
        broker.changed()
        await broker.rebalance()
    round_all = cpu_ms(time.thread_time() - t)
    views = [
        GuestView(
            guest_id=g.id,
            limits=g.limits,
            held=g.held,
            demand=g.demand,
            releasing=g.releasing,
            connected=g.connected,
        )
        for g in broker.guests.values()
    ]
    t = time.thread_time()
    for _ in range(repeats):
        arbitrate(broker.pool, views, config.broker.block_size_bytes)
    arbiter = cpu_ms(time.thread_time() - t)
    t = time.thread_time()
    for _ in range(repeats):
        broker.write_state()
    state = cpu_ms(time.thread_time() - t)
    guest = next(iter(broker.guests.values()))
    report = pb.GuestMessage(
        report=pb.LoadReport(cpu_busy=0.5, online_cpus=1, online_memory_bytes=1 << 30)
    )
    t = time.thread_time()
    for _ in range(1000):
        await broker.on_message(guest, report)
    report_us = 1000 * (time.thread_time() - t)
    return {
        "round_one_cpu_ms": round_one,
        "round_all_cpu_ms": round_all,
        "arbitrate_cpu_ms": arbiter,
        "state_file_cpu_ms": state,
        "report_cpu_us": report_us,
    }


async def quiet(threshold: float, patience: float) -> float:
    """Wait (up to `patience` s) for the host's load to fall below `threshold`
    (% of one core); the machine may be shared. Returns the last load seen."""
    deadline = time.monotonic() + patience
    while True:
        load = psutil.cpu_percent(interval=2.0) * (os.cpu_count() or 1)
        if load < threshold or time.monotonic() > deadline:
            return load
        print(f"host busy ({load:.0f}% of one core); waiting", file=sys.stderr, flush=True)


async def sweep(
    counts: Sequence[int], runs: int, base: Settings, workdir: Path, options: argparse.Namespace
) -> list[dict[str, Any]]:
    points = []
    trees = workdir / "guests"
    trees.mkdir(exist_ok=True)
    for count in counts:
        settings = dataclasses.replace(base, guests=count)
        done = []
        costs = await component_costs(workdir, prepare_trees(trees, count))
        print(
            f"{count} guests: per event, a round {costs['round_one_cpu_ms']:.1f} ms "
            f"(over everyone {costs['round_all_cpu_ms']:.1f} ms, the arbiter alone "
            f"{costs['arbitrate_cpu_ms']:.1f} ms), state file "
            f"{costs['state_file_cpu_ms']:.1f} ms CPU",
            flush=True,
        )
        for run in range(runs):
            t = time.monotonic()
            roots = prepare_trees(trees, count)
            prepared = time.monotonic() - t
            load_before = await quiet(options.quiet_below, options.quiet_wait)
            result = await run_once(settings, workdir, roots)
            result["trees_s"] = prepared
            result["host_load_before_percent"] = load_before
            done.append(result)
            print(
                f"{count} guests, run {run + 1}/{runs}: {result['decisions']} decisions, "
                f"p50 {result['p50_ms']:.1f} ms, p99 {result['p99_ms']:.1f} ms, "
                f"max {result['max_ms']:.1f} ms, broker {result['broker_cpu_percent']:.0f}% CPU, "
                f"{result['broker_rss_mib']:.0f} MiB, host {result['host_cpu_percent']:.0f}%",
                flush=True,
            )
        points.append(
            {
                "guests": count,
                "settings": {
                    k: v for k, v in dataclasses.asdict(settings).items() if k != "profile"
                }
                | {"workers": settings.worker_count},
                "runs": done,
                "components": costs,
            }
        )
        p99 = statistics.median(r["p99_ms"] for r in done)
        if p99 > options.give_up_ms:
            print(
                f"median p99 {p99:.0f} ms at {count} guests is over {options.give_up_ms:g} ms: "
                "larger counts not run",
                flush=True,
            )
            break
    return points


def machine() -> dict[str, str]:
    model = platform.processor()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "uname": run_text("uname", "-a"),
        "cpu": model,
        "cpus": str(os.cpu_count()),
        "memory_gib": f"{psutil.virtual_memory().total / (1 << 30):.1f}",
        "python": platform.python_version(),
        "grpcio": _version("grpc"),
    }


def _version(module: str) -> str:
    with contextlib.suppress(ImportError, AttributeError):
        return str(__import__(module).__version__)
    return "?"


# ------------------------------------------------------------------ the report


def spread(runs: Sequence[dict[str, Any]], key: str) -> tuple[float, float, float]:
    values = [r[key] for r in runs]
    return statistics.median(values), min(values), max(values)


def write_report(out: Path, results: dict[str, Any], name: str = NAME) -> None:
    points = sorted(results["points"], key=lambda p: p["guests"])
    lines = [
        "# Broker scale",
        "",
        "Decision latency of one `vmtide-broker` process (simulated backend) against",
        "many simulated guests, each on its own session stream: a LoadReport every",
        "second and, now and then, a ResourceRequest (grow and shrink in turn).",
        "Latency runs from the request's hand-over to the guest's session until the",
        "Grant (grow) or Reclaim (shrink) is read from the stream. The window opens",
        "after a warm-up of reports only (Settings below). Every figure is",
        "the median over runs, with the spread (min-max) in brackets. CPU figures are",
        "in % of one core; host CPU is every process on the machine, so what exceeds",
        "the broker's and the generators' is other load. Generated by",
        "`bench/broker_scale.py`; the method is in its docstring.",
        "",
        "| guests | runs | decisions | p50 ms | p99 ms | max ms | broker CPU % | broker RSS MiB "
        "| generators CPU % | host CPU % | unanswered |",
        "|---:|---:|---:|---|---|---|---|---|---|---|---:|",
    ]
    for p in points:
        runs = p["runs"]

        def cell(key: str, fmt: str = ".1f", runs: Sequence[dict[str, Any]] = runs) -> str:
            mid, low, high = spread(runs, key)
            if len(runs) == 1:
                return format(mid, fmt)
            return f"{mid:{fmt}} [{low:{fmt}}-{high:{fmt}}]"

        lines.append(
            f"| {p['guests']} | {len(runs)} | {statistics.median(r['decisions'] for r in runs):.0f}"
            f" | {cell('p50_ms')} | {cell('p99_ms')} | {cell('max_ms', '.0f')}"
            f" | {cell('broker_cpu_percent', '.0f')} | {cell('broker_rss_mib', '.0f')}"
            f" | {cell('generators_cpu_percent', '.0f')} | {cell('host_cpu_percent', '.0f')}"
            f" | {sum(r['unanswered'] for r in runs)} |"
        )
    under_50 = [p["guests"] for p in points if spread(p["runs"], "p99_ms")[0] < 50]
    under_100 = [p["guests"] for p in points if spread(p["runs"], "p99_ms")[0] < 100]
    lines += [
        "",
        f"Largest measured count with median p99 under 50 ms: {max(under_50, default='none')};"
        f" under 100 ms: {max(under_100, default='none')}.",
        "",
        f"![latency, CPU and memory against guests]({name}.png)",
        "",
        "## Where the broker's time goes",
        "",
        "CPU time of the broker's work per event, measured in-process on the same guest",
        "trees (this thread's CPU time, so the host's other load barely counts). An",
        "arbitration round runs after every request, Ack and session change; while the",
        "pool is uncontended it plans only for the guest that changed (docs/broker.md,",
        '"Rounds"), otherwise the arbiter runs over every guest. The state file is',
        "written at most once a second; a LoadReport costs the same at any count.",
        "",
        "| guests | round, one guest changed ms | round over everyone ms "
        "| the arbiter over everyone ms | state file ms | one LoadReport us |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for p in points:
        c = p.get("components")
        if c:
            lines.append(
                f"| {p['guests']} | {c['round_one_cpu_ms']:.2f} | {c['round_all_cpu_ms']:.1f}"
                f" | {c['arbitrate_cpu_ms']:.1f} | {c['state_file_cpu_ms']:.1f}"
                f" | {c['report_cpu_us']:.0f} |"
            )
    lines += [
        "",
        "## Settings",
        "",
        "| guests | window s | warm-up s | request every s | report every s | transport "
        "| log level | generator processes |",
        "|---:|---:|---:|---:|---:|---|---|---:|",
    ]
    for p in points:
        s = p["settings"]
        lines.append(
            f"| {p['guests']} | {s['duration']:g} | {s.get('warmup', 0):g} "
            f"| {s['request_interval']:g} "
            f"| {s['report_interval']:g} | {s['transport']} | {s['log_level']} | {s['workers']} |"
        )
    m = results["machine"]
    lines += [
        "",
        "## Machine and commands",
        "",
        f"- `uname -a`: `{m['uname']}`",
        f"- CPU: {m['cpu']}, {m['cpus']} logical CPUs shared by the broker and the generators;"
        f" {m['memory_gib']} GiB RAM",
        f"- Python {m['python']}, grpcio {m['grpcio']}",
        "",
        "| guests | date (UTC) | revision | command |",
        "|---:|---|---|---|",
    ]
    for p in points:
        lines.append(
            f"| {p['guests']} | {p['date']} | {p.get('revision', '?')} | `{p['command']}` |"
        )
    notes = out / f"{name}-notes.md"
    if notes.exists():
        lines += ["", notes.read_text().rstrip()]
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")


def write_plot(out: Path, results: dict[str, Any], name: str = NAME) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = sorted(results["points"], key=lambda p: p["guests"])
    guests = [p["guests"] for p in points]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 7), sharex=True)
    for key, label, marker in (("p50_ms", "p50", "o"), ("p99_ms", "p99", "s")):
        mids, lows, highs = zip(*(spread(p["runs"], key) for p in points), strict=True)
        top.errorbar(
            guests,
            mids,
            yerr=[
                [m - lo for m, lo in zip(mids, lows, strict=True)],
                [h - m for m, h in zip(mids, highs, strict=True)],
            ],
            marker=marker,
            capsize=3,
            label=f"{label} (median, min-max over runs)",
        )
    top.axhline(50, color="tab:green", linestyle="--", linewidth=1, label="50 ms target")
    top.axhline(100, color="tab:red", linestyle="--", linewidth=1, label="100 ms")
    top.set_yscale("log")
    top.set_ylabel("decision latency (ms)")
    top.legend(fontsize=8)
    top.grid(True, which="both", alpha=0.3)
    cpu = [spread(p["runs"], "broker_cpu_percent")[0] for p in points]
    rss = [spread(p["runs"], "broker_rss_mib")[0] for p in points]
    bottom.plot(guests, cpu, marker="o", color="tab:purple", label="broker CPU %")
    bottom.set_ylabel("broker CPU (% of one core)")
    bottom.set_xscale("log")
    bottom.set_xlabel("guests")
    bottom.grid(True, which="both", alpha=0.3)
    right = bottom.twinx()
    right.plot(guests, rss, marker="s", color="tab:brown", label="broker RSS MiB")
    right.set_ylabel("broker RSS (MiB)")
    bottom.legend(loc="upper left", fontsize=8)
    right.legend(loc="lower right", fontsize=8)
    fig.suptitle("vmtide-broker: one process, simulated guests")
    fig.tight_layout()
    fig.savefig(out / f"{name}.png", dpi=90)
    plt.close(fig)


def merge(
    out: Path, points: list[dict[str, Any]], keep_others: bool, name: str = NAME
) -> dict[str, Any]:
    """The new points, with (when asked) the earlier file's points for other counts."""
    results: dict[str, Any] = {"machine": machine(), "points": points}
    path = out / f"{name}.json"
    if keep_others and path.exists():
        earlier = json.loads(path.read_text())
        counts = {p["guests"] for p in points}
        results["points"] = [p for p in earlier["points"] if p["guests"] not in counts] + points
    return results


# ------------------------------------------------------------------ entry point


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.broker_scale",
        description="Decision latency, CPU and memory of one broker against many guests.",
    )
    parser.add_argument("--quick", action="store_true", help="20 guests, 5 s, one run (for CI)")
    parser.add_argument(
        "--out",
        type=Path,
        help="report directory (default: docs/bench; with --quick, a new temporary directory)",
    )
    parser.add_argument(
        "--guests", default=",".join(map(str, DEFAULT_COUNTS)), help="comma-separated guest counts"
    )
    parser.add_argument("--runs", type=int, default=3, help="runs per guest count")
    parser.add_argument("--duration", type=float, default=30.0, help="measurement window, s")
    parser.add_argument(
        "--warmup",
        type=float,
        default=5.0,
        help="seconds of reports only between the sessions' start and the window",
    )
    parser.add_argument(
        "--request-interval",
        type=float,
        default=10.0,
        help="mean seconds between one guest's requests",
    )
    parser.add_argument("--workers", type=int, default=0, help="load-generator processes")
    parser.add_argument("--transport", default="unix", choices=["unix", "tcp"])
    parser.add_argument("--log-level", default="INFO", help="the broker's log level")
    parser.add_argument("--name", default=NAME, help="base name of the report's files")
    parser.add_argument(
        "--merge",
        action="store_true",
        help="keep the report's earlier points for counts not run now",
    )
    parser.add_argument(
        "--profile", type=Path, help="run the broker under cProfile, writing the stats here"
    )
    parser.add_argument(
        "--quiet-below",
        type=float,
        default=60.0,
        help="before each run, wait for the host's load (%% of one core) to fall below this",
    )
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=120.0,
        help="longest wait for a quiet host, s (0: do not wait)",
    )
    parser.add_argument(
        "--give-up-ms",
        type=float,
        default=5000.0,
        help="stop the sweep after a count whose median p99 is above this",
    )
    parser.add_argument("--workdir", type=Path, help="scratch directory (default: under /dev/shm)")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        return asyncio.run(worker_main(args.worker))
    if args.quick:
        counts, runs, duration, interval = [20], 1, 5.0, 2.0
        args.quiet_wait = 0.0
    else:
        try:
            counts = [int(c) for c in args.guests.split(",")]
        except ValueError:
            print(
                f"--guests: {args.guests!r} is not a comma-separated list of counts",
                file=sys.stderr,
            )
            return 2
        runs, duration, interval = args.runs, args.duration, args.request_interval
    out: Path = args.out or (
        Path(tempfile.mkdtemp(prefix="broker-scale-")) if args.quick else REPO / "docs" / "bench"
    )
    limit = raise_fd_limit()
    scratch_base = Path("/dev/shm") if Path("/dev/shm").is_dir() else None
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="vmtide-bench-", dir=scratch_base))
    try:
        base = Settings(
            guests=counts[0],
            duration=duration,
            request_interval=interval,
            workers=args.workers,
            transport=args.transport,
            log_level=args.log_level,
            grace=5.0 if args.quick else 10.0,
            warmup=1.0 if args.quick else args.warmup,
            profile=args.profile,
        )
        if max(counts) * 2 + 100 > limit:
            print(
                f"warning: {max(counts)} guests need about {2 * max(counts)} descriptors in "
                f"the broker; the limit is {limit}",
                file=sys.stderr,
            )
        workdir.mkdir(parents=True, exist_ok=True)
        points = asyncio.run(sweep(counts, runs, base, workdir, args))
    except BenchError as err:
        print(f"broker_scale: {err} (scratch kept in {workdir})", file=sys.stderr)
        return 1
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    command = shlex.join(["python", "-m", "bench.broker_scale", *(argv or sys.argv[1:])])
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M")
    code = revision()
    for point in points:
        point["command"] = command
        point["date"] = date
        point["revision"] = code
    out.mkdir(parents=True, exist_ok=True)
    name = args.name
    results = merge(out, points, args.merge, name)
    (out / f"{name}.json").write_text(json.dumps(results, indent=1) + "\n")
    write_report(out, results, name)
    write_plot(out, results, name)
    print(f"report: {out / (name + '.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
