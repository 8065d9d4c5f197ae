"""A Backend over a simulated guest (vmtide.fakesys), for tests, demos and benchmarks.

Plugging creates CPUs and memory blocks in the fake tree, as ACPI or virtio-mem
hot-add would in a real guest; unplugging removes only what the guest has
offlined, as ACPI eject does. An optional delay models the hypervisor's and the
guest kernel's time to plug. An optional balloon records what it is asked to hold
and reports it held at once, as a guest driver that keeps up would; the fake tree
does not change for it (ballooned memory stays online in a real guest too).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from agent.kernel import MEMORY_DIR
from broker.backend import BackendError, PlugState
from vmtide.fakesys import FakeGuest


class SimulatedBackend:
    def __init__(
        self,
        guest: FakeGuest,
        name: str = "simulated",
        plug_delay: float = 0.0,
        max_memory_bytes: int = 0,
        balloon: bool = False,
    ) -> None:
        self.guest = guest
        self.name = name
        self.plug_delay = plug_delay
        self._balloon = balloon
        self.balloon_bytes = 0
        # Every size the balloon was asked for, in order (for tests).
        self.balloon_requests: list[int] = []
        # Boot blocks carry a marker in the tree: counted from it rather than
        # from what is listed now, a restarted broker can still unplug the
        # blocks the last one plugged.
        self._boot_blocks = sum(
            (guest.sysfs / MEMORY_DIR / f"memory{i}" / ".boot").exists()
            for i in guest.block_indexes()
        )
        # Without a stated maximum, allow four times the boot memory.
        self._max_memory = max_memory_bytes or 4 * self._boot_blocks * guest.block_size

    @property
    def available(self) -> bool:
        return True

    @property
    def has_balloon(self) -> bool:
        return self._balloon

    async def state(self) -> PlugState:
        blocks = len(self.guest.block_indexes())
        return PlugState(
            cpus=self.guest.present_cpus(),
            memory_bytes=(blocks - self._boot_blocks) * self.guest.block_size,
            boot_memory_bytes=self._boot_blocks * self.guest.block_size,
            max_cpus=len(self.guest.possible_cpus()),
            max_memory_bytes=self._max_memory,
            balloon_bytes=self.balloon_bytes,
        )

    async def plug_cpus(self, count: int) -> list[int]:
        free = sorted(self.guest.possible_cpus() - self.guest.present_cpus())[: max(count, 0)]
        if free and self.plug_delay:
            await asyncio.sleep(self.plug_delay)
        for cpu in free:
            self.guest.plug_cpu(cpu)
        return free

    async def unplug_cpus(self, cpu_ids: Sequence[int], timeout: float) -> list[int]:
        removed = []
        online = self.guest.online_cpus()
        for cpu in cpu_ids:
            if cpu == 0:
                raise BackendError(
                    self.name, f"device_del cpu{cpu}", "the boot CPU cannot be unplugged"
                )
            if cpu in online or cpu not in self.guest.present_cpus():
                continue  # the guest did not offline it: ACPI eject would not complete
            self.guest.unplug_cpu(cpu)
            removed.append(cpu)
        return removed

    async def plug_memory(self, nbytes: int) -> int:
        state = await self.state()
        room = self._max_memory - state.boot_memory_bytes - state.memory_bytes
        count = max(0, min(nbytes, room)) // self.guest.block_size
        if count and self.plug_delay:
            await asyncio.sleep(self.plug_delay)
        return len(self.guest.plug_blocks(count)) * self.guest.block_size

    async def unplug_memory(
        self, blocks: Sequence[int], block_size: int, timeout: float
    ) -> list[int]:
        removed = []
        for index in blocks:
            if index < self._boot_blocks:
                continue  # boot memory is never unplugged
            try:
                self.guest.remove_block(index)
            except (ValueError, FileNotFoundError):
                continue  # still online, or already gone
            removed.append(index)
        return removed

    async def set_balloon(self, hold_bytes: int) -> None:
        if hold_bytes < 0:
            raise ValueError(f"hold_bytes must be >= 0, not {hold_bytes}")
        if not self._balloon:
            raise BackendError(self.name, "balloon", "No balloon device has been activated")
        self.balloon_requests.append(hold_bytes)
        self.balloon_bytes = hold_bytes

    async def close(self) -> None:
        return None
