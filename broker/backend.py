"""What the broker needs from a hypervisor: plug and unplug vCPUs and memory for one guest.

The broker's policy code talks only to `Backend`; `broker.qmp_backend.QmpBackend`
implements it for QEMU, and tests may substitute a fake. Nothing here imports
QEMU code.

Identities:

- CPUs are guest logical CPU ids (N in /sys/devices/system/cpu/cpuN), the ids the
  agent reports. How an implementation maps them to hypervisor slots is its own
  business and documented there.
- Memory is counted in bytes of hot-pluggable memory beyond boot memory. To take
  memory back, the broker passes the guest memory block indexes (N in
  /sys/devices/system/memory/memoryN) that the agent reported offline, with the
  guest's block size; only memory the guest gave up is ever unplugged.

Failures: a hypervisor that refuses a command raises `BackendError`; a control
channel that is gone raises `BackendUnavailable`. Steps done before an error stay
done: call `state()` to learn where things stand. An unplug that the guest does not
complete in time is not an error: the call returns what was removed. An unplug the
guest refuses outright (an ACPI eject answered with a failure) raises
`EjectRefused`, which carries what was removed all the same.

Ballooning: memory the guest will not give back (blocks it refuses to offline, or
memory that is not hot-unpluggable) can be squeezed with a balloon device, if the
guest has one. Ballooned memory stays plugged: the broker still counts it as the
guest's, because only the guest's driver says how much it gave (docs/broker.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


class BackendError(Exception):
    """The hypervisor refused or failed a request for one guest.

    `guest` names the guest, `command` what was asked (e.g. "device_add
    driver=pc-dimm id=vmtide-dimm0"), `detail` what the hypervisor said, and
    `error_class` its error class when it gave one (QMP's "GenericError", ...).
    """

    def __init__(
        self, guest: str, command: str, detail: str, *, error_class: str | None = None
    ) -> None:
        said = f"{error_class}: {detail}" if error_class else detail
        super().__init__(f"guest {guest}: {command}: {said}")
        self.guest = guest
        self.command = command
        self.detail = detail
        self.error_class = error_class


class BackendUnavailable(BackendError):  # noqa: N818 -- the interface's name, as agreed
    """The control channel (e.g. the QMP socket) cannot be reached or was closed.

    The guest may be gone or restarting; nothing is known about commands that were
    in flight. Reconnect (or give up on the guest) and call `state()`.
    """


class EjectRefused(BackendError):  # noqa: N818 -- named like BackendUnavailable
    """The guest refused to eject a device it was asked to give up.

    On x86 the guest's ACPI code answers an eject with an _OST status; a failure
    status (`status`, e.g. 0x82 "device busy", for `source` 0x103 "eject
    processing") means it will not eject, so there is nothing to wait for.
    `removed` is what the same call did remove (CPU ids or block indexes). Status
    and source are None when the hypervisor said only that the guest refused.
    """

    def __init__(
        self,
        guest: str,
        command: str,
        detail: str,
        *,
        status: int | None,
        source: int | None,
        removed: Sequence[int] = (),
    ) -> None:
        super().__init__(guest, command, detail)
        self.status = status
        self.source = source
        self.removed = sorted(removed)


@dataclass(frozen=True)
class PlugState:
    """What the hypervisor has plugged into the guest right now."""

    # Guest logical CPU ids plugged in (present), boot CPUs included.
    cpus: frozenset[int]
    # Hot-pluggable memory plugged beyond boot memory, as the hypervisor counts it
    # (for virtio-mem: what the guest driver actually plugged, not the request).
    memory_bytes: int
    boot_memory_bytes: int
    # Most vCPUs the guest can have (plugged or not).
    max_cpus: int
    # Most total memory (boot + hot-pluggable) this backend can reach with its
    # memory mechanism.
    max_memory_bytes: int
    # Memory the guest's balloon holds now, as its driver reports it; 0 without
    # a balloon device.
    balloon_bytes: int = 0


class Backend(Protocol):
    """Plug and unplug resources of one guest.

    Every method is a coroutine bounded by a deadline; none waits for the guest
    for ever.
    """

    @property
    def available(self) -> bool:
        """Whether the control channel is up; while it is not, calls raise
        BackendUnavailable."""
        ...

    @property
    def has_balloon(self) -> bool:
        """Whether the guest has a balloon device `set_balloon` can drive."""
        ...

    async def state(self) -> PlugState: ...

    async def plug_cpus(self, count: int) -> list[int]:
        """Plug up to `count` more vCPUs (fewer when the slots run out).

        Returns the new guest CPU ids, ascending. The guest sees them present and
        offline; the agent onlines them.
        """
        ...

    async def unplug_cpus(self, cpu_ids: Sequence[int], timeout: float) -> list[int]:
        """Ask the guest to eject these CPUs (already offlined by the agent).

        Waits up to `timeout` seconds for the hypervisor to confirm each removal and
        returns the ids confirmed removed; the others stay plugged.
        """
        ...

    async def plug_memory(self, nbytes: int) -> int:
        """Plug up to `nbytes` more memory, in steps; returns the bytes actually added."""
        ...

    async def unplug_memory(
        self, blocks: Sequence[int], block_size: int, timeout: float
    ) -> list[int]:
        """Remove memory behind guest blocks the agent reported offline.

        `blocks` are guest memory block indexes, `block_size` the guest's
        block_size_bytes. Waits up to `timeout` seconds and returns the blocks whose
        memory was removed; blocks that are not hot-pluggable memory (boot memory)
        are never removed, and are left for ballooning.
        """
        ...

    async def set_balloon(self, hold_bytes: int) -> None:
        """Ask the guest's balloon to hold `hold_bytes` of its memory (0 deflates it).

        Returns once the hypervisor took the new size; the guest's driver follows at
        its own pace (`PlugState.balloon_bytes`). Raises BackendError without a
        balloon device.
        """
        ...

    async def close(self) -> None:
        """Release the control channel; idempotent, never raises."""
        ...
