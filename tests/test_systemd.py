"""The systemd units, checked by the real systemd-analyze.

systemd is not running here, so nothing starts the units; what can be checked
offline is checked with systemd's own parser and its security assessment
rather than by grepping the unit text: `verify` (every setting parses),
`security --json=short` (per-setting results) and the overall score, which
docs/systemd.md records and this file reads back.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
UNITS = sorted((ROOT / "systemd").glob("*.service"))
AGENT_UNIT = ROOT / "systemd" / "vmtide-agent.service"
BROKER_UNIT = ROOT / "systemd" / "vmtide-broker.service"
SYSTEMD_DOC = ROOT / "docs" / "systemd.md"
ANALYZE = shutil.which("systemd-analyze")
pytestmark = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze not installed")
ANALYZE_SECONDS = 60

# systemd-analyze's capability groups the agent needs (docs/systemd.md): mlockall,
# the uevent socket's forced receive buffer, PSI triggers with 1 s windows.
AGENT_CAPABILITY_GROUPS = {
    "CapabilityBoundingSet=~CAP_IPC_LOCK",
    "CapabilityBoundingSet=~CAP_NET_ADMIN",
    "CapabilityBoundingSet=~CAP_SYS_(NICE|RESOURCE)",
}


def installed_copy(unit: Path, tmp_path: Path, text: str | None = None) -> Path:
    """The unit as a package installs it, with ExecStart pointing at this checkout's scripts."""
    bindir = Path(sys.executable).parent
    text = unit.read_text() if text is None else text
    text = re.sub(r"/usr/bin/(vmtide-\w+)", lambda m: str(bindir / m.group(1)), text)
    tmp_path.mkdir(parents=True, exist_ok=True)
    copy = tmp_path / unit.name
    copy.write_text(text)
    return copy


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    assert ANALYZE is not None
    return subprocess.run(
        [ANALYZE, *args], capture_output=True, text=True, timeout=ANALYZE_SECONDS, check=False
    )


def verify(unit: Path) -> str:
    """What `systemd-analyze verify` says of the unit (it warns, yet exits 0, on ignored values)."""
    result = analyze("verify", "--man=no", str(unit))
    assert result.returncode == 0, result.stderr
    return result.stderr.strip()


def security(unit: Path) -> dict[str, dict[str, Any]]:
    """`systemd-analyze security --json=short`, by setting name."""
    result = analyze("security", "--offline=yes", "--json=short", str(unit))
    assert result.returncode == 0, result.stderr
    items: list[dict[str, Any]] = json.loads(result.stdout)
    return {item["name"]: item for item in items}


def exposed(report: dict[str, dict[str, Any]]) -> dict[str, float]:
    """The settings systemd-analyze counts against the unit, with their weights."""
    return {
        name: float(item["exposure"])
        for name, item in report.items()
        if item["set"] is False and item["exposure"] is not None
    }


def overall_score(unit: Path) -> tuple[float, str]:
    result = analyze("security", "--offline=yes", "--no-pager", str(unit))
    match = re.search(r"Overall exposure level for \S+: ([\d.]+) (\w+)", result.stdout)
    assert match, result.stdout + result.stderr
    return float(match.group(1)), match.group(2)


def service_setting(unit: Path, key: str) -> str:
    """The value systemd uses for a [Service] key: the last assignment wins."""
    value: str | None = None
    section = ""
    for raw in unit.read_text().splitlines():
        line = raw.strip()
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
        elif section == "Service" and line.startswith(f"{key}="):
            value = line.split("=", 1)[1]
    assert value is not None, f"{unit.name}: no {key}="
    return value


# ---------------------------------------------------- what docs/systemd.md records


def documented_version() -> int:
    recorded = r"`systemd-analyze security --offline=yes <unit>` \(systemd (\d+)\)"
    match = re.search(recorded, doc_text())
    assert match, "docs/systemd.md: no recorded systemd version"
    return int(match.group(1))


def documented_scores() -> dict[str, tuple[float, str]]:
    scores = {
        unit: (float(score), rating)
        for unit, score, rating in re.findall(
            r"^\| `(vmtide-\w+\.service)` \| \*\*([\d.]+) (\w+)\*\* \|$", doc_text(), re.MULTILINE
        )
    }
    assert set(scores) == {u.name for u in UNITS}, scores
    return scores


def documented_exposure() -> dict[str, float]:
    """The agent's 'what remains exposed' table: setting name -> weight."""
    section = doc_text().split("## Hardening and what remains exposed", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([^`]+)` \| ([\d.]+) \|", section, re.MULTILINE)
    assert rows, "docs/systemd.md: no exposure table"
    # A | inside a table cell is escaped in Markdown.
    return {name.replace("\\|", "|"): float(weight) for name, weight in rows}


def doc_text() -> str:
    return SYSTEMD_DOC.read_text()


def require_documented_systemd() -> None:
    result = analyze("--version")
    match = re.match(r"systemd (\d+)", result.stdout)
    assert match, result.stdout
    installed, recorded = int(match.group(1)), documented_version()
    if installed != recorded:
        # Each release weighs the items its own way: the numbers cannot match.
        pytest.skip(f"docs/systemd.md records systemd {recorded}'s scores; this is {installed}")


# ---------------------------------------------------------------------- tests


def test_there_are_units() -> None:
    assert {u.name for u in UNITS} == {"vmtide-agent.service", "vmtide-broker.service"}


@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.name)
def test_units_verify(unit: Path, tmp_path: Path) -> None:
    assert verify(installed_copy(unit, tmp_path)) == ""


@pytest.mark.parametrize(
    ("setting", "broken", "complaint"),
    [
        ("OOMScoreAdjust=-1000", "OOMScoreAdjust=-1001", "OOM score adjust value out of range"),
        ("LimitMEMLOCK=infinity", "LimitMEMLOCK=lots", "Failed to parse resource value"),
        ("WatchdogSec=30s", "WatchdogSec=soon", "Failed to parse sec value"),
        (
            "RuntimeDirectory=vmtide-agent",
            "RuntimeDirectory=../vmtide-agent",
            "path is not normalized",
        ),
    ],
)
def test_verify_would_catch_a_broken_setting(
    tmp_path: Path, setting: str, broken: str, complaint: str
) -> None:
    """A clean `verify` means systemd accepted these values: it does not accept bad ones."""
    text = AGENT_UNIT.read_text()
    assert re.search(rf"^{re.escape(setting)}$", text, re.MULTILINE), setting
    copy = installed_copy(AGENT_UNIT, tmp_path, text.replace(setting, broken))
    assert complaint in verify(copy)


def test_agent_unit_keeps_the_agent_alive_under_pressure(tmp_path: Path) -> None:
    # The values verify accepted (above), as systemd reads them.
    assert verify(installed_copy(AGENT_UNIT, tmp_path)) == ""
    expected = {
        "Type": "notify",
        "NotifyAccess": "main",
        "WatchdogSec": "30s",
        "Restart": "on-failure",
        "RestartPreventExitStatus": "78",
        "OOMScoreAdjust": "-1000",
        "LimitMEMLOCK": "infinity",
        "RuntimeDirectory": "vmtide-agent",
        "RuntimeDirectoryPreserve": "no",
    }
    assert {key: service_setting(AGENT_UNIT, key) for key in expected} == expected


def test_agent_unit_grants_exactly_the_capabilities_it_needs(tmp_path: Path) -> None:
    report = security(installed_copy(AGENT_UNIT, tmp_path))
    groups = {name: item for name, item in report.items() if name.startswith("CapabilityBounding")}
    assert len(groups) > len(AGENT_CAPABILITY_GROUPS), groups
    granted = {name for name, item in groups.items() if item["set"] is False}
    # A misspelt capability is silently dropped by systemd: it shows up here.
    assert granted == AGENT_CAPABILITY_GROUPS
    assert report["AmbientCapabilities="]["set"] is True
    assert report["NoNewPrivileges="]["set"] is True


def test_the_documented_drop_in_removes_only_cap_sys_resource(tmp_path: Path) -> None:
    match = re.search(r"```ini\n\[Service\]\n(CapabilityBoundingSet=~\S+)\n```", doc_text())
    assert match, "docs/systemd.md: no drop-in without CAP_SYS_RESOURCE"
    unit = installed_copy(AGENT_UNIT, tmp_path)
    # systemd-analyze reads drop-ins from <unit>.d beside the unit, as systemd does.
    drop_ins = tmp_path / f"{unit.name}.d"
    drop_ins.mkdir()
    (drop_ins / "no-psi-triggers.conf").write_text(f"[Service]\n{match.group(1)}\n")
    report = security(unit)
    granted = {n for n, i in report.items() if n.startswith("CapabilityBounding") and not i["set"]}
    assert granted == AGENT_CAPABILITY_GROUPS - {"CapabilityBoundingSet=~CAP_SYS_(NICE|RESOURCE)"}


def test_agent_unit_protects_the_system_but_not_sysfs(tmp_path: Path) -> None:
    report = security(installed_copy(AGENT_UNIT, tmp_path))
    protect_system = report["ProtectSystem="]
    assert protect_system["set"] is True and "strict" in protect_system["description"]
    for setting in ("ProtectHome=", "PrivateTmp=", "PrivateDevices=", "ProtectKernelModules="):
        assert report[setting]["set"] is True, setting
    # The agent's job is writing /sys/devices/system/{cpu,memory}.
    assert report["ProtectKernelTunables="]["set"] is False
    # Only the families it uses: no packet sockets.
    assert report["RestrictAddressFamilies=~AF_PACKET"]["set"] is True


def test_broker_unit_holds_no_capability(tmp_path: Path) -> None:
    report = security(installed_copy(BROKER_UNIT, tmp_path))
    groups = [item for name, item in report.items() if name.startswith("CapabilityBounding")]
    assert groups and all(item["set"] is True for item in groups), groups
    assert report["ProtectKernelTunables="]["set"] is True


@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.name)
def test_exposure_score_is_the_one_docs_record(unit: Path, tmp_path: Path) -> None:
    require_documented_systemd()
    assert overall_score(installed_copy(unit, tmp_path)) == documented_scores()[unit.name]


def test_agent_exposure_is_what_docs_explain(tmp_path: Path) -> None:
    require_documented_systemd()
    assert exposed(security(installed_copy(AGENT_UNIT, tmp_path))) == documented_exposure()
