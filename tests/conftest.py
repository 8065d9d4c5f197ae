"""Fixtures shared by test files: the real-VM image and a pool of guests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from vm.build_image import GuestImage
from vm.harness import VMs, guest_image_or_skip


@pytest.fixture(scope="session")
def guest_image() -> GuestImage:
    """The guest kernel and initramfs, built once (cached in .cache/vm); skips without QEMU."""
    return guest_image_or_skip()


@pytest.fixture
def vms(guest_image: GuestImage, tmp_path: Path) -> Iterator[VMs]:
    """Guests for one test; every QEMU is killed by its own pid when the test ends."""
    with VMs(guest_image, tmp_path) as pool:
        yield pool
