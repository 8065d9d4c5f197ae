"""A guest that floods or over-asks, and the agent's metrics endpoint.

A guest is untrusted toward the broker (docs/threat-model.md): one that sends
requests as fast as it can is answered at the configured rate, the newest
request taken up in its turn, and the other guests are served as if it were
quiet; one that asks for everything gets its limits, and the broker's log
says what it refused. The agent's metrics endpoint serves reads only, and
only on the address it is configured with.
"""

from __future__ import annotations

import asyncio
import dataclasses
import http.client
import logging
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from simulation import broker_config, until

from agent.kernel import Kernel
from agent.topology import Topology
from broker.arbiter import Amount
from broker.config import CpuLimits, GuestConfig, MemoryLimits
from broker.core import Broker, GuestRecord
from broker.metrics import BrokerMetrics
from broker.simulated import SimulatedBackend
from vmtide.demo import simulated_agent_config
from vmtide.fakesys import FakeGuest
from vmtide.v1 import broker_pb2 as pb

GiB = 1 << 30
RATE = 5.0  # requests per second per guest


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_broker(tmp: Path, clock: Clock | None = None) -> tuple[Broker, dict[str, FakeGuest]]:
    """Guests a and b (1 of 4 CPUs, burst 4, maximum 3) on a pool of 6 CPUs."""
    fakes = {g: FakeGuest(tmp / g, possible_cpus=4, boot_cpus=1, boot_blocks=8) for g in "ab"}
    guests = [
        GuestConfig(
            id=g,
            listen=f"unix:{tmp}/{g}.sock",
            backend="simulated",
            simulated_root=fake.root,
            cpus=CpuLimits(minimum=1, maximum=3, burst=4),
            memory=MemoryLimits(minimum_bytes=1 * GiB, maximum_bytes=2 * GiB),
        )
        for g, fake in fakes.items()
    ]
    config = broker_config(tmp, guests, cpus=6, memory=4 * GiB)
    config = dataclasses.replace(
        config,
        broker=dataclasses.replace(
            config.broker, max_requests_per_second=RATE, arbitrate_interval_seconds=60.0
        ),
    )
    backends = {g: SimulatedBackend(fake, g) for g, fake in fakes.items()}
    broker = Broker(
        config, dict(backends), BrokerMetrics(CollectorRegistry()), clock=clock or time.monotonic
    )
    for g, fake in fakes.items():
        hello = pb.Hello(
            protocol_version=1,
            guest_id=g,
            topology=Topology.read(Kernel(fake.sysfs, fake.procfs)).to_proto(),
        )
        broker.open_session(g, hello)
    return broker, fakes


def ask(record: GuestRecord, request_id: int, cpus: int) -> pb.GuestMessage:
    request = pb.ResourceRequest(request_id=request_id, cpus=cpus, memory_bytes=1 * GiB)
    request.seen_grant_id = record.last_grant_id
    return pb.GuestMessage(request=request)


def taken(caplog: pytest.LogCaptureFixture, guest: str) -> list[str]:
    """The requests the broker took up, from its log."""
    return [
        r.getMessage()
        for r in caplog.records
        if r.getMessage().startswith(f"guest {guest}: request ")
        and " for " in r.getMessage()
        and "clamped" not in r.getMessage()
    ]


def rate_limited(broker: Broker, guest: str) -> float:
    value: float = broker.metrics.failures.labels(guest, "rate_limited")._value.get()
    return value


async def test_a_flooding_guest_is_answered_at_the_rate_and_others_are_unaffected(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "vmtide.broker")
    clock = Clock()
    broker, _ = make_broker(tmp_path, clock)
    a, b = broker.guests["a"], broker.guests["b"]
    # Guest a sends 200 requests over 2 s, alternating 2 and 3 CPUs, and last
    # asks for 4; guest b asks once, in the middle of the flood.
    for i in range(200):
        await broker.on_message(a, ask(a, i + 1, 2 + i % 2 if i < 199 else 4))
        if i == 100:
            await broker.on_message(b, ask(b, 1, 3))
            # Taken up at once: a's flood costs b nothing.
            assert b.demand.cpus == 3
        if i % 10 == 0:
            await broker.rebalance()
        clock.now += 0.01
    # At most one request per 1/RATE s was taken up: 2 s at 5/s, plus the first.
    assert len(taken(caplog, "a")) <= 2 * RATE + 1
    assert rate_limited(broker, "a") >= 200 - (2 * RATE + 1)
    assert rate_limited(broker, "b") == 0
    # One warning per wait, not one per request: the flood does not flood the log.
    held_back = [r for r in caplog.records if "held back" in r.getMessage()]
    assert 1 <= len(held_back) <= 2 * RATE + 1
    # The newest request is not lost: it is taken up in its turn.
    clock.now += 1.0 / RATE
    await broker.rebalance()
    assert a.demand.cpus == 4
    assert "request 200 for 4 cpus" in " ".join(taken(caplog, "a"))
    # b got what it asked for; a never more than its burst, the pool never overdrawn.
    assert b.entitled.cpus == 3
    assert a.entitled.cpus <= 4
    assert broker.allocated().fits(broker.pool.capacity)


async def test_the_broker_wakes_for_a_held_back_request_on_its_own(tmp_path: Path) -> None:
    # No further message and a 60 s arbitration period: only the held-back
    # request's own timer can bring the grant.
    broker, fakes = make_broker(tmp_path)
    a = broker.guests["a"]
    stop = asyncio.Event()
    runner = asyncio.create_task(broker.run(stop))
    try:
        for i in range(20):
            await broker.on_message(a, ask(a, i + 1, 2 if i < 19 else 3))
        await until(lambda: a.entitled.cpus == 3, 10, "the last request to be granted")
        assert fakes["a"].present_cpus() == {0, 1, 2}
    finally:
        stop.set()
        broker.changed()
        await asyncio.wait_for(runner, 10)


async def test_a_guest_asking_for_everything_gets_its_limits_and_the_refusal_is_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "vmtide.broker")
    clock = Clock()
    broker, fakes = make_broker(tmp_path, clock)
    a, b = broker.guests["a"], broker.guests["b"]
    await broker.on_message(a, ask(a, 1, (1 << 32) - 1))
    await broker.on_message(b, ask(b, 1, 3))
    await broker.rebalance()
    assert a.demand == Amount(4, 1 * GiB)  # its burst, not 4 billion
    assert a.entitled.cpus <= 4 and len(fakes["a"].present_cpus()) <= 4
    assert b.entitled.cpus == 3  # its normal share is not bursting's to take
    assert "request 1 for 4294967295 cpus" in caplog.text
    assert "clamped to its limits (minimum 1 cpus, 1024 MiB; burst 4 cpus" in caplog.text
    # Claiming to hold more than it was given changes nothing either.
    clock.now += 1
    report = pb.LoadReport(online_cpus=4000, online_memory_bytes=1 << 50)
    await broker.on_message(a, pb.GuestMessage(report=report))
    assert a.online.cpus <= len(fakes["a"].present_cpus())
    assert "more than is plugged" in caplog.text
    assert broker.allocated().fits(broker.pool.capacity)


# ------------------------------------------------------------ metrics endpoint


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def request(host: str, port: int, method: str, body: bytes | None = None) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection(host, port, timeout=5)
    try:
        connection.request(method, "/metrics", body=body)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def wait_for_endpoint(host: str, port: int, agent: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while True:
        assert agent.poll() is None, "the agent exited"
        try:
            status, body = request(host, port, "GET")
            if status == 200 and b"vmtide_agent_cpus" in body:
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"no metrics on {host}:{port} after 30 s")
        time.sleep(0.1)


def topology_lines(body: bytes) -> list[str]:
    return sorted(
        line
        for line in body.decode().splitlines()
        if line.startswith(("vmtide_agent_cpus{", "vmtide_agent_memory_bytes{"))
    )


@pytest.fixture
def agent_process(tmp_path: Path) -> Iterator[tuple[FakeGuest, int, subprocess.Popen[bytes]]]:
    """The real agent on a simulated guest, metrics on 127.0.0.2 only."""
    guest = FakeGuest(tmp_path / "g", possible_cpus=4, boot_cpus=1, boot_blocks=8)
    guest.plug_cpu(1)  # standby: nothing but the agent may online it
    port = free_port()
    config = simulated_agent_config(guest.root, "unix:/nonexistent", "g").replace(
        "[metrics]\nenabled = false",
        f'[metrics]\nenabled = true\naddress = "127.0.0.2"\nport = {port}',
    )
    assert f"port = {port}" in config
    path = tmp_path / "agent.toml"
    path.write_text(config)
    log = (tmp_path / "agent.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "run", "--config", str(path), "--no-broker"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        yield guest, port, process
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
        log.close()


def test_the_metrics_endpoint_is_read_only(
    agent_process: tuple[FakeGuest, int, subprocess.Popen[bytes]],
) -> None:
    guest, port, process = agent_process
    wait_for_endpoint("127.0.0.2", port, process)
    _, before = request("127.0.0.2", port, "GET")
    sysfs_before = sorted(
        (p.relative_to(guest.sysfs).as_posix(), p.read_text())
        for p in guest.sysfs.rglob("*")
        if p.is_file()
    )
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        status, body = request("127.0.0.2", port, method, b"vmtide_agent_cpus 99\nonline=1\n")
        # No handler takes a body: a write is answered like a read, or refused.
        assert status in (200, 405, 501), (method, status)
        if status == 200:
            assert b"vmtide_agent_cpus" in body
    _, after = request("127.0.0.2", port, "GET")
    assert topology_lines(after) == topology_lines(before)
    assert 'vmtide_agent_cpus{state="standby"} 1.0' in after.decode()
    sysfs_after = sorted(
        (p.relative_to(guest.sysfs).as_posix(), p.read_text())
        for p in guest.sysfs.rglob("*")
        if p.is_file()
    )
    assert sysfs_after == sysfs_before
    assert process.poll() is None


def test_the_metrics_endpoint_binds_only_where_configured(
    agent_process: tuple[FakeGuest, int, subprocess.Popen[bytes]],
) -> None:
    _, port, process = agent_process
    wait_for_endpoint("127.0.0.2", port, process)
    for host in ("127.0.0.1", "localhost"):
        with pytest.raises(ConnectionRefusedError):
            request(host, port, "GET")
    addresses = {
        str(info[4][0]) for info in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)
    } - {"127.0.0.2"}
    for host in addresses:
        with pytest.raises(OSError):
            request(host, port, "GET")


async def test_a_guest_cannot_forge_broker_log_lines(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "vmtide.broker")
    clock = Clock()
    broker, _ = make_broker(tmp_path, clock)
    a = broker.guests["a"]
    forged = "holding\nERROR vmtide.broker: guest b: unplug failed\r\x1b[2K"
    message = ask(a, 1, 2)
    message.request.reason = forged
    await broker.on_message(a, message)
    await broker.rebalance()
    clock.now += 1
    message = ask(a, 2, 1)
    await broker.on_message(a, message)
    await broker.rebalance()
    (reclaim_id,) = a.pending
    ack = pb.Ack(reclaim_id=reclaim_id, online_cpus=1, online_memory_bytes=1 * GiB, note=forged)
    await broker.on_message(a, pb.GuestMessage(ack=ack))
    lines = [r.getMessage() for r in caplog.records]
    assert sum("unplug failed" in line for line in lines) == 2  # the reason and the note
    for line in lines:
        assert not any(c in line for c in "\n\r\x1b"), line
    assert "holding\\nERROR vmtide.broker" in caplog.text
