"""Reaction on a real VM: from a load step inside the guest to the new CPU or
memory online, split into detection, negotiation, hot-plug and onlining.

    PYTHONPATH=tests .venv/bin/python -m bench.vm_reaction [--runs 10] [--quick]

Each case boots its own guest (Debian 12's kernel under QEMU TCG, the agent
inside, the broker in this process over QMP: the rig of the real-VM tests).
`bench/guest_reaction.py` runs in the guest: it steps the load, times the
agent's decision, the grant reaching it and the resource appearing online, on
the guest's clock, then waits for the guest to shrink back before the next run.
The hot-plug time comes from the broker's `vmtide_broker_hotplug_seconds`
histogram, read after each run (host clock). Negotiation is what is left
between the decision and the grant: the request and the grant crossing QEMU's
user network, the broker's arbitration, and gRPC in the guest.

Cases: a CPU that must be hot-plugged; a standby CPU (plugged at boot,
offline, kept by the agent's `[limits.cpus] standby = 1`: no request, no
hot-plug); memory through virtio-mem and through a pc-dimm. The report goes to
docs/bench/reaction.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import shlex
import statistics
import sys
import tempfile
import time
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families
from vm.build_image import ensure_image
from vm.harness import VMOptions, VMs
from vm.rig import GiB, ListHandler, Rig, free_port

from agent.policy import MemoryParams
from bench.machine import describe_machine, revision
from broker.config import PoolConfig

REPO = Path(__file__).resolve().parents[1]
GUEST_DRIVER = REPO / "bench" / "guest_reaction.py"
POOL = PoolConfig(cpus=8, memory_bytes=16 * GiB)
HEADROOM = MemoryParams()  # the config below keeps the default headroom
# Boot plus the agent's imports under TCG, then every run's growth and shrink.
CONNECT_TIMEOUT_SECONDS = 180.0
RUN_TIMEOUT_SECONDS = 400.0

# The agent's defaults (docs/policy.md) but for the shrink windows, so a run
# ends in seconds rather than minutes; growth is what is measured. At most two
# CPUs: each run adds exactly one.
AGENT_CONFIG = """
[agent]
guest_id = "{name}"
sensing_interval_seconds = %(interval)s
[broker]
target = "10.0.2.2:{port}"
reconnect_min_seconds = 0.5
reconnect_max_seconds = 2.0
[limits.cpus]
minimum = 1
maximum = 2
standby = %(standby)s
[limits.memory]
minimum_bytes = "1GiB"
maximum_bytes = "3GiB"
[metrics]
enabled = false
[policy.cpu]
shrink_window_seconds = 5.0
shrink_interval_seconds = 1.0
shrink_step_ratio = 1.0
[policy.memory]
shrink_window_seconds = 5.0
shrink_interval_seconds = 1.0
shrink_step_ratio = 1.0
"""


@dataclass(frozen=True)
class Case:
    name: str
    what: str
    resource: str  # "cpus" or "memory"
    amount: int  # busy loops, or MiB written
    options: VMOptions
    # CPUs the agent keeps plugged but offline; growth takes one with no grant.
    standby: int = 0


CASES = (
    # Sixteen slots: under TCG QEMU realizes at most maxcpus vCPUs over its
    # life (the broker refuses the one after), and every run plugs one.
    Case("cpu-hotplug", "CPU, hot-plugged", "cpus", 2, VMOptions(maxcpus=16)),
    # Two vCPUs from boot, the kernel bringing up one: cpu1 is the standby.
    Case(
        "cpu-standby",
        "CPU, standby",
        "cpus",
        2,
        VMOptions(cpus=2, kernel_args=("maxcpus=1",)),
        standby=1,
    ),
    Case("memory-virtio-mem", "memory, virtio-mem", "memory", 700, VMOptions(virtio_mem="2G")),
    Case("memory-dimm", "memory, pc-dimm", "memory", 700, VMOptions()),
)
# The boot size, in the guest before the agent starts (shell builtins but for
# cat: under TCG every fork is felt): online, then plugged.
REST_SNAPSHOT = {
    "cpus": "cat /sys/devices/system/cpu/online /sys/devices/system/cpu/present",
    "memory": (
        "n=0; m=0; for b in /sys/devices/system/memory/memory*/state; do"
        ' m=$((m + 1)); read s < "$b"; [ "$s" = online ] && n=$((n + 1)); done;'
        " echo $n; echo $m"
    ),
}
QUICK_CASES = ("cpu-hotplug", "cpu-standby", "memory-virtio-mem")

PHASES = ("ramp", "detection", "negotiation", "hotplug", "onlining", "total")


def scrape_hotplug(port: int, guest: str, resource: str) -> tuple[float, float]:
    """(sum, count) of the broker's hot-plug histogram for one guest and resource."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    total = count = 0.0
    for family in text_string_to_metric_families(text):
        if family.name != "vmtide_broker_hotplug_seconds":
            continue
        for sample in family.samples:
            if sample.labels.get("guest") != guest or sample.labels.get("resource") != resource:
                continue
            if sample.name.endswith("_sum"):
                total = sample.value
            elif sample.name.endswith("_count"):
                count = sample.value
    return total, count


def phases(
    run: Mapping[str, float | None], hotplug: float, standby: bool = False
) -> dict[str, float] | None:
    """A run's phases in seconds, or None when the agent's log missed a step.
    A standby resource is onlined on the decision: no grant to wait for."""
    step, decided, granted, seen = run["step"], run["decided"], run["granted"], run["online"]
    if standby:
        granted, hotplug = decided, 0.0
    if step is None or decided is None or granted is None or seen is None:
        return None
    # Memory is needed partway through the writer's fill. The agent may see
    # it a poll before the driver, or grow on pressure before the headroom
    # runs out (no need seen): detection 0 then.
    needed = min(run.get("needed") or decided, decided)
    return {
        "ramp": max(needed - step, 0.0),
        "detection": max(decided - needed, 0.0),
        "negotiation": max(granted - decided - hotplug, 0.0),
        "hotplug": hotplug,
        "onlining": max(seen - granted, 0.0),
        "total": seen - step,
    }


async def measure(case: Case, runs: int, interval: float, workdir: Path) -> list[dict[str, float]]:
    port = free_port()
    made = Rig(workdir, POOL, metrics_port=port)
    results: list[dict[str, float]] = []
    with VMs(ensure_image(), workdir) as vms, ListHandler(made.log):
        share_cmd = " ".join(
            shlex.quote(str(a))
            for a in (
                "--resource", case.resource, "--amount", case.amount, "--runs", runs,
                "--headroom-min", HEADROOM.headroom_min_bytes,
                "--headroom-share", HEADROOM.headroom_percent / 100,
            )
        )  # fmt: skip
        script = (
            "S=$VMTIDE_SHARE\n"
            f"({REST_SNAPSHOT[case.resource]}) > $S/rest\n"
            # Scheduled ahead of the load, as its unit does (Nice=-10).
            "nice -n -10 {venv}/vmtide-agent run --config $S/agent.toml >> $S/agent.log 2>&1 &\n"
            f"{{venv}}/python {GUEST_DRIVER} {share_cmd} --log $S/agent.log "
            "--out $S/results.jsonl --go $S/go --rest $S/rest\n"
        )
        setup = await made.add(
            vms,
            case.name,
            case.options,
            script=script,
            agent_config=AGENT_CONFIG % {"interval": interval, "standby": case.standby},
        )
        made.start_broker()
        try:
            await setup.until(
                lambda: setup.state().get("connected", False),
                CONNECT_TIMEOUT_SECONDS,
                "the agent to connect",
            )
            (setup.vm.share / "go").touch()
            out = setup.vm.share / "results.jsonl"
            before: tuple[float, float] | None = None
            deadline = time.monotonic() + RUN_TIMEOUT_SECONDS * runs
            while len(results) < runs:
                lines = out.read_text().splitlines() if out.exists() else []
                run = int(json.loads(lines[-1])["run"]) + 1 if lines else 0
                if before is None and (setup.vm.share / f"stepping-{run}").exists():
                    # The guest is at rest and about to step: hot-plugs from
                    # here on are this run's.
                    before = scrape_hotplug(port, case.name, case.resource)
                if len(lines) > len(results):
                    after = scrape_hotplug(port, case.name, case.resource)
                    if before is None:
                        raise AssertionError(f"{case.name}: missed the notice of a step")
                    hotplug = after[0] - before[0] if after[1] > before[1] else 0.0
                    before = None
                    raw = json.loads(lines[len(results)])
                    measured = phases(raw, hotplug, standby=case.standby > 0)
                    if measured is None:
                        raise AssertionError(
                            f"{case.name}: the agent's log missed a step: {raw}\n"
                            + _tail(setup.vm.share / "agent.log")
                        )
                    # 1 when the agent took a standby CPU on a PSI trigger's
                    # own evidence, 0 when its policy decided.
                    trigger = "pressure trigger" in str(raw.get("decision"))
                    measured["trigger"] = float(trigger)
                    results.append(measured)
                    print(f"  {case.name} run {len(results)}/{runs}: " + _fmt(measured))
                    continue
                if time.monotonic() > deadline or setup.vm.script_status() is not None:
                    raise AssertionError(
                        setup.vm.explain(
                            f"{case.name}: {len(results)} of {runs} runs; agent log:\n"
                            + _tail(setup.vm.share / "agent.log")
                            + "\n--- broker log\n"
                            + "\n".join(made.log[-30:])
                        )
                    )
                await asyncio.sleep(0.2)
        finally:
            (setup.vm.share / "stop").touch()
            await made.stop_broker()
    return results


def _tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text().splitlines()[-lines:]) if path.exists() else "(none)"


def _fmt(measured: dict[str, float]) -> str:
    return ", ".join(f"{p} {measured[p]:.2f} s" for p in PHASES)


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile: with few runs p99 is the slowest run."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))
    return ordered[int(rank) - 1]


def report(
    results: dict[str, list[dict[str, float]]],
    runs: int,
    interval: float,
    command: str,
    code: str,
) -> str:
    """The report; `code` is the revision measured, read before the first boot."""
    lines = [
        "# Reaction on a real VM",
        "",
        "From a load step inside a real guest to the new CPU or memory block online.",
        "Each run steps the load, waits for growth, drops the load and waits for the",
        "guest to shrink back (and the broker to unplug) before the next run.",
        "",
        f"- Command: `{command}`",
        f"- Machine: {describe_machine()}",
        f"- Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        f"- Guest: Debian 12 kernel under QEMU {_qemu_version()} with TCG (no KVM here),",
        "  1 vCPU (of 16 slots; the agent may use 2) and 1 GiB; memory cases grow from",
        "  1 GiB by virtio-mem or pc-dimm. The standby case boots 2 vCPUs with the",
        "  kernel's `maxcpus=1` and the agent's `standby = 1`: cpu1 stays plugged, offline.",
        f"- Agent: defaults but `sensing_interval_seconds = {interval}` and 5 s shrink windows,",
        "  at Nice -10 as its unit runs it; broker in the benchmark process, QMP backend,",
        "  pool far above the guest's maximum. Git revision: " + code + ".",
        f"- Runs per case: {runs}. p99 is the nearest rank: with few runs, the slowest.",
        "",
        "Phases: **ramp** (load step to the guest needing more: at once for busy loops,",
        "for memory once the writer has used up the agent's headroom, read from",
        "/proc/meminfo every 10 ms), **detection** (need to the agent's grow decision,",
        "guest clock), **negotiation** (decision to the grant reaching the agent, less",
        "the hot-plug), **hotplug** (the broker's QMP commands and QEMU's answers, host",
        "clock), **onlining** (grant to the resource online in sysfs, guest clock).",
        "Detection, onlining and the guest's share of negotiation run inside the guest,",
        "emulated by TCG, several times slower than under KVM; the hot-plug runs on the host.",
        "",
        "| case | phase | p50 (s) | p99 (s) | min (s) | max (s) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    triggered = []
    for case in CASES:
        got = results.get(case.name)
        if not got:
            continue
        if case.standby:
            count = sum(int(r.get("trigger", 0)) for r in got)
            triggered.append(f"{case.what}: {count} of {len(got)} runs")
        for phase in PHASES:
            values = [r[phase] for r in got]
            lines.append(
                f"| {case.what} | {phase} | {statistics.median(values):.2f} | "
                f"{percentile(values, 99):.2f} | {min(values):.2f} | {max(values):.2f} |"
            )
    if triggered:
        lines += [
            "",
            "Standby growth decided on a PSI trigger's own evidence (tasks stalled and",
            "more runnable than CPUs online), not on the policy's half-second busy share:",
            "; ".join(triggered) + ".",
        ]
    lines += [
        "",
        "Raw runs (seconds; `trigger` 1 when the trigger decided):",
        "",
        "```",
        json.dumps(results, indent=1),
        "```",
        "",
    ]
    return "\n".join(lines)


def _qemu_version() -> str:
    import subprocess

    out = subprocess.run(
        ["qemu-system-x86_64", "--version"], capture_output=True, text=True, check=False
    ).stdout
    return out.split("version")[1].split()[0] if "version" in out else "(unknown)"


async def run(args: argparse.Namespace) -> dict[str, list[dict[str, float]]]:
    results: dict[str, list[dict[str, float]]] = {}
    names = args.case or (QUICK_CASES if args.quick else [c.name for c in CASES])
    for case in CASES:
        if case.name not in names:
            continue
        print(f"{case.name}: booting a guest, {args.runs} runs ...", flush=True)
        with tempfile.TemporaryDirectory(prefix="vmtide-bench-") as tmp:
            results[case.name] = await measure(case, args.runs, args.interval, Path(tmp))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--interval", type=float, default=1.0, help="agent sensing interval")
    parser.add_argument("--case", action="append", choices=[c.name for c in CASES])
    parser.add_argument("--quick", action="store_true", help="one run of two cases (CI)")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "bench")
    args = parser.parse_args(argv)
    if args.quick:
        args.runs = 1
    command = "PYTHONPATH=tests .venv/bin/python -m bench.vm_reaction " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])
    )
    # Now, not at the end: a run lasts most of an hour, and the guests run
    # the tree as it is when each boots.
    code = revision()
    results = asyncio.run(run(args))
    args.out.mkdir(parents=True, exist_ok=True)
    name = "reaction-quick.md" if args.quick else "reaction.md"
    text = report(results, args.runs, args.interval, command.strip(), code)
    (args.out / name).write_text(text)
    print(f"report: {args.out / name}  ({platform.node()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
