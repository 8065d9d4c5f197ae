"""The broker's gRPC side (the standard health service, the vsock listener's
config and start-up) and what `vmtide-broker status` prints.

Sessions over vsock, bound by the peer's CID through the relays, run end to
end in tests/test_vsock_relay.py.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import tempfile
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry
from simulation import broker_config, broker_serve, running, until

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
from broker.server import ListenError, start_servers
from broker.simulated import SimulatedBackend
from vmtide.config import ConfigError, build
from vmtide.fakesys import FakeGuest
from vmtide.relay import VsockTransport

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


# ----------------------------------------------------------------- vsock listener


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


async def test_a_vsock_listener_that_cannot_start_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    broker, _ = vsock_broker(tmp_path)

    def listen(port: int) -> socket.socket:
        raise OSError(errno.EADDRINUSE, os.strerror(errno.EADDRINUSE))

    with pytest.raises(
        ListenError, match=r"cannot listen on vsock port 7470 \(vsock_port\): .*Address already"
    ):
        await start_servers(broker, broker.config, VsockTransport(listen=listen))
    assert not list(tmp_path.glob("vmtide-broker-vsock-*"))  # nothing made yet


async def test_the_vsock_guest_listeners_are_private(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each vsock guest's own listener is a unix socket in a directory only the
    broker's user can enter: reaching it is being that guest."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    broker, _ = vsock_broker(tmp_path)
    port = tmp_path / "vsock.sock"

    def listen(number: int) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(port))
        sock.listen()
        return sock

    servers = await start_servers(broker, broker.config, VsockTransport(listen=listen))
    try:
        (directory,) = tmp_path.glob("vmtide-broker-vsock-*")
        assert directory.stat().st_mode & 0o777 == 0o700
        assert sorted(p.name for p in directory.iterdir()) == ["3.sock", "4.sock"]
    finally:
        for server in servers:
            await server.stop(None)
    assert not directory.exists()  # removed on stop


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
