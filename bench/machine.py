"""What machine a benchmark ran on, for its report."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def memory_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / (1 << 20)
    except OSError:
        pass
    return 0.0


def describe_machine() -> str:
    """One line: CPU model and count, memory, kernel, Python."""
    uname = platform.uname()
    return (
        f"{cpu_model()}, {os.cpu_count()} CPUs, {memory_gib():.0f} GiB; "
        f"{uname.system} {uname.release} {uname.machine}; Python {platform.python_version()}"
    )


def run_text(*command: str) -> str:
    """A command's stdout, run in the repository; "?" when it cannot run."""
    try:
        return subprocess.run(
            command, cwd=REPO, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"


def revision() -> str:
    """The commit measured, and whether the code it measures differs from it."""
    commit = run_text("git", "rev-parse", "--short", "HEAD")
    dirty = run_text("git", "status", "--porcelain", "--", "broker", "bench", "agent", "vmtide")
    return f"{commit} (with uncommitted changes)" if dirty else commit
