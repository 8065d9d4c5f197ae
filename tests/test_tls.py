"""TLS with client certificates, end to end: the real broker on its shared TLS
listener and real agents on simulated guests.

Certificates are made at test time with the openssl CLI: a CA, the broker's
server certificate (for localhost and 127.0.0.1), client certificates for
guests a and b, one for a name no guest has, and one for guest a from another
CA. The broker binds each session to the guest its certificate names, refuses
a Hello that claims another guest, and never completes a handshake with a
client that has no certificate or one from another CA.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from simulation import agent_config, broker_config, broker_serve, make_agent, running, until

from agent.config import AgentConfig
from agent.daemon import Agent
from broker.config import BrokerConfig, BrokerSection, CpuLimits, GuestConfig, MemoryLimits
from vmtide.fakesys import FakeGuest
from vmtide.v1 import broker_pb2 as pb
from vmtide.v1 import broker_pb2_grpc as pb_grpc

GiB = 1 << 30

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_ca(directory: Path, name: str) -> None:
    openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
        "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "1",
        "-subj", f"/CN={name}",
        cwd=directory,
    )  # fmt: skip


def issue(directory: Path, ca: str, name: str, common_name: str, extensions: str) -> None:
    """A key and a certificate for `common_name`, signed by `ca`."""
    (directory / f"{name}.ext").write_text(extensions)
    openssl(
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={common_name}",
        cwd=directory,
    )  # fmt: skip
    openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
        "-CAcreateserial", "-out", f"{name}.pem", "-days", "1", "-extfile", f"{name}.ext",
        cwd=directory,
    )  # fmt: skip


CLIENT = "extendedKeyUsage = clientAuth\n"
SERVER = "extendedKeyUsage = serverAuth\nsubjectAltName = DNS:localhost, IP:127.0.0.1\n"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("pki")
    make_ca(directory, "ca")
    make_ca(directory, "other-ca")
    issue(directory, "ca", "server", "localhost", SERVER)
    issue(directory, "ca", "guest-a", "guest-a", CLIENT)
    issue(directory, "ca", "guest-b", "guest-b", CLIENT)
    issue(directory, "ca", "stranger", "guest-c", CLIENT)
    issue(directory, "other-ca", "forged-a", "guest-a", CLIENT)
    return directory


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclasses.dataclass
class Rig:
    tmp: Path
    pki: Path
    target: str
    guests: dict[str, FakeGuest]
    config: BrokerConfig

    def state(self, guest: str) -> dict[str, Any]:
        path = self.tmp / "broker.json"
        if not path.exists():
            return {"connected": False, "session": ""}
        guests: dict[str, dict[str, Any]] = json.loads(path.read_text())["guests"]
        return guests[guest]

    def agent(self, guest: str, claims: str, cert: str | None, ca: str = "ca") -> Agent:
        """An agent on `guest`'s simulated tree, claiming `claims`, with `cert` (or none)."""
        config: AgentConfig = agent_config(self.guests[guest], claims, self.target)
        broker = dataclasses.replace(
            config.broker,
            tls=True,
            ca_file=self.pki / f"{ca}.pem",
            cert_file=self.pki / f"{cert}.pem" if cert else None,
            key_file=self.pki / f"{cert}.key" if cert else None,
        )
        return make_agent(dataclasses.replace(config, broker=broker))


@pytest.fixture
def rig(tmp_path: Path, pki: Path) -> Rig:
    guests = {g: FakeGuest(tmp_path / g, possible_cpus=4, boot_cpus=1) for g in ("a", "b")}
    port = free_port()
    configs = [
        GuestConfig(
            id=g,
            tls_common_name=f"guest-{g}",  # no listen address: TLS is the only way in
            backend="simulated",
            simulated_root=fake.root,
            cpus=CpuLimits(minimum=1, maximum=4),
            memory=MemoryLimits(minimum_bytes=1 * GiB, maximum_bytes=2 * GiB),
        )
        for g, fake in guests.items()
    ]
    base = broker_config(tmp_path, [], cpus=8, memory=8 * GiB)
    section: BrokerSection = dataclasses.replace(
        base.broker,
        tls_listen=f"127.0.0.1:{port}",
        tls_cert_file=pki / "server.pem",
        tls_key_file=pki / "server.key",
        tls_client_ca_file=pki / "ca.pem",
    )
    config = BrokerConfig(broker=section, pool=base.pool, guests=tuple(configs))
    return Rig(tmp_path, pki, f"localhost:{port}", guests, config)


def connected(agent: Agent) -> bool:
    return agent.link is not None and agent.link.connected


async def test_each_guest_is_bound_by_its_certificate(rig: Rig) -> None:
    # Agent b claims nothing: the certificate alone decides who it is.
    a = rig.agent("a", "a", "guest-a")
    b = rig.agent("b", "", "guest-b")
    async with running(await broker_serve(rig.config), a.run, b.run):
        await until(lambda: connected(a) and connected(b), 15, "both sessions over TLS")
        await until(
            lambda: rig.state("a")["connected"] and rig.state("b")["connected"],
            10,
            "the broker to see both guests",
        )
        assert a.link is not None and b.link is not None
        assert a.link.session_id == rig.state("a")["session"]
        assert b.link.session_id == rig.state("b")["session"]
        assert b.link.session_id.startswith("b-")


async def test_a_certificate_for_a_claiming_b_is_refused_and_logged(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    impostor = rig.agent("b", "b", "guest-a")
    async with running(await broker_serve(rig.config), impostor.run):
        link = impostor.link
        assert link is not None
        await until(lambda: link.reconnects >= 2, 15, "the impostor to be refused twice")
        assert not link.connected
        assert not rig.state("a")["connected"] and not rig.state("b")["connected"]
    broker_lines = [r.getMessage() for r in caplog.records if r.name == "vmtide.broker.server"]
    assert any(
        "claims to be guest 'b' but its client certificate is guest 'a''s" in line
        for line in broker_lines
    ), broker_lines
    agent_lines = [r.getMessage() for r in caplog.records if r.name == "vmtide.agent.session"]
    assert any(
        "broker refused this guest" in line and "client certificate is guest 'a''s" in line
        for line in agent_lines
    ), agent_lines


async def test_a_certificate_naming_no_guest_is_refused_and_logged(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    stranger = rig.agent("a", "", "stranger")
    async with running(await broker_serve(rig.config), stranger.run):
        link = stranger.link
        assert link is not None
        await until(lambda: link.reconnects >= 2, 15, "the stranger to be refused twice")
        assert not link.connected and not rig.state("a")["connected"]
    assert "common name guest-c is no configured guest's tls_common_name" in caplog.text


@pytest.mark.parametrize(
    ("cert", "ca"),
    [(None, "ca"), ("forged-a", "ca")],
    ids=["no client certificate", "certificate from another CA"],
)
async def test_a_client_without_a_valid_certificate_cannot_connect(
    rig: Rig, cert: str | None, ca: str
) -> None:
    agent = rig.agent("a", "a", cert, ca)
    async with running(await broker_serve(rig.config), agent.run):
        link = agent.link
        assert link is not None
        await until(lambda: link.reconnects >= 2, 15, "two failed attempts")
        assert not link.connected
        assert not rig.state("a")["connected"]
        # The handshake itself fails: no stream is ever opened, so not even a
        # Hello reaches the broker.
        await assert_handshake_refused(rig, cert, ca)


async def assert_handshake_refused(rig: Rig, cert: str | None, ca: str) -> None:
    credentials = grpc.ssl_channel_credentials(
        (rig.pki / f"{ca}.pem").read_bytes(),
        (rig.pki / f"{cert}.key").read_bytes() if cert else None,
        (rig.pki / f"{cert}.pem").read_bytes() if cert else None,
    )
    async with grpc.aio.secure_channel(rig.target, credentials) as channel:
        call = pb_grpc.BrokerStub(channel).Session(
            iter([pb.GuestMessage(seq=1, hello=pb.Hello(protocol_version=1, guest_id="a"))])
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in call:
                pass
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_a_plaintext_client_cannot_connect_to_the_tls_listener(rig: Rig) -> None:
    async with running(await broker_serve(rig.config)):
        await until((rig.tmp / "broker.json").exists, 10, "the broker to start")
        async with grpc.aio.insecure_channel(rig.target) as channel:
            call = pb_grpc.BrokerStub(channel).Session(
                iter([pb.GuestMessage(seq=1, hello=pb.Hello(protocol_version=1, guest_id="a"))])
            )
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                async for _ in call:
                    pass
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert not rig.state("a")["connected"]
