"""QmpBackend against a real, paused QEMU (q35, TCG, no guest OS), plus its pure helpers.

Without a guest nothing ejects a device or runs a virtio-mem driver, so these tests
pin down what QEMU itself does and that the backend never waits past its deadline:
plugs land, unplugs time out and report nothing removed, refusals carry QEMU's
words. Each test checks through a second QMP socket, not through the backend.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import QMPClient
from qemu_proc import BALLOON_ARGS, VIRTIO_MEM_ARGS, AcpiGuest, QemuProcess, qemu_binary

from broker.backend import BackendError, BackendUnavailable, EjectRefused
from broker.qmp_backend import (
    CpuSlot,
    Dimm,
    MemoryMechanism,
    OstInfo,
    QmpBackend,
    QmpBackendOptions,
    VirtioMem,
    balloon_target,
    blocks_within,
    dimms_fully_offline,
    eject_refused,
    free_cpu_slots,
    parse_cpu_slots,
    parse_memory_devices,
    parse_ost,
)

MiB = 1 << 20
GiB = 1 << 30
BLOCK = 128 * MiB  # the guest's memory block size (x86-64 Linux)
# No guest ever answers here, so every wait runs to its deadline: keep them short.
UNPLUG_TIMEOUT = 0.5
# Upper bound for "returned at its deadline, did not hang"; generous for slow CI.
HANG_BOUND_SECONDS = 5.0
# How long a test waits for QEMU to show a change the backend asked for.
OBSERVE_TIMEOUT_SECONDS = 5.0
_POLL_SECONDS = 0.01


# ----------------------------------------------------------------- pure helpers


def _slot(core: int, plugged: bool, vcpus: int = 1) -> CpuSlot:
    props = (("core-id", core), ("node-id", 0), ("socket-id", 0), ("thread-id", 0))
    path = f"/machine/unattached/device[{core}]" if plugged else None
    return CpuSlot(type="qemu64-x86_64-cpu", props=props, vcpus=vcpus, qom_path=path)


@pytest.mark.parametrize(
    ("plugged", "count", "want"),
    [
        ({0}, 2, [1, 2]),
        ({0}, 10, [1, 2, 3]),
        ({0, 2}, 2, [1, 3]),  # a hole left by an unplug is filled first
        ({0, 1, 2, 3}, 1, []),
        ({0}, 0, []),
    ],
)
def test_free_cpu_slots_fills_lowest_first(plugged: set[int], count: int, want: list[int]) -> None:
    # QEMU lists slots highest first; the order must not matter.
    slots = [_slot(core, core in plugged) for core in (3, 2, 1, 0)]
    assert [pos for pos, _ in free_cpu_slots(slots, count)] == want


def test_free_cpu_slots_skips_slots_bigger_than_the_request() -> None:
    slots = [_slot(0, True), _slot(1, False, vcpus=2), _slot(2, False)]
    assert [pos for pos, _ in free_cpu_slots(slots, 1)] == [2]


_D0 = Dimm(id="d0", addr=4 * GiB, size=512 * MiB, memdev="/objects/r0")  # blocks 32..35
_D1 = Dimm(id="d1", addr=4 * GiB + 512 * MiB, size=256 * MiB, memdev="/objects/r1")  # 36..37
_ODD = Dimm(id="odd", addr=4 * GiB + 64 * MiB, size=128 * MiB, memdev="/objects/r2")  # 32..33


@pytest.mark.parametrize(
    ("dimms", "blocks", "want"),
    [
        ([_D0, _D1], [32, 33, 34, 35], [_D0]),
        ([_D0, _D1], [32, 33, 34, 35, 36], [_D0]),  # half of d1: d1 stays
        ([_D0, _D1], range(32, 38), [_D0, _D1]),
        ([_D0, _D1], [33, 34, 35, 36, 37], [_D1]),
        ([_D0], [], []),
        ([_ODD], [32], []),  # straddles two blocks: both must be offline
        ([_ODD], [32, 33], [_ODD]),
    ],
)
def test_dimms_fully_offline(dimms: list[Dimm], blocks: list[int], want: list[Dimm]) -> None:
    assert dimms_fully_offline(dimms, blocks, BLOCK) == want


def test_blocks_within_a_device_region() -> None:
    region = (4 * GiB, 1 * GiB)  # blocks 32..39
    assert blocks_within([40, 31, 39, 32, 32], BLOCK, *region) == [32, 39]


def test_parse_replies_as_qemu_7_2_sends_them() -> None:
    # Copied from qemu-system-x86_64 7.2 (-smp 1,maxcpus=4, one virtio-mem, one DIMM).
    slots = parse_cpu_slots(
        [
            {"props": {"core-id": 3, "thread-id": 0, "node-id": 0, "socket-id": 0},
             "vcpus-count": 1, "type": "qemu64-x86_64-cpu"},
            {"props": {"core-id": 0, "thread-id": 0, "node-id": 0, "socket-id": 0},
             "vcpus-count": 1, "qom-path": "/machine/unattached/device[0]",
             "type": "qemu64-x86_64-cpu"},
        ]
    )  # fmt: skip
    assert [(dict(s.props)["core-id"], s.qom_path) for s in slots] == [
        (0, "/machine/unattached/device[0]"),
        (3, None),
    ]
    memory = parse_memory_devices(
        [
            {"type": "virtio-mem", "data": {
                "memdev": "/objects/vmem0", "memaddr": 4294967296, "block-size": 2097152,
                "size": 0, "node": 0, "max-size": 1073741824, "requested-size": 536870912,
                "id": "vm0"}},
            {"type": "dimm", "data": {
                "memdev": "/objects/m1", "hotplugged": True, "addr": 5368709120,
                "hotpluggable": True, "size": 268435456, "slot": 0, "node": 0, "id": "d1"}},
        ]
    )  # fmt: skip
    assert memory.virtio_mems == (
        VirtioMem(
            id="vm0",
            addr=4 * GiB,
            size=0,
            requested_size=512 * MiB,
            max_size=1 * GiB,
            block_size=2 * MiB,
        ),
    )
    assert memory.dimms == (Dimm(id="d1", addr=5 * GiB, size=256 * MiB, memdev="/objects/m1"),)
    assert (memory.slots_used, memory.region_used, memory.plugged) == (1, 1280 * MiB, 256 * MiB)


def test_parse_ost_as_qemu_10_sends_it() -> None:
    # A guest refusing to eject vmtide-cpu1 (recorded from qemu-system-x86_64
    # 10.0 through its qtest socket: the same registers a guest's _OST writes).
    event = {"info": {"device": "vmtide-cpu1", "source": 3, "status": 130, "slot": "1",
                      "slot-type": "CPU"}}  # fmt: skip
    info = parse_ost(event)
    assert info == OstInfo(device="vmtide-cpu1", slot="1", slot_type="CPU", source=3, status=0x82)
    assert info.describe() == "_OST status 0x82 (device busy) for source 0x3 (eject request)"
    no_device = parse_ost({"info": {"slot": "2", "slot-type": "DIMM", "source": 1, "status": 0}})
    assert no_device.device is None
    with pytest.raises(ValueError, match="status"):
        parse_ost({"info": {"slot": "1", "slot-type": "CPU", "source": 3}})


@pytest.mark.parametrize(
    ("source", "status", "refused"),
    [
        (0x03, 0x84, False),  # Linux: eject in progress...
        (0x103, 0x00, False),  # ...then done
        (0x03, 0x82, True),  # device busy (offlining failed)
        (0x03, 0x01, True),  # non-specific failure
        (0x103, 0x80, True),  # ejection not supported by OSPM
        (0x03, 0x02, True),  # the guest did not understand the eject
        (0x01, 0x82, False),  # a device check, not an eject
    ],
)
def test_eject_refused(source: int, status: int, refused: bool) -> None:
    info = OstInfo(device="d", slot="0", slot_type="DIMM", source=source, status=status)
    assert eject_refused(info) is refused


def test_balloon_target_is_what_the_guest_keeps() -> None:
    assert balloon_target(2 * GiB, 0) == 2 * GiB  # deflated
    assert balloon_target(2 * GiB, 512 * MiB) == 1536 * MiB
    for hold in (-1, 2 * GiB):
        with pytest.raises(ValueError):
            balloon_target(2 * GiB, hold)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"id_prefix": "9bad"},
        {"id_prefix": "has space"},
        {"memory_step_bytes": 100 * MiB},  # not a multiple of 128 MiB
        {"memory_step_bytes": 0},
        {"memory": MemoryMechanism.NONE},
        {"size_change_timeout": 0},
    ],
)
def test_options_refuse_bad_values(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        QmpBackendOptions(**kwargs)


# ----------------------------------------------------------------- real QEMU


@dataclass
class Vm:
    proc: QemuProcess
    inspector: QMPClient

    async def qmp(self, command: str, args: Mapping[str, object] | None = None) -> Any:
        return await self.inspector.execute(command, args)

    async def hotpluggable_cpus(self) -> dict[int, str | None]:
        """{core-id: qom-path or None when free}."""
        slots = await self.qmp("query-hotpluggable-cpus")
        return {s["props"]["core-id"]: s.get("qom-path") for s in slots}

    async def memory_devices(self, kind: str) -> list[dict[str, Any]]:
        devices = await self.qmp("query-memory-devices")
        return [d["data"] for d in devices if d["type"] == kind]

    async def modern_cpu_hotplug(self) -> None:
        """Do what a booted guest's ACPI code does: leave legacy CPU hotplug mode.

        Only then does QEMU accept device_del for a CPU (hw/acpi/ich9.c).
        """
        acpi = await self.qmp("qom-get", {"path": "/machine", "property": "acpi-device"})
        await self.qmp("qom-set", {"path": acpi, "property": "cpu-hotplug-legacy", "value": False})


StartVm = Callable[..., Awaitable[Vm]]
OpenBackend = Callable[..., Awaitable[QmpBackend]]


@pytest.fixture
async def start_vm(tmp_path: Path) -> AsyncIterator[StartVm]:
    if qemu_binary() is None:
        pytest.skip("qemu-system-x86_64 is not installed")
    vms: list[Vm] = []
    procs: list[QemuProcess] = []

    async def start(*extra_args: str, qtest: bool = False, replacing: Vm | None = None) -> Vm:
        # `replacing`: a new QEMU on the sockets of one that was killed.
        workdir = replacing.proc.qmp_socket.parent if replacing else tmp_path / f"vm{len(procs)}"
        proc = QemuProcess(workdir, extra_args, qtest=qtest)
        procs.append(proc)  # before start(): killed whatever happens next
        await asyncio.to_thread(proc.start)  # polls with short sleeps: off the loop
        inspector = QMPClient("test-inspector")
        await inspector.connect(str(proc.inspect_socket))
        vm = Vm(proc, inspector)
        vms.append(vm)
        return vm

    try:
        yield start
    finally:
        for vm in vms:
            with contextlib.suppress(Exception):  # QEMU may be dead already
                await vm.inspector.disconnect()
        for proc in procs:
            proc.kill()


@pytest.fixture
async def open_backend() -> AsyncIterator[OpenBackend]:
    backends: list[QmpBackend] = []

    async def open_(vm: Vm, **options: Any) -> QmpBackend:
        backend = QmpBackend(vm.proc.qmp_socket, "g1", QmpBackendOptions(**options))
        backends.append(backend)
        await backend.connect()
        return backend

    try:
        yield open_
    finally:
        for backend in backends:
            await backend.close()


async def eventually(check: Callable[[], Awaitable[bool]], what: str) -> None:
    deadline = time.monotonic() + OBSERVE_TIMEOUT_SECONDS
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {OBSERVE_TIMEOUT_SECONDS} s: {what}")
        await asyncio.sleep(_POLL_SECONDS)


@pytest.mark.qemu
async def test_state_with_virtio_mem(start_vm: StartVm, open_backend: OpenBackend) -> None:
    vm = await start_vm(*VIRTIO_MEM_ARGS)
    backend = await open_backend(vm)

    state = await backend.state()

    assert backend.memory_mechanism is MemoryMechanism.VIRTIO_MEM
    assert backend.virtio_mem_id == "vm0"
    assert not backend.has_balloon
    assert state.cpus == {0}
    assert state.max_cpus == 4
    assert state.boot_memory_bytes == 512 * MiB
    assert state.memory_bytes == 0
    assert state.max_memory_bytes == 512 * MiB + 1 * GiB  # boot + virtio-mem max-size


@pytest.mark.qemu
async def test_state_with_dimms_only(start_vm: StartVm, open_backend: OpenBackend) -> None:
    vm = await start_vm()
    backend = await open_backend(vm)

    state = await backend.state()

    assert backend.memory_mechanism is MemoryMechanism.DIMM
    # 4 slots of 512 MiB steps fit in maxmem 4G - 512M boot.
    assert state.max_memory_bytes == 512 * MiB + 4 * 512 * MiB


@pytest.mark.qemu
async def test_plug_cpus_fills_slots(start_vm: StartVm, open_backend: OpenBackend) -> None:
    vm = await start_vm()
    backend = await open_backend(vm)

    assert await backend.plug_cpus(2) == [1, 2]

    assert await vm.hotpluggable_cpus() == {
        0: "/machine/unattached/device[0]",
        1: "/machine/peripheral/vmtide-cpu1",
        2: "/machine/peripheral/vmtide-cpu2",
        3: None,
    }
    assert (await backend.state()).cpus == {0, 1, 2}


@pytest.mark.qemu
async def test_plug_cpus_beyond_max_plugs_what_fits(
    start_vm: StartVm, open_backend: OpenBackend
) -> None:
    vm = await start_vm()
    backend = await open_backend(vm)

    assert await backend.plug_cpus(10) == [1, 2, 3]
    assert await backend.plug_cpus(1) == []
    assert None not in (await vm.hotpluggable_cpus()).values()


@pytest.mark.qemu
async def test_device_add_refused_carries_qemu_words(
    start_vm: StartVm, open_backend: OpenBackend
) -> None:
    vm = await start_vm()
    backend = await open_backend(vm)
    # Someone else's device already holds the id the backend gives the next CPU.
    await vm.qmp("object-add", {"qom-type": "memory-backend-ram", "id": "m", "size": BLOCK})
    await vm.qmp("device_add", {"driver": "pc-dimm", "id": "vmtide-cpu1", "memdev": "m"})

    with pytest.raises(BackendError) as caught:
        await backend.plug_cpus(1)

    err = caught.value
    assert not isinstance(err, BackendUnavailable)
    assert err.guest == "g1"
    assert err.command.startswith("device_add driver=qemu64-x86_64-cpu id=vmtide-cpu1")
    assert err.error_class == "GenericError"
    assert "Duplicate device ID 'vmtide-cpu1'" in err.detail
    assert "guest g1: device_add" in str(err)
    assert (await vm.hotpluggable_cpus())[1] is None


@pytest.mark.qemu
async def test_unplug_cpu_refused_while_acpi_is_in_legacy_mode(
    start_vm: StartVm, open_backend: OpenBackend
) -> None:
    # Firmware never switches CPU hotplug to modern mode; QEMU refuses at once.
    vm = await start_vm()
    backend = await open_backend(vm)
    await backend.plug_cpus(1)

    with pytest.raises(BackendError) as caught:
        await backend.unplug_cpus([1], timeout=30)

    assert caught.value.command == "device_del id=/machine/peripheral/vmtide-cpu1"
    assert "device unplug request for not supported device type" in caught.value.detail
    assert (await vm.hotpluggable_cpus())[1] == "/machine/peripheral/vmtide-cpu1"


@pytest.mark.qemu
async def test_unplug_cpu_nobody_ejects_times_out(
    start_vm: StartVm, open_backend: OpenBackend
) -> None:
    vm = await start_vm()
    await vm.modern_cpu_hotplug()
    backend = await open_backend(vm)
    await backend.plug_cpus(2)

    started = time.monotonic()
    removed = await backend.unplug_cpus([2, 1], timeout=UNPLUG_TIMEOUT)
    elapsed = time.monotonic() - started

    # QEMU accepted device_del, but only a guest's eject brings DEVICE_DELETED.
    assert removed == []
    assert UNPLUG_TIMEOUT <= elapsed < HANG_BOUND_SECONDS
    slots = await vm.hotpluggable_cpus()
    assert slots[1] == "/machine/peripheral/vmtide-cpu1"
    assert slots[2] == "/machine/peripheral/vmtide-cpu2"
    assert (await backend.state()).cpus == {0, 1, 2}


@pytest.mark.qemu
async def test_unplug_cpu_not_plugged_is_refused(
    start_vm: StartVm, open_backend: OpenBackend
) -> None:
    vm = await start_vm()
    backend = await open_backend(vm)

    with pytest.raises(BackendError, match=r"not plugged: \[3\]"):
        await backend.unplug_cpus([3], timeout=UNPLUG_TIMEOUT)
    assert await backend.unplug_cpus([], timeout=UNPLUG_TIMEOUT) == []


@pytest.mark.qemu
async def test_plug_memory_adds_dimms_in_steps(
    start_vm: StartVm, open_backend: OpenBackend
) -> None:
    vm = await start_vm(*VIRTIO_MEM_ARGS)
    backend = await open_backend(vm, memory=MemoryMechanism.DIMM)

    # Rounded up to whole guest blocks, then cut in 512 MiB steps.
    added = await backend.plug_memory(1 * GiB + 1)

    assert added == 1 * GiB + BLOCK
    dimms = await vm.memory_devices("dimm")
    assert [(d["id"], d["memdev"], d["size"]) for d in dimms] == [
        ("vmtide-dimm0", "/objects/vmtide-ram0", 512 * MiB),
        ("vmtide-dimm1", "/objects/vmtide-ram1", 512 * MiB),
        ("vmtide-dimm2", "/objects/vmtide-ram2", BLOCK),
    ]
    # Guest blocks must map onto whole DIMMs.
    assert all(d["addr"] % BLOCK == 0 for d in dimms)
    assert (await backend.state()).memory_bytes == added


@pytest.mark.qemu
async def test_plug_memory_beyond_slots_plugs_what_fits(
    start_vm: StartVm, open_backend: OpenBackend
) -> None:
    vm = await start_vm()
    backend = await open_backend(vm)

    assert await backend.plug_memory(16 * GiB) == 4 * 512 * MiB  # slots=4
    assert await backend.plug_memory(BLOCK) == 0
    state = await backend.state()
    assert state.memory_bytes == 4 * 512 * MiB
    assert state.boot_memory_bytes + state.memory_bytes == state.max_memory_bytes


@pytest.mark.qemu
async def test_dimm_refused_by_qemu_leaves_no_ram_backend(
    start_vm: StartVm, open_backend: OpenBackend
) -> None:
    vm = await start_vm()
    backend = await open_backend(vm, memory_align_bytes=1 * MiB, memory_step_bytes=1 * MiB)

    with pytest.raises(BackendError, match="must be multiple of 0x200000") as caught:
        await backend.plug_memory(1 * MiB)  # x86 DIMMs come in 2 MiB units

    assert caught.value.command.startswith("device_add driver=pc-dimm")
    assert await vm.memory_devices("dimm") == []
    objects = await vm.qmp("qom-list", {"path": "/objects"})
    assert not [o["name"] for o in objects if o["name"].startswith("vmtide")]


@pytest.mark.qemu
async def test_plug_memory_deletes_orphaned_ram_backends(
    start_vm: StartVm, open_backend: OpenBackend
) -> None:
    # What an eject that came after the backend stopped waiting leaves behind.
    vm = await start_vm()
    for name in ("vmtide-ram7", "someone-elses"):
        await vm.qmp("object-add", {"qom-type": "memory-backend-ram", "id": name, "size": BLOCK})
    backend = await open_backend(vm)

    assert await backend.plug_memory(BLOCK) == BLOCK

    objects = {o["name"] for o in await vm.qmp("qom-list", {"path": "/objects"})}
    assert "vmtide-ram7" not in objects
    assert {"someone-elses", "vmtide-ram0"} <= objects


@pytest.mark.qemu
async def test_unplug_dimm_nobody_ejects_times_out(
    start_vm: StartVm, open_backend: OpenBackend
) -> None:
    vm = await start_vm()
    backend = await open_backend(vm)
    await backend.plug_memory(1 * GiB)
    first, second = await vm.memory_devices("dimm")
    first_blocks = list(range(first["addr"] // BLOCK, (first["addr"] + first["size"]) // BLOCK))
    half_of_second = [second["addr"] // BLOCK]

    started = time.monotonic()
    removed = await backend.unplug_memory(
        first_blocks + half_of_second, BLOCK, timeout=UNPLUG_TIMEOUT
    )
    elapsed = time.monotonic() - started

    assert removed == []
    assert UNPLUG_TIMEOUT <= elapsed < HANG_BOUND_SECONDS
    assert [d["id"] for d in await vm.memory_devices("dimm")] == ["vmtide-dimm0", "vmtide-dimm1"]
    # Boot memory blocks are never unplugged and cost no wait.
    started = time.monotonic()
    assert await backend.unplug_memory([0, 1], BLOCK, timeout=30) == []
    assert time.monotonic() - started < HANG_BOUND_SECONDS


@pytest.mark.qemu
async def test_virtio_mem_request_without_driver_does_not_hang(
    start_vm: StartVm, open_backend: OpenBackend
) -> None:
    vm = await start_vm(*VIRTIO_MEM_ARGS)
    backend = await open_backend(vm, size_change_timeout=1.0)

    async def requested() -> int:
        (device,) = await vm.memory_devices("virtio-mem")
        return int(device["requested-size"])

    async def requested_512m() -> bool:
        return await requested() == 512 * MiB

    plug = asyncio.create_task(backend.plug_memory(512 * MiB))
    # The request reaches QEMU...
    await eventually(requested_512m, "requested-size set to 512 MiB")
    # ...but with no guest driver `size` never follows: nothing added, request undone.
    added = await asyncio.wait_for(plug, HANG_BOUND_SECONDS)
    assert added == 0
    assert await requested() == 0
    (device,) = await vm.memory_devices("virtio-mem")
    assert device["size"] == 0
    # Nothing plugged, so nothing to take back, and no wait either.
    region = range(device["memaddr"] // BLOCK, device["memaddr"] // BLOCK + 4)
    assert await backend.unplug_memory(region, BLOCK, timeout=30) == []


@pytest.mark.qemu
async def test_balloon(start_vm: StartVm, open_backend: OpenBackend) -> None:
    vm = await start_vm(*BALLOON_ARGS)
    backend = await open_backend(vm)
    assert backend.has_balloon

    await backend.set_balloon(256 * MiB)

    # Accepted; without a guest driver `actual` stays at boot memory.
    assert await vm.qmp("query-balloon") == {"actual": 512 * MiB}
    assert (await backend.state()).balloon_bytes == 0
    # QEMU counts plugged DIMMs in the guest's size (and in `actual`): the
    # balloon holds nothing more for them, and its target is boot + DIMMs - hold.
    await backend.plug_memory(BLOCK)
    assert await vm.qmp("query-balloon") == {"actual": 512 * MiB + BLOCK}
    assert (await backend.state()).balloon_bytes == 0
    await backend.set_balloon(0)
    with pytest.raises(BackendError, match="cannot hold"):
        await backend.set_balloon(512 * MiB + BLOCK)


@pytest.mark.qemu
async def test_balloon_without_device_is_refused(
    start_vm: StartVm, open_backend: OpenBackend
) -> None:
    vm = await start_vm()
    backend = await open_backend(vm)
    assert not backend.has_balloon

    with pytest.raises(BackendError) as caught:
        await backend.set_balloon(256 * MiB)
    assert caught.value.error_class == "DeviceNotActive"
    assert "No balloon device has been activated" in str(caught.value)


@pytest.mark.qemu
async def test_missing_virtio_mem_device_is_refused_at_connect(
    start_vm: StartVm, open_backend: OpenBackend
) -> None:
    vm = await start_vm(*VIRTIO_MEM_ARGS)
    with pytest.raises(BackendError, match=r"no virtio-mem device nope \(found: \['vm0'\]\)"):
        await open_backend(vm, virtio_mem_id="nope")


@pytest.mark.qemu
async def test_killed_qemu_is_unavailable(start_vm: StartVm, open_backend: OpenBackend) -> None:
    vm = await start_vm()
    backend = await open_backend(vm)
    vm.proc.kill()

    with pytest.raises(BackendUnavailable) as caught:
        await backend.state()
    assert str(vm.proc.qmp_socket) in str(caught.value)
    await backend.close()  # never raises, even with QEMU gone
    with pytest.raises(BackendUnavailable, match="cannot reach QMP socket"):
        await backend.connect()


@pytest.mark.qemu
async def test_qemu_dying_during_an_unplug_wait_ends_it(
    start_vm: StartVm, open_backend: OpenBackend, caplog: pytest.LogCaptureFixture
) -> None:
    vm = await start_vm()
    await vm.modern_cpu_hotplug()
    backend = await open_backend(vm)
    await backend.plug_cpus(1)

    caplog.set_level(logging.DEBUG, logger="broker.qmp_backend")
    unplug = asyncio.create_task(backend.unplug_cpus([1], timeout=60))

    async def waiting() -> bool:
        return any("waiting up to" in r.getMessage() for r in caplog.records)

    await eventually(waiting, "the backend waits for DEVICE_DELETED")
    vm.proc.kill()

    # Ends when the socket closes, not at the 60 s deadline.
    with pytest.raises(BackendUnavailable, match="closed"):
        await asyncio.wait_for(unplug, HANG_BOUND_SECONDS)


@pytest.mark.qemu
async def test_qemu_gone_before_a_command(start_vm: StartVm, open_backend: OpenBackend) -> None:
    vm = await start_vm()
    backend = await open_backend(vm)
    vm.proc.kill()

    with pytest.raises(BackendUnavailable):
        await asyncio.wait_for(backend.plug_cpus(1), HANG_BOUND_SECONDS)


async def test_missing_socket_is_unavailable(tmp_path: Path) -> None:
    path = tmp_path / "nothing.sock"
    backend = QmpBackend(path, "g1")

    with pytest.raises(BackendUnavailable) as caught:
        await backend.connect()
    assert str(path) in str(caught.value)
    with pytest.raises(BackendUnavailable, match="not connected"):
        await backend.state()


@pytest.mark.qemu
async def test_socket_held_by_another_client_times_out(
    start_vm: StartVm, open_backend: OpenBackend
) -> None:
    vm = await start_vm()
    # The inspector holds its socket: QEMU sends the second client no greeting.
    backend = QmpBackend(vm.proc.inspect_socket, "g1", QmpBackendOptions(connect_timeout=0.3))

    with pytest.raises(BackendUnavailable, match="no QMP greeting"):
        await asyncio.wait_for(backend.connect(), HANG_BOUND_SECONDS)
    await backend.close()


# ----------------------------------------------------------------- the guest's _OST


async def waiting_for_events(caplog: pytest.LogCaptureFixture) -> None:
    async def waiting() -> bool:
        return any("waiting up to" in r.getMessage() for r in caplog.records)

    await eventually(waiting, "the backend waits for the unplug")


@pytest.mark.qemu
async def test_cpu_eject_refused_by_the_guest_ends_the_wait(
    start_vm: StartVm, open_backend: OpenBackend, caplog: pytest.LogCaptureFixture
) -> None:
    vm = await start_vm(qtest=True)
    await vm.modern_cpu_hotplug()
    backend = await open_backend(vm)
    assert await backend.plug_cpus(1) == [1]
    guest = await AcpiGuest.open(vm.proc)
    caplog.set_level(logging.DEBUG, logger="broker.qmp_backend")
    unplug = asyncio.create_task(backend.unplug_cpus([1], timeout=60))
    await waiting_for_events(caplog)

    started = time.monotonic()
    await guest.cpu_ost(slot=1, source=0x03, status=0x82)  # what Linux says when busy
    with pytest.raises(EjectRefused) as caught:
        await asyncio.wait_for(unplug, HANG_BOUND_SECONDS)

    assert time.monotonic() - started < HANG_BOUND_SECONDS  # not the 60 s deadline
    err = caught.value
    assert (err.status, err.source, err.removed) == (0x82, 0x03, [])
    assert "refused to eject /machine/peripheral/vmtide-cpu1" in str(err)
    assert "_OST status 0x82 (device busy)" in str(err)
    assert (await vm.hotpluggable_cpus())[1] == "/machine/peripheral/vmtide-cpu1"
    await guest.close()


@pytest.mark.qemu
async def test_cpu_eject_in_progress_keeps_waiting(
    start_vm: StartVm, open_backend: OpenBackend, caplog: pytest.LogCaptureFixture
) -> None:
    vm = await start_vm(qtest=True)
    await vm.modern_cpu_hotplug()
    backend = await open_backend(vm)
    await backend.plug_cpus(1)
    guest = await AcpiGuest.open(vm.proc)
    caplog.set_level(logging.DEBUG, logger="broker.qmp_backend")
    started = time.monotonic()
    unplug = asyncio.create_task(backend.unplug_cpus([1], timeout=1.0))
    await waiting_for_events(caplog)

    await guest.cpu_ost(slot=1, source=0x03, status=0x84)  # "ejection in progress"

    # Not a refusal: the wait goes on to its deadline, and nothing was removed.
    assert await asyncio.wait_for(unplug, HANG_BOUND_SECONDS) == []
    assert time.monotonic() - started >= 1.0
    await guest.close()


@pytest.mark.qemu
async def test_dimm_eject_refused_by_the_guest_ends_the_wait(
    start_vm: StartVm, open_backend: OpenBackend, caplog: pytest.LogCaptureFixture
) -> None:
    vm = await start_vm(qtest=True)
    backend = await open_backend(vm)
    await backend.plug_memory(BLOCK)
    (dimm,) = await vm.memory_devices("dimm")
    guest = await AcpiGuest.open(vm.proc)
    caplog.set_level(logging.DEBUG, logger="broker.qmp_backend")
    unplug = asyncio.create_task(backend.unplug_memory([dimm["addr"] // BLOCK], BLOCK, timeout=60))
    await waiting_for_events(caplog)

    await guest.dimm_ost(slot=dimm["slot"], source=0x03, status=0x01)
    with pytest.raises(EjectRefused) as caught:
        await asyncio.wait_for(unplug, HANG_BOUND_SECONDS)

    assert (caught.value.status, caught.value.removed) == (0x01, [])
    assert "non-specific failure" in str(caught.value)
    assert [d["id"] for d in await vm.memory_devices("dimm")] == ["vmtide-dimm0"]
    await guest.close()


# ----------------------------------------------------------------- QEMU restarted


@pytest.mark.qemu
async def test_connect_again_to_a_restarted_qemu(
    start_vm: StartVm, open_backend: OpenBackend
) -> None:
    first = await start_vm()
    backend = await open_backend(first)
    old_pid = backend.qemu_pid
    assert old_pid == first.proc.pid
    # Under TCG that was this QEMU's last vCPU hot-plug (maxcpus=4 over its life).
    assert await backend.plug_cpus(3) == [1, 2, 3]
    first.proc.kill()
    with pytest.raises(BackendUnavailable):
        await backend.state()
    assert not backend.available

    second = await start_vm(replacing=first)
    await backend.connect()

    # A new process, read afresh: its boot CPU only, and its own vCPU budget.
    assert backend.available
    assert backend.qemu_pid == second.proc.pid != old_pid
    assert (await backend.state()).cpus == {0}
    assert await backend.plug_cpus(1) == [1]


@pytest.mark.qemu
async def test_wait_closed_returns_when_qemu_exits(
    start_vm: StartVm, open_backend: OpenBackend
) -> None:
    vm = await start_vm()
    backend = await open_backend(vm)
    closed = asyncio.create_task(backend.wait_closed())
    await asyncio.sleep(0.1)
    assert not closed.done()

    vm.proc.kill()

    await asyncio.wait_for(closed, HANG_BOUND_SECONDS)
    assert not backend.available
