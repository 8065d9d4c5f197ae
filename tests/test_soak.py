"""The soak's short form (tests/soak.py): a minute of random loads and faults on
three simulated guests, every invariant checked each second and after settling.
The 30-minute form: python -m tests.soak --minutes 30 (docs/reliability.md)."""

from __future__ import annotations

from pathlib import Path

import pytest
from soak import SoakOptions, run


@pytest.mark.timeout(600)
def test_a_minute_of_random_faults_keeps_every_invariant(tmp_path: Path) -> None:
    summary = run(
        SoakOptions(
            seconds=60,
            guests=3,
            seed=7,
            workdir=tmp_path,
            fault_every=4.0,
            settle_every=30.0,
            progress_every=15.0,
        )
    )
    print(summary.text())
    assert summary.ok, summary.text()
    # It did soak: faults went in, and the books were compared after settling.
    assert sum(summary.faults.values()) >= 5, summary.text()
    assert summary.checks >= 30 and summary.settles == len(summary.settle_seconds) >= 2
