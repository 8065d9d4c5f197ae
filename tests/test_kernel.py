"""The kernel interface against fake trees that behave like the kernel, and read-only
against this machine's real /sys and /proc."""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

import psutil
import pytest

from agent.actuator import Actuator
from agent.kernel import (
    Action,
    BlockState,
    ItemResult,
    Kernel,
    KernelReadError,
    Kind,
    OnlineType,
    Outcome,
    SysfsWriter,
    WriteTimeoutError,
    format_cpu_list,
    parse_cpu_list,
)
from agent.topology import Topology
from vmtide.fakesys import FakeGuest


@pytest.fixture
def guest(tmp_path: Path) -> FakeGuest:
    guest = FakeGuest(tmp_path / "guest", possible_cpus=4, boot_cpus=1, boot_blocks=4)
    guest.plug_cpu(1)
    guest.plug_cpu(2)
    guest.plug_blocks(4)  # blocks 4..7, offline
    return guest


@pytest.fixture
def kernel(guest: FakeGuest) -> Kernel:
    return Kernel(guest.sysfs, guest.procfs, writer=guest.writer)


@pytest.mark.parametrize(
    ("text", "cpus"),
    [
        ("0\n", {0}),
        ("0-3\n", {0, 1, 2, 3}),
        ("0,2-3,7\n", {0, 2, 3, 7}),
        ("\n", set()),
        ("", set()),
    ],
)
def test_cpu_list_round_trip(text: str, cpus: set[int]) -> None:
    assert parse_cpu_list(text) == cpus
    assert parse_cpu_list(format_cpu_list(cpus)) == cpus


@pytest.mark.parametrize("text", ["a", "1-", "3-1", "1,,x", "-2"])
def test_cpu_list_rejects_garbage(text: str) -> None:
    with pytest.raises(ValueError, match="CPU"):
        parse_cpu_list(text)


def test_reads_topology(kernel: Kernel) -> None:
    assert kernel.cpus_possible() == {0, 1, 2, 3}
    assert kernel.cpus_present() == {0, 1, 2}
    assert kernel.cpus_online() == {0}
    cpus = {c.id: c for c in kernel.cpus()}
    assert not cpus[0].hotpluggable and cpus[0].online  # cpu0: no `online` file
    assert cpus[1].hotpluggable and not cpus[1].online
    assert kernel.block_size() == 128 << 20
    assert kernel.auto_online_blocks() == "offline"
    blocks = kernel.memory_blocks()
    assert [b.index for b in blocks] == list(range(8))
    assert all(b.online and not b.movable and b.zones == ("Normal",) for b in blocks[:4])
    assert all(b.state is BlockState.OFFLINE and b.node == 0 for b in blocks[4:])
    assert blocks[4].zones == ()  # an offline block's valid_zones is not read


def test_an_offline_blocks_valid_zones_is_never_read(kernel: Kernel, guest: FakeGuest) -> None:
    # Reading it makes the kernel walk the block, and Linux 6.1 oopses there on
    # a block being hot-removed. A directory in its place fails any read.
    zones = guest.sysfs / "devices/system/memory/memory6/valid_zones"
    zones.unlink()
    zones.mkdir()
    assert guest.block_state(6) == "offline"
    block = kernel.memory_block(6)
    assert block is not None and block.state is BlockState.OFFLINE and block.zones == ()
    assert len(kernel.memory_blocks()) == 8


def test_cpu_online_offline_results(kernel: Kernel, guest: FakeGuest) -> None:
    done = kernel.set_cpu(1, online=True)
    assert (done.kind, done.index, done.action, done.outcome) == (
        Kind.CPU,
        1,
        Action.ONLINE,
        Outcome.DONE,
    )
    assert guest.online_cpus() == {0, 1}
    assert kernel.set_cpu(1, online=True).outcome is Outcome.ALREADY
    assert kernel.set_cpu(0, online=True).outcome is Outcome.ALREADY
    refused = kernel.set_cpu(0, online=False)
    assert (refused.outcome, refused.errno) == (Outcome.REFUSED, errno.EPERM)
    assert kernel.set_cpu(3, online=True).outcome is Outcome.NOT_FOUND  # possible, not present
    assert kernel.set_cpu(1, online=False).outcome is Outcome.DONE
    assert guest.online_cpus() == {0}


@pytest.mark.parametrize("code", [errno.EBUSY, errno.EINVAL, errno.EIO, errno.EPERM])
def test_cpu_refusals_carry_errno(kernel: Kernel, guest: FakeGuest, code: int) -> None:
    guest.set_faults([{"kind": "cpu", "index": 2, "effect": code}])
    result = kernel.set_cpu(2, online=True)
    assert (result.outcome, result.errno, result.detail) == (
        Outcome.REFUSED,
        code,
        os.strerror(code),
    )
    assert 2 not in guest.online_cpus()


def test_online_block_movable_then_already(kernel: Kernel, guest: FakeGuest) -> None:
    assert kernel.online_block(5).outcome is Outcome.DONE
    block = kernel.memory_block(5)
    assert block is not None and block.online and block.movable
    # A second write would be EINVAL in the kernel; the interface does not write.
    assert kernel.online_block(5).outcome is Outcome.ALREADY
    assert guest.block_state(5) == "online"


def test_online_block_refused_where_movable_is_invalid(kernel: Kernel, guest: FakeGuest) -> None:
    (guest.sysfs / "devices/system/memory/memory6/valid_zones").write_text("Normal\n")
    result = kernel.online_block(6)
    assert (result.outcome, result.errno) == (Outcome.REFUSED, errno.EINVAL)
    assert guest.block_state(6) == "offline"


def test_offline_results(kernel: Kernel, guest: FakeGuest) -> None:
    kernel.online_block(4)
    assert kernel.offline_block(4).outcome is Outcome.DONE
    assert kernel.offline_block(4).outcome is Outcome.ALREADY
    busy = kernel.offline_block(0)  # boot memory, ZONE_NORMAL, unmovable pages
    assert (busy.outcome, busy.errno) == (Outcome.REFUSED, errno.EBUSY)
    assert guest.block_state(0) == "online"


def test_offline_refused_with_einval(kernel: Kernel, guest: FakeGuest) -> None:
    kernel.online_block(4)
    guest.set_faults([{"kind": "memory", "index": 4, "effect": errno.EINVAL, "value": "offline"}])
    result = kernel.offline_block(4)
    assert (result.outcome, result.errno) == (Outcome.REFUSED, errno.EINVAL)
    assert guest.block_state(4) == "online"


def test_offline_that_hangs_times_out(kernel: Kernel, guest: FakeGuest) -> None:
    kernel.online_block(4)
    guest.set_faults([{"kind": "memory", "index": 4, "effect": "hang"}])
    result = kernel.offline_block(4, timeout=0.05)
    assert (result.outcome, result.errno) == (Outcome.TIMED_OUT, errno.ETIMEDOUT)
    assert guest.block_state(4) == "online"


def test_block_vanishing_between_listing_and_writing(kernel: Kernel, guest: FakeGuest) -> None:
    listed = [b.index for b in kernel.memory_blocks() if not b.online]
    guest.remove_block(listed[0])
    assert kernel.online_block(listed[0]).outcome is Outcome.NOT_FOUND
    # ... and vanishing during the write itself (virtio-mem removing it).
    guest.set_faults([{"kind": "memory", "index": listed[1], "effect": "vanish"}])
    assert kernel.online_block(listed[1]).outcome is Outcome.NOT_FOUND
    assert kernel.memory_block(listed[1]) is None
    assert listed[1] not in [b.index for b in kernel.memory_blocks()]


@pytest.mark.parametrize(
    ("how", "zones", "movable"),
    [(OnlineType.MOVABLE, ("Movable",), True), (OnlineType.KERNEL, ("Normal",), False)],
)
def test_memory_goes_online_as_the_config_says(
    kernel: Kernel, guest: FakeGuest, how: OnlineType, zones: tuple[str, ...], movable: bool
) -> None:
    # [memory] online_type: movable can be given back; kernel serves any allocation.
    actuator = Actuator(kernel, how)
    results = actuator.online_memory(6 * (128 << 20))
    assert [(r.index, r.outcome) for r in results] == [(4, Outcome.DONE), (5, Outcome.DONE)]
    for index in (4, 5):
        block = kernel.memory_block(index)
        assert block is not None and block.online and block.zones == zones
        assert block.movable is movable
    # Only movable blocks are ever offered back.
    offered = actuator.offline_memory(4 * (128 << 20), 4 * (128 << 20))
    assert [r.index for r in offered] == ([5, 4] if movable else [])


@pytest.mark.parametrize(
    ("damage", "outcome", "code", "detail"),
    [
        ("garbage state", Outcome.REFUSED, errno.EIO, "unknown state 'sideways'"),
        ("state unreadable", Outcome.REFUSED, errno.EISDIR, os.strerror(errno.EISDIR)),
        ("state gone", Outcome.NOT_FOUND, errno.ENOENT, "vanished"),
        ("block gone", Outcome.NOT_FOUND, errno.ENOENT, "vanished"),
    ],
)
def test_a_block_changing_under_an_operation_is_a_result_not_a_raise(
    kernel: Kernel, guest: FakeGuest, damage: str, outcome: Outcome, code: int, detail: str
) -> None:
    kernel.online_block(4)
    block = guest.sysfs / "devices/system/memory/memory4"
    state = block / "state"
    if damage == "garbage state":
        state.write_text("sideways\n")
    elif damage == "state unreadable":
        state.unlink()
        state.mkdir()  # reading it fails with EISDIR, as EIO would
    elif damage == "state gone":
        state.unlink()
    else:
        guest.writer.write(state, "offline")
        guest.remove_block(4)
    result = kernel.offline_block(4)
    assert (result.kind, result.index, result.action) == (Kind.MEMORY_BLOCK, 4, Action.OFFLINE)
    assert (result.outcome, result.errno, result.detail) == (outcome, code, detail)
    if damage != "garbage state":  # online_block reads the state the same way
        assert kernel.online_block(4).outcome is outcome


def test_a_block_vanishing_mid_reclaim_counts_as_given_back(
    kernel: Kernel, guest: FakeGuest
) -> None:
    # The host unplugged it first: offlining one more to make up for it would
    # go below what was asked.
    block = 128 << 20
    actuator = Actuator(kernel)
    actuator.online_memory(8 * block)
    guest.set_faults([{"kind": "memory", "index": 7, "effect": "vanish", "value": "offline"}])
    results = actuator.offline_memory(6 * block, 4 * block)
    assert [(r.index, r.outcome) for r in results] == [(7, Outcome.NOT_FOUND), (6, Outcome.DONE)]
    assert guest.online_memory_bytes() == 6 * block


def test_cpu0_with_an_online_file_is_never_offlined(tmp_path: Path) -> None:
    # arm64, ppc64 and x86 kernels before 6.5 with CONFIG_BOOTPARAM_HOTPLUG_CPU0
    # show cpu0/online; a refusal higher up must not walk the shrink down to it.
    guest = FakeGuest(tmp_path / "g", possible_cpus=3, boot_cpus=3, cpu0_online_file=True)
    kernel = Kernel(guest.sysfs, guest.procfs, writer=guest.writer)
    cpus = {c.id: c for c in kernel.cpus()}
    assert cpus[0].hotpluggable and cpus[0].online  # the fake shows the file
    guest.set_faults([{"kind": "cpu", "index": 1, "effect": errno.EBUSY, "value": "0"}])
    results = Actuator(kernel).offline_cpus(target=1, floor=1)
    assert [(r.index, r.outcome) for r in results] == [(2, Outcome.DONE), (1, Outcome.REFUSED)]
    assert guest.online_cpus() == {0, 1}
    busy = os.strerror(errno.EBUSY)
    assert Actuator(kernel).offline_cpus(target=0, floor=0) == [
        ItemResult(Kind.CPU, 1, Action.OFFLINE, Outcome.REFUSED, errno.EBUSY, busy)
    ]
    assert guest.online_cpus() == {0, 1}
    assert list(Topology.read(kernel).to_proto().cpus.pinned) == [0]


def test_fault_limited_to_some_writes(kernel: Kernel, guest: FakeGuest) -> None:
    guest.set_faults([{"kind": "cpu", "index": 1, "effect": errno.EBUSY, "times": 1}])
    assert kernel.set_cpu(1, online=True).outcome is Outcome.REFUSED
    assert kernel.set_cpu(1, online=True).outcome is Outcome.DONE


def test_unreadable_files_name_the_path(tmp_path: Path) -> None:
    guest = FakeGuest(tmp_path / "g")
    kernel = Kernel(guest.sysfs, guest.procfs)
    (guest.sysfs / "devices/system/memory/block_size_bytes").write_text("zz\n")
    with pytest.raises(KernelReadError, match="block_size_bytes: not a hexadecimal size"):
        kernel.block_size()
    (guest.sysfs / "devices/system/cpu/online").write_text("0-x\n")
    with pytest.raises(KernelReadError, match="cpu/online"):
        kernel.cpus_online()
    (guest.sysfs / "devices/system/memory/memory0/state").write_text("sideways\n")
    with pytest.raises(KernelReadError, match="unknown state 'sideways'"):
        kernel.memory_blocks()


# ------------------------------------------------------- the real write path


def test_real_writer_writes_and_reports_errno(tmp_path: Path) -> None:
    writer = SysfsWriter()
    target = tmp_path / "state"
    target.write_text("offline\n")
    writer.write(target, "online_movable")
    assert target.read_text() == "online_movable"
    writer.write(target, "offline", timeout=10)  # through the worker process
    assert target.read_text() == "offline"
    with pytest.raises(OSError) as info:
        writer.write(tmp_path, "x", timeout=10)
    assert info.value.errno == errno.EISDIR
    with pytest.raises(FileNotFoundError):
        writer.write(tmp_path / "gone" / "state", "x", timeout=10)


def test_real_writer_kills_a_write_stuck_past_its_deadline(tmp_path: Path) -> None:
    # Opening a FIFO with no reader blocks in the kernel, like offline_pages
    # retrying busy pages: only a signal gets the writer out.
    fifo = tmp_path / "state"
    os.mkfifo(fifo)
    # Children other tests left (multiprocessing's resource tracker) are not ours.
    before = set(psutil.Process().children())
    started = time.monotonic()
    with pytest.raises(WriteTimeoutError, match=r"took over 0\.3 s"):
        SysfsWriter().write(fifo, "offline", timeout=0.3)
    assert time.monotonic() - started < 10
    assert set(psutil.Process().children()) - before == set()  # the worker was reaped


def test_kernel_maps_real_writer_errors(tmp_path: Path) -> None:
    guest = FakeGuest(tmp_path / "g")
    guest.plug_cpu(1)
    kernel = Kernel(guest.sysfs, guest.procfs)  # plain writes, no kernel rules
    state = guest.sysfs / "devices/system/cpu/cpu1/online"
    state.chmod(0o444)
    try:
        result = kernel.set_cpu(1, online=True)
    finally:
        state.chmod(0o644)
    if os.geteuid() == 0:  # root ignores file modes: the write goes through
        assert result.outcome is Outcome.DONE
    else:
        assert (result.outcome, result.errno) == (Outcome.REFUSED, errno.EACCES)


# ------------------------------------------------- this machine, read-only


REAL_SYSFS = Path("/sys/devices/system")


def test_real_cpu_reads() -> None:
    kernel = Kernel()
    possible, present, online = kernel.cpus_possible(), kernel.cpus_present(), kernel.cpus_online()
    assert online and online <= present <= possible
    cpus = kernel.cpus()
    assert {c.id for c in cpus} == present
    for cpu in cpus:
        assert cpu.hotpluggable == (REAL_SYSFS / f"cpu/cpu{cpu.id}/online").exists()
        assert cpu.online == (cpu.id in online)


@pytest.mark.skipif(not (REAL_SYSFS / "memory").is_dir(), reason="no memory hotplug on this kernel")
def test_real_memory_reads() -> None:
    kernel = Kernel()
    size = kernel.block_size()
    assert size > 0 and size & (size - 1) == 0  # a power of two
    blocks = kernel.memory_blocks()
    assert blocks and any(b.online for b in blocks)
    assert all(isinstance(b.state, BlockState) for b in blocks)
    assert all(b.zones for b in blocks if b.online)
    assert kernel.auto_online_blocks() in {"offline", "online", "online_kernel", "online_movable"}
    assert kernel.kernel_cmdline() == Path("/proc/cmdline").read_text().strip()


def test_cpu_ejected_between_listing_and_reading_is_skipped(
    kernel: Kernel, guest: FakeGuest
) -> None:
    # `present` still lists cpu2, but its directory is gone (ACPI eject).
    cpu2 = guest.sysfs / "devices/system/cpu/cpu2"
    for child in cpu2.iterdir():
        child.unlink()
    cpu2.rmdir()
    assert [c.id for c in kernel.cpus()] == [0, 1]
