"""The agent's side of the broker session: connect, stream, reconnect.

`BrokerLink` keeps one gRPC stream open to the broker. Each (re)connection
starts with a fresh Hello carrying the guest's true topology, so the broker
reconciles against what the kernel shows rather than what either side
remembers. Failures reconnect with exponential backoff and full jitter (so a
restarted broker is not hit by every guest at once); the backoff resets once a
Welcome arrives.

A "vsock:CID:PORT" target goes through an in-process relay (vmtide.relay):
gRPC dials a private unix socket and each of its connections is piped to a
fresh vsock connection, since the PyPI grpcio cannot dial vsock itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import logging
import random
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc
import grpc.aio

from agent.config import BrokerSection
from vmtide.relay import Relay, VsockTransport, parse_vsock_target, private_listener
from vmtide.v1 import broker_pb2 as pb
from vmtide.v1 import broker_pb2_grpc as pb_grpc

log = logging.getLogger("vmtide.agent.session")

# Detect a vanished broker (host restart, partition) within ~15 s even when
# nothing is being sent; gRPC's default is two hours.
_CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]
# Reports are dropped rather than queued without bound while the stream is
# slow: the next one supersedes them anyway.
_SEND_QUEUE_LIMIT = 256

MessageHandler = Callable[[pb.BrokerMessage], Awaitable[None]]


class LinkClosedError(Exception):
    """The session ended; the link will reconnect."""


def make_channel(config: BrokerSection) -> grpc.aio.Channel:
    """A channel to the broker over TCP or a unix socket, with optional TLS
    (vsock: a relay's unix socket, see BrokerLink)."""
    if not config.tls:
        return grpc.aio.insecure_channel(config.target, options=_CHANNEL_OPTIONS)
    root = _read(config.ca_file)
    key = _read(config.key_file)
    cert = _read(config.cert_file)
    credentials = grpc.ssl_channel_credentials(root, key, cert)
    return grpc.aio.secure_channel(config.target, credentials, options=_CHANNEL_OPTIONS)


def _read(path: Path | None) -> bytes | None:
    return path.read_bytes() if path is not None else None


class BrokerLink:
    def __init__(
        self,
        config: BrokerSection,
        hello: Callable[[], pb.Hello | Awaitable[pb.Hello]],
        on_message: MessageHandler,
        on_state: Callable[[bool], None] = lambda connected: None,
        channel_factory: Callable[[BrokerSection], grpc.aio.Channel] = make_channel,
        vsock: VsockTransport | None = None,
    ) -> None:
        self.config = config
        self._hello = hello
        self._on_message = on_message
        self._on_state = on_state
        self._channel_factory = channel_factory
        self._vsock = vsock or VsockTransport()
        self._outbox: asyncio.Queue[pb.GuestMessage | None] | None = None
        self._seq = 0
        self.connected = False
        self.session_id = ""
        self.reconnects = 0

    def send(self, message: pb.GuestMessage) -> bool:
        """Queue a message for the broker; False when no session is open."""
        if not self.connected or self._outbox is None:
            return False
        if self._outbox.qsize() >= _SEND_QUEUE_LIMIT and message.WhichOneof("body") == "report":
            return False
        self._seq += 1
        message.seq = self._seq
        self._outbox.put_nowait(message)
        return True

    async def run(self, stop: asyncio.Event) -> None:
        """Keep a session open until `stop` is set."""
        async with self._dialed() as dialed:
            await self._keep(stop, dialed)

    @contextlib.asynccontextmanager
    async def _dialed(self) -> AsyncIterator[BrokerSection]:
        """The config gRPC dials: the configured one, or over vsock the same
        with the target of a relay that lives as long as the link runs."""
        vsock = parse_vsock_target(self.config.target)
        if vsock is None:
            yield self.config
            return
        listener, local = private_listener()
        dialer = _VsockDialer(self.config.target, *vsock, self._vsock)
        relay = Relay(f"relay to {self.config.target}", listener, dialer)
        relay.start()
        log.debug("relaying %s through %s", self.config.target, local)
        try:
            yield dataclasses.replace(self.config, target=local)
        finally:
            await relay.stop()

    async def _keep(self, stop: asyncio.Event, dialed: BrokerSection) -> None:
        ceiling = self.config.reconnect_min_seconds
        while not stop.is_set():
            welcomed = False
            try:
                welcomed = await self._session(stop, dialed)
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError as err:
                if err.code() == grpc.StatusCode.PERMISSION_DENIED:
                    log.error("broker refused this guest: %s", err.details())
                else:
                    log.warning(
                        "broker session to %s ended: %s %s",
                        self.config.target,
                        err.code().name,
                        err.details() or "",
                    )
            except (LinkClosedError, OSError) as err:
                log.warning("broker session to %s ended: %s", self.config.target, err)
            finally:
                self._set_connected(False)
            if stop.is_set():
                break
            ceiling = self.config.reconnect_min_seconds if welcomed else ceiling
            delay = random.uniform(self.config.reconnect_min_seconds, ceiling)
            ceiling = min(ceiling * 2, self.config.reconnect_max_seconds)
            self.reconnects += 1
            log.info("reconnecting to broker in %.1f s", delay)
            await _wait(stop, delay)

    async def _session(self, stop: asyncio.Event, dialed: BrokerSection) -> bool:
        outbox: asyncio.Queue[pb.GuestMessage | None] = asyncio.Queue()
        self._outbox = outbox
        self._seq = 1
        # Built now, not at the last rescan: what was plugged while the session
        # was down is in it. The agent reads sysfs for it (a coroutine).
        hello = self._hello()
        if inspect.isawaitable(hello):
            hello = await hello
        first = pb.GuestMessage(seq=1, hello=hello)

        async def outgoing() -> AsyncIterator[pb.GuestMessage]:
            yield first
            while (message := await outbox.get()) is not None:
                yield message

        welcomed = False
        async with self._channel_factory(dialed) as channel:
            stub = pb_grpc.BrokerStub(channel)
            call = stub.Session(outgoing())
            stopper = asyncio.create_task(_cancel_on(stop, call))
            try:
                async for message in call:
                    if message.WhichOneof("body") == "welcome":
                        welcomed = True
                        self.session_id = message.welcome.session_id
                        self._set_connected(True)
                        log.info(
                            "broker session %s open as guest %r",
                            message.welcome.session_id,
                            message.welcome.guest_id,
                        )
                    elif not welcomed:
                        raise LinkClosedError("broker spoke before its welcome")
                    await self._on_message(message)
            except asyncio.CancelledError:
                if stop.is_set():  # our own cancel on shutdown
                    return welcomed
                raise
            finally:
                stopper.cancel()
                outbox.put_nowait(None)
                self._outbox = None
        if not stop.is_set():
            raise LinkClosedError("broker closed the session")
        return welcomed

    def _set_connected(self, connected: bool) -> None:
        if connected != self.connected:
            self.connected = connected
            self._on_state(connected)


class _VsockDialer:
    """Opens the vsock connection behind each connection gRPC makes to the
    relay. A failure closes that connection, so gRPC sees a failed connect as
    it would over TCP (UNAVAILABLE, and the link backs off); the cause is
    logged once, until a connect succeeds again."""

    def __init__(self, target: str, cid: int, port: int, transport: VsockTransport) -> None:
        self.target = target
        self.cid = cid
        self.port = port
        self._transport = transport
        self._failing = False

    async def __call__(self, address: object) -> socket.socket | None:
        try:
            sock = await self._transport.connect(self.cid, self.port)
        except OSError as err:  # TimeoutError included
            why = str(err) or type(err).__name__
            if self._failing:
                log.debug("still cannot reach the broker at %s: %s", self.target, why)
            else:
                log.warning("cannot reach the broker at %s: %s", self.target, why)
            self._failing = True
            return None
        if self._failing:
            log.info("reached the broker at %s again", self.target)
        self._failing = False
        return sock


async def _cancel_on(stop: asyncio.Event, call: grpc.aio.StreamStreamCall) -> None:  # type: ignore[type-arg]
    await stop.wait()
    call.cancel()


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
