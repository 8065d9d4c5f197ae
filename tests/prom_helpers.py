"""A real agent and broker on a simulated guest, and a real Prometheus scraping them.

Shared by tests/test_prometheus.py (the exposition, the queries docs/metrics.md
promises, the alert rules), tests/test_grafana.py (every dashboard query) and
packaging/grafana/render.py (the dashboard's picture). The agent runs as its own
process, exactly as `vmtide-agent run` does in a VM; the broker runs with the
simulated backend, which hot-plugs CPUs and memory blocks into the guest's tree.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from agent import policy
from agent.daemon import EffectiveLimits
from agent.kernel import Kernel
from agent.metrics import AgentMetrics
from agent.sensing import Sensor
from agent.topology import Topology
from vmtide.fakesys import FakeGuest, Load

REPO = Path(__file__).resolve().parent.parent

T = TypeVar("T")

MiB = 1 << 20
GiB = 1 << 30

IDLE = Load(cpus=0.3, memory_bytes=400 * MiB)
# The guest's clock advances this often. The agent's PSI triggers are written
# into the fake /proc/pressure files (they are plain files here), which breaks
# them for the agent's own reads until the next tick rewrites them.
TICK_SECONDS = 0.1

# Python daemons import grpc in about a second; a loaded CI host gets margin.
DAEMON_START_SECONDS = 20.0
# Prometheus opens its TSDB and serves /-/ready within a second or two.
PROMETHEUS_START_SECONDS = 20.0
# Scrapes run every second; a query sees a new value within a few of them.
SCRAPE_INTERVAL = "1s"
SCRAPED_SECONDS = 15.0
STOP_SECONDS = 10.0
POLL_SECONDS = 0.1
HTTP_TIMEOUT_SECONDS = 2.0


# ------------------------------------------------------------------- helpers


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (Debian package prometheus; .ci/run installs it)")
    return path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def http_get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_SECONDS) as response:
        body: bytes = response.read()
    return body


def wait_for(probe: Callable[[], T], done: Callable[[T], bool], timeout: float, what: str) -> T:
    """Poll `probe` until `done(result)`; fail naming what never happened and the last result."""
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            result = probe()
        except (OSError, ValueError) as err:  # not listening yet, a half-written reply
            last = err
        else:
            if done(result):
                return result
            last = result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}; last: {last!r}")
        time.sleep(POLL_SECONDS)


class Process:
    """A child process with its output in a log file, stopped by its own pid."""

    def __init__(self, name: str, args: Sequence[str], log: Path) -> None:
        self.name = name
        self.log = log
        # If pytest itself is killed, the kernel kills the child (as tests/vm does).
        setpriv = shutil.which("setpriv")
        prefix = [setpriv, "--pdeathsig", "KILL"] if setpriv else []
        with log.open("wb") as out:
            self.popen = subprocess.Popen(
                [*prefix, *args], stdout=out, stderr=subprocess.STDOUT, cwd=REPO
            )

    def check_running(self) -> None:
        if self.popen.poll() is not None:
            raise AssertionError(f"{self.name} exited with {self.popen.returncode}:\n{self.tail()}")

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(STOP_SECONDS)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(STOP_SECONDS)


class Ticker:
    """Advances the simulated guest's clock in a thread, under `load(seconds since start)`."""

    def __init__(self, guest: FakeGuest, load: Callable[[float], Load]) -> None:
        self._guest = guest
        self._load = load
        self.started = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="guest-clock", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        last = self.started
        while not self._stop.wait(TICK_SECONDS):
            now = time.monotonic()
            try:
                self._guest.tick(now - last, self._load(now - self.started))
            except FileNotFoundError:
                # The broker, another process, unplugged a CPU or a memory block
                # while the tick read the tree; the next tick reads the new one
                # and accounts for this one's time.
                continue
            last = now

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(STOP_SECONDS)


# ------------------------------------------------- every metric, without a stack

# What a simulated guest's agent could hold: 1-4 CPUs, burst 6; 1-3 GiB, burst 4.
EXAMPLE_LIMITS = EffectiveLimits(
    cpus=policy.Limits(1, 4, 6),
    memory=policy.Limits(1 * GiB, 3 * GiB, 4 * GiB),
)


def example_decisions(cpus: int, memory_bytes: int) -> policy.Decisions:
    def hold(target: int) -> policy.Decision:
        return policy.Decision(target, target, "test", policy.Urgency.LOW, bursting=False)

    return policy.Decisions(cpu=hold(cpus), memory=hold(memory_bytes))


def populated_agent_metrics(
    registry: CollectorRegistry, guest_root: Path, limits: EffectiveLimits | None = EXAMPLE_LIMITS
) -> AgentMetrics:
    """The agent's metrics with every family they can have: a topology, limits, a reading
    and a decision."""
    guest = FakeGuest(guest_root)
    topology = Topology.read(Kernel(guest.sysfs, guest.procfs))
    metrics = AgentMetrics(registry, topology=lambda: topology, limits=lambda: limits)
    metrics.observe_reading(Sensor(guest.procfs).sample())
    metrics.observe_decisions(example_decisions(topology.online_cpus, topology.online_memory_bytes))
    return metrics


# ---------------------------------------------------------- the running stack


BROKER_TOML = """\
[broker]
state_file = "{workdir}/broker.json"
arbitrate_interval_seconds = 0.5
max_requests_per_second = 50.0
metrics_address = "127.0.0.1"
metrics_port = {metrics_port}

[pool]
cpus = {pool_cpus}
memory_bytes = {pool_memory}

[[guests]]
id = "{guest_id}"
listen = "unix:{workdir}/{guest_id}.sock"
backend = "simulated"
simulated_root = "{root}"
[guests.cpus]
minimum = 1
maximum = {possible_cpus}
[guests.memory]
minimum_bytes = "1GiB"
maximum_bytes = {max_memory}
"""

AGENT_TOML = """\
[agent]
guest_id = "{guest_id}"
sensing_interval_seconds = 0.2
rescan_interval_seconds = 1.0
sysfs_root = "{root}/sys"
procfs_root = "{root}/proc"
simulated_kernel = true
lock_memory = false

[broker]
target = "unix:{workdir}/{guest_id}.sock"
reconnect_min_seconds = 0.1
reconnect_max_seconds = 0.5

[limits.cpus]
minimum = 1
maximum = {agent_max_cpus}
burst = {agent_burst_cpus}

[limits.memory]
minimum_bytes = "1GiB"
maximum_bytes = {max_memory}

[metrics]
enabled = true
address = "127.0.0.1"
port = {metrics_port}
{agent_extra}"""


@dataclass(frozen=True)
class StackConfig:
    """The simulated guest and both daemons' settings."""

    guest_id: str = "g1"
    # 2 of 4 possible CPUs and 8 blocks of 128 MiB online at boot.
    possible_cpus: int = 4
    boot_cpus: int = 2
    boot_blocks: int = 8
    block_size: int = 128 * MiB
    pool_cpus: int = 4
    pool_memory: int = 4 * GiB
    max_memory: int = 2 * GiB  # both the agent's and the broker's limit
    # The agent's own CPU limits (the broker's maximum is every possible CPU):
    # 0 is every possible CPU, and no burst above the maximum.
    agent_max_cpus: int = 0
    agent_burst_cpus: int = 0
    # What the workload wants, by seconds since the guest's clock started. Idle
    # by default: the policy's shrink windows are minutes long, so nothing
    # changes size while the tests look.
    load: Callable[[float], Load] = lambda _: IDLE
    agent_extra: str = ""  # more agent.toml, e.g. [policy.*] tables


@dataclass(frozen=True)
class Stack:
    guest: FakeGuest
    guest_id: str
    agent_address: str  # host:port of /metrics
    broker_address: str
    started: float  # time.monotonic() when the guest's clock started

    def exposition(self, address: str) -> str:
        return http_get(f"http://{address}/metrics").decode()


def samples(text: str) -> dict[str, float]:
    """Exposition text to {'name{label="value",...}': value}, labels sorted."""
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            found[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return found


@contextmanager
def running_stack(workdir: Path, config: StackConfig | None = None) -> Iterator[Stack]:
    """The broker and the agent, up: the agent has a session and has sensed."""
    config = config or StackConfig()
    root = workdir / config.guest_id
    guest = FakeGuest(
        root,
        possible_cpus=config.possible_cpus,
        boot_cpus=config.boot_cpus,
        block_size=config.block_size,
        boot_blocks=config.boot_blocks,
    )
    agent_port, broker_port = free_port(), free_port()
    common = {
        "workdir": workdir,
        "root": root,
        "guest_id": config.guest_id,
        "possible_cpus": config.possible_cpus,
        "max_memory": config.max_memory,
    }
    (workdir / "broker.toml").write_text(
        BROKER_TOML.format(
            **common,
            metrics_port=broker_port,
            pool_cpus=config.pool_cpus,
            pool_memory=config.pool_memory,
        )
    )
    (workdir / "agent.toml").write_text(
        AGENT_TOML.format(
            **common,
            metrics_port=agent_port,
            agent_max_cpus=config.agent_max_cpus or config.possible_cpus,
            agent_burst_cpus=config.agent_burst_cpus,
            agent_extra=config.agent_extra,
        )
    )
    ticker = Ticker(guest, config.load)
    processes: list[Process] = []
    try:
        for daemon in ("broker", "agent"):
            processes.append(
                Process(
                    f"vmtide-{daemon}",
                    [
                        sys.executable,
                        "-m",
                        f"{daemon}.cli",
                        "run",
                        "--config",
                        str(workdir / f"{daemon}.toml"),
                    ],
                    workdir / f"{daemon}.log",
                )
            )
        result = Stack(
            guest,
            config.guest_id,
            f"127.0.0.1:{agent_port}",
            f"127.0.0.1:{broker_port}",
            ticker.started,
        )

        def scrape(address: str) -> dict[str, float]:
            for process in processes:
                process.check_running()
            return samples(result.exposition(address))

        try:
            wait_for(
                lambda: scrape(result.agent_address),
                lambda s: (
                    s.get("vmtide_agent_broker_connected") == 1
                    and s.get('vmtide_agent_sensing_cycles_total{result="ok"}', 0) > 0
                ),
                DAEMON_START_SECONDS,
                "the agent's metrics to show a broker session and a sensing cycle",
            )
            wait_for(
                lambda: scrape(result.broker_address),
                lambda s: s.get(f'vmtide_broker_guest_connected{{guest="{config.guest_id}"}}') == 1,
                DAEMON_START_SECONDS,
                "the broker's metrics to show the guest connected",
            )
        except AssertionError as err:
            logs = "".join(f"\n--- {p.name} ({p.log}):\n{p.tail()}" for p in processes)
            raise AssertionError(f"{err}{logs}") from err
        yield result
    finally:
        for process in reversed(processes):
            process.stop()
        ticker.stop()


# ----------------------------------------------------------------- Prometheus


def promql(base: str, query: str) -> list[dict[str, Any]]:
    """An instant query's series."""
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    reply: dict[str, Any] = json.loads(http_get(url))
    assert reply["status"] == "success", reply
    assert reply["data"]["resultType"] == "vector", reply
    result: list[dict[str, Any]] = reply["data"]["result"]
    return result


def promql_range(
    base: str, query: str, start: float, end: float, step: float
) -> list[dict[str, Any]]:
    """A range query's series, each with its [[unix time, "value"], ...]."""
    url = f"{base}/api/v1/query_range?" + urllib.parse.urlencode(
        {"query": query, "start": start, "end": end, "step": step}
    )
    reply: dict[str, Any] = json.loads(http_get(url))
    assert reply["status"] == "success", reply
    assert reply["data"]["resultType"] == "matrix", reply
    result: list[dict[str, Any]] = reply["data"]["result"]
    return result


def values(result: list[dict[str, Any]]) -> list[float]:
    return [float(item["value"][1]) for item in result]


def scrape_errors(base: str) -> str:
    """What Prometheus says of each target's last scrape, for failure messages."""
    try:
        reply: dict[str, Any] = json.loads(http_get(f"{base}/api/v1/targets"))
    except (OSError, ValueError) as err:
        return f"(no answer: {err})"
    return "; ".join(
        f"{t['labels'].get('job')}: {t['health']} {t['lastError']}"
        for t in reply["data"]["activeTargets"]
    )


def settled(base: str, query: str, expected: float) -> None:
    """The query gives one series with `expected`, within a few scrapes."""
    wait_for(
        lambda: values(promql(base, query)),
        lambda got: got == [expected],
        SCRAPED_SECONDS,
        f"{query} == {expected}",
    )


@contextmanager
def running_prometheus(
    workdir: Path,
    stack: Stack,
    *,
    rules: Path | None = None,
    agent_labels: Mapping[str, str] | None = None,
) -> Iterator[str]:
    """A real Prometheus scraping the stack every second; its base URL once both are up.

    `agent_labels` are added to the agent's target, as docs/metrics.md has operators
    label each agent with its guest id."""
    binary = tool("prometheus")
    port = free_port()
    agent_target: dict[str, Any] = {"targets": [stack.agent_address]}
    if agent_labels:
        agent_target["labels"] = dict(agent_labels)
    config = {  # JSON is YAML
        "global": {
            "scrape_interval": SCRAPE_INTERVAL,
            "scrape_timeout": SCRAPE_INTERVAL,
            "evaluation_interval": SCRAPE_INTERVAL,
        },
        "rule_files": [str(rules)] if rules else [],
        "scrape_configs": [
            {"job_name": "vmtide-agent", "static_configs": [agent_target]},
            {"job_name": "vmtide-broker", "static_configs": [{"targets": [stack.broker_address]}]},
        ],
    }
    config_file = workdir / "prometheus.yml"
    config_file.write_text(json.dumps(config, indent=2))
    server = Process(
        "prometheus",
        [
            binary,
            f"--config.file={config_file}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        workdir / "prometheus.log",
    )
    base = f"http://127.0.0.1:{port}"
    try:

        def ready() -> bytes:
            server.check_running()
            return http_get(f"{base}/-/ready")

        try:
            wait_for(ready, lambda _: True, PROMETHEUS_START_SECONDS, "Prometheus to be ready")
            for job in ("vmtide-agent", "vmtide-broker"):
                settled(base, f'up{{job="{job}"}}', 1)
        except AssertionError as err:
            raise AssertionError(
                f"{err}\n--- targets: {scrape_errors(base)}\n{server.tail()}"
            ) from err
        yield base
    finally:
        server.stop()
