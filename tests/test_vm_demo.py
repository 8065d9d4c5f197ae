"""README's main command on a real VM: `make demo`'s program, in its quick form,
boots the guest, follows each load and exits 0 only once the guest grew and
gave everything back."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from vm.build_image import GuestImage

pytestmark = [pytest.mark.vm, pytest.mark.timeout(900)]
TESTS = Path(__file__).resolve().parent


def test_the_real_vm_demo_follows_the_load(guest_image: GuestImage, tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(TESTS.parent)])}
    result = subprocess.run(
        [sys.executable, "-m", "vm.demo", "--quick", "--workdir", str(workdir)],
        capture_output=True,
        text=True,
        timeout=840,
        check=False,
        env=env,
    )
    shown = result.stdout[-4000:] + result.stderr[-4000:]
    assert result.returncode == 0, shown
    assert "the guest grew for each load and gave everything back" in result.stdout, shown
    # The table showed the guest's kernel following: a second CPU online, and
    # the agent's own log says it onlined and offlined item by item.
    assert " 0-1 " in result.stdout or " 0-2 " in result.stdout or " 0-3 " in result.stdout, shown
    agent_log = next(workdir.rglob("agent.log")).read_text()
    assert "online cpu" in agent_log and "offline memory" in agent_log, agent_log[-3000:]
