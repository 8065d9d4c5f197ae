"""Start and stop a real QEMU for tests: no kernel, no disk, the VM stays paused.

QMP works without a guest OS, so hotplug commands can be checked against the real
thing. Each VM gets its own directory, two QMP sockets (one for the code under
test, one for the test to look with: QEMU serves one client per socket) and is
killed by its own pid.
"""

from __future__ import annotations

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
    "-accel",
    "tcg",
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

    def __init__(self, workdir: Path, extra_args: Sequence[str] = ()) -> None:
        binary = qemu_binary()
        if binary is None:
            raise RuntimeError(f"{QEMU_BINARY} is not installed")
        workdir.mkdir(parents=True, exist_ok=True)
        self.qmp_socket = workdir / "qmp.sock"
        self.inspect_socket = workdir / "inspect.sock"
        self._log_path = workdir / "qemu.log"
        self.args = [
            binary,
            *BASE_ARGS,
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
