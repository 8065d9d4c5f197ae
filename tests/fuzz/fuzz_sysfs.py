"""Fuzz the sysfs and procfs parsers (agent/kernel.py, agent/sensing.py).

An input is a text for the CPU list parser and the /proc parsers, then a few
files of a simulated guest's tree rewritten with any contents; reading the
topology and sampling load must give a value or a KernelReadError or
ProcParseError naming the file (the checks are tests/test_bad_input.py's).
See fuzzing.py for how to run it.
"""

from __future__ import annotations

import sys

import atheris  # type: ignore[import-untyped,import-not-found,unused-ignore]
import fuzzing
from fuzzing import text

with atheris.instrument_imports(include=fuzzing.PACKAGES):
    import test_bad_input as checks


def target(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    sample = text(fdp, 200)
    checks.check_cpu_list(sample)
    checks.check_proc_text(sample)
    sysfs = {
        checks.SYSFS_FILES[fdp.ConsumeIntInRange(0, len(checks.SYSFS_FILES) - 1)]: text(fdp, 80)
        for _ in range(fdp.ConsumeIntInRange(0, 3))
    }
    procfs = {
        checks.PROC_FILES[fdp.ConsumeIntInRange(0, len(checks.PROC_FILES) - 1)]: text(fdp, 200)
        for _ in range(fdp.ConsumeIntInRange(0, 2))
    }
    if sysfs or procfs:
        checks.check_guest_tree(sysfs, procfs)


def main() -> None:
    atheris.Setup(sys.argv, target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
