"""README's main command: the demo runs and the simulated guest follows the load."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_quick_demo_follows_the_load(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "vmtide.demo", "--quick", "--workdir", str(tmp_path / "demo")],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    log = (tmp_path / "demo" / "agent.log").read_text()
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:] + log[-3000:]
    assert "resources followed the load" in result.stdout
    # The agent really did the work, item by item.
    assert "online cpu1: done" in log
    assert "offline memory" in log
