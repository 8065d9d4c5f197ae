"""The broker's gRPC side: listeners, identity, and the Session stream.

A session is bound to a guest by how it arrived, never by what it claims: each
guest has its own listener (a TCP port or unix socket only that VM can reach),
or, on a shared TLS listener, its client certificate's common name, or, on the
shared vsock listener, the peer's CID, which the host's vhost-vsock vouches for.
A Hello claiming another identity is refused with PERMISSION_DENIED and logged.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator
from typing import Any

import grpc
import grpc.aio

from broker.config import BrokerConfig
from broker.core import Broker, ProtocolViolationError
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
# VMADDR_CID_ANY: the vsock listener takes connections to any of the host's CIDs.
_VSOCK_CID_ANY = (1 << 32) - 1
# gRPC names a vsock peer "vsock:CID:PORT" (src/core/lib/address_utils/
# sockaddr_utils.cc, grpc_sockaddr_to_uri).
_VSOCK_PEER = re.compile(r"vsock:(\d+):(\d+)")


def vsock_peer_cid(peer: str) -> int | None:
    """The CID of a vsock peer as gRPC's `context.peer()` names it, or None."""
    match = _VSOCK_PEER.fullmatch(peer)
    return int(match.group(1)) if match else None


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
    if len({b.index for b in memory.blocks}) != len(memory.blocks):
        return "topology: duplicate memory block index"
    return None


class GuestServicer(pb_grpc.BrokerServicer):
    """Serves sessions on one listener; `bound_guest` is that listener's guest,
    or None on a shared listener: the TLS one, where the certificate decides
    (`names`: common name to guest), or the vsock one, where the peer's CID
    does (`cids`: CID to guest)."""

    def __init__(
        self,
        broker: Broker,
        bound_guest: str | None,
        names: dict[str, str] | None = None,
        cids: dict[int, str] | None = None,
    ) -> None:
        self.broker = broker
        self.bound_guest = bound_guest
        self.names = names or {}
        self.cids = cids

    @property
    def _how(self) -> str:
        if self.bound_guest is not None:
            return "listener"
        return "vsock CID" if self.cids is not None else "client certificate"

    def _identify(self, context: grpc.aio.ServicerContext[Any, Any]) -> str:
        if self.bound_guest is not None:
            return self.bound_guest
        if self.cids is not None:
            # The host's vhost-vsock drops a VM's packets whose source CID is
            # not the one QEMU gave it: a guest cannot connect as another's.
            cid = vsock_peer_cid(context.peer())
            guest = self.cids.get(cid) if cid is not None else None
            if guest is None:
                raise IdentityError(
                    f"vsock CID {cid if cid is not None else '(not a vsock peer)'} "
                    "is no configured guest's vsock_cid"
                )
            return guest
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


async def start_servers(broker: Broker, config: BrokerConfig) -> list[grpc.aio.Server]:
    servers = []
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
            servers.append(await _start_vsock(broker, config))
    except BaseException:
        await stop_servers(servers)
        raise
    return servers


async def _start_vsock(broker: Broker, config: BrokerConfig) -> grpc.aio.Server:
    cids = {g.vsock_cid: g.id for g in config.guests if g.vsock_cid}
    address = f"vsock:{_VSOCK_CID_ANY}:{config.broker.vsock_port}"
    server = grpc.aio.server()
    pb_grpc.add_BrokerServicer_to_server(GuestServicer(broker, None, cids=cids), server)
    _add_health(server)
    try:
        server.add_insecure_port(address)
    except RuntimeError as err:
        # gRPC's core has vsock only where it was built with it
        # (GRPC_HAVE_VSOCK); the PyPI wheels are not, and say "VSOCK is not
        # supported" on stderr.
        raise ListenError(
            f"cannot listen on {address} (vsock_port): {err}; does this host have vsock "
            "(vhost_vsock loaded) and this grpcio vsock support?"
        ) from err
    await server.start()
    log.info("vsock listener on port %d for %d guests", config.broker.vsock_port, len(cids))
    return server


async def stop_servers(servers: list[grpc.aio.Server]) -> None:
    await asyncio.gather(*(s.stop(STOP_GRACE_SECONDS) for s in servers))
