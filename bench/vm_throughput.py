"""Onlining throughput on a real VM: the agent's code against a bare loop of
sysfs writes, in the same guest.

    PYTHONPATH=tests .venv/bin/python -m bench.vm_throughput [--reps 11] [--quick]

Boots a guest with seven offline CPUs (eight vCPUs, `maxcpus=1`) and a 2 GiB
pc-dimm left offline (`memhp_default_state=offline`), and runs
`bench/guest_throughput.py` in it: each repetition onlines them with a bare
loop of writes and with the agent's `Actuator`, alternating which goes first.
The overhead is the median over repetitions of agent time / bare time - 1,
each pair measured back to back. Report: docs/bench/throughput.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

from vm.build_image import ensure_image
from vm.harness import VENV_BIN, VMOptions, VMs

from bench.machine import describe_machine

REPO = Path(__file__).resolve().parents[1]
GiB = 1 << 30
OPTIONS = VMOptions(
    cpus=8,
    maxcpus=8,
    memory="1G",
    kernel_args=("maxcpus=1", "memhp_default_state=offline"),
    extra_args=(
        "-object", "memory-backend-ram,id=bench-ram,size=2G",
        "-device", "pc-dimm,id=bench-dimm,memdev=bench-ram",
    ),
)  # fmt: skip
# Python's imports under TCG, then the repetitions.
TIMEOUT_SECONDS = 900.0


async def measure(reps: int, workdir: Path) -> dict[str, object]:
    with VMs(ensure_image(), workdir) as vms:
        vm = vms.new(OPTIONS)
        await vm.start(
            f"{VENV_BIN}/python {REPO}/bench/guest_throughput.py --reps {reps} "
            "--out $VMTIDE_SHARE/throughput.json"
        )
        result: dict[str, object] = await vm.read_json("throughput.json", TIMEOUT_SECONDS)
        return result


def summarize(result: dict[str, object]) -> dict[str, float]:
    runs = result["runs"]
    block_size = result["block_size"]
    assert isinstance(runs, list) and isinstance(block_size, int)

    def median(key: str) -> float:
        return statistics.median(float(r[key]) for r in runs)

    def overhead(what: str) -> list[float]:
        return [r[f"agent_{what}_seconds"] / r[f"bare_{what}_seconds"] - 1 for r in runs]

    cpus = median("bare_cpus")
    gib = median("bare_blocks") * block_size / GiB
    return {
        "cpus": cpus,
        "gib": gib,
        "bare_cpus_per_s": cpus / median("bare_cpu_seconds"),
        "agent_cpus_per_s": cpus / median("agent_cpu_seconds"),
        "bare_gib_per_s": gib / median("bare_memory_seconds"),
        "agent_gib_per_s": gib / median("agent_memory_seconds"),
        "cpu_overhead": statistics.median(overhead("cpu")),
        "cpu_overhead_min": min(overhead("cpu")),
        "cpu_overhead_max": max(overhead("cpu")),
        "memory_overhead": statistics.median(overhead("memory")),
        "memory_overhead_min": min(overhead("memory")),
        "memory_overhead_max": max(overhead("memory")),
    }


def report(result: dict[str, object], s: dict[str, float], reps: int, command: str) -> str:
    return "\n".join(
        [
            "# Onlining throughput on a real VM",
            "",
            "The agent's own onlining code (`Actuator` over `Kernel`: topology read,",
            "per-item results, movable-zone fallback) against a bare loop of sysfs writes,",
            "in the same guest, each pair back to back, alternating which goes first.",
            "",
            f"- Command: `{command}`",
            f"- Machine: {describe_machine()}",
            f"- Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
            "- Guest: Debian 12 kernel under QEMU TCG; 7 offline CPUs (8 vCPUs, `maxcpus=1`)",
            "  and a 2 GiB pc-dimm left offline (`memhp_default_state=offline`), onlined movable.",
            f"- Repetitions: {reps}; medians, with the spread of the paired overhead.",
            "",
            "| resource | amount | bare loop | agent | agent overhead, median (min..max) |",
            "|---|---:|---:|---:|---|",
            f"| CPUs | {s['cpus']:.0f} | {s['bare_cpus_per_s']:.2f} CPUs/s | "
            f"{s['agent_cpus_per_s']:.2f} CPUs/s | {s['cpu_overhead']:+.1%} "
            f"({s['cpu_overhead_min']:+.1%}..{s['cpu_overhead_max']:+.1%}) |",
            f"| memory | {s['gib']:.2f} GiB | {s['bare_gib_per_s']:.2f} GiB/s | "
            f"{s['agent_gib_per_s']:.2f} GiB/s | {s['memory_overhead']:+.1%} "
            f"({s['memory_overhead_min']:+.1%}..{s['memory_overhead_max']:+.1%}) |",
            "",
            "Both run under TCG, so the absolute rates are far below a KVM guest's;",
            "the overhead is a ratio measured in the same guest, which TCG slows alike.",
            "",
            "Raw runs (seconds):",
            "",
            "```",
            json.dumps(result, indent=1),
            "```",
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=11)
    parser.add_argument("--quick", action="store_true", help="two repetitions (CI)")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "bench")
    args = parser.parse_args(argv)
    reps = 2 if args.quick else args.reps
    command = "PYTHONPATH=tests .venv/bin/python -m bench.vm_throughput " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])
    )
    print(f"booting a guest, {reps} repetitions ...", flush=True)
    with tempfile.TemporaryDirectory(prefix="vmtide-bench-") as tmp:
        result = asyncio.run(measure(reps, Path(tmp)))
    summary = summarize(result)
    text = report(result, summary, reps, command.strip())
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / ("throughput-quick.md" if args.quick else "throughput.md")).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
