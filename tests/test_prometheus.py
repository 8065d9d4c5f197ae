"""Real Prometheus against the real daemons: the exposition passes `promtool check
metrics`, a real Prometheus server scrapes a running agent (its own process, on a
simulated guest) and broker and answers the queries docs/metrics.md promises with
the guest's true numbers, and the alerting rules pass `promtool check rules`, their
unit tests, and load and evaluate cleanly in the live server.

Debian's `prometheus` package ships both binaries (.ci/run installs it); without
them these tests skip. docs/metrics.md must list exactly the metrics the code
defines: that check needs no Prometheus.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from agent.kernel import Kernel
from agent.metrics import AgentMetrics
from agent.topology import Topology
from broker.metrics import BrokerMetrics
from vmtide.fakesys import FakeGuest, Load

REPO = Path(__file__).resolve().parent.parent
RULES = REPO / "packaging" / "prometheus" / "vmtide.rules.yml"
RULES_TESTS = REPO / "packaging" / "prometheus" / "vmtide.rules.test.yml"
METRICS_DOC = REPO / "docs" / "metrics.md"

T = TypeVar("T")

MiB = 1 << 20
GiB = 1 << 30

# The simulated guest: 2 of 4 possible CPUs and 8 blocks of 128 MiB online. Its
# load stays light and the policy's default shrink windows are minutes long, so
# nothing changes size while the tests look.
POSSIBLE_CPUS = 4
BOOT_CPUS = 2
BOOT_BLOCKS = 8
BLOCK_SIZE = 128 * MiB
POOL_CPUS = 4
POOL_MEMORY = 4 * GiB
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
    """Advances the simulated guest's clock under a light load, in a thread."""

    def __init__(self, guest: FakeGuest) -> None:
        self._guest = guest
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="guest-clock", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        last = time.monotonic()
        while not self._stop.wait(TICK_SECONDS):
            now = time.monotonic()
            self._guest.tick(now - last, IDLE)
            last = now

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(STOP_SECONDS)


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
id = "g1"
listen = "unix:{workdir}/g1.sock"
backend = "simulated"
simulated_root = "{root}"
[guests.cpus]
minimum = 1
maximum = {possible_cpus}
[guests.memory]
minimum_bytes = "1GiB"
maximum_bytes = "2GiB"
"""

AGENT_TOML = """\
[agent]
guest_id = "g1"
sensing_interval_seconds = 0.2
rescan_interval_seconds = 1.0
sysfs_root = "{root}/sys"
procfs_root = "{root}/proc"
simulated_kernel = true
lock_memory = false

[broker]
target = "unix:{workdir}/g1.sock"
reconnect_min_seconds = 0.1
reconnect_max_seconds = 0.5

[limits.cpus]
minimum = 1
maximum = {possible_cpus}

[limits.memory]
minimum_bytes = "1GiB"
maximum_bytes = "2GiB"

[metrics]
enabled = true
address = "127.0.0.1"
port = {metrics_port}
"""


@dataclass(frozen=True)
class Stack:
    guest: FakeGuest
    agent_address: str  # host:port of /metrics
    broker_address: str

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


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tool("promtool")  # no point in starting daemons nobody checks
    workdir = tmp_path_factory.mktemp("prom")
    root = workdir / "g1"
    guest = FakeGuest(
        root,
        possible_cpus=POSSIBLE_CPUS,
        boot_cpus=BOOT_CPUS,
        block_size=BLOCK_SIZE,
        boot_blocks=BOOT_BLOCKS,
    )
    agent_port, broker_port = free_port(), free_port()
    common = {"workdir": workdir, "root": root, "possible_cpus": POSSIBLE_CPUS}
    (workdir / "broker.toml").write_text(
        BROKER_TOML.format(
            **common, metrics_port=broker_port, pool_cpus=POOL_CPUS, pool_memory=POOL_MEMORY
        )
    )
    (workdir / "agent.toml").write_text(AGENT_TOML.format(**common, metrics_port=agent_port))
    ticker = Ticker(guest)
    processes: list[Process] = []
    try:
        processes.append(
            Process(
                "vmtide-broker",
                [
                    sys.executable,
                    "-m",
                    "broker.cli",
                    "run",
                    "--config",
                    str(workdir / "broker.toml"),
                ],
                workdir / "broker.log",
            )
        )
        processes.append(
            Process(
                "vmtide-agent",
                [sys.executable, "-m", "agent.cli", "run", "--config", str(workdir / "agent.toml")],
                workdir / "agent.log",
            )
        )
        result = Stack(guest, f"127.0.0.1:{agent_port}", f"127.0.0.1:{broker_port}")

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
                lambda s: s.get('vmtide_broker_guest_connected{guest="g1"}') == 1,
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


def promql(base: str, query: str) -> list[dict[str, Any]]:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    reply: dict[str, Any] = json.loads(http_get(url))
    assert reply["status"] == "success", reply
    assert reply["data"]["resultType"] == "vector", reply
    result: list[dict[str, Any]] = reply["data"]["result"]
    return result


def values(result: list[dict[str, Any]]) -> list[float]:
    return [float(item["value"][1]) for item in result]


@pytest.fixture(scope="module")
def prometheus(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Prometheus scraping the stack every second with vmtide's rules; its base URL."""
    binary = tool("prometheus")
    workdir = tmp_path_factory.mktemp("prometheus")
    port = free_port()
    config = {  # JSON is YAML
        "global": {
            "scrape_interval": SCRAPE_INTERVAL,
            "scrape_timeout": SCRAPE_INTERVAL,
            "evaluation_interval": SCRAPE_INTERVAL,
        },
        "rule_files": [str(RULES)],
        "scrape_configs": [
            {"job_name": "vmtide-agent", "static_configs": [{"targets": [stack.agent_address]}]},
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


# ---------------------------------------------------------------------- tests


@pytest.mark.parametrize("daemon", ["agent", "broker"])
def test_promtool_check_metrics_passes_on_the_live_exposition(stack: Stack, daemon: str) -> None:
    address = stack.agent_address if daemon == "agent" else stack.broker_address
    text = stack.exposition(address)
    assert f"vmtide_{daemon}_" in text
    result = subprocess.run(
        [tool("promtool"), "check", "metrics"],
        input=text,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "", result.stdout


def test_promtool_check_rules() -> None:
    result = subprocess.run(
        [tool("promtool"), "check", "rules", str(RULES)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_rule_unit_tests() -> None:
    result = subprocess.run(
        [tool("promtool"), "test", "rules", RULES_TESTS.name],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        cwd=RULES_TESTS.parent,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_prometheus_sees_the_guest_as_it_is(stack: Stack, prometheus: str) -> None:
    guest = stack.guest
    online_cpus = len(guest.online_cpus())
    assert online_cpus == BOOT_CPUS
    # The agent's view of the guest.
    settled(prometheus, 'vmtide_agent_cpus{state="online"}', online_cpus)
    settled(prometheus, 'vmtide_agent_cpus{state="present"}', len(guest.present_cpus()))
    settled(prometheus, 'vmtide_agent_cpus{state="possible"}', POSSIBLE_CPUS)
    settled(prometheus, 'vmtide_agent_cpus{state="standby"}', 0)
    settled(
        prometheus,
        'sum(vmtide_agent_memory_bytes{state="online"})',
        guest.online_memory_bytes(),
    )
    settled(
        prometheus,
        'vmtide_agent_memory_bytes{state="online", zone="kernel"}',
        BOOT_BLOCKS * BLOCK_SIZE,
    )
    settled(prometheus, "vmtide_agent_memory_block_size_bytes", BLOCK_SIZE)
    settled(prometheus, "vmtide_agent_broker_connected", 1)
    assert values(promql(prometheus, "vmtide_agent_broker_sessions_total")) == [1.0]
    ok_cycles = wait_for(
        lambda: values(promql(prometheus, 'vmtide_agent_sensing_cycles_total{result="ok"}')),
        lambda got: len(got) == 1 and got[0] > 0,
        SCRAPED_SECONDS,
        "successful sensing cycles",
    )
    assert ok_cycles[0] > 0
    # Light load on 2 CPUs and 1 GiB: the policy wants no more than it has, and
    # no less than its minimum.
    cpu_target = values(promql(prometheus, 'vmtide_agent_target{resource="cpus"}'))
    assert len(cpu_target) == 1 and 1 <= cpu_target[0] <= online_cpus, cpu_target
    memory_target = values(promql(prometheus, 'vmtide_agent_target{resource="memory"}'))
    assert len(memory_target) == 1, memory_target
    assert 1 * GiB <= memory_target[0] <= guest.online_memory_bytes(), memory_target
    available = values(promql(prometheus, "vmtide_agent_memory_available_bytes"))
    assert len(available) == 1 and 0 < available[0] < guest.online_memory_bytes(), available
    busy = values(promql(prometheus, "vmtide_agent_cpu_busy_cpus"))
    assert len(busy) == 1 and 0 <= busy[0] <= online_cpus, busy
    pressure = values(promql(prometheus, "vmtide_agent_pressure_ratio"))
    assert len(pressure) == 5 and all(0 <= p <= 1 for p in pressure), pressure

    # The broker's view of the same guest and of its pool.
    settled(prometheus, 'vmtide_broker_guest_connected{guest="g1"}', 1)
    settled(prometheus, 'vmtide_broker_guest_online_cpus{guest="g1"}', online_cpus)
    settled(
        prometheus,
        'vmtide_broker_guest_online_memory_bytes{guest="g1"}',
        guest.online_memory_bytes(),
    )
    settled(prometheus, 'vmtide_broker_pool_capacity{resource="cpus"}', POOL_CPUS)
    settled(prometheus, 'vmtide_broker_pool_capacity{resource="memory_bytes"}', POOL_MEMORY)
    for resource in ("cpus", "memory_bytes"):
        allocated = values(
            promql(prometheus, f'vmtide_broker_pool_allocated{{resource="{resource}"}}')
        )
        capacity = POOL_CPUS if resource == "cpus" else POOL_MEMORY
        online = online_cpus if resource == "cpus" else guest.online_memory_bytes()
        # The one guest holds at least what it has online, the pool no more than it has.
        assert len(allocated) == 1 and online <= allocated[0] <= capacity, (resource, allocated)

    # Agent and broker agree, across the two jobs.
    settled(
        prometheus,
        'vmtide_agent_cpus{state="online"} - on() vmtide_broker_guest_online_cpus{guest="g1"}',
        0,
    )


def test_rule_expressions_match_the_real_label_sets(stack: Stack, prometheus: str) -> None:
    """The joins in vmtide.rules.yml pair real series (a mismatch would silently never fire)."""
    online_cpus, online_memory = len(stack.guest.online_cpus()), stack.guest.online_memory_bytes()
    joins: list[tuple[str, str, Callable[[float], bool]]] = [
        # VmtideGuestAtMaximum and VmtideGuestGrowthStalled: the target beside
        # what is online. The light load wants no more than it has.
        (
            'vmtide_agent_target{resource="cpus"}'
            ' - ignoring(resource, state) group_left vmtide_agent_cpus{state="online"}',
            "cpus",
            lambda value: value <= 0,
        ),
        (
            'vmtide_agent_target{resource="memory"} - ignoring(resource) group_left'
            ' sum without(state, zone) (vmtide_agent_memory_bytes{state="online"})',
            "memory",
            lambda value: value <= 0,
        ),
        # VmtideGuestAtMaximum's PSI side keeps the target's series.
        (
            'vmtide_agent_target{resource="cpus"} and ignoring(resource, kind)'
            ' vmtide_agent_pressure_ratio{resource="cpu", kind="some"}',
            "cpus",
            lambda value: 1 <= value <= online_cpus,
        ),
        (
            'vmtide_agent_target{resource="memory"} and ignoring(resource, kind)'
            ' vmtide_agent_pressure_ratio{resource="memory", kind="some"}',
            "memory",
            lambda value: 1 * GiB <= value <= online_memory,
        ),
    ]
    for query, resource, plausible in joins:
        result = promql(prometheus, query)
        assert len(result) == 1, (query, result)
        labels = result[0]["metric"]
        assert labels.get("resource") == resource, (query, labels)
        assert labels["job"] == "vmtide-agent" and labels["instance"] == stack.agent_address
        assert plausible(float(result[0]["value"][1])), (query, result)
    pool = promql(prometheus, "vmtide_broker_pool_allocated <= vmtide_broker_pool_capacity")
    assert sorted(item["metric"]["resource"] for item in pool) == ["cpus", "memory_bytes"], pool


def test_rules_load_and_evaluate_in_prometheus(stack: Stack, prometheus: str) -> None:
    def rules() -> list[dict[str, Any]]:
        reply: dict[str, Any] = json.loads(http_get(f"{prometheus}/api/v1/rules"))
        return [rule for group in reply["data"]["groups"] for rule in group["rules"]]

    evaluated = wait_for(
        rules,
        lambda got: bool(got) and all(r["health"] == "ok" for r in got),
        SCRAPED_SECONDS,
        "every rule evaluated without error",
    )
    names = {rule["name"] for rule in evaluated}
    assert names == set(re.findall(r"^ *- alert: (\w+)$", RULES.read_text(), re.MULTILINE))
    # A healthy guest and broker: nothing is even pending.
    alerts = json.loads(http_get(f"{prometheus}/api/v1/alerts"))["data"]["alerts"]
    assert alerts == [], alerts


def documented_metrics() -> set[str]:
    """Names in the first column of docs/metrics.md's tables."""
    return set(re.findall(r"^\| `(vmtide_\w+)`", METRICS_DOC.read_text(), re.MULTILINE))


def exposed_name(name: str, kind: str) -> str:
    return f"{name}_total" if kind == "counter" else name


def test_docs_list_every_metric_and_no_other(tmp_path: Path) -> None:
    guest = FakeGuest(tmp_path / "guest")
    topology = Topology.read(Kernel(guest.sysfs, guest.procfs))
    agent_registry, broker_registry = CollectorRegistry(), CollectorRegistry()
    AgentMetrics(agent_registry, topology=lambda: topology)
    BrokerMetrics(broker_registry)
    defined = {
        exposed_name(family.name, family.type)
        for registry in (agent_registry, broker_registry)
        for family in registry.collect()
    }
    assert "vmtide_agent_cpus" in defined and "vmtide_broker_pool_capacity" in defined
    documented = documented_metrics()
    assert documented - defined == set(), "documented but not defined"
    assert defined - documented == set(), "defined but not in docs/metrics.md"
