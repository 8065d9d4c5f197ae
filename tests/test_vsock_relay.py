"""vsock through the relays (vmtide.relay): the real agent and the real broker.

This machine has no usable vsock (no vhost-vsock, no vsock_loopback), so unix
sockets stand in for AF_VSOCK. The stand-in plays the host kernel: a guest's
connection is bound to an abstract name carrying that guest's CID before it
connects, and the broker reads the CID back from accept()'s address, as it
reads (CID, port) from a real vsock accept. Everything above those three
socket calls (the agent's relay, the broker's routing by CID, the per-guest
gRPC listeners, the sessions) is the real code.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import functools
import logging
import os
import random
import re
import secrets
import socket
import tempfile
from collections.abc import AsyncIterator, Awaitable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
from prometheus_client import CollectorRegistry
from simulation import FAST_POLICY, LoadDriver, agent_config, running, until

from agent.actuator import Actuator
from agent.config import AgentConfig
from agent.config import BrokerSection as AgentBrokerSection
from agent.daemon import Agent
from agent.kernel import Kernel
from agent.metrics import AgentMetrics
from agent.sensing import Sensor
from agent.session import BrokerLink
from agent.topology import Topology
from broker.cli import serve
from broker.config import (
    BrokerConfig,
    BrokerSection,
    CpuLimits,
    GuestConfig,
    MemoryLimits,
    PoolConfig,
)
from broker.core import Broker
from broker.metrics import BrokerMetrics
from broker.server import UNKNOWN_CID_GUEST, Listener, start_servers, stop_servers
from broker.simulated import SimulatedBackend
from vmtide.config import ConfigError, build
from vmtide.fakesys import FakeGuest, FakeKernelWriter, Load
from vmtide.relay import (
    Relay,
    VsockTransport,
    listen_vsock,
    parse_vsock_target,
    private_listener,
    vsock_peer_cid,
    vsock_socket,
)
from vmtide.v1 import broker_pb2 as pb

GiB = 1 << 30
MiB = 1 << 20
T = TypeVar("T")
PORT = 7470
TARGET = f"vsock:2:{PORT}"
CIDS = {"a": 3, "b": 4}


class VsockStandIn:
    """Unix sockets in place of AF_VSOCK, every socket kept to check it closed.

    `listen(port)` is the host's vsock port; `guest(cid)` is a guest's kernel:
    its connections carry `cid` (their bound abstract name), which the code
    under test never chooses; `peer_cid` reads it back on the host.
    """

    HOST_CID = 2

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.token = secrets.token_hex(4)
        self.sockets: list[socket.socket] = []
        self.reachable = True  # False: the host's vsock resets every connect
        self.connects = 0

    def port_path(self, port: int) -> Path:
        return self.tmp / f"vsock-{port}.sock"

    def listen(self, port: int) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sockets.append(sock)
        sock.bind(str(self.port_path(port)))
        sock.listen()
        return sock

    def peer_cid(self, address: object) -> int | None:
        assert isinstance(address, bytes), address  # an abstract name
        match = re.fullmatch(rb"\0vmtide-test-[0-9a-f]+-cid-(\d+)-\d+", address)
        return int(match[1]) if match else None

    def host(self) -> VsockTransport:
        return VsockTransport(listen=self.listen, peer_cid=self.peer_cid)

    def guest(self, cid: int) -> VsockTransport:
        async def connect(host: int, port: int) -> socket.socket:
            assert host == self.HOST_CID
            self.connects += 1
            if not self.reachable:
                raise ConnectionResetError(errno.ECONNRESET, os.strerror(errno.ECONNRESET))
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sockets.append(sock)
            try:
                sock.setblocking(False)
                sock.bind(f"\0vmtide-test-{self.token}-cid-{cid}-{len(self.sockets)}")
                await asyncio.get_running_loop().sock_connect(sock, str(self.port_path(port)))
            except BaseException:
                sock.close()
                raise
            return sock

        return VsockTransport(connect=connect)

    def open_sockets(self) -> list[socket.socket]:
        return [s for s in self.sockets if s.fileno() >= 0]


def unix_socket_names() -> list[str]:
    """Every bound unix socket in this network namespace (/proc/net/unix)."""
    lines = Path("/proc/net/unix").read_text().splitlines()[1:]
    return [fields[7] for line in lines if len(fields := line.split()) > 7]


def leftovers(stand_in: VsockStandIn, tmp: Path) -> list[str]:
    """What should be gone once everything stopped: sockets, tasks, directories."""
    ours = (f"@vmtide-{os.getpid()}-", f"@vmtide-test-{stand_in.token}-", str(tmp))
    found = [name for name in unix_socket_names() if name.startswith(ours)]
    found += [repr(s) for s in stand_in.open_sockets()]
    found += [t.get_name() for t in asyncio.all_tasks() if t.get_name().startswith("vmtide-relay")]
    found += [str(p) for p in tmp.glob("vmtide-broker-vsock-*")]
    return found


@pytest.fixture
def stand_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[VsockStandIn]:
    # The broker's private directory of per-guest sockets goes under tmp_path.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    yield VsockStandIn(tmp_path)


@pytest.fixture
def fakes(tmp_path: Path) -> dict[str, FakeGuest]:
    return {
        name: FakeGuest(tmp_path / name, possible_cpus=4, boot_cpus=1, boot_blocks=8)
        for name in CIDS
    }


def vsock_broker_config(tmp: Path, fakes: dict[str, FakeGuest]) -> BrokerConfig:
    guests = [
        GuestConfig(
            id=name,
            vsock_cid=CIDS[name],  # no listen: the CID is the only way in
            backend="simulated",
            simulated_root=fake.root,
            cpus=CpuLimits(minimum=1, maximum=4),
            memory=MemoryLimits(minimum_bytes=1 * GiB, maximum_bytes=2 * GiB),
        )
        for name, fake in fakes.items()
    ]
    return BrokerConfig(
        broker=BrokerSection(
            state_file=tmp / "broker.json",
            arbitrate_interval_seconds=0.2,
            max_requests_per_second=50.0,
            metrics_port=0,
            vsock_port=PORT,
        ),
        pool=PoolConfig(cpus=8, memory_bytes=8 * GiB),
        guests=tuple(guests),
    )


def vsock_agent(fake: FakeGuest, claims: str, transport: VsockTransport) -> Agent:
    """The real agent on a simulated guest, its broker link on `transport`."""
    config: AgentConfig = agent_config(fake, claims, TARGET)
    kernel = Kernel(fake.sysfs, fake.procfs, writer=FakeKernelWriter(fake.root))
    return Agent(
        dataclasses.replace(config, policy=FAST_POLICY),
        Actuator(kernel, offline_timeout=2.0),
        Sensor(fake.procfs),
        AgentMetrics(CollectorRegistry()),
        guest_id=claims,
        link_factory=lambda agent: BrokerLink(
            agent.config.broker,
            agent.hello,
            agent.on_broker_message,
            agent.on_link_state,
            vsock=transport,
        ),
    )


def messages_of(caplog: pytest.LogCaptureFixture, logger: str, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == logger and text in r.getMessage()]


# ------------------------------------------------ the real agent and broker


async def test_cpus_follow_load_over_vsock_bound_by_cid(
    tmp_path: Path, stand_in: VsockStandIn, fakes: dict[str, FakeGuest]
) -> None:
    config = vsock_broker_config(tmp_path, fakes)
    agent = vsock_agent(fakes["b"], "b", stand_in.guest(CIDS["b"]))
    driver = LoadDriver(fakes["b"], Load(cpus=0.2, memory_bytes=256 * MiB))
    broker = functools.partial(serve, config, vsock=stand_in.host())
    async with running(broker, driver.run, agent.run):
        await until(lambda: agent.link is not None and agent.link.connected, 10, "a session")
        driver.load = Load(cpus=3.5, memory_bytes=256 * MiB)
        # The broker plugged CPUs into guest b's VM: the CID's, not guest a's.
        await until(lambda: len(fakes["b"].online_cpus()) >= 3, 20, "3+ cpus online in b")
        assert fakes["a"].present_cpus() == {0}
        assert stand_in.connects == 1  # one gRPC connection, one vsock connection
    await until(lambda: not leftovers(stand_in, tmp_path), 5, "every socket and task gone")


async def test_a_guest_claiming_another_is_refused_by_its_cid(
    tmp_path: Path,
    stand_in: VsockStandIn,
    fakes: dict[str, FakeGuest],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    config = vsock_broker_config(tmp_path, fakes)
    agent = vsock_agent(fakes["a"], "b", stand_in.guest(CIDS["a"]))  # CID 3 is a's
    broker = functools.partial(serve, config, vsock=stand_in.host())
    async with running(broker, agent.run):
        await until(
            lambda: bool(messages_of(caplog, "vmtide.agent.session", "broker refused this guest")),
            10,
            "the agent told it is refused",
        )
        assert agent.link is not None and not agent.link.connected
    refused = messages_of(caplog, "vmtide.broker.server", "refused a session")
    assert refused and "claims to be guest 'b' but its vsock CID is guest 'a''s" in refused[0]
    assert "this vsock CID is guest 'a''s, not 'b''s" in " ".join(
        messages_of(caplog, "vmtide.agent.session", "refused")
    )
    await until(lambda: not leftovers(stand_in, tmp_path), 5, "every socket and task gone")


@dataclasses.dataclass
class Rig:
    broker: Broker
    registry: CollectorRegistry
    listeners: list[Listener]


@pytest.fixture
async def rig(
    tmp_path: Path, stand_in: VsockStandIn, fakes: dict[str, FakeGuest]
) -> AsyncIterator[Rig]:
    """The broker's listeners alone (no arbitration), with metrics to read."""
    config = vsock_broker_config(tmp_path, fakes)
    registry = CollectorRegistry()
    backends = {name: SimulatedBackend(fake, name) for name, fake in fakes.items()}
    broker = Broker(config, dict(backends), BrokerMetrics(registry))
    listeners = await start_servers(broker, config, stand_in.host())
    try:
        yield Rig(broker, registry, listeners)
    finally:
        await stop_servers(listeners)


def link_for(fake: FakeGuest, claims: str, transport: VsockTransport) -> BrokerLink:
    """A bare agent session: BrokerLink with a Hello of `fake`'s real topology."""
    topology = Topology.read(Kernel(fake.sysfs, fake.procfs)).to_proto()

    async def ignore(message: pb.BrokerMessage) -> None:
        pass

    config = AgentBrokerSection(
        target=TARGET, reconnect_min_seconds=0.05, reconnect_max_seconds=0.2
    )
    return BrokerLink(
        config,
        lambda: pb.Hello(protocol_version=1, guest_id=claims, topology=topology),
        ignore,
        vsock=transport,
    )


async def test_a_connection_from_an_unknown_cid_is_closed_logged_and_counted(
    rig: Rig,
    stand_in: VsockStandIn,
    fakes: dict[str, FakeGuest],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    link = link_for(fakes["a"], "a", stand_in.guest(9))  # CID 9: nobody's
    async with running(link.run):
        await until(lambda: link.reconnects >= 2, 10, "two failed sessions")
        assert not link.connected
        assert not any(g.connected for g in rig.broker.guests.values())
    # Counted every time, logged once a minute: any VM can dial this port.
    refused = messages_of(caplog, "vmtide.broker.server", "refused a vsock connection")
    assert refused == [
        "refused a vsock connection from CID 9: no configured guest has this vsock_cid"
    ]
    count = rig.registry.get_sample_value(
        "vmtide_broker_failures_total", {"guest": UNKNOWN_CID_GUEST, "reason": "refused_identity"}
    )
    assert count is not None and count >= 2
    # To the agent it is a failed connection, as over TCP: logged, backed off.
    ended = messages_of(caplog, "vmtide.agent.session", f"broker session to {TARGET} ended")
    assert ended and "UNAVAILABLE" in ended[0]


async def test_an_unreachable_host_is_a_failed_connection_logged_once(
    tmp_path: Path,
    stand_in: VsockStandIn,
    fakes: dict[str, FakeGuest],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    stand_in.reachable = False
    link = link_for(fakes["a"], "a", stand_in.guest(CIDS["a"]))
    async with running(link.run):
        await until(lambda: link.reconnects >= 3, 10, "three failed sessions")
        assert not link.connected
        ended = messages_of(caplog, "vmtide.agent.session", f"broker session to {TARGET} ended")
        assert len(ended) >= 3 and all("UNAVAILABLE" in m for m in ended)
        assert messages_of(caplog, "vmtide.agent.session", "reconnecting to broker in")
        # The cause once, not at every attempt.
        cause = messages_of(caplog, "vmtide.agent.session", "cannot reach the broker")
        assert cause == [
            f"cannot reach the broker at {TARGET}: [Errno 104] Connection reset by peer"
        ]
        # The host comes up: the same link gets through.
        stand_in.reachable = True
        config = vsock_broker_config(tmp_path, fakes)
        broker = Broker(
            config,
            {n: SimulatedBackend(f, n) for n, f in fakes.items()},
            BrokerMetrics(CollectorRegistry()),
        )
        listeners = await start_servers(broker, config, stand_in.host())
        try:
            await until(lambda: link.connected, 10, "a session once the host is up")
            assert broker.guests["a"].connected
        finally:
            await stop_servers(listeners)
    assert messages_of(caplog, "vmtide.agent.session", f"reached the broker at {TARGET} again")
    await until(lambda: not leftovers(stand_in, tmp_path), 5, "every socket and task gone")


# ------------------------------------------------ the relay itself


class Upstreams:
    """An upstream for a Relay: each connection gets one end of a socket pair,
    the test the other (queued in `far`)."""

    def __init__(self) -> None:
        self.far: asyncio.Queue[socket.socket] = asyncio.Queue()
        self.near: list[socket.socket] = []
        self.hold = False  # True: never answer (a connect that hangs)

    async def __call__(self, address: object) -> socket.socket | None:
        if self.hold:
            await asyncio.Event().wait()
        near, far = socket.socketpair()
        near.setblocking(False)
        far.setblocking(False)
        self.near.append(near)
        await self.far.put(far)
        return near


@pytest.fixture
async def relay() -> AsyncIterator[tuple[Relay, Upstreams, bytes]]:
    listener, _ = private_listener()
    address = listener.getsockname()
    upstreams = Upstreams()
    relay = Relay("test", listener, upstreams)
    relay.start()
    try:
        yield relay, upstreams, address
    finally:
        await relay.stop()


async def dial(address: bytes) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, address)
    except BaseException:
        sock.close()
        raise
    return sock


async def send(sock: socket.socket, data: bytes, half_close: bool = True) -> None:
    await asyncio.get_running_loop().sock_sendall(sock, data)
    if half_close:
        sock.shutdown(socket.SHUT_WR)


async def read_all(sock: socket.socket) -> bytes:
    loop = asyncio.get_running_loop()
    data = bytearray()
    while chunk := await loop.sock_recv(sock, 1 << 20):
        data += chunk
    return bytes(data)


def payload(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


async def timed(awaitable: Awaitable[T]) -> T:
    return await asyncio.wait_for(awaitable, 30)


async def test_large_payloads_cross_both_ways_at_once(
    relay: tuple[Relay, Upstreams, bytes],
) -> None:
    _, upstreams, address = relay
    client = await dial(address)
    server = await timed(upstreams.far.get())
    up, down = payload(24 * MiB, 1), payload(24 * MiB, 2)
    with client, server:
        _, got_up, _, got_down = await timed(
            asyncio.gather(send(client, up), read_all(server), send(server, down), read_all(client))
        )
    assert got_up == up and got_down == down


async def test_a_half_closed_request_still_gets_its_answer(
    relay: tuple[Relay, Upstreams, bytes],
) -> None:
    r, upstreams, address = relay
    client = await dial(address)
    server = await timed(upstreams.far.get())
    request, answer = payload(3 * MiB, 3), payload(5 * MiB, 4)

    async def answer_after_eof() -> None:
        assert await read_all(server) == request  # the client's half-close came through
        await send(server, answer)

    with client, server:
        _, _, got = await timed(
            asyncio.gather(send(client, request), answer_after_eof(), read_all(client))
        )
    assert got == answer
    await until(lambda: r.connections == 0, 5, "the connection done")
    assert all(s.fileno() == -1 for s in upstreams.near)


@pytest.mark.parametrize("dies", ["upstream", "client"])
async def test_a_peer_that_closes_mid_stream_ends_the_connection(
    relay: tuple[Relay, Upstreams, bytes], dies: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="vmtide.relay")
    r, upstreams, address = relay
    client = await dial(address)
    server = await timed(upstreams.far.get())
    sender, dying = (client, server) if dies == "upstream" else (server, client)
    loop = asyncio.get_running_loop()
    sending = asyncio.create_task(send(sender, payload(64 * MiB, 5), half_close=False))
    await timed(loop.sock_recv(dying, 1 << 20))  # mid-stream
    dying.close()  # with data unread: the kernel resets its peer
    with pytest.raises(ConnectionError):
        await timed(sending)
    sender.close()
    await until(lambda: r.connections == 0, 5, "the connection done")
    assert all(s.fileno() == -1 for s in upstreams.near)
    ended = messages_of(caplog, "vmtide.relay", "connection ended")
    assert len(ended) == 1, ended  # logged once, not by each direction


async def test_stop_closes_every_connection_and_socket(
    relay: tuple[Relay, Upstreams, bytes],
) -> None:
    r, upstreams, address = relay
    loop = asyncio.get_running_loop()
    clients, servers = [], []
    for _ in range(3):
        clients.append(await dial(address))
        servers.append(await timed(upstreams.far.get()))
        await send(clients[-1], b"x", half_close=False)
        assert await timed(loop.sock_recv(servers[-1], 1)) == b"x"
    upstreams.hold = True  # one more, stuck in its upstream connect
    clients.append(await dial(address))
    await until(lambda: r.connections == 4, 5, "four connections")

    await r.stop()

    assert r.connections == 0
    assert all(s.fileno() == -1 for s in upstreams.near)
    names = [t.get_name() for t in asyncio.all_tasks()]
    assert not [n for n in names if n.startswith("vmtide-relay")], names
    for sock in clients + servers:
        with sock:
            assert await timed(read_all(sock)) == b""  # closed at the far end
    with pytest.raises(ConnectionRefusedError):  # nobody listens any more
        await dial(address)


# ------------------------------------------------ vsock itself, targets, config


def test_real_vsock_sockets_can_be_built() -> None:
    """What stands in for nothing: the real AF_VSOCK socket objects (no peer)."""
    if not hasattr(socket, "AF_VSOCK"):
        pytest.skip("Python's socket module has no AF_VSOCK on this kernel")
    try:
        client = vsock_socket()
    except OSError as err:
        pytest.skip(f"AF_VSOCK is not available on this kernel: {err}")
    with client:
        assert client.family == socket.AF_VSOCK and client.type == socket.SOCK_STREAM
        assert not client.getblocking()
    try:
        listener = listen_vsock(socket.VMADDR_PORT_ANY)
    except OSError as err:
        pytest.skip(f"this kernel has no vsock transport to listen on: {err}")
    with listener:
        cid, port = listener.getsockname()
        assert cid == socket.VMADDR_CID_ANY and port != socket.VMADDR_PORT_ANY
        assert not listener.getblocking()


def test_vsock_peer_cid_reads_accepts_address() -> None:
    assert vsock_peer_cid((3, 1029)) == 3
    assert vsock_peer_cid((4294967294, 7470)) == 4294967294
    for other in ("/run/x.sock", b"\0abstract", ("127.0.0.1", 7470), (3,), None):
        assert vsock_peer_cid(other) is None


def test_vsock_targets_are_parsed_and_checked() -> None:
    assert parse_vsock_target("vsock:2:7470") == (2, 7470)
    assert parse_vsock_target("unix:/run/vmtide.sock") is None
    assert parse_vsock_target("10.0.2.2:7470") is None
    cases: list[tuple[dict[str, object], str]] = [
        ({"target": "vsock:2"}, r"broker\.target: 'vsock:2' is not vsock:CID:PORT"),
        ({"target": "vsock:2:x"}, "is not vsock:CID:PORT"),
        ({"target": "vsock:4294967296:1"}, "two 32-bit numbers"),
        ({"target": "vsock:2:7470", "tls": True}, r"broker\.tls: not over vsock"),
    ]
    for broker, message in cases:
        with pytest.raises(ConfigError, match=message):
            build(AgentConfig, {"broker": broker}, file="agent.toml")
    assert build(AgentConfig, {"broker": {"target": "vsock:2:7470"}}, file="agent.toml")
