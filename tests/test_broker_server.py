"""The broker's gRPC side (the standard health service, sessions bound by vsock
CID) and what `vmtide-broker status` prints.

This machine's kernel has no vsock loopback (no vsock_loopback module: a
connection to CID 1 times out) and the PyPI grpcio wheel is built without vsock
(`add_insecure_port("vsock:...")` logs "VSOCK is not supported"), so the vsock
listener cannot run end to end here. What decides identity is tested instead:
gRPC's peer string for a vsock connection ("vsock:CID:PORT", as grpc's
sockaddr_utils formats it) through the real servicer, with a stand-in context.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path
from typing import Any, NoReturn

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry
from simulation import broker_config, broker_serve, running, until

from agent.kernel import Kernel
from agent.topology import Topology
from broker import cli as broker_cli
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
from broker.server import GuestServicer, ListenError, start_servers, vsock_peer_cid
from broker.simulated import SimulatedBackend
from vmtide.config import ConfigError, build
from vmtide.fakesys import FakeGuest
from vmtide.v1 import broker_pb2 as pb

GiB = 1 << 30


def simulated(tmp: Path, name: str, **keys: Any) -> tuple[FakeGuest, GuestConfig]:
    fake = FakeGuest(tmp / name, possible_cpus=4, boot_cpus=1, boot_blocks=8)
    config = GuestConfig(
        id=name,
        backend="simulated",
        simulated_root=fake.root,
        cpus=CpuLimits(minimum=1, maximum=4),
        memory=MemoryLimits(minimum_bytes=1 * GiB, maximum_bytes=2 * GiB),
        **keys,
    )
    return fake, config


# ----------------------------------------------------------------- health


async def test_health_service_says_serving(tmp_path: Path) -> None:
    sock = tmp_path / "g.sock"
    _, guest = simulated(tmp_path, "g", listen=f"unix:{sock}")
    config = broker_config(tmp_path, [guest], cpus=4, memory=4 * GiB)
    async with running(await broker_serve(config)):
        await until(sock.exists, 10, "the listener")
        async with grpc.aio.insecure_channel(f"unix:{sock}") as channel:
            health = health_pb2_grpc.HealthStub(channel)

            async def status(service: str) -> int:
                request = health_pb2.HealthCheckRequest(service=service)
                reply = await health.Check(request, timeout=5)
                return int(reply.status)

            serving = health_pb2.HealthCheckResponse.SERVING
            # The broker's own service, and the server as a whole ("").
            for _ in range(100):  # set by a task just after the server starts
                if await status("vmtide.v1.Broker") == serving:
                    break
                await asyncio.sleep(0.05)
            assert await status("vmtide.v1.Broker") == serving
            assert await status("") == serving
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await status("no.such.Service")
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND


# ----------------------------------------------------------------- vsock identity


@pytest.mark.parametrize(
    ("peer", "cid"),
    [
        ("vsock:3:1024", 3),
        ("vsock:4294967294:7470", 4294967294),
        ("unix:/run/vmtide/g.sock", None),
        ("ipv4:127.0.0.1:7470", None),
        ("vsock:3", None),
        ("vsock:x:1", None),
        ("", None),
    ],
)
def test_vsock_peer_cid(peer: str, cid: int | None) -> None:
    assert vsock_peer_cid(peer) == cid


def test_vsock_config_is_checked(tmp_path: Path) -> None:
    def load(guests: list[dict[str, Any]], **broker: Any) -> BrokerConfig:
        table = {"broker": broker, "guests": guests}
        return build(BrokerConfig, table, file="broker.toml")

    def guest(name: str, **keys: Any) -> dict[str, Any]:
        return {"id": name, "backend": "simulated", "simulated_root": str(tmp_path), **keys}

    config = load([guest("a", vsock_cid=3), guest("b", vsock_cid=4)], vsock_port=7470)
    assert [g.vsock_cid for g in config.guests] == [3, 4]  # no listen needed
    bad = [
        (
            [guest("a", vsock_cid=2)],
            {"vsock_port": 7470},
            r"guests\[0\]\.vsock_cid: 2 is not a guest CID",
        ),
        ([guest("a", vsock_cid=True)], {"vsock_port": 7470}, "expected an integer"),
        ([guest("a", vsock_cid=3), guest("b", vsock_cid=3)], {"vsock_port": 7470}, "share"),
        ([guest("a", vsock_cid=3)], {}, "vsock_cid needs broker.vsock_port"),
        ([guest("a", vsock_cid=3)], {"vsock_port": -1}, "broker.vsock_port"),
        ([guest("a")], {}, "listen: each guest needs"),
    ]
    for guests, broker, message in bad:
        with pytest.raises(ConfigError, match=message):
            load(guests, **broker)


class AbortedError(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code


class VsockContext:
    """What the servicer reads of grpc's context, for a peer that came over vsock."""

    def __init__(self, cid: int) -> None:
        self._peer = f"vsock:{cid}:1029"

    def peer(self) -> str:
        return self._peer

    def auth_context(self) -> dict[str, list[bytes]]:
        return {}

    async def abort(self, code: grpc.StatusCode, details: str) -> NoReturn:
        raise AbortedError(code, details)


def vsock_broker(tmp_path: Path) -> tuple[Broker, dict[str, FakeGuest]]:
    fakes, guests = {}, []
    for name, cid in (("a", 3), ("b", 4)):
        fakes[name], guest = simulated(tmp_path, name, vsock_cid=cid)
        guests.append(guest)
    config = BrokerConfig(
        broker=BrokerSection(state_file=tmp_path / "broker.json", vsock_port=7470),
        pool=PoolConfig(cpus=4, memory_bytes=4 * GiB),
        guests=tuple(guests),
    )
    backends = {g: SimulatedBackend(fake, g) for g, fake in fakes.items()}
    broker = Broker(config, dict(backends), BrokerMetrics(CollectorRegistry()))
    return broker, fakes


async def session(
    broker: Broker, cid: int, fake: FakeGuest, claims: str
) -> tuple[pb.BrokerMessage, AsyncGenerator[pb.BrokerMessage]]:
    servicer = GuestServicer(broker, None, cids={3: "a", 4: "b"})
    topology = Topology.read(Kernel(fake.sysfs, fake.procfs)).to_proto()

    async def requests() -> AsyncIterator[pb.GuestMessage]:
        yield pb.GuestMessage(
            hello=pb.Hello(protocol_version=1, guest_id=claims, topology=topology)
        )
        await asyncio.Event().wait()  # the guest says nothing more

    context: Any = VsockContext(cid)
    replies: Any = servicer.Session(requests(), context)  # an async generator
    return await anext(replies), replies


async def test_a_vsock_session_is_the_guest_of_its_cid(tmp_path: Path) -> None:
    broker, fakes = vsock_broker(tmp_path)

    welcome, replies = await session(broker, 4, fakes["b"], claims="")

    # No claim at all: the CID alone says who it is.
    assert welcome.welcome.guest_id == "b"
    assert broker.guests["b"].connected and not broker.guests["a"].connected
    await replies.aclose()


async def test_a_vsock_session_claiming_another_guest_is_refused(tmp_path: Path) -> None:
    broker, fakes = vsock_broker(tmp_path)

    with pytest.raises(AbortedError) as caught:
        await session(broker, 3, fakes["a"], claims="b")

    assert caught.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert "this vsock CID is guest 'a''s, not 'b''s" in str(caught.value)
    assert not broker.guests["b"].connected


async def test_a_vsock_session_from_an_unknown_cid_is_refused(tmp_path: Path) -> None:
    broker, fakes = vsock_broker(tmp_path)

    with pytest.raises(AbortedError) as caught:
        await session(broker, 9, fakes["a"], claims="a")

    assert caught.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert "vsock CID 9 is no configured guest's vsock_cid" in str(caught.value)
    assert not any(g.connected for g in broker.guests.values())


def vsock_listens_here() -> bool:
    """Whether this kernel can take vsock connections to itself (CID 1)."""
    try:
        with socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM) as server:
            server.bind((socket.VMADDR_CID_ANY, socket.VMADDR_PORT_ANY))
            server.listen()
            with socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM) as client:
                client.settimeout(1.0)
                client.connect((1, server.getsockname()[1]))
    except OSError:
        return False
    return True


async def test_a_vsock_listener_that_cannot_start_is_a_clear_error(tmp_path: Path) -> None:
    if vsock_listens_here():
        pytest.skip("vsock works here: the listener may well start")
    broker, _ = vsock_broker(tmp_path)
    with pytest.raises(ListenError, match=r"cannot listen on vsock:4294967295:7470 \(vsock_port\)"):
        await start_servers(broker, broker.config)


# ----------------------------------------------------------------- status


def test_status_text_shows_memory_limits(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, guest = simulated(tmp_path, "g", listen="unix:/nonexistent")
    config = broker_config(tmp_path, [guest], cpus=4, memory=4 * GiB)
    backend = SimulatedBackend(FakeGuest.open(tmp_path / "g"), "g")
    Broker(config, {"g": backend}, BrokerMetrics(CollectorRegistry())).write_state()
    toml = tmp_path / "broker.toml"
    toml.write_text(
        f'[broker]\nstate_file = "{config.broker.state_file}"\n'
        f'[[guests]]\nid = "g"\nlisten = "unix:/nonexistent"\nbackend = "simulated"\n'
        f'simulated_root = "{tmp_path / "g"}"\n'
    )

    assert broker_cli.main(["status", "--config", str(toml)]) == 0

    header, row = capsys.readouterr().out.splitlines()[1:3]
    assert "memory MiB min/max/burst" in header and "cpus min/max/burst" in header
    assert row.split()[:4] == ["g", "no", "0", "1/4/4"]
    assert "1024/2048/2048" in row  # minimum 1 GiB, maximum 2 GiB, no burst above it
    assert row.split()[-1] == "ok"  # its hypervisor answers
