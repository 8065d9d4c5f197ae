"""Boot a real Linux guest under QEMU, run a script in it, and watch it from the test.

The guest is Debian 12's kernel with a busybox initramfs (`vm.build_image`) whose
init chroots into the host's root, mounted read-only over 9p: the host's Python
and this repo's .venv run inside the guest unchanged. A per-VM directory,
`VM.share`, is also exported read-write and mounted at the same path in the
guest; the guest script writes its results there and the test reads them.

    vm = vms.new(VMOptions(cpus=1, maxcpus=4))
    await vm.start(f"{VENV_BIN}/vmtide-agent status --json > /tmp/s; publish status.json < /tmp/s")
    status = await vm.read_json("status.json", timeout=...)
    async with vm.qmp() as qmp:
        await qmp.execute("device_add", {...})
    assert await vm.wait_exit() == 0

Every wait has a deadline and gives up at once when QEMU or the guest script has
already exited; its failure message ends with the guest console's tail.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest
from qemu.qmp import QMPClient

from vm.build_image import GuestImage, ensure_image

QEMU_BINARY = "qemu-system-x86_64"

# The virtualenv running the tests; the guest sees it at the same path.
VENV_BIN = Path(sys.executable).parent
# Device ids for QMP commands (qom-set, device_del, query-memory-devices).
VIRTIO_MEM_ID = "vm0"
BALLOON_ID = "balloon0"

# QEMU makes its QMP sockets in about 0.1 s; the margin is for a loaded CI host.
QMP_READY_TIMEOUT_SECONDS = 15.0
# The guest script starts about 4.5 s after QEMU here (TCG, 2 host cores); a
# slower or busier CI host gets ten times that.
BOOT_TIMEOUT_SECONDS = 45.0
# The guest powers off within a second of its script ending.
EXIT_TIMEOUT_SECONDS = 20.0
# SIGKILL is not refused; waiting only reaps.
KILL_TIMEOUT_SECONDS = 10.0
# How often waits look again: files on the 9p share appear on the host as soon
# as the guest writes them, so this bounds the added latency, not correctness.
POLL_SECONDS = 0.05
CONSOLE_TAIL_LINES = 40
# Unix socket paths are limited to 107 bytes (sun_path); pytest's tmp_path can
# be longer, so the sockets live in a short directory of their own.
_SOCKET_DIR_PREFIX = "vmtide-vm-"

# Prepended to every guest script. `publish NAME` moves stdin into the share
# atomically, so the host never reads a half-written result.
SCRIPT_PRELUDE = """\
#!/bin/sh
set -eu
publish() {
    cat > "$VMTIDE_SHARE/.$1.partial"
    mv "$VMTIDE_SHARE/.$1.partial" "$VMTIDE_SHARE/$1"
}
"""
# Files init.sh writes into the share.
STARTED_FILE = ".vmtide-started"  # guest uptime when the script started
EXIT_FILE = ".vmtide-exit"  # the script's exit status
SCRIPT_FILE = "run.sh"
# SeaBIOS clears the screen; keep its escape sequences out of failure messages.
_TERMINAL_CONTROL = re.compile(r"\x1b(?:\[[0-9;?]*[A-Za-z]|c)")


def hidden_host_paths() -> list[str]:
    """Host paths the guest needs that its own /tmp and /run would hide: this
    checkout and the Python it runs on, when they live there (a CI clone in /tmp)."""
    repo = Path(__file__).resolve().parents[2]
    wanted = {repo, Path(sys.prefix).resolve(), Path(sys.base_prefix).resolve()}
    hidden = (Path("/tmp"), Path("/run"))
    kept = [p for p in wanted if any(p.is_relative_to(h) for h in hidden)]
    # A path inside another kept one comes along with it.
    return sorted(str(p) for p in kept if not any(p != q and p.is_relative_to(q) for q in kept))


class VMError(AssertionError):
    """A guest did not do what the test waited for; the message ends with its console."""


def qemu_binary() -> str | None:
    return shutil.which(QEMU_BINARY)


def guest_image_or_skip() -> GuestImage:
    """The body of a session fixture: skip without QEMU, else build or reuse the image."""
    if qemu_binary() is None:
        pytest.skip(f"{QEMU_BINARY} is not installed (Debian package qemu-system-x86)")
    return ensure_image()


@dataclass(frozen=True)
class VMOptions:
    cpus: int = 1
    maxcpus: int = 4
    memory: str = "1G"
    slots: int = 4
    maxmem: str = "4G"
    # Backend size of a virtio-mem-pci device (id VIRTIO_MEM_ID, requested-size
    # 0, block-size 2M), e.g. "2G"; counts against maxmem. None: no device.
    virtio_mem: str | None = None
    balloon: bool = False  # virtio-balloon-pci, id BALLOON_ID
    # (host port, guest port): the host's 127.0.0.1:host reaches guest:guest.
    host_forwards: tuple[tuple[int, int], ...] = ()
    # KVM hangs on these machines (nested virtualisation); opt in with "kvm".
    accel: str = "tcg,thread=multi"
    cpu: str = "max"
    kernel_args: tuple[str, ...] = ()
    extra_args: tuple[str, ...] = ()


class VM:
    """One QEMU guest; `VMs` creates them and kills them when the test ends."""

    def __init__(self, image: GuestImage, workdir: Path, options: VMOptions) -> None:
        self.image = image
        self.options = options
        self.workdir = workdir
        self.share = workdir / "share"
        self.console_path = workdir / "console.log"
        self.qemu_log_path = workdir / "qemu.log"  # QEMU's own stdout and stderr
        self._socket_dir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._launched_at = 0.0

    # ------------------------------------------------------------- lifecycle

    @property
    def qmp_socket(self) -> Path:
        """QMP for the code under test (the broker); QEMU serves one client per socket."""
        return self._sockets() / "qmp.sock"

    @property
    def monitor_socket(self) -> Path:
        """QMP for the test itself, see `qmp()`."""
        return self._sockets() / "monitor.sock"

    @property
    def pid(self) -> int:
        return self._process().pid

    async def start(self, script: str) -> None:
        """Boot the guest to run `script` (sh, after SCRIPT_PRELUDE); return once QMP answers.

        The script runs as root in the chroot with $VMTIDE_SHARE set to `share`;
        /tmp and /run are the guest's own tmpfs. The guest powers off when it ends.
        """
        if self._proc is not None:
            raise RuntimeError("a VM starts once; make a new one")
        binary = qemu_binary()
        if binary is None:
            raise RuntimeError(f"{QEMU_BINARY} is not installed")
        self.share.mkdir(parents=True, exist_ok=True)
        program = self.share / SCRIPT_FILE
        program.write_text(SCRIPT_PRELUDE + textwrap.dedent(script))
        program.chmod(0o755)
        args = [*_die_with_parent(), binary, *self.qemu_args(program)]
        with self.qemu_log_path.open("wb") as log:
            log.write(f"# {shlex.join(args)}\n".encode())
            log.flush()
            self._proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self._launched_at = time.monotonic()
        await self._wait(
            lambda: _accepts(self.qmp_socket) and _accepts(self.monitor_socket),
            QMP_READY_TIMEOUT_SECONDS,
            "QEMU to accept QMP connections",
        )

    def qemu_args(self, program: Path) -> list[str]:
        o = self.options
        for path in (program, self.share, self.console_path, self._sockets()):
            # QEMU's option syntax and the kernel command line split on these.
            if any(c in str(path) for c in ", \t\n"):
                raise ValueError(f"VM paths may not contain commas or blanks: {path}")
        append = [
            "console=ttyS0",
            "quiet",
            "panic=-1",  # a dying init reboots, and -no-reboot turns that into an exit
            # The IO-APIC timer check times the emulated PIT; on a busy TCG host
            # it fails and panics ("IO-APIC + timer doesn't work").
            "no_timer_check",
            f"vmtide.run={program}",
            f"vmtide.share={self.share}",
            *(f"vmtide.keep={path}" for path in hidden_host_paths()),
            *o.kernel_args,
        ]
        netdev = "user,id=net0" + "".join(
            f",hostfwd=tcp:127.0.0.1:{host}-:{guest}" for host, guest in o.host_forwards
        )
        virtfs = "security_model=none,multidevs=remap"  # / spans several host devices
        args = [
            "-accel", o.accel,
            "-cpu", o.cpu,
            "-machine", "q35",
            "-nodefaults",
            "-nographic",
            "-no-reboot",
            "-smp", f"{o.cpus},maxcpus={o.maxcpus}",
            "-m", f"{o.memory},slots={o.slots},maxmem={o.maxmem}",
            "-kernel", str(self.image.kernel),
            "-initrd", str(self.image.initrd),
            "-append", " ".join(append),
            "-virtfs", f"local,path=/,mount_tag=hostroot,readonly=on,{virtfs}",
            "-virtfs", f"local,path={self.share},mount_tag=vmshare,{virtfs}",
            "-netdev", netdev,
            # romfile=: no iPXE option ROM, which only slows the firmware down.
            "-device", "virtio-net-pci,netdev=net0,romfile=",
            "-chardev", f"file,id=console,path={self.console_path}",
            "-serial", "chardev:console",
            "-monitor", "none",
            "-qmp", f"unix:{self.qmp_socket},server=on,wait=off",
            "-qmp", f"unix:{self.monitor_socket},server=on,wait=off",
        ]  # fmt: skip
        if o.virtio_mem is not None:
            args += [
                "-object", f"memory-backend-ram,id=vmem0,size={o.virtio_mem}",
                "-device",
                f"virtio-mem-pci,id={VIRTIO_MEM_ID},memdev=vmem0,requested-size=0,block-size=2M",
            ]  # fmt: skip
        if o.balloon:
            args += ["-device", f"virtio-balloon-pci,id={BALLOON_ID}"]
        return [*args, *o.extra_args]

    def kill(self) -> None:
        """SIGKILL our own QEMU and reap it; idempotent, safe on a VM never started."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(KILL_TIMEOUT_SECONDS)
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
            self._socket_dir = None

    # ----------------------------------------------------------------- waits

    async def wait_for(
        self, condition: str | Path | Callable[[], bool], timeout: float, what: str = ""
    ) -> None:
        """Wait until a file exists (relative paths are in `share`) or a predicate holds.

        Fails at the deadline, or as soon as QEMU or the guest script has exited
        without the condition holding.
        """
        if isinstance(condition, str | Path):
            path = self.share / condition
            check = path.exists
            what = what or f"{path} to appear"
        else:
            check = condition
            what = what or getattr(condition, "__name__", "the condition")

        def done() -> bool:
            if check():
                return True
            # Look again after seeing the exit: the script may have just made it true.
            if (self.share / EXIT_FILE).exists() and not check():
                raise self.failure(
                    f"the guest script ended ({self.script_status()}) while waiting for {what}"
                )
            return False

        await self._wait(done, timeout, what)

    async def read_text(self, name: str, timeout: float) -> str:
        """The content of `share/name` once it exists (write it with `publish`)."""
        await self.wait_for(name, timeout)
        return (self.share / name).read_text()

    async def read_json(self, name: str, timeout: float) -> Any:
        """`share/name` parsed as JSON, waiting until it exists and parses."""
        path = self.share / name
        parsed: list[Any] = []

        def parses() -> bool:
            try:
                parsed.append(json.loads(path.read_text()))
            except (FileNotFoundError, json.JSONDecodeError):
                return False
            return True

        await self.wait_for(parses, timeout, f"{path} to hold JSON")
        return parsed[0]

    async def wait_started(self, timeout: float = BOOT_TIMEOUT_SECONDS) -> float:
        """Wait for the guest script to start; return the seconds since QEMU launched."""
        await self.wait_for(STARTED_FILE, timeout, "the guest to boot and start its script")
        return time.monotonic() - self._launched_at

    @property
    def boot_seconds(self) -> float:
        """The guest's uptime when its script started (after `wait_started`)."""
        return float((self.share / STARTED_FILE).read_text())

    async def wait_exit(self, timeout: float = EXIT_TIMEOUT_SECONDS) -> int:
        """Wait for the guest to power off; return its script's exit status."""
        proc = self._process()
        await self._wait(lambda: proc.poll() is not None, timeout, "the guest to power off")
        status = self.script_status()
        if status is None:
            raise self.failure(f"QEMU exited ({proc.returncode}) but the guest script never ended")
        return status

    def script_status(self) -> int | None:
        try:
            return int((self.share / EXIT_FILE).read_text())
        except FileNotFoundError:
            return None

    async def _wait(self, done: Callable[[], bool], timeout: float, what: str) -> None:
        proc = self._process()
        deadline = time.monotonic() + timeout
        while not done():
            if proc.poll() is not None and not done():  # again: it may hold by now
                raise self.failure(f"QEMU exited ({proc.returncode}) while waiting for {what}")
            if time.monotonic() > deadline:
                raise self.failure(f"gave up after {timeout:g} s waiting for {what}")
            await asyncio.sleep(POLL_SECONDS)

    # ------------------------------------------------------------ inspection

    @contextlib.asynccontextmanager
    async def qmp(self) -> AsyncIterator[QMPClient]:
        """A QMP client on the test's own socket (the broker can have `qmp_socket`)."""
        client = QMPClient(f"vmtide-test-{self.workdir.name}")
        await client.connect(str(self.monitor_socket))
        try:
            yield client
        finally:
            await client.disconnect()

    def console_tail(self, lines: int = CONSOLE_TAIL_LINES) -> str:
        try:
            text = self.console_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no console output)"
        return "\n".join(_TERMINAL_CONTROL.sub("", text).splitlines()[-lines:])

    def failure(self, message: str) -> VMError:
        return VMError(self.explain(message))

    def explain(self, message: str) -> str:
        """`message` with the console tail (and QEMU's complaints): for assert messages."""
        parts = [message, f"--- console tail ({self.console_path}) ---", self.console_tail()]
        if self.qemu_log_path.exists():
            qemu_log = self.qemu_log_path.read_text(errors="replace").splitlines()[1:]
            if qemu_log:  # line 0 is the command line, shown only when QEMU said more
                parts += [f"--- QEMU ({self.qemu_log_path}) ---", *qemu_log[-10:]]
        return "\n".join(parts)

    def _process(self) -> subprocess.Popen[bytes]:
        if self._proc is None:
            raise RuntimeError("the VM is not started")
        return self._proc

    def _sockets(self) -> Path:
        if self._socket_dir is None:
            self._socket_dir = Path(tempfile.mkdtemp(prefix=_SOCKET_DIR_PREFIX))
        return self._socket_dir


class VMs:
    """The VMs of one test: use as a context manager (a fixture's body) to kill them all."""

    def __init__(self, image: GuestImage, root: Path) -> None:
        self.image = image
        self.root = root
        self._vms: list[VM] = []

    def new(self, options: VMOptions | None = None) -> VM:
        """A VM, not yet started, with its files under root/vmN."""
        vm = VM(self.image, self.root / f"vm{len(self._vms)}", options or VMOptions())
        vm.workdir.mkdir(parents=True)
        self._vms.append(vm)
        return vm

    def started(self) -> list[VM]:
        """The VMs whose QEMU was launched (their console logs exist)."""
        return [vm for vm in self._vms if vm.console_path.exists()]

    def close(self) -> None:
        for vm in self._vms:
            vm.kill()

    def __enter__(self) -> VMs:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _accepts(path: Path) -> bool:
    """Whether QEMU listens yet: the file appears at bind(), before listen()."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            return False
    return True


def _die_with_parent() -> list[str]:
    """A prefix that makes the kernel SIGKILL QEMU when the test process dies.

    Fixtures kill every VM, but a CI job killed from outside skips them, and an
    orphaned TCG guest would spin a host core until someone notices. setpriv
    (util-linux) sets PR_SET_PDEATHSIG and execs QEMU, so QEMU keeps its pid.
    """
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "KILL"] if setpriv else []
