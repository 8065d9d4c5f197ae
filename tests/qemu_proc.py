"""Start and stop a real QEMU for tests: no kernel, no disk, the VM stays paused.

QMP works without a guest OS, so hotplug commands can be checked against the real
thing. Each VM gets its own directory, two QMP sockets (one for the code under
test, one for the test to look with: QEMU serves one client per socket) and is
killed by its own pid. A new QemuProcess on the same directory is a restarted
QEMU on the same sockets.

With `qtest=True` QEMU runs under its qtest accelerator instead of TCG and serves
the qtest protocol on a third socket: a test can then write the guest's side of
an I/O port, e.g. the ACPI _OST answer a guest OS gives to an eject (`AcpiGuest`).
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

QEMU_BINARY = "qemu-system-x86_64"

# TCG: nested KVM guests hang on these machines (docs: real-vm.md). -S keeps the
# firmware from running at all: QMP and hotplug work on a paused VM, and a
# running SeaBIOS with nothing to boot would only burn CPU and reset.
BASE_ARGS = (
    "-S",
    "-machine",
    "q35",
    "-nodefaults",
    "-nographic",
    "-display",
    "none",
)
DEFAULT_MACHINE_ARGS = (
    "-smp",
    "1,maxcpus=4",
    "-m",
    "512M,slots=4,maxmem=4G",
)
VIRTIO_MEM_ARGS = (
    "-object",
    "memory-backend-ram,id=vmem0,size=1G",
    "-device",
    "virtio-mem-pci,id=vm0,memdev=vmem0,requested-size=0,block-size=2M",
)
BALLOON_ARGS = ("-device", "virtio-balloon-pci,id=balloon0")

# QEMU creates its QMP sockets within a few hundred ms even under TCG; a slow CI
# host gets ample margin, a QEMU that dies on bad arguments is seen at once.
START_TIMEOUT_SECONDS = 15.0
STOP_TIMEOUT_SECONDS = 10.0
_POLL_SECONDS = 0.01


def qemu_binary() -> str | None:
    return shutil.which(QEMU_BINARY)


def _accepts(path: Path) -> bool:
    """Whether a client can connect; QEMU takes the next client once this one hangs up."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            return False
    return True


class QemuProcess:
    """One QEMU process; use as a context manager so it is always killed."""

    def __init__(
        self, workdir: Path, extra_args: Sequence[str] = (), *, qtest: bool = False
    ) -> None:
        binary = qemu_binary()
        if binary is None:
            raise RuntimeError(f"{QEMU_BINARY} is not installed")
        workdir.mkdir(parents=True, exist_ok=True)
        self.qmp_socket = workdir / "qmp.sock"
        self.inspect_socket = workdir / "inspect.sock"
        self.qtest_socket = workdir / "qtest.sock"
        self._log_path = workdir / "qemu.log"
        # -qtest picks the qtest accelerator itself; it refuses to share with TCG.
        accel = (
            ("-qtest", f"unix:{self.qtest_socket},server=on,wait=off")
            if qtest
            else (
                "-accel",
                "tcg",
            )
        )
        self.args = [
            binary,
            *BASE_ARGS,
            *accel,
            *DEFAULT_MACHINE_ARGS,
            *extra_args,
            "-qmp",
            f"unix:{self.qmp_socket},server=on,wait=off",
            "-qmp",
            f"unix:{self.inspect_socket},server=on,wait=off",
        ]
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self._proc is not None, "not started"
        return self._proc.pid

    def log(self) -> str:
        return self._log_path.read_text(errors="replace") if self._log_path.exists() else ""

    def start(self) -> None:
        with self._log_path.open("wb") as log:
            self._proc = subprocess.Popen(
                self.args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        # The socket file appears at bind(), before listen(): wait until QEMU accepts.
        while not (_accepts(self.qmp_socket) and _accepts(self.inspect_socket)):
            if self._proc.poll() is not None:
                raise RuntimeError(f"QEMU exited with {self._proc.returncode}: {self.log()}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"QEMU made no QMP socket in {START_TIMEOUT_SECONDS} s")
            time.sleep(_POLL_SECONDS)

    def kill(self) -> None:
        """SIGKILL our own process and reap it; idempotent."""
        if self._proc is None or self._proc.poll() is not None:
            return
        self._proc.kill()
        self._proc.wait(STOP_TIMEOUT_SECONDS)

    def __enter__(self) -> QemuProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


# The guest-facing ACPI hotplug registers on q35 (QEMU docs/specs/
# acpi_cpu_hotplug.rst and acpi_mem_hotplug.rst): a selector, then the _OST
# event and status; writing the status makes QEMU emit ACPI_DEVICE_OST.
_CPU_HOTPLUG_BASE = 0x0CD8
_CPU_CMD_OFFSET = 0x5
_CPU_DATA_OFFSET = 0x8
_CPU_CMD_OST_EVENT = 1
_CPU_CMD_OST_STATUS = 2
_MEMORY_HOTPLUG_BASE = 0x0A00
_MEMORY_OST_EVENT_OFFSET = 0x4
_MEMORY_OST_STATUS_OFFSET = 0x8


class AcpiGuest:
    """Plays a guest OS's ACPI code over QEMU's qtest socket: answers an eject."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    @classmethod
    async def open(cls, proc: QemuProcess) -> AcpiGuest:
        reader, writer = await asyncio.open_unix_connection(str(proc.qtest_socket))
        return cls(reader, writer)

    async def _command(self, line: str) -> None:
        self._writer.write(f"{line}\n".encode())
        await self._writer.drain()
        while True:  # skip the IRQ notices qtest interleaves
            answer = (await self._reader.readline()).decode().strip()
            if not answer:
                raise RuntimeError(f"qtest closed after {line!r}")
            if not answer.startswith("IRQ"):
                break
        if answer != "OK":
            raise RuntimeError(f"qtest {line!r}: {answer}")

    async def cpu_ost(self, slot: int, source: int, status: int) -> None:
        """_OST for the CPU in possible-CPU slot `slot` (its cpu-index here)."""
        await self._command(f"outl {_CPU_HOTPLUG_BASE:#x} {slot:#x}")
        for command, value in ((_CPU_CMD_OST_EVENT, source), (_CPU_CMD_OST_STATUS, status)):
            await self._command(f"outb {_CPU_HOTPLUG_BASE + _CPU_CMD_OFFSET:#x} {command:#x}")
            await self._command(f"outl {_CPU_HOTPLUG_BASE + _CPU_DATA_OFFSET:#x} {value:#x}")

    async def dimm_ost(self, slot: int, source: int, status: int) -> None:
        """_OST for the DIMM in slot `slot` (query-memory-devices' `slot`)."""
        await self._command(f"outl {_MEMORY_HOTPLUG_BASE:#x} {slot:#x}")
        event = _MEMORY_HOTPLUG_BASE + _MEMORY_OST_EVENT_OFFSET
        await self._command(f"outl {event:#x} {source:#x}")
        await self._command(
            f"outl {_MEMORY_HOTPLUG_BASE + _MEMORY_OST_STATUS_OFFSET:#x} {status:#x}"
        )

    async def close(self) -> None:
        self._writer.close()
        await self._writer.wait_closed()
