"""Fixtures shared by test files: the real-VM image and a pool of guests; and,
in CI, no silent skips."""

from __future__ import annotations

import os
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest
from vm.build_image import GuestImage
from vm.harness import VMs, guest_image_or_skip

# With VMTIDE_NO_SKIPS=1 (.ci/run sets it) a skipped test fails, unless the
# reason is a fact of the kernel under test rather than a missing install:
# a CI host without QEMU or Prometheus must not go green by skipping.
NO_SKIPS = os.environ.get("VMTIDE_NO_SKIPS") == "1"
KERNEL_FACTS = ("this kernel", "PSI triggers refused")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    # Kept for fixtures that report on failure (the VM consoles).
    setattr(item, f"report_{report.when}", report)
    if NO_SKIPS and report.skipped and not hasattr(report, "wasxfail"):
        reason = str(report.longrepr[-1]) if isinstance(report.longrepr, tuple) else ""
        if not any(fact in reason for fact in KERNEL_FACTS):
            report.outcome = "failed"
            report.longrepr = f"skipped under VMTIDE_NO_SKIPS=1 (CI installs everything): {reason}"


@pytest.fixture(scope="session")
def guest_image() -> GuestImage:
    """The guest kernel and initramfs, built once (cached in .cache/vm); skips without QEMU."""
    return guest_image_or_skip()


@pytest.fixture
def vms(guest_image: GuestImage, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[VMs]:
    """Guests for one test; every QEMU is killed by its own pid when the test ends.
    When the test fails, each guest's console tail goes into the report."""
    with VMs(guest_image, tmp_path) as pool:
        yield pool
        report = getattr(request.node, "report_call", None)
        if report is not None and report.failed:
            for vm in pool.started():
                print(f"--- console of {vm.workdir.name} ({vm.console_path})")
                print(vm.console_tail())
