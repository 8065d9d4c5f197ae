"""agent.udev: uevents as the kernel sends them, the netlink monitor behind a fake
pyudev, and the distributions' udev rules that online hot-added resources."""

from __future__ import annotations

import asyncio
import os
import sys
import types
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.udev import OnliningRule, UdevMonitor, Uevent, find_onlining_rules, parse

# --------------------------------------------------------------------- parse


@pytest.mark.parametrize(
    ("action", "subsystem", "name", "expected"),
    [
        # ACTION, SUBSYSTEM and the last part of DEVPATH of real uevents
        # (udevadm monitor --kernel --property on a 6.1 guest).
        ("add", "memory", "memory42", Uevent("add", "memory", "memory42", 42)),
        ("online", "memory", "memory42", Uevent("online", "memory", "memory42", 42)),
        ("offline", "cpu", "cpu3", Uevent("offline", "cpu", "cpu3", 3)),
        ("remove", "cpu", "cpu127", Uevent("remove", "cpu", "cpu127", 127)),
        ("change", "memory", "memory0", Uevent("change", "memory", "memory0", 0)),
        # The directories themselves and their other children.
        ("add", "cpu", "cpufreq", None),
        ("add", "memory", "memory", None),
        ("add", "cpu", "cpu", None),
        ("add", "memory", "memory3x", None),
        # Other subsystems, and events pyudev delivers without an action.
        ("add", "block", "memory1", None),
        (None, "memory", "memory1", None),
        ("add", None, "memory1", None),
        ("add", "memory", None, None),
        ("", "cpu", "cpu1", None),
    ],
)
def test_parse(
    action: str | None, subsystem: str | None, name: str | None, expected: Uevent | None
) -> None:
    assert parse(action, subsystem, name) == expected


def test_a_uevent_reads_as_action_and_device() -> None:
    assert str(parse("add", "memory", "memory42")) == "add memory42"


# ------------------------------------------------------------ the monitor


@dataclass
class Device:
    action: str | None
    subsystem: str
    sys_name: str


class FakeMonitor:
    """pyudev's Monitor on a pipe: readable while devices are queued."""

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        self.queue: list[Device] = []
        self.filters: list[str] = []
        self.buffer_size = 0
        self.started = False

    def filter_by(self, subsystem: str) -> None:
        self.filters.append(subsystem)

    def set_receive_buffer_size(self, size: int) -> None:
        self.buffer_size = size
        raise PermissionError("needs CAP_NET_ADMIN beyond rmem_max")

    def start(self) -> None:
        self.started = True

    def fileno(self) -> int:
        return self.read_fd

    def poll(self, timeout: float | None = None) -> Device | None:
        assert timeout == 0, "the monitor must never block the event loop"
        if not self.queue:
            return None
        os.read(self.read_fd, 1)
        return self.queue.pop(0)

    def send(self, *devices: Device) -> None:
        self.queue.extend(devices)
        os.write(self.write_fd, b"x" * len(devices))

    def close(self) -> None:
        os.close(self.read_fd)
        os.close(self.write_fd)


@pytest.fixture
def monitor(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeMonitor]:
    fake = FakeMonitor()

    class Monitor:
        @staticmethod
        def from_netlink(context: object, source: str) -> FakeMonitor:
            assert source == "kernel"  # raw kernel uevents: udev's may be late or absent
            return fake

    module = types.ModuleType("pyudev")
    module.Context = object  # type: ignore[attr-defined]
    module.Monitor = Monitor  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pyudev", module)
    yield fake
    fake.close()


async def test_the_monitor_yields_cpu_and_memory_events_until_stopped(
    monitor: FakeMonitor,
) -> None:
    stop = asyncio.Event()
    seen: list[Uevent] = []

    async def consume() -> None:
        async for event in UdevMonitor(receive_buffer_bytes=1 << 20).events(stop):
            seen.append(event)

    task = asyncio.create_task(consume())
    await asyncio.sleep(0.05)
    assert monitor.started and monitor.filters == ["cpu", "memory"]
    assert monitor.buffer_size == 1 << 20  # tried; refused without privilege, not fatal
    monitor.send(
        Device("add", "memory", "memory8"),
        Device("add", "memory", "memory"),  # not a block: dropped
        Device("online", "cpu", "cpu1"),
    )
    for _ in range(100):
        if len(seen) == 2:
            break
        await asyncio.sleep(0.01)
    stop.set()
    await asyncio.wait_for(task, 5)
    assert [str(e) for e in seen] == ["add memory8", "online cpu1"]


# --------------------------------------------------------------- udev rules

# RHEL 7 and SUSE: one line matches the subsystem and assigns the state.
SUSE_RULES = (
    "# CPU hotadd request\n"
    'SUBSYSTEM=="cpu", ACTION=="add", CONST{arch}=="x86-64", TEST=="online", '
    'ATTR{online}=="0", ATTR{online}="1"\n'
    "\n"
    "# Memory hotadd request\n"
    'SUBSYSTEM=="memory", ACTION=="add", PROGRAM=="/usr/bin/systemd-detect-virt", '
    'RESULT!="zvm", ATTR{state}=="offline", \\\n'  # continued on the next line
    '  ATTR{state}="online"\n'
)
RHEL7_MEMORY_RULE = (
    'SUBSYSTEM=="memory", ACTION=="add", PROGRAM="/bin/uname -p", RESULT!="s390*", '
    'ATTR{state}=="offline", ATTR{state}="online"\n'
)
# RHEL 8 (40-redhat.rules): other subsystems jump over the memory section.
RHEL8_RULES = """\
# Memory hotadd request
SUBSYSTEM!="memory", GOTO="memory_hotplug_end"
ACTION!="add", GOTO="memory_hotplug_end"
PROGRAM="/bin/uname -p", RESULT=="s390*", GOTO="memory_hotplug_end"

ENV{.state}="online"
PROGRAM="/bin/systemd-detect-virt", RESULT=="none", ENV{.state}="online_movable"
ATTR{state}=="offline", ATTR{state}="$env{.state}"

LABEL="memory_hotplug_end"

# Not memory: a test of the state after the section, assigning nothing
SUBSYSTEM=="block", ATTR{state}=="online", RUN+="/bin/true"
"""
# Debian and Ubuntu ship nothing that onlines; these only look alike.
DEBIAN_RULES = {
    "60-persistent-storage.rules": 'SUBSYSTEM=="block", ATTR{state}="running"\n',
    "73-special-net-names.rules": 'SUBSYSTEM=="net", ACTION=="add", ATTR{online}="1"\n',
    "99-watch.rules": 'SUBSYSTEM=="memory", ACTION=="online", RUN+="/usr/bin/logger added"\n',
    "99-test.rules": '# SUBSYSTEM=="memory", ATTR{state}="online"\n'
    'SUBSYSTEM=="memory", ATTR{state}=="online", TAG+="systemd"\n',
}


def rules_dirs(tmp_path: Path, files: dict[str, dict[str, str]]) -> list[Path]:
    """Rules directories in udev's order (etc, run, lib), with the files given."""
    dirs = []
    for name in ("etc", "run", "lib"):
        directory = tmp_path / name / "rules.d"
        directory.mkdir(parents=True)
        for file, text in files.get(name, {}).items():
            (directory / file).write_text(text)
        dirs.append(directory)
    return dirs


@pytest.mark.parametrize(
    ("text", "subsystems"),
    [
        pytest.param(RHEL7_MEMORY_RULE, {"memory"}, id="rhel7"),
        pytest.param(RHEL8_RULES, {"memory"}, id="rhel8-goto-section"),
        pytest.param(SUSE_RULES, {"cpu", "memory"}, id="suse-cpu-and-memory"),
        pytest.param(
            'SUBSYSTEM=="memory", ACTION=="add", RUN+="/bin/sh -c \'echo online > '
            "/sys$devpath/state'\"\n",
            {"memory"},
            id="run-echo",
        ),
    ],
)
def test_rules_that_online_hot_added_resources_are_found(
    tmp_path: Path, text: str, subsystems: set[str]
) -> None:
    dirs = rules_dirs(tmp_path, {"lib": {"40-redhat.rules": text, **DEBIAN_RULES}})
    (rule,) = find_onlining_rules(dirs)
    assert rule == OnliningRule(dirs[2] / "40-redhat.rules", frozenset(subsystems))
    assert rule.onlines_memory


def test_a_distribution_without_such_rules(tmp_path: Path) -> None:
    dirs = rules_dirs(tmp_path, {"lib": DEBIAN_RULES, "etc": {"README": RHEL7_MEMORY_RULE}})
    assert find_onlining_rules([*dirs, tmp_path / "absent"]) == []


def test_a_cpu_only_rule_does_not_online_memory(tmp_path: Path) -> None:
    cpu_only = SUSE_RULES.split("# Memory", maxsplit=1)[0]
    (rule,) = find_onlining_rules(rules_dirs(tmp_path, {"lib": {"80-hotplug.rules": cpu_only}}))
    assert rule.subsystems == {"cpu"} and not rule.onlines_memory
    assert str(rule).endswith("80-hotplug.rules (CPUs)")


def test_a_rule_in_etc_overrides_or_masks_the_one_shipped(tmp_path: Path) -> None:
    shipped = {"lib": {"40-redhat.rules": RHEL8_RULES}}
    masked = rules_dirs(tmp_path / "masked", {**shipped, "etc": {"40-redhat.rules": ""}})
    assert find_onlining_rules(masked) == []
    etc = masked[0] / "40-redhat.rules"
    etc.unlink()
    etc.symlink_to(os.devnull)  # how an admin masks a rule
    assert find_onlining_rules(masked) == []
    local = rules_dirs(tmp_path / "local", {**shipped, "run": {"40-redhat.rules": SUSE_RULES}})
    (rule,) = find_onlining_rules(local)
    assert rule.path == local[1] / "40-redhat.rules" and rule.subsystems == {"cpu", "memory"}
