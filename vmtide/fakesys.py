"""A simulated guest: a sysfs and procfs tree that behaves like a guest kernel's.

Used by unit tests, by the broker's simulated backend and by the demo, so the
real agent can run unchanged against it (`vmtide-agent run --sysfs-root ...
--procfs-root ... --simulated-kernel`).

Everything the agent sees lives in files under `root`, so an agent in another
process sees the same machine. Writes go through `FakeKernelWriter`, which
applies the kernel's rules (drivers/base/core.c online_store, drivers/base/
memory.c state_store) and the faults planted in `root/faults.json`:

- cpu0 has no `online` file (unless built with `cpu0_online_file`, as arm64,
  ppc64 and some x86 kernels show one); CPUs accept "0" or "1" only;
- a memory block accepts online, online_kernel, online_movable and offline;
  writing its current state fails with EINVAL, as the kernel's does;
- online_movable fails with EINVAL where Movable is not a valid zone;
- boot memory sits in ZONE_NORMAL and refuses offlining with EBUSY, like a
  kernel zone holding unmovable pages;
- planted faults refuse with an errno, hang until the deadline, or make the
  block vanish between listing and writing;
- a state change and the host's plugs and unplugs never interleave: they take
  a lock on `root/.hotplug.lock`, as the kernel's take device_hotplug_lock.

The host side (`FakeGuest`) plugs and unplugs CPUs and blocks, and `tick()`
turns a simulated load into /proc/stat, /proc/meminfo and PSI figures.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NotRequired, TypedDict

from agent.kernel import CPU_DIR, MEMORY_DIR, WriteTimeoutError, format_cpu_list, parse_cpu_list

MiB = 1 << 20
FAULTS_FILE = "faults.json"
LOCK_FILE = ".hotplug.lock"
_USER_HZ = 100  # /proc/stat counts jiffies of 1/100 s on every Linux ABI
_CPU_PATH = re.compile(r"cpu(\d+)/online")
_BLOCK_PATH = re.compile(r"memory(\d+)/state")
_ONLINE_TYPES = {"online": "Normal", "online_kernel": "Normal", "online_movable": "Movable"}


class Fault(TypedDict):
    """A fault planted on one CPU or block, applied by FakeKernelWriter."""

    kind: str  # "cpu" or "memory"
    index: int
    effect: int | str  # an errno to refuse with, "hang" or "vanish"
    value: NotRequired[str]  # only writes of this value (e.g. "offline")
    times: NotRequired[int]  # only this many writes, then the fault is gone
    seconds: NotRequired[float]  # how long a "hang" lasts without a deadline


@dataclass(frozen=True)
class Load:
    """What the simulated workload wants."""

    cpus: float  # CPUs' worth of runnable work
    memory_bytes: int  # memory the workload touches


@contextlib.contextmanager
def _hotplug_lock(root: Path) -> Iterator[None]:
    """The kernel's device_hotplug_lock: onlining, offlining, plugging and
    removing never interleave, whichever process does them. (Without it the
    host could remove a block between reading it offline and the agent's
    onlining, and leave half a directory behind.)"""
    with open(root / LOCK_FILE, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _write(path: Path, text: str) -> None:
    # Write then rename, so a reader in another process never sees half a file.
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class FakeKernelWriter:
    """An AttrWriter that applies kernel rules to a FakeGuest tree."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._sysfs = root / "sys"

    def write(self, path: Path, value: str, timeout: float | None = None) -> None:
        rel = path.relative_to(self._sysfs).as_posix()
        if rel.startswith(CPU_DIR + "/") and (m := _CPU_PATH.fullmatch(rel[len(CPU_DIR) + 1 :])):
            self._fault("cpu", int(m.group(1)), value, timeout)
            with _hotplug_lock(self.root):
                self._write_cpu(int(m.group(1)), value.strip())
        elif rel.startswith(MEMORY_DIR + "/") and (
            m := _BLOCK_PATH.fullmatch(rel[len(MEMORY_DIR) + 1 :])
        ):
            self._fault("memory", int(m.group(1)), value, timeout)
            with _hotplug_lock(self.root):
                self._write_block(int(m.group(1)), value.strip())
        else:
            raise OSError(errno.EACCES, os.strerror(errno.EACCES), str(path))

    def _fault(self, kind: str, index: int, value: str, timeout: float | None) -> None:
        faults = load_faults(self.root)
        for fault in faults:
            if fault["kind"] != kind or fault["index"] != index:
                continue
            if fault.get("value") not in (None, value.strip()):
                continue
            effect = fault["effect"]
            if "times" in fault:
                fault["times"] -= 1
                if fault["times"] <= 0:
                    faults.remove(fault)
                _write(self.root / FAULTS_FILE, json.dumps(faults))
            if effect == "hang":
                # A kernel stuck retrying: only the deadline's signal ends it.
                time.sleep(timeout if timeout is not None else fault.get("seconds", 3600))
                raise WriteTimeoutError(f"{kind}{index}: interrupted after {timeout} s")
            if effect == "vanish":
                shutil.rmtree(self._block_dir(index) if kind == "memory" else self._cpu_dir(index))
                raise FileNotFoundError(errno.ENOENT, "vanished", f"{kind}{index}")
            code = int(effect)
            raise OSError(code, os.strerror(code))

    def _cpu_dir(self, cpu: int) -> Path:
        return self._sysfs / CPU_DIR / f"cpu{cpu}"

    def _block_dir(self, index: int) -> Path:
        return self._sysfs / MEMORY_DIR / f"memory{index}"

    def _write_cpu(self, cpu: int, value: str) -> None:
        state = self._cpu_dir(cpu) / "online"
        if not state.exists():
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(state))
        if value not in ("0", "1"):
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL), str(state))
        _write(state, value + "\n")
        online_file = self._sysfs / CPU_DIR / "online"
        online = set(parse_cpu_list(online_file.read_text()))
        (online.add if value == "1" else online.discard)(cpu)
        _write(online_file, format_cpu_list(online) + "\n")

    def _write_block(self, index: int, value: str) -> None:
        block = self._block_dir(index)
        state_file = block / "state"
        try:
            state = state_file.read_text().strip()
            zones = (block / "valid_zones").read_text().split()
        except FileNotFoundError:
            raise FileNotFoundError(errno.ENOENT, "vanished", str(state_file)) from None
        if value == "offline":
            if state == "offline":
                raise OSError(errno.EINVAL, os.strerror(errno.EINVAL), str(state_file))
            if zones != ["Movable"] and (block / ".boot").exists():
                raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), str(state_file))
            _write(state_file, "offline\n")
            _write(block / "valid_zones", "Normal Movable\n")
            return
        zone = _ONLINE_TYPES.get(value)
        if zone is None or state == "online" or (zone == "Movable" and "Movable" not in zones):
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL), str(state_file))
        _write(state_file, "online\n")
        _write(block / "valid_zones", zone + "\n")


def load_faults(root: Path) -> list[Fault]:
    try:
        faults: list[Fault] = json.loads((root / FAULTS_FILE).read_text())
    except FileNotFoundError:
        return []
    return faults


class FakeGuest:
    """The host's view of a simulated guest: its tree, its hotplug slots, its load."""

    def __init__(
        self,
        root: Path,
        *,
        possible_cpus: int = 4,
        boot_cpus: int = 1,
        block_size: int = 128 * MiB,
        boot_blocks: int = 8,
        auto_online: str = "offline",
        cpu0_online_file: bool = False,
    ) -> None:
        self._attach(root, block_size)
        self._cpu0_online_file = cpu0_online_file
        self._build(possible_cpus, boot_cpus, boot_blocks, auto_online)

    @classmethod
    def open(cls, root: Path) -> FakeGuest:
        """Attach to a tree another process built (e.g. the broker's backend)."""
        size_file = root / "sys" / MEMORY_DIR / "block_size_bytes"
        if not size_file.exists():
            raise FileNotFoundError(f"{root} holds no simulated guest")
        guest = cls.__new__(cls)
        guest._attach(root, int(size_file.read_text(), 16))
        return guest

    def _attach(self, root: Path, block_size: int) -> None:
        self.root = root
        self.sysfs = root / "sys"
        self.procfs = root / "proc"
        self.block_size = block_size
        self.writer = FakeKernelWriter(root)
        self._cpu = self.sysfs / CPU_DIR
        self._memory = self.sysfs / MEMORY_DIR
        self._jiffies: list[tuple[int, int]] = []  # (busy, idle) per CPU id
        self._psi = {"cpu": 0.0, "memory": 0.0, "io": 0.0}
        self._psi_total = {"cpu": 0, "memory": 0, "io": 0}
        self._swap = [0, 0]
        self._cpu0_online_file = False

    # ----------------------------------------------------------------- build

    def _build(self, possible: int, boot_cpus: int, boot_blocks: int, auto_online: str) -> None:
        self._cpu.mkdir(parents=True)
        self._memory.mkdir(parents=True)
        (self.procfs / "pressure").mkdir(parents=True)
        _write(self._cpu / "possible", format_cpu_list(range(possible)) + "\n")
        _write(self._cpu / "present", "\n")
        _write(self._cpu / "online", "\n")
        for cpu in range(boot_cpus):
            self.plug_cpu(cpu, online=True)
        _write(self._memory / "block_size_bytes", f"{self.block_size:x}\n")
        _write(self._memory / "auto_online_blocks", auto_online + "\n")
        for index in range(boot_blocks):
            block = self._add_block(index, "online", "Normal")
            (block / ".boot").touch()
        _write(self.procfs / "cmdline", "console=ttyS0 quiet\n")
        self.tick(0.0, Load(cpus=0.0, memory_bytes=0))
        self.set_faults([])

    def _add_block(self, index: int, state: str, zones: str) -> Path:
        block = self._memory / f"memory{index}"
        block.mkdir()
        (block / "node0").mkdir()
        _write(block / "state", state + "\n")
        _write(block / "valid_zones", zones + "\n")
        _write(block / "phys_device", "0\n")
        return block

    # ------------------------------------------------------- host-side hotplug

    def plug_cpu(self, cpu: int, online: bool = False) -> None:
        """A vCPU hot-added by the host: present, and offline unless it is cpu0."""
        if cpu not in self.possible_cpus():
            raise ValueError(f"cpu{cpu} is not a possible CPU of this guest")
        with _hotplug_lock(self.root):
            self._plug_cpu(cpu, online)

    def _plug_cpu(self, cpu: int, online: bool) -> None:
        cpu_dir = self._cpu / f"cpu{cpu}"
        cpu_dir.mkdir(exist_ok=True)
        if cpu != 0 or self._cpu0_online_file:  # usually cpu0 has no `online` file
            _write(cpu_dir / "online", ("1" if online or cpu == 0 else "0") + "\n")
        self._update_list("present", cpu, add=True)
        if online or cpu == 0:
            self._update_list("online", cpu, add=True)

    def unplug_cpu(self, cpu: int) -> None:
        """The host ejects a vCPU; like ACPI eject, only an offline CPU goes."""
        with _hotplug_lock(self.root):
            if cpu in self.online_cpus():
                raise ValueError(f"cpu{cpu} is online; offline it before unplugging")
            shutil.rmtree(self._cpu / f"cpu{cpu}", ignore_errors=True)
            self._update_list("present", cpu, add=False)

    def plug_blocks(self, count: int) -> list[int]:
        """Hot-add `count` memory blocks after the highest existing one."""
        with _hotplug_lock(self.root):
            start = max(self.block_indexes(), default=-1) + 1
            auto = (self._memory / "auto_online_blocks").read_text().strip()
            added = list(range(start, start + count))
            for index in added:
                if auto == "offline":
                    self._add_block(index, "offline", "Normal Movable")
                else:
                    self._add_block(index, "online", _ONLINE_TYPES.get(auto, "Normal"))
        return added

    def remove_block(self, index: int) -> None:
        """The host unplugs a block; only an offline block can go."""
        with _hotplug_lock(self.root):
            state = (self._memory / f"memory{index}" / "state").read_text().strip()
            if state != "offline":
                raise ValueError(f"memory{index} is {state}; offline it before unplugging")
            shutil.rmtree(self._memory / f"memory{index}")

    def set_faults(self, faults: list[Fault]) -> None:
        """Plant faults for the agent's next writes (replacing earlier ones)."""
        _write(self.root / FAULTS_FILE, json.dumps(faults))

    def _update_list(self, name: str, cpu: int, *, add: bool) -> None:
        path = self._cpu / name
        cpus = set(parse_cpu_list(path.read_text()))
        (cpus.add if add else cpus.discard)(cpu)
        _write(path, format_cpu_list(cpus) + "\n")

    # ------------------------------------------------------------------ views

    def possible_cpus(self) -> frozenset[int]:
        return parse_cpu_list((self._cpu / "possible").read_text())

    def present_cpus(self) -> frozenset[int]:
        return parse_cpu_list((self._cpu / "present").read_text())

    def online_cpus(self) -> frozenset[int]:
        return parse_cpu_list((self._cpu / "online").read_text())

    def block_indexes(self) -> list[int]:
        return sorted(int(p.name[6:]) for p in self._memory.glob("memory[0-9]*"))

    def block_state(self, index: int) -> str:
        return (self._memory / f"memory{index}" / "state").read_text().strip()

    def online_blocks(self) -> list[int]:
        online = []
        for i in self.block_indexes():
            try:
                if self.block_state(i) == "online":
                    online.append(i)
            except FileNotFoundError:
                pass  # unplugged (by a broker in another process) since the listing
        return online

    def online_memory_bytes(self) -> int:
        return len(self.online_blocks()) * self.block_size

    # ------------------------------------------------------------------ procfs

    def tick(self, seconds: float, load: Load) -> None:
        """Advance the guest's clock by `seconds` under `load` and rewrite /proc."""
        online = sorted(self.online_cpus())
        if online and len(self._jiffies) <= online[-1]:
            self._jiffies += [(0, 0)] * (online[-1] + 1 - len(self._jiffies))
        capacity = float(len(online))
        busy = min(load.cpus, capacity)
        per_cpu = busy / capacity if capacity else 0.0
        jiffies = seconds * _USER_HZ
        for cpu in online:
            b, i = self._jiffies[cpu]
            self._jiffies[cpu] = (b + round(jiffies * per_cpu), i + round(jiffies * (1 - per_cpu)))
        total_mem = self.online_memory_bytes()
        # Stall shares as PSI would see them: work waiting for a CPU, and the
        # part of the working set that does not fit (reclaim and swap stalls).
        cpu_stall = max(0.0, load.cpus - capacity) / load.cpus if load.cpus > 0 else 0.0
        mem_short = max(0, load.memory_bytes - int(total_mem * 0.9))
        mem_stall = min(1.0, mem_short / total_mem * 4) if total_mem else 1.0
        self._advance_psi("cpu", cpu_stall, seconds)
        self._advance_psi("memory", mem_stall, seconds)
        self._advance_psi("io", mem_stall / 2, seconds)
        if mem_short:
            pages = int(mem_short / 4096 * min(seconds, 1.0) / 10)
            self._swap = [self._swap[0] + pages, self._swap[1] + pages]
        self._write_proc(load, total_mem, online)

    def _advance_psi(self, resource: str, stall: float, seconds: float) -> None:
        # avg10 is an exponential moving average with a 10 s window.
        weight = 1.0 - pow(2.718281828, -seconds / 10.0) if seconds > 0 else 0.0
        self._psi[resource] += (stall * 100.0 - self._psi[resource]) * weight
        self._psi_total[resource] += int(stall * seconds * 1_000_000)

    def _write_proc(self, load: Load, total_mem: int, online: list[int]) -> None:
        lines = []
        agg_busy = sum(b for b, _ in self._jiffies)
        agg_idle = sum(i for _, i in self._jiffies)
        lines.append(f"cpu  {agg_busy} 0 0 {agg_idle} 0 0 0 0 0 0")
        # The CPUs `tick` counted: the agent, in another process, may online
        # one meanwhile, and it has no counters before the next tick.
        for cpu in online:
            b, i = self._jiffies[cpu]
            lines.append(f"cpu{cpu} {b} 0 0 {i} 0 0 0 0 0 0")
        running = max(1, round(load.cpus))
        lines += [
            "intr 0",
            "ctxt 0",
            "btime 0",
            "processes 1",
            f"procs_running {running}",
            "procs_blocked 0",
        ]
        _write(self.procfs / "stat", "\n".join(lines) + "\n")
        avail = max(0, total_mem - load.memory_bytes)
        meminfo = {
            "MemTotal": total_mem,
            "MemFree": avail,
            "MemAvailable": avail,
            "SwapTotal": 1024 * MiB,
            "SwapFree": 1024 * MiB,
        }
        _write(
            self.procfs / "meminfo",
            "".join(f"{k}:{v // 1024:>16} kB\n" for k, v in meminfo.items()),
        )
        _write(self.procfs / "vmstat", f"pswpin {self._swap[0]}\npswpout {self._swap[1]}\n")
        for resource, avg in self._psi.items():
            total = self._psi_total[resource]
            # The fake's full is half its some: enough shape for a policy.
            text = "".join(
                f"{kind} avg10={a:.2f} avg60={a:.2f} avg300={a:.2f} total={t}\n"
                for kind, a, t in (("some", avg, total), ("full", avg / 2, total // 2))
            )
            _write(self.procfs / "pressure" / resource, text)
