"""The guest kernel's hotplug interface: every sysfs path the agent touches.

Nothing else in vmtide names a file under /sys. The `Kernel` class is built with
the sysfs and procfs roots, so tests and the simulated guest point it at a
temporary tree. Reads return small frozen records; writes return a typed
`ItemResult` per CPU or memory block instead of raising, because refusals
(EBUSY, EINVAL) are the normal case of memory offlining, not exceptions.

Kernel references: Documentation/admin-guide/mm/memory-hotplug.rst and
Documentation/core-api/cpu_hotplug.rst. The `probe` file is never used: it
fails with EEXIST on some kernels and is for architectures without ACPI/virtio
memory discovery.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import os
import re
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

CPU_DIR = "devices/system/cpu"
MEMORY_DIR = "devices/system/memory"

# Offlining a memory block migrates every page out of it; the kernel retries
# busy pages until a signal arrives (mm/memory_hotplug.c offline_pages), so an
# unbounded write can hang for ever. Long enough for ~128 MiB of migration on a
# slow emulated guest, short enough to answer a broker's reclaim deadline.
MEMORY_OFFLINE_TIMEOUT_SECONDS = 10.0
# After SIGKILL the worker leaves the kernel at its next signal check; a worker
# still alive after this is abandoned rather than blocking the agent.
WORKER_KILL_GRACE_SECONDS = 5.0

# The boot CPU. Some kernels expose cpu0/online (x86 with
# CONFIG_BOOTPARAM_HOTPLUG_CPU0 until 6.5, arm64, ppc64), but firmware and
# drivers may still depend on it (suspend, legacy interrupts), and a refusal
# on a higher CPU must never walk the shrink down to it.
BOOT_CPU = 0
# Far above any kernel's NR_CPUS (8192 on x86 with MAXSMP).
MAX_CPUS = 1 << 16

_READ_CHUNK = 4096
_DIGITS = re.compile(r"[0-9]+")
_CPU_NAME = re.compile(r"cpu(\d+)")
_BLOCK_NAME = re.compile(r"memory(\d+)")
_NODE_NAME = re.compile(r"node(\d+)")


class Outcome(enum.StrEnum):
    DONE = "done"  # the kernel did it
    ALREADY = "already"  # it was in that state; nothing written
    REFUSED = "refused"  # the kernel said no; errno says why
    TIMED_OUT = "timed_out"  # interrupted at the deadline
    NOT_FOUND = "not_found"  # the CPU or block vanished (unplugged)


class Kind(enum.StrEnum):
    CPU = "cpu"
    MEMORY_BLOCK = "memory_block"


class Action(enum.StrEnum):
    ONLINE = "online"
    OFFLINE = "offline"


class BlockState(enum.StrEnum):
    ONLINE = "online"
    OFFLINE = "offline"
    GOING_OFFLINE = "going-offline"


class OnlineType(enum.StrEnum):
    """What to write to memoryN/state to online a block."""

    MOVABLE = "online_movable"  # ZONE_MOVABLE: can be offlined again later
    KERNEL = "online_kernel"  # a kernel zone: usable for any allocation
    DEFAULT = "online"  # the kernel's choice (memhp default / auto-movable)


@dataclass(frozen=True)
class ItemResult:
    kind: Kind
    index: int
    action: Action
    outcome: Outcome
    errno: int = 0
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.outcome in (Outcome.DONE, Outcome.ALREADY)

    def __str__(self) -> str:
        name = f"cpu{self.index}" if self.kind is Kind.CPU else f"memory{self.index}"
        text = f"{self.action} {name}: {self.outcome}"
        return f"{text} ({self.detail})" if self.detail else text


@dataclass(frozen=True)
class Cpu:
    id: int
    online: bool
    # False when the CPU has no `online` file (usually cpu0): it cannot be
    # offlined, so it is never offered back to the host.
    hotpluggable: bool


@dataclass(frozen=True)
class MemoryBlock:
    index: int
    state: BlockState
    # valid_zones of an online block: its zone. Empty for any other block
    # (not read: see Kernel.memory_block).
    zones: tuple[str, ...]
    node: int | None

    @property
    def online(self) -> bool:
        return self.state is BlockState.ONLINE

    @property
    def movable(self) -> bool:
        return self.online and self.zones[:1] == ("Movable",)


class KernelReadError(ValueError):
    """A sysfs or procfs file could not be read or made no sense."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class WriteTimeoutError(Exception):
    """A bounded write did not finish before its deadline."""


class AttrWriter(Protocol):
    """Writes one value to one sysfs attribute, raising OSError as the kernel does."""

    def write(self, path: Path, value: str, timeout: float | None = None) -> None: ...


class SysfsWriter:
    """Writes sysfs attributes of the running kernel.

    A write with a timeout runs in a short-lived worker process: a thread
    cannot be interrupted inside the kernel, but a process killed at the
    deadline gets a fatal signal, which ends the kernel's offline retry loop.
    """

    def write(self, path: Path, value: str, timeout: float | None = None) -> None:
        if timeout is None:
            _write_attr(path, value)
            return
        worker = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _WORKER_SOURCE, str(path), value],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        try:
            out, _ = worker.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            worker.kill()
            # Still stuck in the kernel after the grace: reaped when it leaves.
            with contextlib.suppress(subprocess.TimeoutExpired):
                worker.wait(WORKER_KILL_GRACE_SECONDS)
            message = f"writing {value!r} to {path} took over {timeout:g} s"
            raise WriteTimeoutError(message) from None
        if worker.returncode != 0:
            code = int(out.strip() or errno.EIO)
            raise OSError(code, os.strerror(code), str(path))


def _read_attr(path: str) -> str:
    """A sysfs attribute's (or another small file's) text, raising OSError as
    open and read do.

    os-level, not Path.read_text: a rescan reads a few files per CPU and per
    memory block, and the buffered text layer costs as much again.
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        # sysfs hands over a whole attribute (at most a page) in one read, as
        # a regular file does: a short read is the end.
        data = os.read(fd, _READ_CHUNK)
        while len(data) % _READ_CHUNK == 0 and (more := os.read(fd, _READ_CHUNK)):
            data += more
    finally:
        os.close(fd)
    return data.decode()


def _write_attr(path: Path, value: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC)  # as `echo >` does; sysfs ignores O_TRUNC
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


# The worker: one write, errno on stdout when it fails. -I -S keep it small.
_WORKER_SOURCE = """
import os, sys
try:
    fd = os.open(sys.argv[1], os.O_WRONLY | os.O_TRUNC)
    try:
        os.write(fd, sys.argv[2].encode())
    finally:
        os.close(fd)
except OSError as err:
    print(err.errno)
    sys.exit(1)
"""


def parse_cpu_list(text: str) -> frozenset[int]:
    """Parse the kernel's CPU list format ("0-3,5,7-8"; empty means none)."""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        if not part:
            continue
        first, sep, last = part.partition("-")
        if not _DIGITS.fullmatch(first) or (sep and not _DIGITS.fullmatch(last)):
            raise ValueError(f"bad CPU list entry {part!r} in {text.strip()!r}")
        start, end = int(first), int(last) if sep else int(first)
        if end < start:
            raise ValueError(f"descending CPU range {part!r}")
        if end >= MAX_CPUS:
            # Bounds the set built below: "0-99999999999" would exhaust memory.
            raise ValueError(f"CPU {end} in {part!r} is beyond any kernel's {MAX_CPUS} CPUs")
        cpus.update(range(start, end + 1))
    return frozenset(cpus)


def format_cpu_list(cpus: Iterable[int]) -> str:
    """The inverse of parse_cpu_list, with ranges collapsed."""
    ordered = sorted(set(cpus))
    parts: list[str] = []
    start = prev = None
    for cpu in [*ordered, None]:
        if start is not None and prev is not None and (cpu is None or cpu != prev + 1):
            parts.append(str(start) if start == prev else f"{start}-{prev}")
            start = None
        if cpu is not None and start is None:
            start = cpu
        prev = cpu
    return ",".join(parts)


class Kernel:
    """The CPU and memory hotplug files of one kernel, rooted at `sysfs`."""

    def __init__(
        self,
        sysfs: Path = Path("/sys"),
        procfs: Path = Path("/proc"),
        writer: AttrWriter | None = None,
    ) -> None:
        self.sysfs = sysfs
        self.procfs = procfs
        self._cpu = sysfs / CPU_DIR
        self._memory = sysfs / MEMORY_DIR
        # As strings too: paths per CPU and per block are built on every rescan.
        self._cpu_dir = str(self._cpu)
        self._memory_dir = str(self._memory)
        self._writer: AttrWriter = writer if writer is not None else SysfsWriter()

    # ------------------------------------------------------------------ reads

    def _read(self, path: Path) -> str:
        try:
            return _read_attr(str(path))
        except OSError as err:
            raise KernelReadError(path, err.strerror or str(err)) from err

    def _cpu_list(self, name: str) -> frozenset[int]:
        path = self._cpu / name
        try:
            return parse_cpu_list(self._read(path))
        except ValueError as err:
            if isinstance(err, KernelReadError):
                raise
            raise KernelReadError(path, str(err)) from err

    def cpus_possible(self) -> frozenset[int]:
        return self._cpu_list("possible")

    def cpus_present(self) -> frozenset[int]:
        return self._cpu_list("present")

    def cpus_online(self) -> frozenset[int]:
        return self._cpu_list("online")

    def cpus(self) -> list[Cpu]:
        """Every present CPU, by id."""
        online = self.cpus_online()
        result = []
        for cpu_id in sorted(self.cpus_present()):
            cpu_dir = f"{self._cpu_dir}/cpu{cpu_id}"
            try:
                text = _read_attr(cpu_dir + "/online").strip()
            except FileNotFoundError:
                if not os.path.exists(cpu_dir):
                    continue  # ejected since `present` was read
                # cpu0 (and CPUs the firmware marks non-removable) have no
                # `online` file; they are online for as long as the kernel runs.
                result.append(Cpu(cpu_id, online=cpu_id in online, hotpluggable=False))
                continue
            except OSError as err:
                if err.errno == errno.ENODEV:
                    # Being ejected: the ACPI handler has unregistered the
                    # device but not yet removed its directory (seen on 6.1).
                    continue
                path = Path(cpu_dir, "online")
                raise KernelReadError(path, err.strerror or str(err)) from err
            result.append(Cpu(cpu_id, online=text == "1", hotpluggable=True))
        return result

    def block_size(self) -> int:
        path = self._memory / "block_size_bytes"
        text = self._read(path).strip()
        try:
            size = int(text, 16)  # hex without 0x, e.g. "8000000" for 128 MiB
        except ValueError:
            raise KernelReadError(path, f"not a hexadecimal size: {text!r}") from None
        if size <= 0:
            raise KernelReadError(path, f"block size must be positive, got {size}")
        return size

    def auto_online_blocks(self) -> str:
        """The kernel's policy for hot-added memory: offline, online, online_movable..."""
        path = self._memory / "auto_online_blocks"
        try:
            return _read_attr(str(path)).strip()
        except FileNotFoundError:
            return "offline"  # kernels before 4.7 never auto-online
        except OSError as err:
            raise KernelReadError(path, err.strerror or str(err)) from err

    def memory_block(self, index: int) -> MemoryBlock | None:
        """One block, or None when it does not exist (any more)."""
        block_dir = f"{self._memory_dir}/memory{index}"
        try:
            state_text = _read_attr(block_dir + "/state").strip()
            # An online block's valid_zones is its zone, fixed. An offline
            # block's makes the kernel walk the block's pages, and 6.1 oopses
            # there (NULL NODE_DATA in zone_for_pfn_range) on a block being
            # hot-removed: seen in a guest as virtio-mem shrank. Onlining
            # never needs it: the kernel refuses a zone the block cannot join.
            zones_text = (
                _read_optional(block_dir + "/valid_zones") if state_text == "online" else ""
            )
            node = next(
                (
                    int(m.group(1))
                    for name in os.listdir(block_dir)
                    if (m := _NODE_NAME.fullmatch(name))
                ),
                None,
            )
        except FileNotFoundError:
            return None
        except OSError as err:
            if err.errno == errno.ENODEV:
                return None  # being removed (virtio-mem unplug, DIMM eject)
            raise KernelReadError(Path(block_dir), err.strerror or str(err)) from err
        return MemoryBlock(
            index, self._state(block_dir, state_text), tuple(zones_text.split()), node
        )

    def _state(self, block_dir: str, text: str) -> BlockState:
        try:
            return BlockState(text)
        except ValueError:
            raise KernelReadError(Path(block_dir, "state"), f"unknown state {text!r}") from None

    def _block_indexes(self) -> list[int]:
        try:
            names = os.listdir(self._memory_dir)
        except OSError as err:
            raise KernelReadError(self._memory, err.strerror or str(err)) from err
        return sorted(int(m.group(1)) for n in names if (m := _BLOCK_NAME.fullmatch(n)))

    def memory_block_states(self) -> list[tuple[int, BlockState]]:
        """Every block's index and state, by index: what onlining needs, without
        the zones and nodes a full read takes. Blocks that vanish are skipped."""
        states = []
        for index in self._block_indexes():
            block_dir = f"{self._memory_dir}/memory{index}"
            try:
                text = _read_attr(block_dir + "/state").strip()
            except FileNotFoundError:
                continue
            except OSError as err:
                if err.errno == errno.ENODEV:
                    continue  # being removed
                raise KernelReadError(Path(block_dir), err.strerror or str(err)) from err
            states.append((index, self._state(block_dir, text)))
        return states

    def memory_blocks(self) -> list[MemoryBlock]:
        """Every block the kernel lists, by index. Blocks that vanish meanwhile are skipped."""
        return [b for i in self._block_indexes() if (b := self.memory_block(i)) is not None]

    def kernel_cmdline(self) -> str:
        return self._read(self.procfs / "cmdline").strip()

    # ----------------------------------------------------------------- writes

    def _write(
        self, kind: Kind, index: int, action: Action, path: Path, value: str, timeout: float | None
    ) -> ItemResult:
        try:
            self._writer.write(path, value, timeout)
        except WriteTimeoutError as err:
            return ItemResult(kind, index, action, Outcome.TIMED_OUT, errno.ETIMEDOUT, str(err))
        except FileNotFoundError:
            return ItemResult(kind, index, action, Outcome.NOT_FOUND, errno.ENOENT, "vanished")
        except OSError as err:
            code = err.errno or errno.EIO
            return ItemResult(kind, index, action, Outcome.REFUSED, code, os.strerror(code))
        return ItemResult(kind, index, action, Outcome.DONE)

    def set_cpu(self, cpu_id: int, online: bool, timeout: float | None = None) -> ItemResult:
        """Online or offline one CPU."""
        action = Action.ONLINE if online else Action.OFFLINE
        cpu_dir = f"{self._cpu_dir}/cpu{cpu_id}"
        try:
            current = _read_attr(cpu_dir + "/online").strip()
        except FileNotFoundError:
            if not os.path.exists(cpu_dir):
                return ItemResult(
                    Kind.CPU, cpu_id, action, Outcome.NOT_FOUND, errno.ENOENT, "no such CPU"
                )
            if online:
                return ItemResult(Kind.CPU, cpu_id, action, Outcome.ALREADY)
            return ItemResult(
                Kind.CPU,
                cpu_id,
                action,
                Outcome.REFUSED,
                errno.EPERM,
                "not hot-pluggable (no online file)",
            )
        except OSError as err:
            code = err.errno or errno.EIO
            return ItemResult(Kind.CPU, cpu_id, action, Outcome.REFUSED, code, os.strerror(code))
        if current == ("1" if online else "0"):
            return ItemResult(Kind.CPU, cpu_id, action, Outcome.ALREADY)
        state_file = Path(cpu_dir, "online")
        return self._write(Kind.CPU, cpu_id, action, state_file, "1" if online else "0", timeout)

    def _block_state(self, index: int, action: Action) -> str | ItemResult:
        """A block's state file, or the result that ends the operation on it.

        Only the state: valid_zones makes the kernel walk the block's zones,
        which costs more than the check is worth, and a read that fails (the
        block going away under the agent) is a per-item result, not a raise.
        """
        try:
            return _read_attr(f"{self._memory_dir}/memory{index}/state").strip()
        except OSError as err:
            if isinstance(err, FileNotFoundError) or err.errno == errno.ENODEV:
                return ItemResult(
                    Kind.MEMORY_BLOCK, index, action, Outcome.NOT_FOUND, errno.ENOENT, "vanished"
                )
            code = err.errno or errno.EIO
            return ItemResult(
                Kind.MEMORY_BLOCK, index, action, Outcome.REFUSED, code, os.strerror(code)
            )

    def online_block(self, index: int, how: OnlineType = OnlineType.MOVABLE) -> ItemResult:
        """Online one memory block, by default into ZONE_MOVABLE so it can be given back."""
        state = self._block_state(index, Action.ONLINE)
        if isinstance(state, ItemResult):
            return state
        if state == BlockState.ONLINE.value:
            # Writing "online" to an online block fails with EINVAL
            # (drivers/base/memory.c state_store), so do not write.
            return ItemResult(Kind.MEMORY_BLOCK, index, Action.ONLINE, Outcome.ALREADY)
        path = self._memory / f"memory{index}" / "state"
        return self._write(Kind.MEMORY_BLOCK, index, Action.ONLINE, path, how.value, None)

    def offline_block(
        self, index: int, timeout: float | None = MEMORY_OFFLINE_TIMEOUT_SECONDS
    ) -> ItemResult:
        """Offline one memory block, giving up at the deadline."""
        state = self._block_state(index, Action.OFFLINE)
        if isinstance(state, ItemResult):
            return state
        if state == BlockState.OFFLINE.value:
            return ItemResult(Kind.MEMORY_BLOCK, index, Action.OFFLINE, Outcome.ALREADY)
        if state not in (BlockState.ONLINE.value, BlockState.GOING_OFFLINE.value):
            # Not a state this kernel interface knows: writing blind could
            # fail any way, so refuse and let the next rescan look again.
            return ItemResult(
                Kind.MEMORY_BLOCK,
                index,
                Action.OFFLINE,
                Outcome.REFUSED,
                errno.EIO,
                f"unknown state {state!r}",
            )
        path = self._memory / f"memory{index}" / "state"
        return self._write(Kind.MEMORY_BLOCK, index, Action.OFFLINE, path, "offline", timeout)


def _read_optional(path: str) -> str:
    try:
        return _read_attr(path).strip()
    except FileNotFoundError:
        return ""
