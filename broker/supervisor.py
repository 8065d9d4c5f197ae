"""Keep one guest's hypervisor connection up while QEMU comes and goes.

`SupervisedBackend` wraps a backend whose control channel can drop (QMP: QEMU not
started yet, restarted, killed). While the channel is down every call fails at
once with BackendUnavailable, so one broken VM costs the others nothing; `run()`
reconnects with capped exponential backoff and tells the broker, which reads what
is plugged again before it hot-plugs anything (a restarted QEMU has only its boot
CPUs and memory).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol, TypeVar

from broker.backend import Backend, BackendError, BackendUnavailable, PlugState

log = logging.getLogger("vmtide.broker")

_T = TypeVar("_T")

# QEMU makes its QMP socket a few hundred ms after it starts: try again soon...
RECONNECT_MIN_SECONDS = 0.5
# ...but a VM that stays down costs one connection attempt per this long.
RECONNECT_MAX_SECONDS = 30.0


class Connectable(Backend, Protocol):
    """A backend with a control channel to open again after it dropped."""

    async def connect(self) -> None: ...

    async def wait_closed(self) -> None: ...


class SupervisedBackend:
    """A `Backend` over `inner` that survives its control channel going away.

    `where` names the channel in log lines and errors (the QMP socket's path).
    """

    def __init__(
        self,
        inner: Connectable,
        guest: str,
        where: str,
        *,
        min_delay: float = RECONNECT_MIN_SECONDS,
        max_delay: float = RECONNECT_MAX_SECONDS,
    ) -> None:
        if not 0 < min_delay <= max_delay:
            raise ValueError(f"need 0 < min_delay <= max_delay, not {min_delay}, {max_delay}")
        self._inner = inner
        self._guest = guest
        self._where = where
        self._min_delay = min_delay
        self._max_delay = max_delay
        self._up = False
        # Why the channel is down ("" while it is up), for logs and status.
        self.error = "not connected yet"

    @property
    def inner(self) -> Connectable:
        return self._inner

    @property
    def available(self) -> bool:
        return self._up

    @property
    def has_balloon(self) -> bool:
        return self._up and self._inner.has_balloon

    # ------------------------------------------------------------- connection

    async def connect(self) -> bool:
        """One attempt; False (and the reason in `error`) when it failed."""
        try:
            await self._inner.connect()
        except BackendError as err:
            # Unreachable, or a QEMU set up otherwise than the config says (no
            # such virtio-mem device): either way this guest only, and QEMU may
            # be restarted the right way, so keep trying.
            self._mark_down(str(err))
            return False
        self._up = True
        self.error = ""
        return True

    def _mark_down(self, error: str) -> None:
        if self._up or error != self.error:
            log.error(
                "guest %s: hypervisor unreachable: %s; no hot-plug for this guest until "
                "%s answers (retrying, at most every %.0f s)",
                self._guest,
                error,
                self._where,
                self._max_delay,
            )
        else:
            log.debug("guest %s: still unreachable: %s", self._guest, error)
        self._up = False
        self.error = error

    async def run(
        self,
        stop: asyncio.Event,
        on_up: Callable[[], Awaitable[None]],
        on_down: Callable[[str], None],
    ) -> None:
        """Reconnect whenever the channel is down, until `stop`.

        `on_down(reason)` is called once per outage (including one at start);
        `on_up()` after each reconnection, before anything else may use it.
        """
        delay = self._min_delay
        reported = False
        while not stop.is_set():
            if self._up:
                reported = False
                await _first_of(self._inner.wait_closed(), stop)
                if stop.is_set():
                    break
                if self._up:  # QEMU hung up, not a failed call (that marks it down)
                    self._mark_down(f"QMP socket {self._where} closed (QEMU exited or restarted)")
                # The client keeps a dead session until told to let it go.
                await self._inner.close()
                delay = self._min_delay
                continue
            if not reported:
                on_down(self.error)
                reported = True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            if stop.is_set():
                break
            if await self.connect():
                log.info("guest %s: hypervisor reachable again on %s", self._guest, self._where)
                try:
                    await on_up()
                except BackendError as err:
                    # What is plugged could not be read: the books cannot be
                    # trusted, so the channel counts as down and is retried.
                    self._mark_down(f"reading what is plugged: {err}")
                    await self._inner.close()
                    delay = min(delay * 2, self._max_delay)
                except Exception:  # a bug there must not end the reconnecting
                    log.exception("guest %s: after reconnecting", self._guest)
                else:
                    delay = self._min_delay
            else:
                delay = min(delay * 2, self._max_delay)

    async def _call(self, what: str, call: Callable[[], Awaitable[_T]]) -> _T:
        if not self._up:
            raise BackendUnavailable(self._guest, what, f"{self._where}: {self.error}")
        try:
            return await call()
        except BackendUnavailable as err:
            self._mark_down(str(err))
            await self._inner.close()  # so that run() notices and reconnects
            raise

    # ------------------------------------------------------------- Backend

    async def state(self) -> PlugState:
        return await self._call("state", self._inner.state)

    async def plug_cpus(self, count: int) -> list[int]:
        return await self._call("plug CPUs", lambda: self._inner.plug_cpus(count))

    async def unplug_cpus(self, cpu_ids: Sequence[int], timeout: float) -> list[int]:
        return await self._call("unplug CPUs", lambda: self._inner.unplug_cpus(cpu_ids, timeout))

    async def plug_memory(self, nbytes: int) -> int:
        return await self._call("plug memory", lambda: self._inner.plug_memory(nbytes))

    async def unplug_memory(
        self, blocks: Sequence[int], block_size: int, timeout: float
    ) -> list[int]:
        return await self._call(
            "unplug memory", lambda: self._inner.unplug_memory(blocks, block_size, timeout)
        )

    async def set_balloon(self, hold_bytes: int) -> None:
        await self._call("balloon", lambda: self._inner.set_balloon(hold_bytes))

    async def close(self) -> None:
        self._up = False
        self.error = "closed"
        await self._inner.close()


async def _first_of(waiting: Awaitable[None], stop: asyncio.Event) -> None:
    """Wait for `waiting` or `stop`, whichever comes first; cancel the other."""
    tasks = {asyncio.ensure_future(waiting), asyncio.ensure_future(stop.wait())}
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
