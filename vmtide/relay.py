"""Byte relays that carry gRPC over vsock, which the PyPI grpcio cannot speak.

grpcio's core has vsock only when built with GRPC_HAVE_VSOCK, and the PyPI
wheels are not: a "vsock:CID:PORT" target is resolved as a DNS name and binding
one fails with "VSOCK is not supported". Python's socket module has AF_VSOCK,
so each daemon lets gRPC use a private unix socket and pipes every connection
on it to an AF_VSOCK one: the agent dials the host for each connection gRPC
makes, the broker accepts and routes by the peer's CID (broker/server.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import secrets
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

log = logging.getLogger("vmtide.relay")

# Large enough that a bulk copy takes few system calls, small enough to bound
# what one connection buffers: sock_sendall finishes before the next read, so
# a slow reader holds back its writer instead of filling memory.
_CHUNK_BYTES = 64 << 10
# The kernel itself fails a vsock connect after 2 s (VSOCK_DEFAULT_CONNECT_TIMEOUT,
# net/vmw_vsock/af_vsock.c); this bounds transports that never answer at all.
CONNECT_TIMEOUT_SECONDS = 10.0
# A failing accept() (EMFILE: out of descriptors) stays readable; retry after
# this long rather than spin.
_ACCEPT_RETRY_SECONDS = 0.5
_VSOCK_TARGET = re.compile(r"vsock:(\d+):(\d+)")
_VSOCK_LIMIT = 1 << 32  # CIDs and ports are 32-bit

# What the relay pipes an accepted connection to, given the peer's address as
# accept() returned it; None refuses the connection (it is closed at once).
Upstream = Callable[[object], Awaitable[socket.socket | None]]


def parse_vsock_target(target: str) -> tuple[int, int] | None:
    """(CID, port) of a "vsock:CID:PORT" target; None for any other scheme."""
    if not target.startswith("vsock:"):
        return None
    match = _VSOCK_TARGET.fullmatch(target)
    if match is None or not all(int(n) < _VSOCK_LIMIT for n in match.groups()):
        raise ValueError(f"{target!r} is not vsock:CID:PORT (two 32-bit numbers)")
    return int(match[1]), int(match[2])


def vsock_socket() -> socket.socket:
    """A non-blocking AF_VSOCK stream socket; OSError where the kernel has none."""
    sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    sock.setblocking(False)
    return sock


async def connect_vsock(cid: int, port: int) -> socket.socket:
    """A vsock connection to CID:PORT. The kernel stamps our own CID on it."""
    sock = vsock_socket()
    try:
        async with asyncio.timeout(CONNECT_TIMEOUT_SECONDS):
            await asyncio.get_running_loop().sock_connect(sock, (cid, port))
    except BaseException:
        sock.close()
        raise
    return sock


def listen_vsock(port: int) -> socket.socket:
    """A socket listening on `port` of every CID of this host (VMADDR_CID_ANY)."""
    sock = vsock_socket()
    try:
        sock.bind((socket.VMADDR_CID_ANY, port))
        sock.listen()
    except BaseException:
        sock.close()
        raise
    return sock


def vsock_peer_cid(address: object) -> int | None:
    """The CID in an AF_VSOCK peer address, (CID, port) as accept() returns it."""
    match address:
        case (int(cid), int(_)):
            return cid
    return None


@dataclass(frozen=True)
class VsockTransport:
    """How the daemons make vsock sockets; tests stand unix sockets in for them
    (this machine's kernel need not have vsock at all)."""

    connect: Callable[[int, int], Awaitable[socket.socket]] = connect_vsock
    listen: Callable[[int], socket.socket] = listen_vsock
    # The peer's CID from accept()'s address. The host kernel (vhost-vsock)
    # writes it, never the guest: it is what identifies a guest.
    peer_cid: Callable[[object], int | None] = vsock_peer_cid


def private_listener() -> tuple[socket.socket, str]:
    """A unix socket for gRPC to dial, in the abstract namespace (nothing on
    disk to clean up), and its gRPC target. The random name keeps another
    process from binding it first."""
    name = f"vmtide-{os.getpid()}-{secrets.token_hex(8)}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind("\0" + name)
        sock.listen()
    except BaseException:
        sock.close()
        raise
    return sock, f"unix-abstract:{name}"


async def pipe(a: socket.socket, b: socket.socket) -> None:
    """Copy bytes both ways between two connected non-blocking sockets until
    both directions have ended, then close both.

    The end of one side's stream is passed on as a half-close (SHUT_WR), so a
    peer that has finished sending still gets its answer. An error in either
    direction ends both and is raised; cancellation ends both too.
    """
    copies = [
        asyncio.create_task(_copy(a, b), name="vmtide-relay-copy"),
        asyncio.create_task(_copy(b, a), name="vmtide-relay-copy"),
    ]
    try:
        done, _ = await asyncio.wait(copies, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            if (err := task.exception()) is not None:
                raise err
    finally:
        for task in copies:
            task.cancel()
        await asyncio.gather(*copies, return_exceptions=True)
        a.close()
        b.close()


async def _copy(source: socket.socket, sink: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    while data := await loop.sock_recv(source, _CHUNK_BYTES):
        await loop.sock_sendall(sink, data)
    # ENOTCONN: the sink is gone already, which its own direction reports.
    with contextlib.suppress(OSError):
        sink.shutdown(socket.SHUT_WR)


class Relay:
    """Accepts connections on `listener` and pipes each to the socket
    `upstream` opens for it. Every connection is a tracked task: stop() ends
    them all and closes every socket."""

    def __init__(self, name: str, listener: socket.socket, upstream: Upstream) -> None:
        listener.setblocking(False)
        self.name = name
        self._listener = listener
        self._upstream = upstream
        self._connections: set[asyncio.Task[None]] = set()
        self._retry: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def connections(self) -> int:
        return len(self._connections)

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._listener.fileno(), self._accept)

    async def stop(self) -> None:
        if self._loop is not None and self._listener.fileno() >= 0:
            self._loop.remove_reader(self._listener.fileno())
        if self._retry is not None:
            self._retry.cancel()
        self._listener.close()
        tasks = list(self._connections)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _accept(self) -> None:
        # A reader callback rather than an accept task: nothing accepted can
        # be lost to a cancellation between accept() and its task starting.
        assert self._loop is not None
        while True:
            try:
                conn, address = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as err:
                log.warning("%s: accept failed: %s", self.name, err)
                self._loop.remove_reader(self._listener.fileno())
                self._retry = self._loop.call_later(_ACCEPT_RETRY_SECONDS, self._resume)
                return
            conn.setblocking(False)
            task = self._loop.create_task(
                self._serve(conn, address), name=f"vmtide-relay-{self.name}"
            )
            self._connections.add(task)
            task.add_done_callback(self._connections.discard)

    def _resume(self) -> None:
        assert self._loop is not None
        self._retry = None
        if self._listener.fileno() >= 0:
            self._loop.add_reader(self._listener.fileno(), self._accept)

    async def _serve(self, conn: socket.socket, address: object) -> None:
        try:
            upstream = await self._upstream(address)
            if upstream is not None:
                await pipe(conn, upstream)
        except OSError as err:
            # Once per connection: pipe() raises only the first error.
            log.info("%s: connection ended: %s", self.name, str(err) or type(err).__name__)
        except Exception:
            log.exception("%s: relaying a connection failed", self.name)
        finally:
            conn.close()
