"""vmtide/notify.py against real AF_UNIX datagram sockets, as systemd's manager listens.

systemd passes $NOTIFY_SOCKET: a filesystem path, or "@name" for a socket in the
abstract namespace (sd_notify(3)). Each test binds such a socket, points the
notifier at it and reads what arrived, with the sender's credentials, which is
how systemd tells the main process's messages from others (NotifyAccess=main).
"""

from __future__ import annotations

import os
import socket
import struct
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmtide.notify import SystemdNotifier

# Long enough for a datagram already sent to be queued; nothing here waits on a peer.
RECV_TIMEOUT_SECONDS = 2.0
DATAGRAM_BYTES = 4096
# struct ucred: pid, uid, gid (unix(7), SCM_CREDENTIALS).
UCRED = struct.Struct("iII")


def listener(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    sock.bind(address)
    sock.settimeout(RECV_TIMEOUT_SECONDS)
    return sock


def receive(sock: socket.socket) -> tuple[bytes, int]:
    """One datagram and the sender's pid."""
    data, ancillary, _flags, _address = sock.recvmsg(DATAGRAM_BYTES, socket.CMSG_SPACE(UCRED.size))
    pids = [
        UCRED.unpack(payload[: UCRED.size])[0]
        for level, kind, payload in ancillary
        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS
    ]
    assert len(pids) == 1, ancillary
    return data, pids[0]


def nothing_queued(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        sock.recv(DATAGRAM_BYTES)
    except BlockingIOError:
        return True
    finally:
        sock.settimeout(RECV_TIMEOUT_SECONDS)
    return False


def open_fds() -> set[int]:
    """This process's open descriptors (not the one listdir used for the listing)."""
    listed = {int(name) for name in os.listdir("/proc/self/fd")}
    return {fd for fd in listed if is_open(fd)}


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


@pytest.fixture
def path_socket(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    # sun_path holds 108 bytes: pytest's tmp_path is well below that.
    address = str(tmp_path / "notify")
    sock = listener(address)
    yield address, sock
    sock.close()


@pytest.fixture
def abstract_socket() -> Iterator[tuple[str, socket.socket]]:
    name = f"vmtide-test-notify-{uuid.uuid4().hex}"
    sock = listener("\0" + name)
    yield "@" + name, sock
    sock.close()


@pytest.mark.parametrize("kind", ["path_socket", "abstract_socket"])
def test_ready_and_watchdog_reach_the_socket_in_notify_socket(
    kind: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    address, sock = request.getfixturevalue(kind)
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    notifier = SystemdNotifier()
    try:
        assert notifier.enabled
        notifier("READY=1")
        notifier("WATCHDOG=1")
        notifier("STATUS=guest «web-1»: 4 CPUs\nWATCHDOG=1")  # UTF-8, two lines
    finally:
        notifier.close()
    # One datagram per call, in order, each from this process.
    assert receive(sock) == (b"READY=1", os.getpid())
    assert receive(sock) == (b"WATCHDOG=1", os.getpid())
    assert receive(sock) == ("STATUS=guest «web-1»: 4 CPUs\nWATCHDOG=1".encode(), os.getpid())
    assert nothing_queued(sock)


def test_an_explicit_address_wins_over_the_environment(
    path_socket: tuple[str, socket.socket],
    abstract_socket: tuple[str, socket.socket],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    (path, path_sock), (abstract, abstract_sock) = path_socket, abstract_socket
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    notifier = SystemdNotifier(abstract)
    try:
        notifier("READY=1")
    finally:
        notifier.close()
    assert receive(abstract_sock) == (b"READY=1", os.getpid())
    assert nothing_queued(path_sock)


@pytest.mark.parametrize("value", [None, ""], ids=["unset", "empty"])
def test_without_notify_socket_it_does_nothing(
    value: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    if value is None:
        monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    else:
        monkeypatch.setenv("NOTIFY_SOCKET", value)
    before = open_fds()
    notifier = SystemdNotifier()
    assert not notifier.enabled
    notifier("READY=1")
    notifier("WATCHDOG=1")
    notifier.close()
    # Not run by systemd: no socket was even opened.
    assert open_fds() == before


def test_a_vanished_manager_is_not_an_error(
    path_socket: tuple[str, socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    address, sock = path_socket
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    notifier = SystemdNotifier()
    try:
        sock.close()  # systemd going down: nobody listens any more
        notifier("WATCHDOG=1")
        os.unlink(address)
        notifier("WATCHDOG=1")
    finally:
        notifier.close()


def test_close_releases_the_socket_and_later_calls_do_nothing(
    path_socket: tuple[str, socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    address, sock = path_socket
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    before = open_fds()
    notifier = SystemdNotifier()
    assert len(open_fds() - before) == 1
    notifier.close()
    assert open_fds() == before and not notifier.enabled
    notifier("WATCHDOG=1")
    notifier.close()  # twice is fine
    assert nothing_queued(sock)


def test_the_socket_is_not_inherited_by_children(
    path_socket: tuple[str, socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", path_socket[0])
    before = open_fds()
    notifier = SystemdNotifier()
    try:
        (fd,) = open_fds() - before
        # A child the agent runs must not be able to speak for it (NotifyAccess=main).
        assert not os.get_inheritable(fd)
    finally:
        notifier.close()
