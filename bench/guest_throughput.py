"""Inside the benchmark guest: how fast the agent onlines CPUs and memory, against
a bare loop of sysfs writes, in the same guest, alternating which goes first.

    python guest_throughput.py --reps 5 --out throughput.json
    python guest_throughput.py --fake --reps 200 --out throughput-fake.json

The guest boots with offline CPUs (`maxcpus=1`) and an offline pc-dimm
(`memhp_default_state=offline`). Each repetition offlines them, onlines them
with a bare loop of writes, offlines them again and onlines them with the
agent's own code (`agent.actuator.Actuator` over `agent.kernel.Kernel`: the
topology read, the per-item results, the movable-zone fallback), timing each.

`--fake` runs the same comparison in this process on a simulated guest
(vmtide.fakesys, on tmpfs where there is one) with 7 standby CPUs and 16
standby blocks, both loops writing through its kernel rules. Its writes cost
far less than a real kernel's onlining, so it prints the agent's overhead in
microseconds per item, which is what a real guest adds to each write.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from agent.actuator import Actuator
from agent.kernel import AttrWriter, Kernel


def _write_attr(path: Path, value: str, timeout: float | None = None) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Tree:
    """The CPU and memory directories of a sysfs, and how a write reaches it."""

    cpu: Path
    memory: Path
    writer: Callable[[Path, str], None]


REAL = Tree(Path("/sys/devices/system/cpu"), Path("/sys/devices/system/memory"), _write_attr)


def write(tree: Tree, path: Path, value: str) -> bool:
    try:
        tree.writer(path, value)
    except OSError:
        return False
    return True


def hotplug_cpus(tree: Tree) -> list[Path]:
    return sorted(p for p in tree.cpu.glob("cpu[0-9]*") if (p / "online").exists())


def offline_blocks(tree: Tree) -> list[Path]:
    return sorted(
        (
            b
            for b in tree.memory.glob("memory[0-9]*")
            if (b / "state").read_text().strip() == "offline"
        ),
        key=lambda b: int(b.name[6:]),
    )


def removable_blocks(tree: Tree, boot_blocks: set[str]) -> list[Path]:
    return [b for b in tree.memory.glob("memory[0-9]*") if b.name not in boot_blocks]


def reset(tree: Tree, boot_blocks: set[str]) -> tuple[int, int]:
    """Offline the test's CPUs and blocks; how many are offline now."""
    for cpu in hotplug_cpus(tree):
        write(tree, cpu / "online", "0")
    for block in removable_blocks(tree, boot_blocks):
        write(tree, block / "state", "offline")
    offline_cpus = sum((c / "online").read_text().strip() == "0" for c in hotplug_cpus(tree))
    return offline_cpus, len(offline_blocks(tree))


def bare_cpus(tree: Tree) -> float:
    started = time.perf_counter()
    for cpu in hotplug_cpus(tree):
        if (cpu / "online").read_text().strip() == "0":
            write(tree, cpu / "online", "1")
    return time.perf_counter() - started


def bare_memory(tree: Tree) -> float:
    started = time.perf_counter()
    for block in offline_blocks(tree):
        write(tree, block / "state", "online_movable")
    return time.perf_counter() - started


def agent_cpus(actuator: Actuator) -> float:
    started = time.perf_counter()
    results = actuator.online_cpus(target=1 << 16)
    elapsed = time.perf_counter() - started
    if not all(r.ok for r in results):
        raise RuntimeError(f"agent could not online: {results}")
    return elapsed


def agent_memory(actuator: Actuator) -> float:
    started = time.perf_counter()
    results = actuator.online_memory(target_bytes=1 << 50)
    elapsed = time.perf_counter() - started
    if not all(r.ok for r in results):
        raise RuntimeError(f"agent could not online: {results}")
    return elapsed


def measure(tree: Tree, actuator: Actuator, reps: int, echo: bool) -> dict[str, object]:
    boot_blocks = {b.parent.name for b in tree.memory.glob("memory[0-9]*/state")}
    boot_blocks -= {b.name for b in offline_blocks(tree)}
    block_size = int((tree.memory / "block_size_bytes").read_text(), 16)
    runs = []
    for rep in range(reps):
        order = ("bare", "agent") if rep % 2 == 0 else ("agent", "bare")
        run: dict[str, float | int] = {}
        for who in order:
            cpus, blocks = reset(tree, boot_blocks)
            run[f"{who}_cpus"] = cpus
            run[f"{who}_cpu_seconds"] = agent_cpus(actuator) if who == "agent" else bare_cpus(tree)
            run[f"{who}_blocks"] = blocks
            run[f"{who}_memory_seconds"] = (
                agent_memory(actuator) if who == "agent" else bare_memory(tree)
            )
        runs.append(run)
        if echo:
            print(f"rep {rep}: {run}", flush=True)
    return {"block_size": block_size, "runs": runs}


def fake_tree(root: Path) -> tuple[Tree, AttrWriter]:
    # Imported here: the benchmark guest needs none of the simulator.
    from vmtide.fakesys import FakeGuest

    guest = FakeGuest(root, possible_cpus=8, boot_cpus=1, boot_blocks=8)
    for cpu in range(1, 8):
        guest.plug_cpu(cpu)
    guest.plug_blocks(16)
    writer = guest.writer
    sysfs = guest.sysfs / "devices/system"
    return Tree(sysfs / "cpu", sysfs / "memory", writer.write), writer


def overheads(result: dict[str, object]) -> dict[str, float]:
    """Median agent - bare per item (microseconds) and ratio, per resource."""
    runs = result["runs"]
    assert isinstance(runs, list)
    summary = {}
    for what, items in (("cpu", "cpus"), ("memory", "blocks")):
        per_item = [
            (r[f"agent_{what}_seconds"] - r[f"bare_{what}_seconds"]) / r[f"agent_{items}"] * 1e6
            for r in runs
        ]
        ratio = [r[f"agent_{what}_seconds"] / r[f"bare_{what}_seconds"] - 1 for r in runs]
        bare = [r[f"bare_{what}_seconds"] / r[f"bare_{items}"] * 1e6 for r in runs]
        summary[f"{what}_bare_us_per_item"] = statistics.median(bare)
        summary[f"{what}_overhead_us_per_item"] = statistics.median(per_item)
        summary[f"{what}_overhead_ratio"] = statistics.median(ratio)
    return summary


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--fake", action="store_true", help="a simulated guest, in process")
    args = parser.parse_args()
    if not args.fake:
        result = measure(REAL, Actuator(Kernel()), args.reps, echo=True)
        args.out.write_text(json.dumps(result))
        return 0
    shm = Path("/dev/shm")
    with tempfile.TemporaryDirectory(dir=shm if shm.is_dir() else None) as tmp:
        tree, writer = fake_tree(Path(tmp) / "guest")
        kernel = Kernel(Path(tmp) / "guest" / "sys", Path(tmp) / "guest" / "proc", writer=writer)
        result = measure(tree, Actuator(kernel), args.reps, echo=False)
    summary = overheads(result)
    args.out.write_text(json.dumps({**result, "summary": summary}))
    for what in ("cpu", "memory"):
        print(
            f"{what}: bare {summary[f'{what}_bare_us_per_item']:.0f} us/item, agent overhead"
            f" {summary[f'{what}_overhead_us_per_item']:+.0f} us/item"
            f" ({summary[f'{what}_overhead_ratio']:+.1%})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
