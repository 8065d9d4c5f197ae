"""Each atheris harness in this directory, run for a short bounded time.

CI runs every harness for a fixed number of inputs (capped at a few seconds
each, with a fixed seed so a failure reproduces); a longer search is the
same harness run directly (see fuzzing.py), or this test with
VMTIDE_FUZZ_SECONDS=600 (and VMTIDE_FUZZ_SEED to vary the search).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
# Inputs per harness in CI: each costs from ~3 ms (config) to ~50 ms (broker,
# two simulated guests built per input).
RUNS = {"fuzz_agent": 60, "fuzz_broker": 60, "fuzz_config": 3000, "fuzz_sysfs": 300}
CAP_SECONDS = 20


@pytest.mark.parametrize("name", sorted(RUNS))
def test_harness_finds_nothing(name: str, tmp_path: Path) -> None:
    pytest.importorskip("atheris")
    seconds = int(os.environ.get("VMTIDE_FUZZ_SECONDS", "0"))
    limits = (
        [f"-max_total_time={seconds}"]
        if seconds
        else [
            f"-runs={RUNS[name]}",
            f"-max_total_time={CAP_SECONDS}",
        ]
    )
    seed = os.environ.get("VMTIDE_FUZZ_SEED", "1")
    result = subprocess.run(
        [
            sys.executable,
            str(HERE / f"{name}.py"),
            *limits,
            f"-seed={seed}",
            f"-artifact_prefix={tmp_path}/",
            "-print_final_stats=1",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=(seconds or CAP_SECONDS) + 120,
        check=False,
    )
    # libFuzzer reports on stderr; the code under test logs there too.
    report = result.stderr[-6000:]
    assert result.returncode == 0, f"{name} found a crash:\n{report}"
    assert "Done " in result.stderr, report
    assert not list(tmp_path.glob("crash-*")), report
