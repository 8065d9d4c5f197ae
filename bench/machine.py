"""What machine a benchmark ran on, for its report."""

from __future__ import annotations

import os
import platform
from pathlib import Path


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
