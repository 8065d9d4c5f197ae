"""Build vmtide's packages into dist/: vmtide-agent and vmtide-broker as .deb, and .rpm.

    python packaging/build.py                   # both .debs (dpkg-deb)
    python packaging/build.py --rpm             # and both .rpms (rpmbuild)
    python packaging/build.py --package agent   # only that one
    python packaging/build.py install-tree --package agent --root DIR
                                                # what a package installs, laid out
                                                # under DIR (the rpm spec's %install)

Each package is self-contained: a virtualenv under /opt/vmtide/<role> holds
vmtide and the PyPI releases it needs, on the system's Python 3.11, because
Debian 12's python3-grpcio (1.51) and python3-protobuf (3.21) are far older
than the generated stubs require (docs/packaging.md). /usr/bin gets a link to
the command, the unit comes from systemd/, the default config goes to
/etc/vmtide as a conffile, and a man page is generated from the command's own
argparse parser.

Building needs the network (PyPI, through pip's cache) and, for the venv, the
interpreter the package will run on: /usr/bin/python3.11 with its venv module
(Debian: python3-venv).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import importlib.util
import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.parser import HeaderParser
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from deb import manpage  # noqa: E402  (after the path it lives on)

DEFAULT_PYTHON = "/usr/bin/python3.11"
DEFAULT_MAINTAINER = "vmtide developers <vmtide@example.org>"
HOMEPAGE = "https://github.com/vmtide/vmtide"
DEB_UNITDIR = "/lib/systemd/system"  # Debian 12 ships units there, not under /usr
EX_CONFIG = 78
# The venv's own tooling: nothing at run time needs it, and pip in a package
# invites changing files dpkg owns.
BUILD_ONLY_DISTRIBUTIONS = ("pip", "setuptools")


@dataclass(frozen=True)
class Package:
    role: str  # agent, broker
    extra: str  # the pyproject extra to install with vmtide ("" for none)
    summary: str
    description: str  # paragraphs, blank-line separated
    depends: tuple[str, ...]  # Debian packages beyond the interpreter
    suggests: tuple[str, ...]
    data: tuple[tuple[str, str], ...]  # (file in the repo, installed path)
    see_also: tuple[tuple[str, str], ...]
    notes: str  # for the man page: how the command is run
    exit_one: str  # for the man page: what exit status 1 means

    @property
    def name(self) -> str:
        return f"vmtide-{self.role}"

    @property
    def prefix(self) -> str:
        return f"/opt/vmtide/{self.role}"

    @property
    def entry_point(self) -> str:
        return f"{self.role}.cli:main"

    @property
    def config(self) -> str:
        return f"/etc/vmtide/{self.role}.toml"

    @property
    def unit(self) -> str:
        return f"{self.name}.service"


PACKAGES = {
    "agent": Package(
        role="agent",
        extra="",
        summary="guest agent: CPUs and memory that follow the load",
        description=(
            "vmtide-agent runs inside a virtual machine. It watches the guest's load\n"
            "and pressure (PSI), decides how many CPUs and how much memory the guest\n"
            "needs, asks the host's vmtide-broker for them over gRPC (vsock by\n"
            "default), and onlines or offlines hot-plugged CPUs and memory blocks.\n"
            "\n"
            "This package is self-contained: vmtide and the Python libraries it needs\n"
            "(grpcio, protobuf, psutil, pyudev, prometheus-client) are in a private\n"
            "virtualenv under /opt/vmtide/agent, run by the system's Python 3.11."
        ),
        depends=("libudev1",),
        suggests=(),
        data=(("docs/agent.example.toml", "/usr/share/doc/vmtide-agent/examples/agent.toml"),),
        see_also=(("vmtide-broker", "8"), ("systemctl", "1")),
        notes=(
            "In a guest, systemd runs `vmtide-agent run` (vmtide-agent.service, enabled when"
            " the package is installed; it starts only in a virtual machine). `status` shows"
            " what the agent sees and what its policy would do now; `check-config` validates"
            " a configuration before a restart. The agent must run as root: it writes the"
            " online files under /sys/devices/system/cpu and /sys/devices/system/memory."
        ),
        exit_one="check-config found an error; run or status could not read the guest's topology",
    ),
    "broker": Package(
        role="broker",
        extra="broker",
        summary="host broker: arbitrates CPUs and memory among vmtide guests",
        description=(
            "vmtide-broker runs on the virtualisation host. It serves the vmtide-agent\n"
            "of each guest, arbitrates a pool of CPUs and memory among them by\n"
            "priority and limits, and hot-plugs vCPUs and memory into the QEMU VMs\n"
            "over QMP.\n"
            "\n"
            "Prometheus alerting rules and a Grafana dashboard for both daemons are\n"
            "in /usr/share/vmtide-broker.\n"
            "\n"
            "This package is self-contained: vmtide and the Python libraries it needs\n"
            "(grpcio, protobuf, qemu.qmp, prometheus-client and more) are in a private\n"
            "virtualenv under /opt/vmtide/broker, run by the system's Python 3.11."
        ),
        depends=(),
        suggests=("qemu-system-x86", "prometheus"),
        data=(
            ("docs/broker.example.toml", "/usr/share/doc/vmtide-broker/examples/broker.toml"),
            (
                "packaging/prometheus/vmtide.rules.yml",
                "/usr/share/vmtide-broker/prometheus/vmtide.rules.yml",
            ),
            ("packaging/grafana/vmtide.json", "/usr/share/vmtide-broker/grafana/vmtide.json"),
        ),
        see_also=(("vmtide-agent", "8"), ("systemctl", "1")),
        notes=(
            "On the host, systemd runs `vmtide-broker run` (vmtide-broker.service). As"
            " installed, /etc/vmtide/broker.toml serves no guest: add a [[guests]] table per"
            " VM, then restart the unit. `status` shows, per guest, its limits and what is"
            " granted, online and pending; `check-config` validates a configuration."
        ),
        exit_one=(
            "check-config found an error; run could not open a listener or reach a guest's"
            " QEMU; status found no state file (the broker is not running)"
        ),
    ),
}


# ------------------------------------------------------------------ helpers


def run(
    args: Sequence[str | Path], *, cwd: Path | None = None, env: dict[str, str] | None = None
) -> str:
    """Run a build step; on failure raise with its output (pip's is long: only then shown)."""
    result = subprocess.run(
        [str(a) for a in args],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", **(env or {})},
    )
    if result.returncode != 0:
        output = (result.stdout or "") + (result.stderr or "")
        raise SystemExit(
            f"build: {' '.join(map(str, args))} failed ({result.returncode}):\n{output}"
        )
    return result.stdout or ""


def version(source: Path) -> str:
    match = re.search(
        r'^__version__ = "([^"]+)"$', (source / "vmtide/__init__.py").read_text(), re.MULTILINE
    )
    if not match:
        raise SystemExit(f"build: no __version__ in {source / 'vmtide/__init__.py'}")
    return match.group(1)


def source_date_epoch(source: Path) -> int:
    """SOURCE_DATE_EPOCH, else the last commit's time: file dates and the changelog's."""
    if "SOURCE_DATE_EPOCH" in os.environ:
        return int(os.environ["SOURCE_DATE_EPOCH"])
    try:
        return int(run(["git", "log", "-1", "--format=%ct"], cwd=source).strip())
    except (SystemExit, ValueError, FileNotFoundError):
        return int(datetime.now(UTC).timestamp())


def export_source(source: Path, dest: Path) -> Path:
    """The work tree's files that git does not ignore, copied to `dest`: what the tests
    import is what gets packaged, and no cache, venv or build output comes along.
    (A release is built from a clean checkout, where that is the commit.)"""
    listed = run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=source
    )
    for name in sorted(set(filter(None, listed.split("\0")))):
        path = source / name
        if path.is_file():  # a tracked file deleted in the work tree is skipped
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, dest / name)
    return dest


def installed(root: Path, path: str) -> Path:
    """An absolute installed path inside the staging root."""
    return root / path.lstrip("/")


# ------------------------------------------------------------ the virtualenv


def bundle_venv(root: Path, package: Package, source: Path, python: str, compile: bool) -> Path:
    """vmtide and its dependencies in a venv built in place under `root`, then made to
    run from package.prefix: it never runs from `root`, so no path may point there."""
    venv = installed(root, package.prefix)
    if not Path(python).exists():
        raise SystemExit(f"build: no interpreter {python} (Debian: apt-get install python3.11)")
    vpython = venv / "bin" / "python"
    requirement = f"{source}[{package.extra}]" if package.extra else str(source)
    # Wheels only for the dependencies: nothing is compiled on the build host.
    install = ["install", "--no-compile", "--only-binary=:all:", requirement]
    if importlib.util.find_spec("pip") is not None:
        # This interpreter's pip installs into the venv: faster than seeding the
        # venv with its own pip, and leaves nothing to remove.
        run([python, "-m", "venv", "--clear", "--without-pip", venv])
        run([sys.executable, "-m", "pip", "--python", vpython, *install])
    else:  # e.g. rpmbuild running this with the bare system interpreter
        run([python, "-m", "venv", "--clear", venv])
        run([vpython, "-m", "pip", *install])
        run([vpython, "-m", "pip", "uninstall", "--yes", *BUILD_ONLY_DISTRIBUTIONS])
    # The other daemon's command (one wheel holds both) would fail without its
    # extra; the activation scripts and empty include/ serve no one at run time.
    others = [f"vmtide-{p.role}" for p in PACKAGES.values() if p != package]
    for name in ("activate", "activate.csh", "activate.fish", "Activate.ps1", *others):
        (venv / "bin" / name).unlink(missing_ok=True)
    shutil.rmtree(venv / "include", ignore_errors=True)
    for cache in sorted(venv.rglob("__pycache__"), reverse=True):
        shutil.rmtree(cache)
    for dist_info in (venv / "lib").glob("python3*/site-packages/vmtide-*.dist-info"):
        # The build directory's URL, meaningless once installed.
        (dist_info / "direct_url.json").unlink(missing_ok=True)
        record = dist_info / "RECORD"
        lines = record.read_text().splitlines(keepends=True)
        record.write_text("".join(line for line in lines if "direct_url.json" not in line))
    _relocate(venv, package.prefix)
    strip_shared_objects(venv)
    (venv / "bundled.txt").write_text(
        "".join(f"{d.name} {d.version} ({d.license})\n" for d in bundled(venv))
    )
    if compile:
        # Paths in the bytecode (tracebacks) are the installed ones.
        run([vpython, "-m", "compileall", "-q", "-s", root, "-p", "/", venv / "lib"])
    return venv


def _relocate(venv: Path, prefix: str) -> None:
    """Point the scripts' shebangs and pyvenv.cfg at `prefix` instead of the build path."""
    built = str(venv).encode()
    for path in [*sorted((venv / "bin").iterdir()), venv / "pyvenv.cfg"]:
        if path.is_symlink() or not path.is_file():
            continue
        data = path.read_bytes()
        if built in data:
            path.write_bytes(data.replace(built, prefix.encode()))
    for path in venv.rglob("*"):
        if path.is_file() and not path.is_symlink() and built in path.read_bytes():
            raise SystemExit(f"build: {path} still names the build directory {venv}")


def strip_shared_objects(venv: Path) -> None:
    """As dh_strip does: wheels may ship debugging symbols nobody here can use."""
    strip = shutil.which("strip")
    if strip is None:
        raise SystemExit("build: no strip (Debian: apt-get install binutils)")
    objects = sorted(venv.glob("lib/python3*/site-packages/**/*.so"))
    if objects:
        run(
            [
                strip,
                "--remove-section=.comment",
                "--remove-section=.note",
                "--strip-unneeded",
                *objects,
            ]
        )


@dataclass(frozen=True)
class Distribution:
    name: str
    version: str
    license: str


def bundled(venv: Path) -> list[Distribution]:
    """What the venv holds (besides vmtide), with each release's declared license."""
    found = []
    for metadata in sorted(venv.glob("lib/python3*/site-packages/*.dist-info/METADATA")):
        headers = HeaderParser().parsestr(metadata.read_text(errors="replace"))
        classifiers = [
            c.rsplit(" :: ", 1)[-1]
            for c in headers.get_all("Classifier") or []
            if c.startswith("License ::")
        ]
        declared = headers.get("License-Expression") or headers.get("License") or ""
        if not declared or len(declared) > 80:  # some put the whole text there
            declared = ", ".join(classifiers) or "see its dist-info"
        found.append(Distribution(headers["Name"], headers["Version"], declared.strip()))
    return [d for d in found if d.name != "vmtide"]


# --------------------------------------------------------- the installed tree


def install_tree(
    root: Path, package: Package, source: Path, python: str, unitdir: str, compile: bool
) -> None:
    """Everything the package installs, under `root`, as both .deb and .rpm ship it."""
    venv = bundle_venv(root, package, source, python, compile)
    command = venv / "bin" / package.name
    if not command.exists():
        raise SystemExit(f"build: the venv has no {command.name} console script")
    link = installed(root, f"/usr/bin/{package.name}")
    link.parent.mkdir(parents=True, exist_ok=True)
    # Between top-level directories a link is absolute (Debian policy 10.5).
    link.symlink_to(f"{package.prefix}/bin/{package.name}")

    unit = installed(root, f"{unitdir}/{package.unit}")
    unit.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(source / "systemd" / package.unit, unit)
    config = installed(root, package.config)
    config.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(HERE / "deb" / f"{package.role}.toml", config)
    for repo_file, path in package.data:
        target = installed(root, path)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source / repo_file, target)

    page = manpage.render(
        manpage.probe(venv / "bin" / "python", package.entry_point),
        manpage.Page(
            section="8",
            version=version(source),
            summary=package.summary,
            notes=package.notes,
            files=(
                (package.config, "the configuration (TOML); absent keys take their defaults"),
                (f"{unitdir}/{package.unit}", "the systemd unit"),
                (package.prefix, "the bundled virtualenv: vmtide and its Python libraries"),
            ),
            exit_status=(
                ("0", "success"),
                ("1", package.exit_one),
                ("2", "no command given"),
                (
                    str(EX_CONFIG),
                    "run or status: the config does not load (EX_CONFIG; the unit does not"
                    " restart on it)",
                ),
            ),
            see_also=package.see_also,
            epoch=source_date_epoch(source),
        ),
    )
    man = installed(root, f"/usr/share/man/man8/{package.name}.8.gz")
    man.parent.mkdir(parents=True, exist_ok=True)
    man.write_bytes(gzip_bytes(page.encode()))


def gzip_bytes(data: bytes) -> bytes:
    """gzip -9n: no name, no date, so the same input gives the same bytes."""
    buffer = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, compresslevel=9, mtime=0) as out:
        out.write(data)
    return buffer.getvalue()


# ---------------------------------------------------------------------- .deb


@dataclass(frozen=True)
class Build:
    source: Path
    version: str
    epoch: int
    python: str
    maintainer: str
    compression: str  # the .deb payload's


def deb_architecture() -> str:
    return run(["dpkg", "--print-architecture"]).strip()


def walk(root: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            yield Path(dirpath) / name


def normalise_modes(root: Path, executables: Sequence[str]) -> None:
    """0755 for directories and commands, 0644 for everything else (wheels' own
    modes vary: a shared object or a module marked executable is not a command)."""
    for path in walk(root):
        if path.is_symlink():
            continue
        rel = "/" + path.relative_to(root).as_posix()
        executable = path.is_dir() or any(rel.startswith(e) for e in executables)
        path.chmod(0o755 if executable else 0o644)


def deb_changelog(package: Package, build: Build) -> str:
    when = datetime.fromtimestamp(build.epoch, UTC).strftime("%a, %d %b %Y %H:%M:%S +0000")
    return (
        f"vmtide ({build.version}) unstable; urgency=medium\n\n"
        f"  * vmtide {build.version}: packaged by packaging/build.py.\n\n"
        f" -- {build.maintainer}  {when}\n"
    )


def deb_copyright(package: Package, venv: Path, epoch: int) -> str:
    year = datetime.fromtimestamp(epoch, UTC).year
    components = "\n".join(f" {d.name} {d.version}: {d.license}" for d in bundled(venv))
    return f"""\
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: vmtide
Source: {HOMEPAGE}
Comment: {package.prefix} bundles these PyPI releases, each under its own
 license, whose full text is in its .dist-info directory under
 {package.prefix}/lib/python3.11/site-packages (the list is also in
 {package.prefix}/bundled.txt):
 .
{components}

Files: *
Copyright: {year} vmtide contributors
License: Apache-2.0
 On Debian systems, the full text of the Apache License version 2.0 is in
 /usr/share/common-licenses/Apache-2.0.
"""


# Only errors inherent to a self-contained package are overridden; each is
# explained in docs/packaging.md, and so is every warning left.
LINTIAN_OVERRIDES = """\
# Add-on software built outside Debian, with its own virtualenv: the FHS puts
# such packages in /opt/<provider>.
{name}: dir-or-file-in-opt [opt/vmtide/*]
# grpcio's wheel links its own zlib statically; Debian's cannot replace it.
{name}: embedded-library zlib [opt/vmtide/*/grpc/_cython/cygrpc.*.so]
"""


def installed_size_kib(root: Path) -> int:
    """As dpkg-gencontrol counts: each file's size rounded up to KiB, 1 for other entries."""
    total = 0
    for path in walk(root):
        if path.is_file() and not path.is_symlink():
            total += -(-path.stat().st_size // 1024)
        else:
            total += 1
    return total


def shared_library_depends(workdir: Path, package: Package, venv: Path) -> list[str]:
    """What the wheels' compiled modules link against (libc6, libstdc++6), as Debian
    packages with versions: dpkg-shlibdeps, as ${shlibs:Depends} would give."""
    objects = sorted(venv.glob("lib/python3*/site-packages/**/*.so"))
    if not objects:
        return []
    control = workdir / "debian" / "control"
    control.write_text(f"Source: vmtide\n\nPackage: {package.name}\nArchitecture: any\n")
    try:
        output = run(["dpkg-shlibdeps", "-O", "--warnings=0", *objects], cwd=workdir)
    finally:
        control.unlink()
    match = re.search(r"^shlibs:Depends=(.*)$", output, re.MULTILINE)
    if not match:
        raise SystemExit(f"build: dpkg-shlibdeps gave no dependencies:\n{output}")
    return [d.strip() for d in match.group(1).split(",")]


def deb_control(
    package: Package, build: Build, arch: str, size: int, libraries: Sequence[str]
) -> str:
    interpreter = Path(build.python).name  # python3.11: the venv's binary is its symlink
    description = "\n".join(
        f" {line}" if line else " ." for line in package.description.splitlines()
    )
    fields = [
        ("Package", package.name),
        ("Source", "vmtide"),
        ("Version", build.version),
        ("Architecture", arch),
        ("Maintainer", build.maintainer),
        ("Installed-Size", str(size)),
        ("Depends", ", ".join((interpreter, *libraries, *package.depends))),
        ("Suggests", ", ".join(package.suggests)),
        ("Section", "admin"),
        ("Priority", "optional"),
        ("Homepage", HOMEPAGE),
        ("Description", f"{package.summary}\n{description}"),
    ]
    return "".join(f"{key}: {value}\n" for key, value in fields if value)


def build_deb(package: Package, build: Build, out: Path) -> Path:
    arch = deb_architecture()
    with tempfile.TemporaryDirectory(prefix=f"{package.name}-") as tmp:
        # debian/<package>, as dh lays it out: where dpkg-shlibdeps expects binaries.
        root = Path(tmp) / "debian" / package.name
        install_tree(root, package, build.source, build.python, DEB_UNITDIR, compile=False)
        venv = installed(root, package.prefix)
        doc = installed(root, f"/usr/share/doc/{package.name}")
        doc.mkdir(parents=True, exist_ok=True)
        (doc / "copyright").write_text(deb_copyright(package, venv, build.epoch))
        (doc / "changelog.gz").write_bytes(gzip_bytes(deb_changelog(package, build).encode()))
        overrides = installed(root, f"/usr/share/lintian/overrides/{package.name}")
        overrides.parent.mkdir(parents=True, exist_ok=True)
        overrides.write_text(LINTIAN_OVERRIDES.format(name=package.name))
        normalise_modes(root, [f"{package.prefix}/bin/", "/usr/bin/"])

        libraries = shared_library_depends(Path(tmp), package, venv)

        debian = root / "DEBIAN"
        debian.mkdir()
        size = installed_size_kib(root)
        (debian / "control").write_text(deb_control(package, build, arch, size, libraries))
        (debian / "conffiles").write_text(f"{package.config}\n")
        for script in ("postinst", "prerm", "postrm"):
            text = (HERE / "deb" / script).read_text()
            for key, value in (
                ("@PACKAGE@", package.name),
                ("@PREFIX@", package.prefix),
                ("@UNIT@", package.unit),
            ):
                text = text.replace(key, value)
            (debian / script).write_text(text)
            (debian / script).chmod(0o755)
        sums = []
        for path in walk(root):
            if path.is_file() and not path.is_symlink() and debian not in path.parents:
                digest = hashlib.md5(path.read_bytes()).hexdigest()
                sums.append(f"{digest}  {path.relative_to(root).as_posix()}\n")
        (debian / "md5sums").write_text("".join(sums))
        (debian / "md5sums").chmod(0o644)
        (debian / "control").chmod(0o644)
        (debian / "conffiles").chmod(0o644)

        out.mkdir(parents=True, exist_ok=True)
        deb = out / f"{package.name}_{build.version}_{arch}.deb"
        env = {**os.environ, "SOURCE_DATE_EPOCH": str(build.epoch)}
        result = subprocess.run(
            [
                "dpkg-deb",
                "--root-owner-group",
                f"-Z{build.compression}",
                "--build",
                str(root),
                str(deb),
            ],
            capture_output=True,
            text=True,
            env=env,
            check=False,
        )
        if result.returncode != 0:
            raise SystemExit(f"build: dpkg-deb failed for {package.name}:\n{result.stderr}")
    return deb


# ---------------------------------------------------------------------- .rpm

SPEC = HERE / "rpm" / "vmtide.spec"


def source_tarball(build: Build, dest: Path) -> Path:
    """vmtide-<version>.tar.gz with the tree under vmtide-<version>/, as the spec's Source0."""
    tarball = dest / f"vmtide-{build.version}.tar.gz"
    top = f"vmtide-{build.version}"

    def clamp(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = 0
        info.uname = info.gname = "root"
        info.mtime = min(info.mtime, build.epoch)
        return info

    with tarfile.open(tarball, "w:gz") as tar:
        for path in walk(build.source):
            name = f"{top}/{path.relative_to(build.source).as_posix()}"
            tar.add(path, name, recursive=False, filter=clamp)
    return tarball


def build_rpms(build: Build, out: Path) -> list[Path]:
    """Both subpackages: the spec builds them together."""
    rpmbuild = shutil.which("rpmbuild")
    if rpmbuild is None:
        raise SystemExit("build: --rpm needs rpmbuild (Debian: apt-get install rpm)")
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="vmtide-rpm-") as tmp:
        top = Path(tmp)
        sources = top / "SOURCES"
        sources.mkdir()
        source_tarball(build, sources)
        run(
            [
                rpmbuild,
                "-bb",
                # BuildRequires name rpm packages; a Debian host's rpm database has none.
                "--nodeps",
                "--define",
                f"_topdir {top}",
                "--define",
                f"_rpmdir {out.resolve()}",
                "--define",
                "_rpmfilename %%{NAME}-%%{VERSION}-%%{RELEASE}.%%{ARCH}.rpm",
                "--define",
                f"vmtide_version {build.version}",
                "--define",
                f"vmtide_python {build.python}",
                SPEC,
            ],
            env={"SOURCE_DATE_EPOCH": str(build.epoch)},
        )
    arch = run(["rpm", "--eval", "%{_arch}"]).strip()
    rpms = [out / f"{p.name}-{build.version}-1.{arch}.rpm" for p in PACKAGES.values()]
    missing = [r for r in rpms if not r.exists()]
    if missing:
        raise SystemExit(f"build: rpmbuild did not write {', '.join(map(str, missing))}")
    return rpms


# ----------------------------------------------------------------------- main


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "task",
        nargs="?",
        default="packages",
        choices=["packages", "install-tree"],
        help="packages (default): build into --out; install-tree: lay out one package in --root",
    )
    parser.add_argument(
        "--package",
        action="append",
        choices=sorted(PACKAGES),
        help="build only this .deb (repeatable; default both; --rpm builds both)",
    )
    parser.add_argument("--out", type=Path, default=REPO / "dist", help="default dist/")
    parser.add_argument("--rpm", action="store_true", help="also build .rpms (needs rpmbuild)")
    parser.add_argument("--no-deb", action="store_true", help="skip the .debs")
    parser.add_argument(
        "--compression",
        choices=["xz", "gzip"],
        default="xz",
        help=".deb payload compression (default xz; gzip builds several times faster)",
    )
    parser.add_argument(
        "--python",
        default=DEFAULT_PYTHON,
        help=f"the interpreter the packages run on (default {DEFAULT_PYTHON})",
    )
    parser.add_argument(
        "--maintainer",
        default=os.environ.get("VMTIDE_MAINTAINER", DEFAULT_MAINTAINER),
        help="the packages' Maintainer (default $VMTIDE_MAINTAINER or a placeholder)",
    )
    parser.add_argument("--source", type=Path, help="install-tree: the source tree (default .)")
    parser.add_argument("--root", type=Path, help="install-tree: where to lay it out")
    parser.add_argument(
        "--unitdir", default=DEB_UNITDIR, help=f"install-tree: units (default {DEB_UNITDIR})"
    )
    parser.add_argument(
        "--compile", action="store_true", help="install-tree: ship bytecode (rpm does)"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    packages = [PACKAGES[name] for name in (args.package or sorted(PACKAGES))]
    if args.task == "install-tree":
        if args.root is None or len(packages) != 1:
            raise SystemExit("build: install-tree needs --root and exactly one --package")
        source = (args.source or Path.cwd()).resolve()
        install_tree(args.root, packages[0], source, args.python, args.unitdir, args.compile)
        return 0
    with tempfile.TemporaryDirectory(prefix="vmtide-src-") as tmp:
        source = export_source(REPO, Path(tmp))
        build = Build(
            source=source,
            version=version(source),
            epoch=source_date_epoch(REPO),
            python=args.python,
            maintainer=args.maintainer,
            compression=args.compression,
        )
        built = []
        if not args.no_deb:
            built += [build_deb(package, build, args.out) for package in packages]
        if args.rpm:
            built += build_rpms(build, args.out)
    for path in built:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
