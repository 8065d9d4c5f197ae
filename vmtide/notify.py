"""sd_notify(3) without libsystemd: READY=1, WATCHDOG=1 and STATUS= over $NOTIFY_SOCKET."""

from __future__ import annotations

import contextlib
import os
import socket


class SystemdNotifier:
    """Sends state strings to systemd; does nothing when not run by systemd."""

    def __init__(self, address: str | None = None) -> None:
        address = address if address is not None else os.environ.get("NOTIFY_SOCKET", "")
        if address.startswith("@"):  # abstract namespace socket
            address = "\0" + address[1:]
        self._address = address
        self._socket: socket.socket | None = None
        if address:
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    @property
    def enabled(self) -> bool:
        return self._socket is not None

    def __call__(self, state: str) -> None:
        if self._socket is None:
            return
        # Never block the caller's loop: a full queue (PID 1 stalled) drops
        # this message (EAGAIN), and the next cycle sends another.
        with contextlib.suppress(OSError):  # systemd gone (shutdown): nothing to tell
            self._socket.sendto(state.encode(), socket.MSG_DONTWAIT, self._address)

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None
