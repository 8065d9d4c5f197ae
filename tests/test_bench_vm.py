"""The benchmarks that run the real agent run in CI too, on a tiny input, so
they never rot. No timing is asserted: only that each measures what it says."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_bench(module: str, out: Path, *args: str, timeout: float) -> str:
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'tests'}:{REPO}"}
    done = subprocess.run(
        [sys.executable, "-m", module, "--quick", "--out", str(out), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, f"{module} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.mark.timeout(300)
def test_footprint_quick(tmp_path: Path) -> None:
    run_bench("bench.footprint", tmp_path, timeout=240)
    text = (tmp_path / "footprint-quick.md").read_text()
    cpu = re.search(r"\| CPU, % of one core per window \| ([0-9.]+) \|", text)
    rss = re.search(r"\| RSS, MiB \(per-window peak\) \| ([0-9.]+) \|", text)
    assert cpu and rss, text
    assert float(rss[1]) > 5  # a Python process with grpc loaded, really measured


@pytest.mark.timeout(120)
def test_throughput_on_a_simulated_guest(tmp_path: Path) -> None:
    out = tmp_path / "throughput.json"
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'tests'}:{REPO}"}
    done = subprocess.run(
        [sys.executable, "bench/guest_throughput.py", "--fake", "--reps", "2", "--out", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    # Both loops onlined all 7 standby CPUs and 16 blocks, each repetition.
    for run in result["runs"]:
        assert (run["bare_cpus"], run["agent_cpus"], run["bare_blocks"]) == (7, 7, 16)
    assert "us/item" in done.stdout


@pytest.mark.vm
@pytest.mark.timeout(600)
def test_throughput_quick(tmp_path: Path) -> None:
    run_bench("bench.vm_throughput", tmp_path, timeout=540)
    text = (tmp_path / "throughput-quick.md").read_text()
    # Both the bare loop and the agent brought the same 7 CPUs and 2 GiB online.
    assert re.search(r"\| CPUs \| 7 \| [0-9.]+ CPUs/s \| [0-9.]+ CPUs/s \|", text), text
    assert re.search(r"\| memory \| 2\.00 GiB \| [0-9.]+ GiB/s \| [0-9.]+ GiB/s \|", text), text


@pytest.mark.vm
@pytest.mark.timeout(600)
def test_reaction_quick(tmp_path: Path) -> None:
    run_bench(
        "bench.vm_reaction", tmp_path, "--case", "cpu-hotplug", "--case", "cpu-standby", timeout=540
    )
    text = (tmp_path / "reaction-quick.md").read_text()
    total = re.search(r"\| CPU, hot-plugged \| total \| ([0-9.]+) \|", text)
    assert total and float(total[1]) > 0, text
    # The standby CPU came online in a guest that kept it plugged and offline
    # while idle (its rest size is two plugged, one online).
    standby = re.search(r"\| CPU, standby \| total \| ([0-9.]+) \|", text)
    assert standby and float(standby[1]) > 0, text
    # QEMU really hot-plugged a vCPU. A vCPU plugs in a few milliseconds, which
    # the table rounds to 0.00 s: read the raw runs.
    raw = re.search(r"```\n(\{.*?\})\n```", text, re.DOTALL)
    assert raw, text
    runs = json.loads(raw[1])
    assert all(run["hotplug"] > 0 for run in runs["cpu-hotplug"]), runs


def test_reaction_phases_split_the_memory_ramp_from_detection() -> None:
    from bench.vm_reaction import phases

    run = {"step": 100.0, "needed": 104.0, "decided": 104.6, "granted": 104.7, "online": 105.0}
    got = phases(run, hotplug=0.02)
    assert got is not None
    assert got["ramp"] == pytest.approx(4.0) and got["detection"] == pytest.approx(0.6)
    assert got["negotiation"] == pytest.approx(0.08) and got["total"] == pytest.approx(5.0)
    # Grown on pressure before the headroom ran out: all of it was the ramp.
    early = phases({**run, "needed": None}, hotplug=0.02)
    assert early is not None and early["detection"] == 0 and early["ramp"] == pytest.approx(4.6)
    # A log that missed the decision is no run.
    assert phases({**run, "decided": None}, hotplug=0.02) is None
