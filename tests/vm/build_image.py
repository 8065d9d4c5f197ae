"""Build (once) the kernel and initramfs that the real-VM tests boot.

The guest runs Debian 12's own kernel (`linux-image-amd64`), fetched with
`apt-get download` and unpacked with `dpkg -x` so /boot is never touched, and an
initramfs made of busybox-static, a few modules and `init.sh`. Everything lands
in `.cache/vm/` (git-ignored); an image is keyed by a digest of all its inputs,
so a second run is a lookup and a changed `init.sh` or module list rebuilds.

Run `python tests/vm/build_image.py` to build ahead of the tests. Standard
library only: it must run from a fresh clone before anything else is installed.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import io
import json
import lzma
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CACHE_DIR = REPO_ROOT / ".cache" / "vm"
INIT_SCRIPT = Path(__file__).with_name("init.sh")

KERNEL_METAPACKAGE = "linux-image-amd64"
BUSYBOX_PACKAGE = "busybox-static"
BUSYBOX_PATH = Path("/bin/busybox")

# What the guest loads; their dependencies come from each module's own
# `depends=` and are loaded first. virtio_pci finds the devices, 9pnet_virtio and
# 9p mount the host, virtio_net is user networking, virtio_mem and
# virtio_balloon are the memory mechanisms the broker drives.
GUEST_MODULES = (
    "virtio_pci",
    "9pnet_virtio",
    "9p",
    "virtio_net",
    "virtio_mem",
    "virtio_balloon",
)

# Downloading 70 MB is quick on a CI mirror; the margin covers a slow one.
APT_TIMEOUT_SECONDS = 600.0
# dpkg -x of the kernel package writes about 400 MB (6 s here).
DPKG_TIMEOUT_SECONDS = 300.0

Progress = Callable[[str], None]


class ImageError(RuntimeError):
    """The guest image cannot be built; the message says what to install or fix."""


@dataclass(frozen=True)
class GuestImage:
    kernel: Path
    initrd: Path
    kernel_release: str  # e.g. 6.1.0-56-amd64


def _stderr_progress(message: str) -> None:
    print(f"vmtide vm image: {message}", file=sys.stderr, flush=True)


def ensure_image(
    cache_dir: Path = DEFAULT_CACHE_DIR, progress: Progress = _stderr_progress
) -> GuestImage:
    """Return the cached image, building it first when any input changed."""
    busybox = _busybox()
    cache_dir.mkdir(parents=True, exist_ok=True)
    # Parallel test runs share the cache: one builds, the others wait and reuse.
    with _locked(cache_dir / ".lock"):
        deb = _kernel_deb(cache_dir, progress)
        # This file (module list, archive layout), init.sh, busybox and the kernel.
        key = _digest(
            deb.name.encode(),
            Path(__file__).read_bytes(),
            INIT_SCRIPT.read_bytes(),
            busybox.read_bytes(),
        )
        image_dir = cache_dir / "images" / key
        manifest = image_dir / "manifest.json"
        if not manifest.exists():
            _build(deb, busybox, image_dir, progress)
        built = json.loads(manifest.read_text())
        kernel = image_dir / built["kernel"]
        return GuestImage(kernel, image_dir / "initrd.gz", built["kernel_release"])


def _busybox() -> Path:
    # The Debian package "busybox" installs the same path, dynamically linked:
    # in an initramfs without libc that is a kernel panic, so say so here.
    if not BUSYBOX_PATH.is_file() or not _is_static_elf(BUSYBOX_PATH.read_bytes()):
        raise ImageError(
            f"{BUSYBOX_PATH} is missing or not statically linked: install the Debian package "
            f"{BUSYBOX_PACKAGE} (apt-get install {BUSYBOX_PACKAGE}); the guest's initramfs "
            "is built from it"
        )
    return BUSYBOX_PATH


def _is_static_elf(data: bytes) -> bool:
    """A 64-bit little-endian ELF without a PT_INTERP (dynamic loader) program header."""
    if data[:6] != b"\x7fELF\x02\x01":
        return False
    phoff, phentsize, phnum = (
        int.from_bytes(data[32:40], "little"),
        int.from_bytes(data[54:56], "little"),
        int.from_bytes(data[56:58], "little"),
    )
    pt_interp = 3
    return all(
        int.from_bytes(data[phoff + i * phentsize : phoff + i * phentsize + 4], "little")
        != pt_interp
        for i in range(phnum)
    )


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(hashlib.sha256(part).digest())
    return h.hexdigest()[:16]


# ------------------------------------------------------------------ kernel


def _kernel_deb(cache_dir: Path, progress: Progress) -> Path:
    """The kernel package that linux-image-amd64 pointed at on first use; pinned after."""
    pin = cache_dir / "kernel-package.json"
    if pin.exists():
        deb = cache_dir / str(json.loads(pin.read_text())["deb"])
        if deb.exists():
            return deb
    debs = cache_dir / "debs"
    debs.mkdir(exist_ok=True)
    progress(f"resolving {KERNEL_METAPACKAGE} with apt-get")
    meta = _apt_download(KERNEL_METAPACKAGE, debs, progress)
    depends = _run(["dpkg-deb", "--field", str(meta), "Depends"], DPKG_TIMEOUT_SECONDS)
    # The metapackage depends on exactly one image: "linux-image-6.1.0-56-amd64 (= 6.1.192-2)".
    match = re.match(r"\s*(linux-image-[\w.+-]+)\s*\(=\s*([^)\s]+)\)", depends)
    if match is None:
        raise ImageError(f"unexpected Depends in {meta.name}: {depends.strip()!r}")
    package, version = match.groups()
    progress(f"downloading {package} {version} (about 70 MB)")
    deb = _apt_download(f"{package}={version}", debs, progress)
    meta.unlink()
    tmp = pin.with_suffix(".tmp")
    tmp.write_text(json.dumps({"package": package, "version": version, "deb": f"debs/{deb.name}"}))
    tmp.replace(pin)
    return deb


def _apt_download(spec: str, into: Path, progress: Progress) -> Path:
    """`apt-get download SPEC` into a directory; runs `apt-get update` once if apt has no lists."""
    if shutil.which("apt-get") is None:
        raise ImageError("apt-get not found: the real-VM tests fetch a Debian 12 kernel with it")
    before = set(into.glob("*.deb"))
    command = ["apt-get", "download", "--quiet", spec]
    try:
        _run(command, APT_TIMEOUT_SECONDS, cwd=into)
    except ImageError:
        # A fresh CI image has no package lists; anything else fails again below.
        progress(f"apt-get download {spec} failed; running apt-get update and retrying")
        _run(["apt-get", "update", "--quiet"], APT_TIMEOUT_SECONDS)
        _run(command, APT_TIMEOUT_SECONDS, cwd=into)
    name = spec.split("=", 1)[0]
    new = [d for d in set(into.glob("*.deb")) - before if d.name.startswith(f"{name}_")]
    if not new:  # already there from an earlier, interrupted run
        new = sorted(into.glob(f"{name}_*.deb"))
    if len(new) != 1:
        raise ImageError(f"apt-get download {spec} left {len(new)} packages in {into}")
    return new[0]


def _run(command: list[str], timeout: float, cwd: Path | None = None) -> str:
    try:
        done = subprocess.run(
            command, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired as err:
        raise ImageError(f"{' '.join(command)} took longer than {timeout:.0f} s") from err
    if done.returncode != 0:
        raise ImageError(
            f"{' '.join(command)} failed ({done.returncode}): {done.stderr.strip() or done.stdout}"
        )
    return done.stdout


# --------------------------------------------------------------- initramfs


def _build(deb: Path, busybox: Path, image_dir: Path, progress: Progress) -> None:
    image_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=image_dir.parent, prefix=".build-") as tmp:
        work = Path(tmp)
        progress(f"unpacking {deb.name} with dpkg -x")
        tree = work / "tree"
        _run(["dpkg", "-x", str(deb), str(tree)], DPKG_TIMEOUT_SECONDS)
        (vmlinuz,) = (tree / "boot").glob("vmlinuz-*")
        release = vmlinuz.name.removeprefix("vmlinuz-")
        modules = _load_order(tree / "lib" / "modules" / release, GUEST_MODULES)
        progress(
            f"building the initramfs ({len(modules)} modules: {' '.join(n for n, _ in modules)})"
        )
        out = work / "image"
        out.mkdir()
        kernel = _pvh_kernel(vmlinuz.read_bytes())
        if kernel is None:
            shutil.copyfile(vmlinuz, out / "vmlinuz")
        else:
            (out / "vmlinux").write_bytes(kernel)
        archive = _Cpio()
        # Mount points, and where `busybox --install` puts its links.
        for d in ("proc", "sys", "newroot", "tmp", "sbin", "usr/bin", "usr/sbin"):
            archive.directory(d)
        # The kernel opens /dev/console for PID 1 before init can mount devtmpfs.
        archive.char_device("dev/console", major=5, minor=1)
        archive.file("bin/busybox", busybox.read_bytes(), 0o755)
        archive.file("init", INIT_SCRIPT.read_bytes(), 0o755)
        archive.file("etc/vmtide/modules", "".join(f"{n}\n" for n, _ in modules).encode(), 0o644)
        for name, data in modules:
            archive.file(f"lib/modules/{name}.ko", data, 0o644)
        (out / "initrd.gz").write_bytes(gzip.compress(archive.finish(), mtime=0))
        (out / "manifest.json").write_text(
            json.dumps(
                {
                    "kernel_release": release,
                    "kernel": "vmlinuz" if kernel is None else "vmlinux",
                    "deb": deb.name,
                    "modules": [n for n, _ in modules],
                },
                indent=2,
            )
        )
        if image_dir.exists():  # a half-built leftover: manifest.json is written last
            shutil.rmtree(image_dir)
        out.rename(image_dir)
    for old in image_dir.parent.iterdir():  # images of older inputs; none is in use
        if old.is_dir() and old != image_dir and not old.name.startswith(".build-"):
            shutil.rmtree(old)
    progress(f"image ready in {image_dir}")


def _pvh_kernel(bzimage: bytes) -> bytes | None:
    """The uncompressed ELF kernel inside a bzImage, if QEMU can boot it directly.

    QEMU boots an ELF vmlinux through its PVH entry point: no decompression
    under TCG, which halves the boot (4.4 s instead of 8.4 s here). Debian's
    6.1 bzImage holds an xz payload and has CONFIG_PVH; anything else falls
    back to the bzImage.
    """
    start = bzimage.find(b"\xfd7zXZ\x00")
    if start < 0:
        return None
    try:
        elf = lzma.LZMADecompressor().decompress(bzimage[start:])
    except lzma.LZMAError:
        return None
    # An ELF note named "Xen" of type XEN_ELFNOTE_PHYS32_ENTRY (18) marks PVH.
    if not elf.startswith(b"\x7fELF") or b"\x12\x00\x00\x00Xen\x00" not in elf:
        return None
    return elf


def _load_order(modules_dir: Path, wanted: tuple[str, ...]) -> list[tuple[str, bytes]]:
    """The wanted modules and their dependencies, each after what it depends on.

    The package ships no modules.dep (depmod writes it on install), so the
    dependencies come from each module's `depends=` modinfo string.
    """
    files: dict[str, Path] = {}
    for path in (modules_dir / "kernel").rglob("*.ko*"):
        files[_module_name(path)] = path
    builtin = {
        _module_name(Path(line)) for line in (modules_dir / "modules.builtin").read_text().split()
    }
    ordered: list[tuple[str, bytes]] = []
    seen: set[str] = set()

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if name in seen or name in builtin:
            return
        if name in chain:
            raise ImageError(f"module dependency cycle: {' -> '.join((*chain, name))}")
        if name not in files:
            raise ImageError(
                f"module {name} (needed by {chain or 'the guest'}) not in {modules_dir}"
            )
        data = _decompress(files[name])
        match = re.search(rb"(?:^|\x00)depends=([^\x00]*)\x00", data)
        for dep in match.group(1).decode().split(",") if match else []:
            if dep:
                visit(dep.replace("-", "_"), (*chain, name))
        seen.add(name)
        ordered.append((name, data))

    for name in wanted:
        visit(name, ())
    return ordered


def _module_name(path: Path) -> str:
    # Module names treat "-" and "_" alike; modinfo uses "_".
    return path.name.split(".ko", 1)[0].replace("-", "_")


def _decompress(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.endswith(".ko"):
        return data
    if path.name.endswith(".ko.xz"):
        # busybox insmod takes plain ELF only.
        return lzma.decompress(data)
    raise ImageError(f"cannot decompress {path.name}: only .ko and .ko.xz are handled")


class _Cpio:
    """A `newc` cpio archive, the format the kernel unpacks as an initramfs."""

    def __init__(self) -> None:
        self._out = io.BytesIO()
        self._ino = 0
        self._dirs: set[str] = set()

    def directory(self, name: str) -> None:
        if name not in self._dirs:
            self._entry(name, 0o040755, b"")
            self._dirs.add(name)

    def file(self, name: str, data: bytes, perm: int) -> None:
        self._entry(name, 0o100000 | perm, data)

    def char_device(self, name: str, major: int, minor: int) -> None:
        self._entry(name, 0o020600, b"", rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0, b"")
        return self._out.getvalue()

    def _entry(self, name: str, mode: int, data: bytes, rdev: tuple[int, int] = (0, 0)) -> None:
        parent = name.rpartition("/")[0]
        if parent:  # the kernel does not create missing parents
            self.directory(parent)
        self._ino += 1
        encoded = name.encode() + b"\x00"
        # ino mode uid gid nlink mtime filesize devmajor devminor rdevmajor rdevminor namesize check
        fields = (self._ino, mode, 0, 0, 1, 0, len(data), 0, 0, *rdev, len(encoded), 0)
        header = b"070701" + b"".join(b"%08x" % f for f in fields)
        self._write_padded(header + encoded)
        self._write_padded(data)

    def _write_padded(self, chunk: bytes) -> None:
        self._out.write(chunk)
        self._out.write(b"\x00" * (-self._out.tell() % 4))


def main() -> int:
    try:
        image = ensure_image()
    except ImageError as err:
        print(f"vmtide vm image: {err}", file=sys.stderr)
        return 1
    print(f"kernel {image.kernel}\ninitrd {image.initrd}\nrelease {image.kernel_release}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
