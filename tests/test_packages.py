"""The .deb and .rpm packages, built by packaging/build.py and checked for real.

lintian reports no error on either .deb, and every warning it gives is explained in
docs/packaging.md. Both .debs install with apt into a clean Debian 12 root (mmdebstrap,
minbase), which fetches their dependencies from Debian's archive; there the commands
run, the agent reads a simulated guest, the units are enabled, the configs are
conffiles that survive a reinstall, and a purge leaves nothing behind. The rpm spec
builds both subpackages with rpmbuild, and what they hold runs.

Needs dpkg-deb, dpkg-shlibdeps and strip to build (dpkg-dev), lintian, and for the
clean root root privileges, unshare and mmdebstrap; rpmbuild (Debian package rpm) for
the rpm. Each test skips when what it needs is missing; `-m "not packages"` skips them
all. The root's tarball is built once into .cache/packages (a minute or two) and
reused for a week; the archive's .debs it installs are cached beside it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from vmtide import __version__
from vmtide.fakesys import FakeGuest

REPO = Path(__file__).resolve().parent.parent
BUILD = REPO / "packaging" / "build.py"
SPEC = REPO / "packaging" / "rpm" / "vmtide.spec"
PACKAGING_DOC = REPO / "docs" / "packaging.md"
CACHE = REPO / ".cache" / "packages"
ROOT_TARBALL = CACHE / "bookworm-minbase.tar"
ARCHIVES = CACHE / "archives"  # the .debs apt fetches into the root, kept across runs
ROOT_MAX_AGE_SECONDS = 7 * 24 * 3600  # then the archive has moved on: rebuild
MIRROR = os.environ.get("VMTIDE_DEBIAN_MIRROR", "http://deb.debian.org/debian")
SECURITY = os.environ.get("VMTIDE_DEBIAN_SECURITY", "http://deb.debian.org/debian-security")

BUILD_SECONDS = 600  # two virtualenvs from PyPI wheels, on a loaded 2-core machine
ROOT_SECONDS = 600  # mmdebstrap downloads and unpacks a minimal Debian
APT_SECONDS = 300

ROLES = ("agent", "broker")

pytestmark = [pytest.mark.packages, pytest.mark.timeout(1800)]


def need(*tools: str) -> None:
    for name in tools:
        if shutil.which(name) is None:
            pytest.skip(f"{name} is not installed (see docs/packaging.md for the Debian packages)")


def need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("the clean Debian root is a chroot: needs root")


def run(
    args: list[str],
    timeout: float,
    *,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        args, capture_output=True, text=True, timeout=timeout, check=False, cwd=cwd, env=env
    )
    if result.returncode != 0:
        raise AssertionError(
            f"{' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
        )
    return result


def build(out: Path, *options: str) -> list[Path]:
    result = run([sys.executable, str(BUILD), "--out", str(out), *options], BUILD_SECONDS, cwd=REPO)
    return [Path(line) for line in result.stdout.split()]


# ---------------------------------------------------------------------- .deb


@dataclass(frozen=True)
class Deb:
    role: str
    path: Path
    tree: Path  # its contents, unpacked (dpkg-deb -R: data and DEBIAN/)

    @property
    def name(self) -> str:
        return f"vmtide-{self.role}"

    def field(self, name: str) -> str:
        return run(["dpkg-deb", "-f", str(self.path), name], 30).stdout.strip()

    def files(self) -> list[str]:
        listing = run(["dpkg-deb", "--contents", str(self.path)], 30).stdout
        return [line.split(None, 5)[5].removeprefix(".") for line in listing.splitlines()]


@pytest.fixture(scope="module")
def debs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Deb]:
    need("dpkg-deb", "dpkg-shlibdeps", "strip")
    out = tmp_path_factory.mktemp("dist")
    # gzip: several times faster than the default xz, and the contents are the same.
    built = build(out, "--compression", "gzip")
    found = {}
    for role in ROLES:
        path = out / f"vmtide-{role}_{__version__}_amd64.deb"
        assert path in built, built
        tree = out / role
        run(["dpkg-deb", "-R", str(path), str(tree)], 60)
        found[role] = Deb(role, path, tree)
    return found


@pytest.mark.parametrize("role", ROLES)
def test_deb_metadata(debs: dict[str, Deb], role: str) -> None:
    deb = debs[role]
    assert deb.field("Package") == deb.name
    assert deb.field("Version") == __version__
    assert deb.field("Architecture") == "amd64"
    depends = [d.strip() for d in deb.field("Depends").split(",")]
    # The venv's interpreter, and the C libraries the wheels' modules link (shlibdeps).
    assert depends[0] == "python3.11", depends
    assert any(re.fullmatch(r"libc6 \(>= 2\.\d+\)", d) for d in depends), depends
    assert ("libudev1" in depends) == (role == "agent"), depends  # pyudev loads it
    assert (deb.tree / "DEBIAN/conffiles").read_text() == f"/etc/vmtide/{role}.toml\n"
    for script in ("postinst", "prerm", "postrm"):
        text = (deb.tree / "DEBIAN" / script).read_text()
        assert "@" not in text, f"{script} has an unsubstituted placeholder"
        assert f"'{deb.name}.service'" in text, script
        assert os.access(deb.tree / "DEBIAN" / script, os.X_OK)
    assert int(deb.field("Installed-Size")) > 10_000  # KiB: the venv is there


@pytest.mark.parametrize("role", ROLES)
def test_deb_contents(debs: dict[str, Deb], role: str) -> None:
    deb = debs[role]
    files = deb.files()
    venv = f"/opt/vmtide/{role}"
    for path in (
        f"/usr/bin/{deb.name} -> {venv}/bin/{deb.name}",
        f"{venv}/bin/python3.11 -> /usr/bin/python3.11",
        f"{venv}/pyvenv.cfg",
        f"/lib/systemd/system/{deb.name}.service",
        f"/etc/vmtide/{role}.toml",
        f"/usr/share/man/man8/{deb.name}.8.gz",
        f"/usr/share/doc/{deb.name}/copyright",
        f"/usr/share/doc/{deb.name}/examples/{role}.toml",
    ):
        assert path in files, path
    other = "broker" if role == "agent" else "agent"
    assert f"{venv}/bin/vmtide-{other}" not in files  # its extra is not installed
    # Bytecode is the target machine's business (postinst), and no build path leaks.
    assert not [f for f in files if f.endswith(".pyc") or "__pycache__" in f]
    config = (deb.tree / f"opt/vmtide/{role}/pyvenv.cfg").read_text()
    assert "home = /usr/bin\n" in config and "include-system-site-packages = false" in config
    assert f"{venv}\n" in config and "/tmp" not in config
    shebang = (deb.tree / f"opt/vmtide/{role}/bin/{deb.name}").read_text().splitlines()[0]
    assert shebang == f"#!{venv}/bin/python"
    unit = deb.tree / f"lib/systemd/system/{deb.name}.service"
    assert unit.read_bytes() == (REPO / "systemd" / f"{deb.name}.service").read_bytes()
    if role == "broker":  # the monitoring that goes with the host side
        assert "/usr/share/vmtide-broker/prometheus/vmtide.rules.yml" in files
        assert "/usr/share/vmtide-broker/grafana/vmtide.json" in files


@pytest.mark.parametrize("role", ROLES)
def test_man_page_renders_cleanly_and_lists_every_command(debs: dict[str, Deb], role: str) -> None:
    need("man")
    page = debs[role].tree / f"usr/share/man/man8/vmtide-{role}.8.gz"
    result = run(
        ["man", "--warnings", "-E", "UTF-8", "-l", "-Tutf8", str(page)],
        60,
        env={**os.environ, "MANWIDTH": "80"},
    )
    assert result.stderr == "", result.stderr
    text = re.sub(r".\x08", "", result.stdout)  # overstrike bold/underline
    assert re.search(rf"^ +vmtide-{role} +- +\w", text, re.MULTILINE), text[:500]  # NAME
    for command in ("run", "status", "check-config"):
        assert f"vmtide-{role} {command}" in text, command
    assert "--config" in text and "--version" in text and "EXIT STATUS" in text


def lintian_tags(deb: Deb) -> list[tuple[str, str]]:
    """(severity letter, tag) for each E:/W: line."""
    result = subprocess.run(
        ["lintian", "--no-tag-display-limit", str(deb.path)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode in (0, 1, 2), result.stderr  # 2: errors, checked below
    return re.findall(rf"^([EW]): {deb.name}(?: \S+)?: (\S+)", result.stdout, re.MULTILINE)


def test_lintian_reports_no_errors_and_docs_explain_each_warning(debs: dict[str, Deb]) -> None:
    need("lintian")
    documented = set(re.findall(r"^\| `([a-z0-9-]+)`", PACKAGING_DOC.read_text(), re.MULTILINE))
    for deb in debs.values():
        tags = lintian_tags(deb)
        errors = sorted({tag for severity, tag in tags if severity == "E"})
        assert errors == [], f"{deb.name}: lintian errors {errors}"
        warnings = {tag for severity, tag in tags if severity == "W"}
        assert warnings <= documented, (
            f"{deb.name}: not in docs/packaging.md: {warnings - documented}"
        )


# ---------------------------------------------------------- the clean root


def root_tarball() -> Path:
    """A minimal Debian 12 with apt's package lists, built once and kept for a week."""
    if ROOT_TARBALL.exists() and time.time() - ROOT_TARBALL.stat().st_mtime < ROOT_MAX_AGE_SECONDS:
        return ROOT_TARBALL
    CACHE.mkdir(parents=True, exist_ok=True)
    partial = ROOT_TARBALL.with_name(f"{ROOT_TARBALL.stem}.{os.getpid()}.partial.tar")
    try:
        run(
            [
                "mmdebstrap",
                "--variant=minbase",
                "--format=tar",
                "--skip=cleanup/apt/lists",  # apt resolves the .debs' dependencies
                "--quiet",
                "bookworm",
                str(partial),
                f"deb {MIRROR} bookworm main",
                f"deb {SECURITY} bookworm-security main",
            ],
            ROOT_SECONDS,
        )
        partial.replace(ROOT_TARBALL)
    finally:
        partial.unlink(missing_ok=True)
    return ROOT_TARBALL


# Runs one command in the root: a private mount namespace (its mounts go with it),
# a /proc of its own, apt's download cache kept outside so reruns need no network.
_ENTER = """
set -e
root=$1 archives=$2
shift 2
mount -t proc proc "$root/proc"
mount --bind "$archives" "$root/var/cache/apt/archives"
exec chroot "$root" "$@"
"""

ROOT_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LC_ALL": "C.UTF-8",
    "HOME": "/root",
    "DEBIAN_FRONTEND": "noninteractive",
}


@dataclass(frozen=True)
class Root:
    path: Path

    def run(self, *command: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return run(
            [
                "unshare",
                "--mount",
                "--pid",
                "--fork",
                "--propagation",
                "private",
                "sh",
                "-c",
                _ENTER,
                "enter",
                str(self.path),
                str(ARCHIVES),
                *command,
            ],
            timeout,
            env=ROOT_ENV,
        )

    def file(self, path: str) -> Path:
        return self.path / path.lstrip("/")

    def apt_install(self, *debs: Path) -> None:
        staged = []
        for deb in debs:
            shutil.copy(deb, self.file(f"/tmp/{deb.name}"))
            staged.append(f"/tmp/{deb.name}")
        self.run(
            "apt-get",
            "install",
            "-y",
            "-q",
            "--no-install-recommends",
            *staged,
            timeout=APT_SECONDS,
        )


@pytest.fixture(scope="module")
def root(debs: dict[str, Deb], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Root]:
    """A clean Debian 12 root with both .debs installed by apt."""
    need_root()
    need("mmdebstrap", "unshare", "chroot", "tar")
    tarball = root_tarball()
    ARCHIVES.mkdir(parents=True, exist_ok=True)
    (ARCHIVES / "partial").mkdir(exist_ok=True)
    path = tmp_path_factory.mktemp("root")
    try:
        run(["tar", "-C", str(path), "-xf", str(tarball)], 300)
        shutil.copy("/etc/resolv.conf", path / "etc/resolv.conf")
        result = Root(path)
        result.apt_install(debs["agent"].path, debs["broker"].path)
        yield result
    finally:
        shutil.rmtree(path, ignore_errors=True)  # a few hundred MB: do not keep it


def test_commands_run_in_the_clean_root(root: Root) -> None:
    for role in ROLES:
        assert root.run(f"vmtide-{role}", "--version").stdout == f"vmtide-{role} {__version__}\n"
        checked = root.run(f"vmtide-{role}", "check-config", f"/etc/vmtide/{role}.toml")
        assert checked.stdout == f"/etc/vmtide/{role}.toml: ok\n"
        # postinst compiled the bundled modules for this machine's interpreter.
        cache = root.file(f"/opt/vmtide/{role}/lib/python3.11/site-packages/vmtide/__pycache__")
        assert any(cache.glob("__init__.cpython-311.pyc")), sorted(cache.parent.iterdir())
    # The bundled libraries are the ones in use, not Debian's (there are none here).
    where = root.run(
        "/opt/vmtide/agent/bin/python", "-c", "import google.protobuf, grpc; print(grpc.__file__)"
    )
    assert where.stdout.startswith("/opt/vmtide/agent/lib/python3.11/site-packages/grpc/")


def test_the_agent_reads_a_guest_in_the_clean_root(root: Root) -> None:
    guest = FakeGuest(root.file("/tmp/guest"), possible_cpus=4, boot_cpus=2, boot_blocks=8)
    result = root.run(
        "vmtide-agent",
        "status",
        "--json",
        "--sysfs-root",
        "/tmp/guest/sys",
        "--procfs-root",
        "/tmp/guest/proc",
    )
    status = json.loads(result.stdout)
    assert status["cpus"]["online"] == len(guest.online_cpus()) == 2
    assert status["cpus"]["possible"] == 4
    assert status["memory"]["online_bytes"] == guest.online_memory_bytes()


def test_units_configs_and_man_pages_are_installed(root: Root) -> None:
    for role in ROLES:
        name = f"vmtide-{role}"
        unit = root.file(f"/lib/systemd/system/{name}.service")
        assert unit.read_bytes() == (REPO / "systemd" / f"{name}.service").read_bytes()
        # Enabled by postinst (deb-systemd-helper), not started: no systemd runs here.
        wants = root.file(f"/etc/systemd/system/multi-user.target.wants/{name}.service")
        assert os.readlink(wants) == f"/lib/systemd/system/{name}.service"
        config = root.file(f"/etc/vmtide/{role}.toml")
        assert config.read_bytes() == (REPO / "packaging/deb" / f"{role}.toml").read_bytes()
        conffiles = root.run("dpkg-query", "-W", "-f=${Conffiles}", name).stdout
        assert f"/etc/vmtide/{role}.toml " in conffiles
        assert root.file(f"/usr/share/man/man8/{name}.8.gz").is_file()
        assert root.file(f"/usr/share/doc/{name}/copyright").is_file()


def test_a_reinstall_keeps_an_edited_config(root: Root, debs: dict[str, Deb]) -> None:
    config = root.file("/etc/vmtide/agent.toml")
    edited = config.read_text().replace('# guest_id = ""', 'guest_id = "web-1"')
    assert edited != config.read_text()
    config.write_text(edited)
    shutil.copy(debs["agent"].path, root.file("/tmp/again.deb"))
    root.run("dpkg", "-i", "--force-confold", "/tmp/again.deb", timeout=APT_SECONDS)
    assert config.read_text() == edited
    assert root.run("vmtide-agent", "--version").returncode == 0


def test_purge_leaves_nothing_behind(root: Root) -> None:
    """Last: it empties the shared root."""
    root.run("apt-get", "purge", "-y", "-q", "vmtide-agent", "vmtide-broker", timeout=APT_SECONDS)
    for path in (
        "/opt/vmtide",  # the bytecode postinst wrote included
        "/etc/vmtide",
        "/usr/bin/vmtide-agent",
        "/usr/bin/vmtide-broker",
        "/etc/systemd/system/multi-user.target.wants/vmtide-agent.service",
        "/etc/systemd/system/multi-user.target.wants/vmtide-broker.service",
    ):
        assert not os.path.lexists(root.file(path)), path


# ---------------------------------------------------------------------- .rpm


def test_spec_version_is_the_projects() -> None:
    match = re.search(r"%global vmtide_version (\S+)\}", SPEC.read_text())
    assert match and match.group(1) == __version__


def test_rpm_spec_builds_both_subpackages(tmp_path: Path) -> None:
    need("rpmbuild", "rpm", "rpm2cpio", "cpio", "strip")
    built = build(tmp_path, "--rpm", "--no-deb")
    assert sorted(p.name for p in built) == [
        f"vmtide-{role}-{__version__}-1.x86_64.rpm" for role in ROLES
    ]
    for role, rpm in zip(ROLES, sorted(built), strict=True):
        name = f"vmtide-{role}"
        files = run(["rpm", "-qlp", str(rpm)], 60).stdout.splitlines()
        for path in (
            f"/usr/bin/{name}",
            f"/usr/lib/systemd/system/{name}.service",
            f"/usr/share/man/man8/{name}.8.gz",
            f"/opt/vmtide/{role}/pyvenv.cfg",
        ):
            assert path in files, path
        # Unlike the .deb, the rpm owns its bytecode: rpm removes what it installed.
        assert any(f.endswith(".cpython-311.pyc") for f in files)
        configs = run(["rpm", "-qp", "--configfiles", str(rpm)], 60).stdout.split()
        assert configs == [f"/etc/vmtide/{role}.toml"]
        requires = run(["rpm", "-qp", "--requires", str(rpm)], 60).stdout.splitlines()
        assert "/usr/bin/python3.11" in requires
        assert not [r for r in requires if r.startswith(("/opt/", "python("))], requires
        scripts = run(["rpm", "-qp", "--scripts", str(rpm)], 60).stdout
        assert f"preset {name}.service" in scripts and f"try-restart {name}.service" in scripts
        # What the package holds runs (from where it is unpacked: the venv's own
        # interpreter finds its site-packages relative to itself).
        unpacked = tmp_path / role
        unpacked.mkdir()
        run(["sh", "-c", 'rpm2cpio "$1" | cpio -idm --quiet', "sh", str(rpm)], 60, cwd=unpacked)
        python = unpacked / f"opt/vmtide/{role}/bin/python"
        version = run([str(python), "-m", f"{role}.cli", "--version"], 60)
        assert version.stdout == f"{name} {__version__}\n"
