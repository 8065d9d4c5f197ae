"""The broker's gRPC side: listeners, identity, and the Session stream.

A session is bound to a guest by how it arrived, never by what it claims: each
guest has its own listener (a TCP port or unix socket only that VM can reach),
or, on a shared TLS listener, its client certificate's common name, or, on the
shared vsock listener, the peer's CID, which the host's vhost-vsock vouches for.
A Hello claiming another identity is refused with PERMISSION_DENIED and logged.

gRPC never sees vsock (the PyPI grpcio has none): the broker accepts vsock
connections itself and pipes each, by the peer's CID, to that guest's own
listener, a unix socket in a private directory (`VsockListener`).
"""

from __future__ import annotations

import asyncio
import logging
import math
import shutil
import socket
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import grpc
import grpc.aio

from broker.config import BrokerConfig
from broker.core import Broker, ProtocolViolationError
from vmtide.relay import Relay, VsockTransport
from vmtide.v1 import broker_pb2 as pb
from vmtide.v1 import broker_pb2_grpc as pb_grpc

log = logging.getLogger("vmtide.broker.server")

# A guest that connects but says nothing is dropped after this long.
HELLO_TIMEOUT_SECONDS = 10.0
# Grace for in-flight messages on shutdown.
STOP_GRACE_SECONDS = 2.0
# Largest believable topology; anything bigger is a confused or hostile guest.
_MAX_CPUS = 8192
_MAX_BLOCKS = 1 << 20
_MIN_BLOCK_BYTES = 1 << 20  # arm64 and tests use small sections
_MAX_BLOCK_BYTES = 2 << 30
# The guest label of a vsock connection from a CID no guest has: one series,
# whatever the CID (the log names it).
UNKNOWN_CID_GUEST = ""
# Any VM on the host can dial the vsock port as often as it likes: a refused
# CID is logged at most this often, with how many refusals went unlogged.
_REFUSAL_LOG_SECONDS = 60.0


class IdentityError(Exception):
    pass


def check_hello(hello: pb.Hello) -> str | None:
    """Why a Hello cannot be accepted, or None."""
    if hello.protocol_version < 1:
        return f"protocol version {hello.protocol_version} is not supported (need >= 1)"
    cpus = hello.topology.cpus
    memory = hello.topology.memory
    if len(cpus.possible) > _MAX_CPUS or len(memory.blocks) > _MAX_BLOCKS:
        return "topology is implausibly large"
    if not set(cpus.online) <= set(cpus.present) <= set(cpus.possible):
        return "topology: online CPUs must be present and present CPUs possible"
    size = memory.block_size_bytes
    if size <= 0 or size & (size - 1):
        return f"topology: block size {size} is not a power of two"
    # Linux's memory blocks are 128 MiB to 2 GiB on x86-64 (sections of 128
    # MiB, larger on big guests); an absurd size would make every count absurd.
    if not _MIN_BLOCK_BYTES <= size <= _MAX_BLOCK_BYTES:
        return (
            f"topology: block size {size} is outside {_MIN_BLOCK_BYTES >> 20} MiB"
            f" to {_MAX_BLOCK_BYTES >> 20} MiB"
        )
    if len({b.index for b in memory.blocks}) != len(memory.blocks):
        return "topology: duplicate memory block index"
    return None


class GuestServicer(pb_grpc.BrokerServicer):
    """Serves sessions on one listener; `bound_guest` is that listener's guest
    (`how`: what the listener stands for, for messages), or None on the shared
    TLS listener, where the certificate decides (`names`: common name to
    guest)."""

    def __init__(
        self,
        broker: Broker,
        bound_guest: str | None,
        names: dict[str, str] | None = None,
        *,
        how: str = "listener",
    ) -> None:
        self.broker = broker
        self.bound_guest = bound_guest
        self.names = names or {}
        self.how = how

    @property
    def _how(self) -> str:
        return self.how if self.bound_guest is not None else "client certificate"

    def _identify(self, context: grpc.aio.ServicerContext[Any, Any]) -> str:
        if self.bound_guest is not None:
            return self.bound_guest
        auth = context.auth_context()
        names = [name.decode(errors="replace") for name in auth.get("x509_common_name", [])]
        for name in names:
            guest = self.names.get(name)
            if guest is not None:
                return guest
        raise IdentityError(
            f"the client certificate's common name {', '.join(names) or '(none)'} "
            "is no configured guest's tls_common_name"
        )

    async def Session(  # noqa: N802  (gRPC method name)
        self,
        request_iterator: AsyncIterator[pb.GuestMessage],
        context: grpc.aio.ServicerContext[pb.GuestMessage, pb.BrokerMessage],
    ) -> AsyncIterator[pb.BrokerMessage]:
        peer = context.peer()
        try:
            guest_id = self._identify(context)
        except IdentityError as err:
            log.warning("refused a session from %s: %s", peer, err)
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(err))
        try:
            first = await asyncio.wait_for(anext(aiter(request_iterator)), HELLO_TIMEOUT_SECONDS)
        except (TimeoutError, StopAsyncIteration):
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "the first message must be a hello"
            )
        if first.WhichOneof("body") != "hello":
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "the first message must be a hello"
            )
        hello = first.hello
        if hello.guest_id and hello.guest_id != guest_id:
            self.broker.metrics.failure(guest_id, "refused_identity")
            how = self._how
            log.warning(
                "refused a session from %s: it claims to be guest %r but its %s is guest %r's",
                peer,
                hello.guest_id,
                how,
                guest_id,
            )
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"this {how} is guest {guest_id!r}'s, not {hello.guest_id!r}'s",
            )
        problem = check_hello(hello) or await self.broker.check_plugged(guest_id, hello)
        if problem is not None:
            self.broker.metrics.failure(guest_id, "bad_message")
            log.warning("refused guest %s's hello: %s", guest_id, problem)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        guest, outbox = self.broker.open_session(guest_id, hello)
        reader = asyncio.create_task(self._read(guest_id, request_iterator, outbox))
        try:
            while (message := await outbox.get()) is not None:
                yield message
        finally:
            reader.cancel()
            self.broker.close_session(guest, outbox)

    async def _read(
        self,
        guest_id: str,
        requests: AsyncIterator[pb.GuestMessage],
        outbox: asyncio.Queue[pb.BrokerMessage | None],
    ) -> None:
        guest = self.broker.guests[guest_id]
        try:
            async for message in requests:
                try:
                    await self.broker.on_message(guest, message)
                except ProtocolViolationError as err:
                    self.broker.metrics.failure(guest_id, "bad_message")
                    log.warning("guest %s: refused a message: %s", guest_id, err)
        except (grpc.aio.AioRpcError, asyncio.CancelledError):
            pass
        except grpc.aio.BaseError as err:
            # The server stopping under an open stream (a broker shutdown):
            # expected, one line.
            log.info("guest %s: session ended: %s", guest_id, err)
        except Exception:
            log.exception("guest %s: session reader failed", guest_id)
        finally:
            outbox.put_nowait(None)


def _add_health(server: grpc.aio.Server) -> None:
    try:
        from grpc_health.v1 import health_pb2, health_pb2_grpc
        from grpc_health.v1._async import HealthServicer
    except ImportError:  # the broker extra is not installed: no health service
        return
    servicer = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    asyncio.get_running_loop().create_task(
        servicer.set("vmtide.v1.Broker", health_pb2.HealthCheckResponse.SERVING)
    )


class ListenError(Exception):
    pass


class Listener(Protocol):
    """What start_servers returns: a gRPC server, or the vsock listener."""

    async def stop(self, grace: float | None) -> None: ...


async def start_servers(
    broker: Broker, config: BrokerConfig, vsock: VsockTransport | None = None
) -> list[Listener]:
    servers: list[Listener] = []
    try:
        for guest in config.guests:
            if not guest.listen:
                continue
            server = grpc.aio.server()
            pb_grpc.add_BrokerServicer_to_server(GuestServicer(broker, guest.id), server)
            _add_health(server)
            try:
                port = server.add_insecure_port(guest.listen)
            except RuntimeError as err:
                raise ListenError(
                    f"guest {guest.id}: cannot listen on {guest.listen}: {err}"
                ) from err
            if port == 0 and not guest.listen.startswith("unix:"):
                raise ListenError(f"guest {guest.id}: cannot listen on {guest.listen}")
            await server.start()
            servers.append(server)
            log.info("guest %s: listening on %s", guest.id, guest.listen)
        section = config.broker
        if section.tls_listen:
            assert section.tls_cert_file and section.tls_key_file and section.tls_client_ca_file
            credentials = grpc.ssl_server_credentials(
                [(section.tls_key_file.read_bytes(), section.tls_cert_file.read_bytes())],
                root_certificates=section.tls_client_ca_file.read_bytes(),
                require_client_auth=True,
            )
            names = {g.tls_common_name: g.id for g in config.guests if g.tls_common_name}
            server = grpc.aio.server()
            pb_grpc.add_BrokerServicer_to_server(GuestServicer(broker, None, names), server)
            _add_health(server)
            server.add_secure_port(section.tls_listen, credentials)
            await server.start()
            servers.append(server)
            log.info("TLS listener on %s for %d guests", section.tls_listen, len(names))
        if section.vsock_port:
            servers.append(await VsockListener.start(broker, config, vsock or VsockTransport()))
    except BaseException:
        await stop_servers(servers)
        raise
    return servers


class VsockListener:
    """The shared vsock listener (`[broker] vsock_port`).

    A Python AF_VSOCK socket accepts; each connection is piped to the own
    gRPC listener of the guest whose `vsock_cid` is the peer's CID: a unix
    socket in a directory only the broker can enter (mkdtemp: mode 0700), so
    that listener is the guest's identity exactly as a per-guest `listen` is.
    A connection from any other CID is closed at once, logged and counted.
    """

    def __init__(self, relay: Relay, servers: Sequence[grpc.aio.Server], directory: Path) -> None:
        self._relay = relay
        self._servers = servers
        self._directory = directory

    @classmethod
    async def start(
        cls, broker: Broker, config: BrokerConfig, transport: VsockTransport
    ) -> VsockListener:
        port = config.broker.vsock_port
        try:
            listener = transport.listen(port)
        except OSError as err:
            raise ListenError(
                f"cannot listen on vsock port {port} (vsock_port): {err}; "
                "does this host have vsock (vhost_vsock loaded)?"
            ) from err
        directory = Path(tempfile.mkdtemp(prefix="vmtide-broker-vsock-"))
        servers: list[grpc.aio.Server] = []
        try:
            routes: dict[int, tuple[str, Path]] = {}
            for guest in config.guests:
                if not guest.vsock_cid:
                    continue
                # Named by CID, not guest id: short enough for sun_path (108).
                path = directory / f"{guest.vsock_cid}.sock"
                server = grpc.aio.server()
                servicer = GuestServicer(broker, guest.id, how="vsock CID")
                pb_grpc.add_BrokerServicer_to_server(servicer, server)
                _add_health(server)
                try:
                    server.add_insecure_port(f"unix:{path}")
                except RuntimeError as err:
                    raise ListenError(f"guest {guest.id}: cannot listen on {path}: {err}") from err
                await server.start()
                servers.append(server)
                routes[guest.vsock_cid] = (guest.id, path)
            route = _CidRoute(broker, transport, routes)
            relay = Relay(f"vsock port {port}", listener, route)
            relay.start()
        except BaseException:
            listener.close()
            await asyncio.gather(*(s.stop(None) for s in servers))
            shutil.rmtree(directory, ignore_errors=True)
            raise
        log.info("vsock listener on port %d for %d guests", port, len(routes))
        return cls(relay, servers, directory)

    async def stop(self, grace: float | None) -> None:
        # The servers first, so sessions end within their grace rather than
        # by their connections being cut; then whatever the relay still holds.
        await asyncio.gather(*(s.stop(grace) for s in self._servers))
        await self._relay.stop()
        shutil.rmtree(self._directory, ignore_errors=True)


class _CidRoute:
    """Where a vsock connection goes: its peer CID's guest listener, or nowhere."""

    def __init__(
        self, broker: Broker, transport: VsockTransport, routes: dict[int, tuple[str, Path]]
    ) -> None:
        self.broker = broker
        self.transport = transport
        self.routes = routes
        self._refused: dict[int | None, tuple[float, int]] = {}  # CID: (logged, unlogged)

    async def __call__(self, address: object) -> socket.socket | None:
        # The host's vhost-vsock drops a VM's packets whose source CID is not
        # the one QEMU gave it (drivers/vhost/vsock.c): a guest cannot connect
        # as another's, so the CID accept() reports is the guest's identity.
        cid = self.transport.peer_cid(address)
        route = self.routes.get(cid) if cid is not None else None
        if route is None:
            self.broker.metrics.failure(UNKNOWN_CID_GUEST, "refused_identity")
            self._log_refusal(cid, address)
            return None
        guest_id, path = route
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, str(path))
        except OSError as err:
            sock.close()
            log.warning("guest %s: cannot reach its vsock session listener: %s", guest_id, err)
            return None
        except BaseException:
            sock.close()
            raise
        log.debug("vsock CID %d: relayed to guest %s's listener", cid, guest_id)
        return sock

    def _log_refusal(self, cid: int | None, address: object) -> None:
        now = time.monotonic()
        logged, unlogged = self._refused.get(cid, (-math.inf, 0))
        if now - logged < _REFUSAL_LOG_SECONDS:
            self._refused[cid] = (logged, unlogged + 1)
            return
        if len(self._refused) > 256:  # bounded however many VMs try
            self._refused.clear()
        self._refused[cid] = (now, 0)
        log.warning(
            "refused a vsock connection from CID %s: no configured guest has this vsock_cid%s",
            cid if cid is not None else f"(none in {address!r})",
            f" ({unlogged} more since last logged)" if unlogged else "",
        )


async def stop_servers(servers: Sequence[Listener]) -> None:
    await asyncio.gather(*(s.stop(STOP_GRACE_SECONDS) for s in servers))
