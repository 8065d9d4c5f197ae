"""Brings the guest to a number of online CPUs and bytes of online memory.

Chooses which CPUs and blocks move, writes through the kernel interface, and
returns one result per item it touched. Growth takes standby resources in
index order; shrinking gives back the highest CPUs first (never cpu0, never a
CPU without an `online` file) and only blocks in ZONE_MOVABLE, whose pages can
migrate.
Nothing here ever takes the guest below the floor it is given.

The methods block (sysfs writes, memory migration): the daemon runs them in a
worker thread, one at a time.
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Callable, Collection

from agent.crashpoint import crash_point
from agent.kernel import BOOT_CPU, BlockState, ItemResult, Kernel, OnlineType, Outcome
from agent.topology import Topology

log = logging.getLogger("vmtide.agent.actuator")


class Actuator:
    def __init__(
        self,
        kernel: Kernel,
        online_type: OnlineType = OnlineType.MOVABLE,
        offline_timeout: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.kernel = kernel
        self.online_type = online_type
        self.offline_timeout = offline_timeout
        self._clock = clock

    def topology(self) -> Topology:
        return Topology.read(self.kernel)

    def online_cpus(self, target: int, only: Collection[int] | None = None) -> list[ItemResult]:
        """Online standby CPUs (of `only`, if given), lowest id first, until `target` are online."""
        # The CPUs alone, read once for the batch: each write still checks its
        # own CPU first, so an item onlined meanwhile is ALREADY, not DONE.
        cpus = self.kernel.cpus()
        results = []
        online = sum(c.online for c in cpus)
        standby = (c.id for c in cpus if not c.online)
        for cpu in sorted(c for c in standby if only is None or c in only):
            if online >= target:
                break
            crash_point("online.before-write")
            result = self.kernel.set_cpu(cpu, online=True)
            crash_point("online.after-write")
            results.append(result)
            online += result.ok
        return results

    def offline_cpus(self, target: int, floor: int) -> list[ItemResult]:
        """Offline CPUs, highest id first, down to max(target, floor)."""
        cpus = self.kernel.cpus()
        goal = max(target, floor, 1)
        online = sum(c.online for c in cpus)
        results = []
        for cpu in sorted(
            (c for c in cpus if c.online and c.hotpluggable and c.id != BOOT_CPU),
            key=lambda c: -c.id,
        ):
            if online <= goal:
                break
            crash_point("offline.before-write")
            result = self.kernel.set_cpu(cpu.id, online=False)
            crash_point("offline.after-write")
            results.append(result)
            online -= _gone(result)
        return results

    def online_memory(
        self, target_bytes: int, only: Collection[int] | None = None
    ) -> list[ItemResult]:
        """Online offline blocks (of `only`, if given), lowest index first, up to `target_bytes`."""
        # Only the blocks' states: zones and nodes are for offlining and the
        # broker, and an offline block's valid_zones makes the kernel walk it.
        block_size = self.kernel.block_size()
        states = self.kernel.memory_block_states()
        online = sum(state is BlockState.ONLINE for _, state in states) * block_size
        standby = (i for i, state in states if state is BlockState.OFFLINE)
        results = []
        for index in sorted(b for b in standby if only is None or b in only):
            if online >= target_bytes:
                break
            crash_point("online.before-write")
            result = self.kernel.online_block(index, self.online_type)
            if (
                result.outcome is Outcome.REFUSED
                and result.errno == errno.EINVAL
                and self.online_type is OnlineType.MOVABLE
            ):
                # Movable is not valid for this block (it sits between kernel
                # zones); take the kernel's choice rather than leave it unused.
                log.info("memory%d cannot be movable; onlining it in the kernel's zone", index)
                result = self.kernel.online_block(index, OnlineType.DEFAULT)
            crash_point("online.after-write")
            results.append(result)
            online += block_size * result.ok
        return results

    def offline_memory(
        self, target_bytes: int, floor_bytes: int, deadline: float | None = None
    ) -> list[ItemResult]:
        """Offline movable blocks, highest index first, down to max(target, floor).

        A refused block is reported and the next one tried, so one pinned page
        does not stop the release; nothing is tried after the deadline.
        """
        block_size = self.kernel.block_size()
        blocks = self.kernel.memory_blocks()
        goal = max(target_bytes, floor_bytes)
        online = sum(b.online for b in blocks) * block_size
        results = []
        for block in sorted((b for b in blocks if b.movable), key=lambda b: -b.index):
            if online - block_size < goal:
                break
            timeout = self.offline_timeout
            if deadline is not None:
                timeout = min(timeout, deadline - self._clock())
                if timeout <= 0:
                    break
            crash_point("offline.before-write")
            result = self.kernel.offline_block(block.index, timeout=timeout)
            crash_point("offline.after-write")
            results.append(result)
            online -= block_size * _gone(result)
        return results


def _gone(result: ItemResult) -> bool:
    """Whether an offline took the item out of what is online: done, already,
    or vanished (the host unplugged it meanwhile; counting it would offline
    one more than asked)."""
    return result.ok or result.outcome is Outcome.NOT_FOUND
