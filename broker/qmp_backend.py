"""`Backend` for a QEMU guest, over QMP (qemu.qmp's asyncio `QMPClient`).

Verified against qemu-system-x86 7.2 (q35, TCG); see tests/test_qmp_backend.py.

vCPUs. `query-hotpluggable-cpus` lists the slots (with `-smp 1,maxcpus=4`: socket 0,
cores 0..3); a vCPU is plugged with `device_add` of the slot's type and props, id
`<prefix>-cpu<N>`. Guest CPU ids are QEMU's cpu-index (from `query-cpus-fast`).
On x86 the cpu-index is the slot's position in APIC-id order, and Linux gives a
hot-added CPU the lowest free logical id (kernels >= 6.9 number every possible
CPU in APIC order up front), so the two agree as long as slots are filled
lowest-first, which this backend does. The cpu-index is read back after plugging,
never assumed. Unplug is `device_del` then DEVICE_DELETED once the guest has
ejected the CPU; a guest that refuses answers with ACPI_DEVICE_OST and a failure
status instead, which ends the wait at once (`EjectRefused`). QEMU refuses CPU
unplug outright ("acpi: device unplug request for not supported device type")
until the guest's ACPI code has switched CPU hotplug out of legacy mode, which a
booted Linux does and firmware does not.

Memory, one mechanism per guest, chosen at connect time (`MemoryMechanism`):

- virtio-mem: `qom-set requested-size` on the device, then wait for
  MEMORY_DEVICE_SIZE_CHANGE until `size` (what the guest driver actually plugged)
  follows. Without a guest driver `size` never moves: at the deadline the request
  is set back to the current size, so the device never grows or shrinks later
  behind the broker's back, and the call reports what really happened.
- pc-dimm: `object-add memory-backend-ram` + `device_add pc-dimm`; unplug with
  `device_del` and DEVICE_DELETED, after which the RAM backend is deleted too.
  A DIMM is only unplugged when every guest block it spans was reported offline;
  block index = guest physical address // guest block size.

Memory is added in steps (`QmpBackendOptions.memory_step_bytes`): a guest that
hot-adds several GiB at once allocates and initialises the struct pages for all of
it in one go, and stalls.

`set_balloon()` drives a virtio-balloon device, for memory that cannot be unplugged.

QEMU serves one client per QMP socket: give the broker its own `-qmp` socket.
The connection may drop (QEMU restarted): `connect()` again, and it reads the
machine afresh; `broker.supervisor` does that with backoff. QEMU's pid (the
socket's peer credentials) tells a restarted QEMU from the same one, whose
per-process limits (TCG's vCPU budget, the replug cooldown) carry over.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import re
import socket
import struct
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

from qemu.qmp import (
    EventListener,
    ExecInterruptedError,
    ExecuteError,
    Message,
    QMPClient,
    QMPError,
    Runstate,
)
from qemu.qmp.protocol import ConnectError, StateError

from broker.backend import BackendError, BackendUnavailable, EjectRefused, PlugState

log = logging.getLogger(__name__)

_T = TypeVar("_T")
_K = TypeVar("_K")

MiB = 1 << 20

# Hot-adding memory makes the guest allocate struct pages (~1.6 % of the range)
# and online it in one go; 512 MiB steps keep each pause short.
DEFAULT_MEMORY_STEP_BYTES = 512 * MiB
# Linux/x86-64 memory block size for guests under 64 GiB: the guest onlines and
# offlines memory in these, so smaller DIMMs would be unusable in part.
DEFAULT_MEMORY_ALIGN_BYTES = 128 * MiB
# QEMU serves one client per QMP socket and leaves a second one waiting for a
# greeting that never comes; without a bound, connect() would hang for ever.
DEFAULT_CONNECT_TIMEOUT_SECONDS = 5.0
# Every command used here is answered at once by QEMU's main loop; no answer
# means that loop is stuck, which the broker must treat as an unreachable guest.
COMMAND_TIMEOUT_SECONDS = 10.0
# Per memory step: a virtio-mem driver plugs 512 MiB in well under this even
# under TCG; a guest without the driver never answers, and this bounds the cost
# of finding that out.
DEFAULT_SIZE_CHANGE_TIMEOUT_SECONDS = 15.0

# QEMU's rule for device and object ids (qemu/id.c id_wellformed).
_QEMU_ID = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*")
# Topology properties in the order QEMU sorts possible CPUs (by APIC id on x86).
_TOPOLOGY_KEYS = ("socket-id", "die-id", "cluster-id", "core-id", "thread-id")
# Devices given an id live here in the QOM tree; DEVICE_DELETED carries this path.
_PERIPHERAL = "/machine/peripheral"
_OBJECTS = "/objects"

_OST_EVENT = "ACPI_DEVICE_OST"
_UNPLUG_EVENTS = ("DEVICE_DELETED", "DEVICE_UNPLUG_GUEST_ERROR", _OST_EVENT)
# ACPI 5.0 section 6.3.5 (_OST): the source events of an eject, and its status
# codes. Linux answers an eject it cannot do with source 0x03 and 0x82 (busy) or
# 0x01; one it is doing with 0x84, then source 0x103 and 0 once done.
_OST_EJECT_SOURCES = {0x03: "eject request", 0x103: "eject processing"}
_OST_SUCCESS = 0x00
_OST_EJECT_IN_PROGRESS = 0x84
_OST_STATUS = {
    0x00: "success",
    0x01: "non-specific failure",
    0x02: "unrecognized notify code",
    0x80: "device ejection not supported by OSPM",
    0x81: "device in use by an application",
    0x82: "device busy",
    0x83: "ejection dependency is busy or not supported",
    0x84: "ejection in progress",
}
# QEMU 7.2 under TCG aborted ("double free or corruption") when a vCPU slot
# was plugged again 0.15 s after its unplug completed: the old vCPU thread was
# still being torn down. Give a slot this long before reusing it.
CPU_REPLUG_COOLDOWN_SECONDS = 3.0
# How often to look at QEMU's inventory while an unplug finishes.
_INVENTORY_POLL_SECONDS = 0.05


class MemoryMechanism(enum.StrEnum):
    AUTO = "auto"  # virtio-mem if the guest has such a device, else pc-dimm
    VIRTIO_MEM = "virtio-mem"
    DIMM = "dimm"
    NONE = "none"  # resolved only: neither exists, plug_memory raises


@dataclass(frozen=True)
class QmpBackendOptions:
    memory_step_bytes: int = DEFAULT_MEMORY_STEP_BYTES
    # Requests are rounded up to this; memory_step_bytes must be a multiple of it.
    memory_align_bytes: int = DEFAULT_MEMORY_ALIGN_BYTES
    memory: MemoryMechanism = MemoryMechanism.AUTO
    # The virtio-mem device to drive; None picks the first one with an id.
    virtio_mem_id: str | None = None
    # Names what this backend creates: <prefix>-cpuN, <prefix>-dimmN, <prefix>-ramN.
    id_prefix: str = "vmtide"
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT_SECONDS
    size_change_timeout: float = DEFAULT_SIZE_CHANGE_TIMEOUT_SECONDS

    def __post_init__(self) -> None:
        if self.memory_align_bytes <= 0:
            raise ValueError(f"memory_align_bytes must be > 0, not {self.memory_align_bytes}")
        if self.memory_step_bytes <= 0 or self.memory_step_bytes % self.memory_align_bytes:
            raise ValueError(
                f"memory_step_bytes ({self.memory_step_bytes}) must be a positive multiple"
                f" of memory_align_bytes ({self.memory_align_bytes})"
            )
        if self.memory is MemoryMechanism.NONE:
            raise ValueError("memory=none is a result of detection, not a choice")
        if not _QEMU_ID.fullmatch(self.id_prefix):
            raise ValueError(f"id_prefix {self.id_prefix!r} is not a valid QEMU id")
        if self.connect_timeout <= 0 or self.size_change_timeout <= 0:
            raise ValueError("timeouts must be > 0")


# ----------------------------------------------------------------- QMP replies


@dataclass(frozen=True)
class CpuSlot:
    """One entry of query-hotpluggable-cpus."""

    type: str
    # Passed back to device_add unchanged, as QEMU documents.
    props: tuple[tuple[str, int], ...]
    vcpus: int
    qom_path: str | None  # None: the slot is free

    def topology(self) -> tuple[int, ...]:
        values = dict(self.props)
        return tuple(values.get(key, 0) for key in _TOPOLOGY_KEYS)


@dataclass(frozen=True)
class Dimm:
    """A pc-dimm from query-memory-devices."""

    id: str | None
    addr: int
    size: int
    memdev: str  # QOM path of the RAM backend, e.g. /objects/vmtide-ram0

    def blocks(self, block_size: int) -> range:
        """Guest memory blocks this DIMM's memory lies in."""
        return range(self.addr // block_size, -(-(self.addr + self.size) // block_size))


@dataclass(frozen=True)
class VirtioMem:
    """A virtio-mem device from query-memory-devices."""

    id: str | None
    addr: int
    size: int  # plugged by the guest driver
    requested_size: int
    max_size: int
    block_size: int


@dataclass(frozen=True)
class MachineMemory:
    """The machine's `memory` property: -m size,slots=,maxmem=."""

    boot: int
    slots: int
    max: int


def _obj(value: object, what: str) -> Mapping[str, object]:
    if not isinstance(value, Mapping):
        raise ValueError(f"{what}: expected an object, got {value!r}")
    return value


def _list(value: object, what: str) -> list[object]:
    if not isinstance(value, list):
        raise ValueError(f"{what}: expected a list, got {value!r}")
    return value


def _int(obj: Mapping[str, object], key: str) -> int:
    value = obj.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{key}: expected an integer, got {value!r}")
    return value


def _opt_str(obj: Mapping[str, object], key: str) -> str | None:
    value = obj.get(key)
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{key}: expected a string, got {value!r}")
    return value


def _str(obj: Mapping[str, object], key: str) -> str:
    value = _opt_str(obj, key)
    if value is None:
        raise ValueError(f"{key}: missing")
    return value


def parse_cpu_slots(reply: object) -> list[CpuSlot]:
    slots = []
    for item in _list(reply, "query-hotpluggable-cpus"):
        entry = _obj(item, "slot")
        props = _obj(entry.get("props"), "props")
        slots.append(
            CpuSlot(
                type=_str(entry, "type"),
                props=tuple((key, _int(props, key)) for key in props),
                vcpus=_int(entry, "vcpus-count"),
                qom_path=_opt_str(entry, "qom-path"),
            )
        )
    return sorted(slots, key=CpuSlot.topology)


def parse_cpu_indexes(reply: object) -> dict[str, int]:
    """query-cpus-fast as {qom-path: cpu-index}."""
    cpus = {}
    for item in _list(reply, "query-cpus-fast"):
        entry = _obj(item, "cpu")
        cpus[_str(entry, "qom-path")] = _int(entry, "cpu-index")
    return cpus


@dataclass(frozen=True)
class MemoryInventory:
    """query-memory-devices, as far as this backend cares."""

    dimms: tuple[Dimm, ...]
    virtio_mems: tuple[VirtioMem, ...]
    # DIMM slots taken (nvdimms too) and device-memory space taken (a
    # virtio-mem device reserves its max-size): QEMU's limits for the next DIMM.
    slots_used: int
    region_used: int

    @property
    def plugged(self) -> int:
        """Memory the guest has from these devices (virtio-mem: its current size)."""
        return sum(d.size for d in self.dimms) + sum(v.size for v in self.virtio_mems)


def parse_memory_devices(reply: object) -> MemoryInventory:
    dimms = []
    virtio_mems = []
    slots_used = region_used = 0
    for item in _list(reply, "query-memory-devices"):
        entry = _obj(item, "memory device")
        data = _obj(entry.get("data"), "data")
        kind = entry.get("type")
        region_used += _int(data, "max-size") if "max-size" in data else _int(data, "size")
        if kind in ("dimm", "nvdimm"):
            slots_used += 1
        if kind == "dimm":
            dimms.append(
                Dimm(
                    id=_opt_str(data, "id"),
                    addr=_int(data, "addr"),
                    size=_int(data, "size"),
                    memdev=_str(data, "memdev"),
                )
            )
        elif kind == "virtio-mem":
            virtio_mems.append(
                VirtioMem(
                    id=_opt_str(data, "id"),
                    addr=_int(data, "memaddr"),
                    size=_int(data, "size"),
                    requested_size=_int(data, "requested-size"),
                    max_size=_int(data, "max-size"),
                    block_size=_int(data, "block-size"),
                )
            )
    return MemoryInventory(tuple(dimms), tuple(virtio_mems), slots_used, region_used)


@dataclass(frozen=True)
class OstInfo:
    """ACPI_DEVICE_OST's `info` (qapi/acpi.json ACPIOSTInfo): the guest's _OST answer."""

    device: str | None  # the device's id, when it has one
    slot: str
    slot_type: str  # "CPU" or "DIMM"
    source: int
    status: int

    def describe(self) -> str:
        source = _OST_EJECT_SOURCES.get(self.source, "event")
        status = _OST_STATUS.get(self.status, "unknown status")
        return f"_OST status {self.status:#x} ({status}) for source {self.source:#x} ({source})"


def parse_ost(data: object) -> OstInfo:
    info = _obj(_obj(data, "ACPI_DEVICE_OST data").get("info"), "info")
    return OstInfo(
        device=_opt_str(info, "device"),
        slot=_str(info, "slot"),
        slot_type=_str(info, "slot-type"),
        source=_int(info, "source"),
        status=_int(info, "status"),
    )


@dataclass
class _Deletion(Generic[_K]):
    """What came of device_del for a set of devices (keyed as the caller likes)."""

    deleted: list[_K]
    # (QOM path, the guest's _OST answer; None for DEVICE_UNPLUG_GUEST_ERROR)
    refused: list[tuple[str, OstInfo | None]]


# ----------------------------------------------------------------- pure decisions


def eject_refused(info: OstInfo) -> bool:
    """Whether an _OST answer says the guest will not eject the device.

    Success and "in progress" are not refusals: DEVICE_DELETED follows (or not,
    and the deadline ends the wait). Any other status of an eject is.
    """
    return info.source in _OST_EJECT_SOURCES and info.status not in (
        _OST_SUCCESS,
        _OST_EJECT_IN_PROGRESS,
    )


def balloon_target(ram_bytes: int, hold_bytes: int) -> int:
    """QMP `balloon value` for a balloon holding `hold_bytes` of `ram_bytes`.

    QEMU's value is the size the guest should be left with, counted against boot
    memory plus plugged memory devices (virtio-balloon.c virtio_balloon_to_target,
    get_current_ram_size), not the balloon's own size.
    """
    if not 0 <= hold_bytes < ram_bytes:
        raise ValueError(f"a balloon cannot hold {hold_bytes} of {ram_bytes} bytes")
    return ram_bytes - hold_bytes


def free_cpu_slots(slots: Sequence[CpuSlot], count: int) -> list[tuple[int, CpuSlot]]:
    """The free slots to fill for up to `count` vCPUs, lowest topology first.

    Returns (position in topology order, slot); the position names the device.
    """
    chosen = []
    remaining = count
    for position, slot in enumerate(sorted(slots, key=CpuSlot.topology)):
        if slot.qom_path is None and 0 < slot.vcpus <= remaining:
            chosen.append((position, slot))
            remaining -= slot.vcpus
    return chosen


def dimms_fully_offline(
    dimms: Iterable[Dimm], blocks: Iterable[int], block_size: int
) -> list[Dimm]:
    """The DIMMs every one of whose guest blocks is in `blocks`."""
    offline = set(blocks)
    return [d for d in dimms if d.size > 0 and offline.issuperset(d.blocks(block_size))]


def blocks_within(blocks: Iterable[int], block_size: int, start: int, length: int) -> list[int]:
    """The blocks lying entirely inside [start, start + length), ascending."""
    return sorted(
        b for b in set(blocks) if start <= b * block_size and (b + 1) * block_size <= start + length
    )


def _align_up(value: int, align: int) -> int:
    return -(-value // align) * align


def _align_down(value: int, align: int) -> int:
    return value // align * align


def _no_event(_: Message) -> bool:
    return False


def _peer_pid(sock: socket.socket) -> int | None:
    """The pid of the process at the other end of a unix socket (None if unknown:
    0 when it lives in a pid namespace this one cannot see)."""
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    pid: int = struct.unpack("3i", creds)[0]
    return pid or None


def _describe(command: str, args: Mapping[str, object] | None) -> str:
    if not args:
        return command
    return " ".join([command, *(f"{key}={value}" for key, value in args.items())])


# ----------------------------------------------------------------- the backend


class QmpBackend:
    """`Backend` for one QEMU guest, through its QMP unix socket.

    Call `connect()` first (again after `BackendUnavailable`, once QEMU is back).
    Operations that change the guest are serialized; each is bounded by a deadline.
    """

    def __init__(
        self, socket_path: str | Path, guest: str, options: QmpBackendOptions | None = None
    ) -> None:
        self._path = str(socket_path)
        self._guest = guest
        self._options = options or QmpBackendOptions()
        self._qmp = QMPClient(f"vmtide-{guest}")
        # The client's default listener queues and records every event for ever;
        # nobody reads it here (each wait has its own listener), so let it take none.
        self._qmp.events.event_filter = _no_event
        self._lock = asyncio.Lock()
        self._cpu_unplugged_at: dict[str, float] = {}  # device id -> loop time
        self._machine = MachineMemory(boot=0, slots=0, max=0)
        self._mechanism = MemoryMechanism.NONE
        self._virtio_mem_id: str | None = None
        self._has_balloon = False
        # The QEMU process on the other end (SO_PEERCRED), None when unknown.
        self._qemu_pid: int | None = None
        # Under TCG QEMU gives every vCPU it realizes a TCG context and never
        # takes one back (tcg_register_thread asserts n < tcg_max_ctxs, and
        # there are maxcpus of them): after unplugs, the maxcpus-th hot-plug
        # over the process's life aborts QEMU. So count them down and refuse
        # before that. None under KVM, where vCPUs come and go freely.
        self._tcg_vcpus_left: int | None = None

    @property
    def memory_mechanism(self) -> MemoryMechanism:
        """The mechanism chosen at connect time (NONE before)."""
        return self._mechanism

    @property
    def virtio_mem_id(self) -> str | None:
        return self._virtio_mem_id

    @property
    def has_balloon(self) -> bool:
        """Whether QEMU had an active balloon device at connect time."""
        return self._has_balloon

    @property
    def available(self) -> bool:
        """Whether the QMP connection is up."""
        return self._qmp.runstate is Runstate.RUNNING

    @property
    def qemu_pid(self) -> int | None:
        """QEMU's pid from the socket's peer credentials (None if unknown)."""
        return self._qemu_pid

    # ------------------------------------------------------------- connection

    async def connect(self) -> None:
        """Connect and find out which memory mechanisms the guest has.

        Everything about the machine is read afresh, so connecting again after
        QEMU restarted sees the new process as it is.
        """
        if self._qmp.runstate is not Runstate.IDLE:
            await self.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            async with asyncio.timeout(self._options.connect_timeout):
                await asyncio.get_running_loop().sock_connect(sock, self._path)
                pid = _peer_pid(sock)
                await self._qmp.connect(sock)
        except TimeoutError as err:
            sock.close()
            raise BackendUnavailable(
                self._guest,
                "connect",
                f"no QMP greeting on {self._path} within {self._options.connect_timeout} s"
                " (is another client connected to this socket?)",
            ) from err
        except (OSError, ConnectError) as err:
            sock.close()
            cause = err.exc if isinstance(err, ConnectError) else err
            raise BackendUnavailable(
                self._guest, "connect", f"cannot reach QMP socket {self._path}: {cause}"
            ) from err
        if pid is not None and self._qemu_pid is not None and pid != self._qemu_pid:
            # A new QEMU: what the old one could not do any more, this one can.
            log.info("guest %s: QEMU restarted (pid %d, was %d)", self._guest, pid, self._qemu_pid)
            self._tcg_vcpus_left = None
            self._cpu_unplugged_at.clear()
        self._qemu_pid = pid if pid is not None else self._qemu_pid
        try:
            await self._discover()
        except BaseException:
            await self.close()
            raise

    async def wait_closed(self) -> None:
        """Return once the QMP connection is down (QEMU exited, or `close()`)."""
        await self._connection_lost()

    async def close(self) -> None:
        """Disconnect; idempotent, never raises."""
        if self._qmp.runstate is Runstate.IDLE:
            return
        try:
            await self._qmp.disconnect()
        except Exception as err:  # the reader's cause of death, e.g. EOFError
            log.debug("guest %s: QMP disconnect: %r", self._guest, err)

    async def _discover(self) -> None:
        memory = _obj(
            await self._execute("qom-get", {"path": "/machine", "property": "memory"}),
            "memory",
        )
        self._machine = MachineMemory(
            boot=_int(memory, "size"), slots=_int(memory, "slots"), max=_int(memory, "max-size")
        )
        self._mechanism, self._virtio_mem_id = self._choose_memory(await self._memory())
        try:
            await self._execute("query-balloon")
            self._has_balloon = True
        except BackendError as err:
            if err.error_class != "DeviceNotActive":
                raise
            self._has_balloon = False
        await self._count_tcg_vcpus()
        log.info(
            "guest %s: QMP %s: memory by %s%s, balloon %s",
            self._guest,
            self._path,
            self._mechanism,
            f" ({self._virtio_mem_id})" if self._virtio_mem_id else "",
            "yes" if self._has_balloon else "no",
        )

    async def _count_tcg_vcpus(self) -> None:
        kvm = _obj(await self._execute("query-kvm"), "query-kvm")
        if kvm.get("enabled") is True:
            self._tcg_vcpus_left = None
            return
        slots = await self._query("query-hotpluggable-cpus", parse_cpu_slots)
        # Realized so far: at least those plugged now (unplugs before this
        # connection are unknown). Never more than an earlier count said.
        left = sum(s.vcpus for s in slots if s.qom_path is None)
        if self._tcg_vcpus_left is not None:
            left = min(left, self._tcg_vcpus_left)
        self._tcg_vcpus_left = left
        log.info("guest %s: QEMU runs it under TCG: %d more vCPU hot-plugs", self._guest, left)

    def _choose_memory(self, memory: MemoryInventory) -> tuple[MemoryMechanism, str | None]:
        wanted = self._options.memory
        ids = [v.id for v in memory.virtio_mems if v.id is not None]
        if wanted is MemoryMechanism.VIRTIO_MEM or (
            wanted is MemoryMechanism.AUTO and (ids or self._options.virtio_mem_id)
        ):
            want_id = self._options.virtio_mem_id
            if want_id is None and ids:
                return MemoryMechanism.VIRTIO_MEM, ids[0]
            if want_id is not None and want_id in ids:
                return MemoryMechanism.VIRTIO_MEM, want_id
            raise BackendError(
                self._guest,
                "query-memory-devices",
                f"no virtio-mem device {want_id or 'with an id'} (found: {ids or 'none'})",
            )
        can_dimm = self._machine.slots > 0 and self._machine.max > self._machine.boot
        if can_dimm:
            return MemoryMechanism.DIMM, None
        if wanted is MemoryMechanism.DIMM:
            raise BackendError(
                self._guest,
                "qom-get /machine memory",
                f"no DIMM slots or room for them (slots={self._machine.slots},"
                f" maxmem={self._machine.max}, boot={self._machine.boot})",
            )
        return MemoryMechanism.NONE, None

    # ------------------------------------------------------------- QMP plumbing

    async def _execute(self, command: str, args: Mapping[str, object] | None = None) -> object:
        what = _describe(command, args)
        if self._qmp.runstate is not Runstate.RUNNING:
            raise BackendUnavailable(self._guest, what, f"not connected to {self._path}")
        try:
            async with asyncio.timeout(COMMAND_TIMEOUT_SECONDS):
                return await self._qmp.execute(command, args)
        except ExecuteError as err:
            raise BackendError(self._guest, what, str(err), error_class=err.error_class) from err
        except TimeoutError as err:
            raise BackendUnavailable(
                self._guest, what, f"no reply on {self._path} within {COMMAND_TIMEOUT_SECONDS} s"
            ) from err
        except (ExecInterruptedError, StateError, OSError, EOFError) as err:
            raise BackendUnavailable(
                self._guest, what, f"QMP socket {self._path} closed ({err!r})"
            ) from err
        except QMPError as err:
            raise BackendError(self._guest, what, f"QMP protocol error: {err}") from err

    async def _query(self, command: str, parse: Callable[[object], _T]) -> _T:
        reply = await self._execute(command)
        try:
            return parse(reply)
        except ValueError as err:
            raise BackendError(self._guest, command, f"unexpected reply: {err}") from err

    async def _memory(self) -> MemoryInventory:
        return await self._query("query-memory-devices", parse_memory_devices)

    async def _virtio_mem(self) -> VirtioMem:
        for device in (await self._memory()).virtio_mems:
            if device.id == self._virtio_mem_id:
                return device
        raise BackendError(
            self._guest, "query-memory-devices", f"virtio-mem device {self._virtio_mem_id} is gone"
        )

    async def _connection_lost(self) -> None:
        while self._qmp.runstate is Runstate.RUNNING:
            await self._qmp.runstate_changed()

    async def _next_event(self, listener: EventListener, deadline: float) -> Message | None:
        """The listener's next event; None at the deadline; BackendUnavailable if QMP drops."""
        if not listener.empty():
            return await listener.get()
        remaining = deadline - asyncio.get_running_loop().time()
        if remaining <= 0:
            return None
        get = asyncio.ensure_future(listener.get())
        lost = asyncio.ensure_future(self._connection_lost())
        try:
            await asyncio.wait({get, lost}, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (get, lost):
                task.cancel()
            await asyncio.gather(get, lost, return_exceptions=True)
        if get.done() and not get.cancelled():
            return get.result()
        if lost.done() and not lost.cancelled():
            raise BackendUnavailable(
                self._guest, "waiting for events", f"QMP socket {self._path} closed"
            )
        return None

    async def _wait(
        self,
        listener: EventListener,
        deadline: float,
        finished: Callable[[], bool],
        on_event: Callable[[Message], Awaitable[None]],
    ) -> bool:
        """Feed events to `on_event` until `finished()` or the deadline; returns finished()."""
        while not finished():
            event = await self._next_event(listener, deadline)
            if event is None:
                return False
            await on_event(event)
        return True

    def _deadline(self, timeout: float) -> float:
        return asyncio.get_running_loop().time() + timeout

    # ------------------------------------------------------------- state

    async def state(self) -> PlugState:
        cpus = await self._query("query-cpus-fast", parse_cpu_indexes)
        try:
            slots = await self._query("query-hotpluggable-cpus", parse_cpu_slots)
            max_cpus = sum(slot.vcpus for slot in slots)
        except BackendUnavailable:
            raise
        except BackendError:
            max_cpus = len(cpus)  # the machine has no CPU hotplug at all
        memory = await self._memory()
        balloon = 0
        if self._has_balloon:
            # `actual` is what the guest's driver left it, of boot plus plugged memory.
            actual = _int(_obj(await self._execute("query-balloon"), "query-balloon"), "actual")
            balloon = max(0, self._machine.boot + memory.plugged - actual)
        return PlugState(
            cpus=frozenset(cpus.values()),
            memory_bytes=memory.plugged,
            boot_memory_bytes=self._machine.boot,
            max_cpus=max_cpus,
            max_memory_bytes=self._machine.boot + memory.plugged + self._headroom(memory),
            balloon_bytes=balloon,
        )

    def _headroom(self, memory: MemoryInventory) -> int:
        """Bytes plug_memory could still add."""
        if self._mechanism is MemoryMechanism.VIRTIO_MEM:
            for device in memory.virtio_mems:
                if device.id == self._virtio_mem_id:
                    return device.max_size - device.size
            return 0
        if self._mechanism is MemoryMechanism.DIMM:
            return self._dimm_room(memory)
        return 0

    def _dimm_room(self, memory: MemoryInventory) -> int:
        """Bytes of DIMMs that fit: QEMU caps all memory devices at maxmem - boot."""
        space = self._machine.max - self._machine.boot - memory.region_used
        slots = self._machine.slots - memory.slots_used
        room = min(space, slots * self._options.memory_step_bytes)
        return max(0, _align_down(room, self._options.memory_align_bytes))

    # ------------------------------------------------------------- vCPUs

    async def plug_cpus(self, count: int) -> list[int]:
        if count < 0:
            raise ValueError(f"count must be >= 0, not {count}")
        if count == 0:
            return []
        async with self._lock:
            slots = await self._query("query-hotpluggable-cpus", parse_cpu_slots)
            chosen = free_cpu_slots(slots, count)
            left = self._tcg_vcpus_left
            if left is not None and sum(slot.vcpus for _, slot in chosen) > left:
                chosen = free_cpu_slots(slots, left)
                if not chosen:
                    raise BackendError(
                        self._guest,
                        "device_add (vCPU)",
                        "QEMU runs this guest under TCG, which realizes at most maxcpus "
                        "vCPUs over its life and aborts on the next one; none is left",
                    )
            paths = []
            for position, slot in chosen:
                device_id = f"{self._options.id_prefix}-cpu{position}"
                await self._replug_cooldown(device_id)
                await self._execute(
                    "device_add", {"driver": slot.type, "id": device_id, **dict(slot.props)}
                )
                if self._tcg_vcpus_left is not None:
                    self._tcg_vcpus_left -= slot.vcpus
                paths.append(f"{_PERIPHERAL}/{device_id}")
            if not paths:
                return []
            indexes = await self._query("query-cpus-fast", parse_cpu_indexes)
            missing = [path for path in paths if path not in indexes]
            if missing:
                raise BackendError(
                    self._guest, "query-cpus-fast", f"plugged CPUs not listed: {missing}"
                )
            added = sorted(indexes[path] for path in paths)
            log.info("guest %s: plugged CPUs %s", self._guest, added)
            return added

    async def _replug_cooldown(self, device_id: str) -> None:
        """Wait until a vCPU slot unplugged a moment ago may be plugged again."""
        unplugged_at = self._cpu_unplugged_at.pop(device_id, None)
        if unplugged_at is not None:
            wait = unplugged_at + CPU_REPLUG_COOLDOWN_SECONDS - asyncio.get_running_loop().time()
            if wait > 0:
                log.info(
                    "guest %s: %s was unplugged just now; waiting %.1f s",
                    self._guest,
                    device_id,
                    wait,
                )
                await asyncio.sleep(wait)

    async def unplug_cpus(self, cpu_ids: Sequence[int], timeout: float) -> list[int]:
        wanted = sorted(set(cpu_ids))
        if not wanted:
            return []
        deadline = self._deadline(timeout)
        async with self._lock:
            by_index = {
                index: path
                for path, index in (await self._query("query-cpus-fast", parse_cpu_indexes)).items()
            }
            unknown = [cpu for cpu in wanted if cpu not in by_index]
            if unknown:
                raise BackendError(
                    self._guest,
                    f"unplug CPUs {wanted}",
                    f"not plugged: {unknown} (plugged: {sorted(by_index)})",
                )
            # device_del takes a QOM path as well as an id; so do the events.
            deletion = await self._delete_devices({by_index[cpu]: cpu for cpu in wanted}, deadline)
            removed = deletion.deleted
            # Trust QEMU's inventory over the events: a CPU is removed once
            # query-cpus-fast no longer lists it (a moment after its child's event).
            loop = asyncio.get_running_loop()
            while True:
                still = set((await self._query("query-cpus-fast", parse_cpu_indexes)).values())
                if not still & set(removed) or loop.time() >= deadline:
                    break
                await asyncio.sleep(_INVENTORY_POLL_SECONDS)
            removed = [cpu for cpu in removed if cpu not in still]
            now = asyncio.get_running_loop().time()
            for cpu in removed:
                self._cpu_unplugged_at[by_index[cpu].rsplit("/", 1)[-1]] = now
            log.info(
                "guest %s: CPUs %s removed, %s still plugged",
                self._guest,
                removed,
                sorted(set(wanted) - set(removed)),
            )
            if deletion.refused:
                raise self._refusal(f"unplug CPUs {wanted}", deletion, removed)
            return sorted(removed)

    def _refusal(
        self, command: str, deletion: _Deletion[_K], removed: Sequence[int]
    ) -> EjectRefused:
        reasons = "; ".join(
            f"{path}: {info.describe() if info else 'DEVICE_UNPLUG_GUEST_ERROR'}"
            for path, info in deletion.refused
        )
        first = next((info for _, info in deletion.refused if info is not None), None)
        return EjectRefused(
            self._guest,
            command,
            f"the guest refused to eject {reasons}",
            status=first.status if first else None,
            source=first.source if first else None,
            removed=removed,
        )

    async def _delete_devices(self, paths: Mapping[str, _K], deadline: float) -> _Deletion[_K]:
        """device_del each path; returns those DEVICE_DELETED confirmed and those
        the guest refused to eject.

        The wait ends once every device is deleted or refused, or at the deadline.
        """
        pending = set(paths)
        result: _Deletion[_K] = _Deletion([], [])

        def ost(event: Message) -> None:
            try:
                info = parse_ost(event.get("data"))
            except ValueError as err:
                log.warning("guest %s: unexpected %s: %s", self._guest, _OST_EVENT, err)
                return
            # The event names the device by id; ours live in /machine/peripheral.
            path = next((p for p in pending if p == f"{_PERIPHERAL}/{info.device}"), "")
            if not path:
                return
            if not eject_refused(info):
                log.debug("guest %s: %s: %s", self._guest, path, info.describe())
                return
            pending.discard(path)
            result.refused.append((path, info))
            log.warning(
                "guest %s: the guest refused to eject %s: %s", self._guest, path, info.describe()
            )

        async def on_event(event: Message) -> None:
            if event["event"] == _OST_EVENT:
                ost(event)
                return
            path = _obj(event.get("data"), "event data").get("path")
            if not isinstance(path, str):
                return
            # QEMU 7.2 announces a vCPU's removal only by its child's
            # DEVICE_DELETED (".../vmtide-cpu1/lapic"), never the CPU's own
            # (seen under TCG with a 6.1 guest): a child going means the device
            # is being unrealized. unplug_cpus confirms with query-cpus-fast.
            path = next((p for p in pending if path == p or path.startswith(p + "/")), "")
            if not path:
                return
            pending.discard(path)
            if event["event"] == "DEVICE_DELETED":
                result.deleted.append(paths[path])
            else:  # DEVICE_UNPLUG_GUEST_ERROR: the guest refused, it will not go
                result.refused.append((path, None))
                log.warning("guest %s: the guest refused to eject %s", self._guest, path)

        listener = EventListener(_UNPLUG_EVENTS)
        # Listen before asking, or an eject quicker than our next line goes unseen.
        with self._qmp.listen(listener):
            for path in paths:
                await self._execute("device_del", {"id": path})
            log.debug(
                "guest %s: waiting up to %.1f s for DEVICE_DELETED of %s",
                self._guest,
                max(0.0, deadline - asyncio.get_running_loop().time()),
                sorted(paths),
            )
            await self._wait(listener, deadline, lambda: not pending, on_event)
        return result

    # ------------------------------------------------------------- memory

    async def plug_memory(self, nbytes: int) -> int:
        if nbytes < 0:
            raise ValueError(f"nbytes must be >= 0, not {nbytes}")
        if nbytes == 0:
            return 0
        async with self._lock:
            if self._mechanism is MemoryMechanism.VIRTIO_MEM:
                return await self._plug_virtio_mem(nbytes)
            if self._mechanism is MemoryMechanism.DIMM:
                return await self._plug_dimms(nbytes)
            raise BackendError(
                self._guest,
                f"plug {nbytes} bytes",
                "no memory hot-plug mechanism: no virtio-mem device and no DIMM slots"
                " (-m SIZE,slots=N,maxmem=MAX)",
            )

    async def _plug_dimms(self, nbytes: int) -> int:
        step = self._options.memory_step_bytes
        await self._delete_orphan_backends()
        room = self._dimm_room(await self._memory())
        budget = min(_align_up(nbytes, self._options.memory_align_bytes), room)
        taken = await self._taken_ids()
        added = 0
        number = 0
        while added < budget:
            while {self._dimm_id(number), self._ram_id(number)} & taken:
                number += 1
            size = min(step, budget - added)
            await self._add_dimm(number, size)
            taken |= {self._dimm_id(number), self._ram_id(number)}
            added += size
        log.info("guest %s: plugged %d MiB of DIMMs", self._guest, added // MiB)
        return added

    def _dimm_id(self, number: int) -> str:
        return f"{self._options.id_prefix}-dimm{number}"

    def _ram_id(self, number: int) -> str:
        return f"{self._options.id_prefix}-ram{number}"

    async def _taken_ids(self) -> set[str]:
        devices = _list(await self._execute("qom-list", {"path": _PERIPHERAL}), "qom-list")
        objects = _list(await self._execute("qom-list", {"path": _OBJECTS}), "qom-list")
        return {str(_obj(item, "qom-list entry").get("name")) for item in devices + objects}

    async def _add_dimm(self, number: int, size: int) -> None:
        ram = self._ram_id(number)
        await self._execute(
            "object-add", {"qom-type": "memory-backend-ram", "id": ram, "size": size}
        )
        try:
            await self._execute(
                "device_add", {"driver": "pc-dimm", "id": self._dimm_id(number), "memdev": ram}
            )
        except BackendError:
            # Leave no host RAM reserved for a DIMM that does not exist.
            with contextlib.suppress(BackendError):
                await self._execute("object-del", {"id": ram})
            raise

    async def _delete_orphan_backends(self) -> None:
        """Delete our RAM backends no DIMM uses, e.g. after an eject we stopped waiting for."""
        prefix = f"{self._options.id_prefix}-ram"
        try:
            objects = _list(await self._execute("qom-list", {"path": _OBJECTS}), "qom-list")
            used = {d.memdev.removeprefix(f"{_OBJECTS}/") for d in (await self._memory()).dimms}
            for item in objects:
                name = str(_obj(item, "qom-list entry").get("name"))
                if name.startswith(prefix) and name not in used:
                    await self._execute("object-del", {"id": name})
        except BackendUnavailable:
            raise
        except (BackendError, ValueError) as err:
            log.warning("guest %s: cleaning up RAM backends: %s", self._guest, err)

    async def _plug_virtio_mem(self, nbytes: int) -> int:
        device = await self._virtio_mem()
        start = device.size
        goal = min(device.max_size, start + _align_up(nbytes, device.block_size))
        target = start
        while target < goal:
            target = min(goal, target + self._options.memory_step_bytes)
            deadline = self._deadline(self._options.size_change_timeout)
            device = await self._resize_virtio_mem(target, deadline, shrink=False)
            if device.size < target:
                break
        added = device.size - start
        log.info("guest %s: virtio-mem plugged %d MiB", self._guest, added // MiB)
        return added

    async def _resize_virtio_mem(self, target: int, deadline: float, *, shrink: bool) -> VirtioMem:
        """Set requested-size and wait until the guest's size reaches `target`.

        At the deadline the request is set back to the size the guest reached.
        """

        def reached(size: int) -> bool:
            return size <= target if shrink else size >= target

        device_id = self._virtio_mem_id
        listener = EventListener("MEMORY_DEVICE_SIZE_CHANGE")
        with self._qmp.listen(listener):
            await self._execute(
                "qom-set", {"path": device_id, "property": "requested-size", "value": target}
            )
            device = await self._virtio_mem()

            async def on_event(_: Message) -> None:
                nonlocal device
                # The event is throttled (1 s per device); the query is the truth.
                device = await self._virtio_mem()

            done = await self._wait(listener, deadline, lambda: reached(device.size), on_event)
        if not done:
            device = await self._virtio_mem()
            log.warning(
                "guest %s: virtio-mem %s stayed at %d MiB of %d MiB requested (no guest driver?);"
                " request set back",
                self._guest,
                device_id,
                device.size // MiB,
                target // MiB,
            )
            await self._execute(
                "qom-set", {"path": device_id, "property": "requested-size", "value": device.size}
            )
        return device

    async def unplug_memory(
        self, blocks: Sequence[int], block_size: int, timeout: float
    ) -> list[int]:
        if block_size <= 0:
            raise ValueError(f"block_size must be > 0, not {block_size}")
        if not blocks:
            return []
        deadline = self._deadline(timeout)
        async with self._lock:
            removed: list[int] = []
            memory = await self._memory()
            addressable = (d for d in memory.dimms if d.id is not None)
            dimms = dimms_fully_offline(addressable, blocks, block_size)
            deletion: _Deletion[Dimm] = _Deletion([], [])
            if dimms:
                by_path = {f"{_PERIPHERAL}/{d.id}": d for d in dimms}
                deletion = await self._delete_devices(by_path, deadline)
                for dimm in deletion.deleted:
                    removed.extend(dimm.blocks(block_size))
                await self._delete_orphan_backends()
            if self._mechanism is MemoryMechanism.VIRTIO_MEM:
                removed.extend(await self._unplug_virtio_mem(blocks, block_size, deadline))
            log.info(
                "guest %s: memory blocks %s removed of %d offered",
                self._guest,
                removed,
                len(set(blocks)),
            )
            if deletion.refused:
                raise self._refusal(
                    f"unplug memory blocks {sorted(set(blocks))}", deletion, removed
                )
            return sorted(removed)

    async def _unplug_virtio_mem(
        self, blocks: Sequence[int], block_size: int, deadline: float
    ) -> list[int]:
        """Shrink the device by the offline blocks it holds.

        QEMU reports only the device's size, not which guest blocks went. The Linux
        driver empties offline blocks before online ones (drivers/virtio/virtio_mem.c,
        virtio_mem_sbm_unplug_request), so the first N offered blocks are reported,
        N = bytes removed // block_size; the agent sees the exact set in sysfs.
        """
        device = await self._virtio_mem()
        mine = blocks_within(blocks, block_size, device.addr, device.max_size)
        if not mine:
            return []
        start = device.size
        target = _align_up(max(0, start - len(mine) * block_size), device.block_size)
        if target >= start:
            return []
        device = await self._resize_virtio_mem(target, deadline, shrink=True)
        return mine[: min(len(mine), (start - device.size) // block_size)]

    # ------------------------------------------------------------- balloon

    async def set_balloon(self, hold_bytes: int) -> None:
        """Make the guest's balloon hold `hold_bytes` of its memory (0 deflates it).

        Returns once QEMU took the target; the guest's driver follows at its own pace
        (`state().balloon_bytes`). Raises BackendError ("DeviceNotActive") without a
        balloon device.
        """
        if hold_bytes < 0:
            raise ValueError(f"hold_bytes must be >= 0, not {hold_bytes}")
        async with self._lock:
            ram = self._machine.boot + (await self._memory()).plugged
            try:
                target = balloon_target(ram, hold_bytes)
            except ValueError as err:
                raise BackendError(self._guest, f"balloon hold {hold_bytes}", str(err)) from err
            await self._execute("balloon", {"value": target})
            log.info(
                "guest %s: balloon to hold %d MiB (guest left with %d MiB)",
                self._guest,
                hold_bytes // MiB,
                target // MiB,
            )
