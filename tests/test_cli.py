"""The command-line tools as an operator runs them."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from simulation import agent_config, make_agent

from vmtide import __version__
from vmtide.fakesys import FakeGuest, Load

MiB = 1 << 20


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args], capture_output=True, text=True, timeout=60, check=False
    )


def test_versions() -> None:
    assert run("agent.cli", "--version").stdout.strip() == f"vmtide-agent {__version__}"
    assert run("broker.cli", "--version").stdout.strip() == f"vmtide-broker {__version__}"


def test_status_on_a_simulated_guest(tmp_path: Path) -> None:
    guest = FakeGuest(tmp_path / "g", possible_cpus=4, boot_cpus=1, boot_blocks=8)
    guest.plug_cpu(1)
    guest.plug_blocks(2)
    guest.tick(1.0, Load(cpus=0.5, memory_bytes=300 * MiB))
    roots = [
        "--sysfs-root",
        str(guest.sysfs),
        "--procfs-root",
        str(guest.procfs),
        "--config",
        str(tmp_path / "none.toml"),
    ]
    (tmp_path / "none.toml").write_text("")
    result = run("agent.cli", "status", "--json", *roots)
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert status["cpus"]["online"] == 1 and status["cpus"]["standby"] == [1]
    assert status["memory"]["online_bytes"] == 1024 * MiB
    assert status["memory"]["standby_blocks"] == [8, 9]
    assert status["memory"]["block_size_bytes"] == 128 * MiB
    assert "target" in status["cpus"]["would"]
    text = run("agent.cli", "status", *roots)
    assert text.returncode == 0, text.stderr
    assert "1 online of 2 present, 4 possible; standby [1]" in text.stdout


def test_status_shows_what_the_running_daemon_sees(tmp_path: Path) -> None:
    guest = FakeGuest(tmp_path / "g", possible_cpus=4, boot_cpus=1, boot_blocks=8)
    guest.plug_cpu(1)
    guest.tick(1.0, Load(cpus=0.5, memory_bytes=300 * MiB))
    config = tmp_path / "agent.toml"
    config.write_text(
        "[agent]\nlock_memory = false\nsensing_interval_seconds = 0.2\n[metrics]\nenabled = false\n"
    )
    roots = ["--config", str(config), "--sysfs-root", str(guest.sysfs)]
    roots += ["--procfs-root", str(guest.procfs), "--simulated-kernel"]
    state_file = guest.root / "agent.json"  # next to the fake tree, not in /run
    with (tmp_path / "agent.log").open("w") as log:
        daemon = subprocess.Popen(
            [sys.executable, "-m", "agent.cli", "run", *roots, "--no-broker", "--guest-id", "g1"],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        while not state_file.exists():
            assert daemon.poll() is None, (tmp_path / "agent.log").read_text()
            assert time.monotonic() < deadline, "the daemon never published its state"
            time.sleep(0.1)
        result = run("agent.cli", "status", "--json", *roots)
        assert result.returncode == 0, result.stderr
        status = json.loads(result.stdout)
        assert status["source"] == "daemon" and status["pid"] == daemon.pid
        assert status["guest_id"] == "g1" and status["age_seconds"] < 5
        assert status["cpus"]["online"] == 1 and status["cpus"]["standby"] == [1]
        assert status["memory"]["online_bytes"] == 1024 * MiB
        assert status["broker"] == {
            "enabled": False,
            "target": "vsock:2:7470",
            "connected": False,
            "session_id": "",
            "reconnects": 0,
            "last_grant_id": 0,
        }
        assert status["cpus"]["decision"]["direction"] == "hold"
        text = run("agent.cli", "status", *roots)
        assert text.returncode == 0, text.stderr
        assert f"agent   pid {daemon.pid}, guest 'g1'; live state" in text.stdout
        assert "broker  none (standalone" in text.stdout
        assert "1 online of 2 present, 4 possible; standby [1]" in text.stdout
        assert "limits 1-4 (burst 4); decision: cpu hold 1: busy 0.0/1" in text.stdout
        assert "pending nothing" in text.stdout
    finally:
        daemon.terminate()
        daemon.wait(30)
    assert daemon.returncode == 0, (tmp_path / "agent.log").read_text()
    # Stopped: the file went with it, and status samples once, saying so.
    assert not state_file.exists()
    after = run("agent.cli", "status", *roots)
    assert after.returncode == 0, after.stderr
    why = f"(no agent is publishing its state at {state_file})"
    assert f"one-shot sample with a fresh policy state {why}" in after.stdout
    assert "would hold 1" in after.stdout


def test_status_does_not_trust_a_stale_state_file(tmp_path: Path) -> None:
    guest = FakeGuest(tmp_path / "g", possible_cpus=4, boot_cpus=1, boot_blocks=8)
    (tmp_path / "none.toml").write_text("")
    stale = {"written_at": time.time() - 100, "sensing_interval_seconds": 1.0, "cpus": {}}
    (guest.root / "agent.json").write_text(json.dumps(stale))  # a daemon killed long ago
    roots = ["--sysfs-root", str(guest.sysfs), "--procfs-root", str(guest.procfs)]
    result = run("agent.cli", "status", "--json", "--config", str(tmp_path / "none.toml"), *roots)
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert status["source"] == "one-shot" and status["cpus"]["online"] == 1
    assert "agent.json is 100 s old: the agent is not running, or stuck" in status["why_not_live"]
    # Fresh, but from an agent version whose file this one cannot show.
    stale["written_at"] = time.time()
    (guest.root / "agent.json").write_text(json.dumps(stale))
    text = run("agent.cli", "status", "--config", str(tmp_path / "none.toml"), *roots)
    assert text.returncode == 0, text.stderr
    assert text.stdout.startswith("one-shot sample with a fresh policy state (")
    assert "(another agent version?)" in text.stdout and "Traceback" not in text.stderr


def test_status_names_an_unreadable_tree(tmp_path: Path) -> None:
    (tmp_path / "none.toml").write_text("")
    result = run(
        "agent.cli",
        "status",
        "--sysfs-root",
        str(tmp_path / "missing"),
        "--config",
        str(tmp_path / "none.toml"),
    )
    assert result.returncode == 1
    assert "cannot read the topology" in result.stderr and "missing" in result.stderr
    assert "Traceback" not in result.stderr


def test_run_with_a_bad_config_exits_78(tmp_path: Path) -> None:
    bad = tmp_path / "agent.toml"
    bad.write_text("[limits.cpus]\nminimum = 'two'\n")
    result = run("agent.cli", "run", "--config", str(bad))
    assert result.returncode == 78
    assert f"{bad}: limits.cpus.minimum: expected an integer" in result.stderr
    broker = run("broker.cli", "run", "--config", str(bad))
    assert broker.returncode == 78 and "unknown key" in broker.stderr


async def test_metrics_after_a_cycle(tmp_path: Path) -> None:
    guest = FakeGuest(tmp_path / "g", possible_cpus=4, boot_cpus=2, boot_blocks=8)
    guest.plug_blocks(1)
    registry = CollectorRegistry()
    agent = make_agent(agent_config(guest, "g", "unix:/nonexistent"), registry)
    guest.tick(1.0, Load(cpus=0.5, memory_bytes=300 * MiB))
    await agent.sense_and_decide()
    text = generate_latest(registry).decode()
    assert 'vmtide_agent_cpus{state="online"} 2.0' in text
    assert 'vmtide_agent_cpus{state="possible"} 4.0' in text
    assert 'vmtide_agent_memory_bytes{state="online",zone="kernel"} 1.073741824e+09' in text
    assert 'vmtide_agent_memory_bytes{state="standby",zone=""} 1.34217728e+08' in text
    assert 'vmtide_agent_decisions_total{direction="hold",resource="cpus"} 1.0' in text
    assert 'vmtide_agent_sensing_cycles_total{result="ok"}' in text
    assert "vmtide_agent_broker_connected 0.0" in text


def test_oom_protection(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from agent.cli import _protect_from_oom

    adj = tmp_path / "oom_score_adj"
    adj.write_text("0\n")
    _protect_from_oom(-1000, adj)
    assert adj.read_text() == "-1000\n"
    adj.write_text("-1000\n")
    adj.chmod(0o444)  # already protected (by systemd): nothing to write
    _protect_from_oom(-1000, adj)
    assert "cannot set" not in caplog.text
    _protect_from_oom(-1000, tmp_path / "missing")
    assert "cannot set the agent's oom_score_adj to -1000" in caplog.text
