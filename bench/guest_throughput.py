"""Inside the benchmark guest: how fast the agent onlines CPUs and memory, against
a bare loop of sysfs writes, in the same guest, alternating which goes first.

    python guest_throughput.py --reps 5 --out throughput.json

The guest boots with offline CPUs (`maxcpus=1`) and an offline pc-dimm
(`memhp_default_state=offline`). Each repetition offlines them, onlines them
with a bare loop of writes, offlines them again and onlines them with the
agent's own code (`agent.actuator.Actuator` over `agent.kernel.Kernel`: the
topology read, the per-item results, the movable-zone fallback), timing each.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from agent.actuator import Actuator
from agent.kernel import Kernel

CPU = Path("/sys/devices/system/cpu")
MEMORY = Path("/sys/devices/system/memory")


def write(path: Path, value: str) -> bool:
    try:
        fd = os.open(path, os.O_WRONLY)
        try:
            os.write(fd, value.encode())
        finally:
            os.close(fd)
    except OSError:
        return False
    return True


def hotplug_cpus() -> list[Path]:
    return sorted(p for p in CPU.glob("cpu[0-9]*") if (p / "online").exists())


def offline_blocks() -> list[Path]:
    return sorted(
        (b for b in MEMORY.glob("memory[0-9]*") if (b / "state").read_text().strip() == "offline"),
        key=lambda b: int(b.name[6:]),
    )


def removable_blocks(boot_blocks: set[str]) -> list[Path]:
    return [b for b in MEMORY.glob("memory[0-9]*") if b.name not in boot_blocks]


def reset(boot_blocks: set[str]) -> tuple[int, int]:
    """Offline the test's CPUs and blocks; how many are offline now."""
    for cpu in hotplug_cpus():
        write(cpu / "online", "0")
    for block in removable_blocks(boot_blocks):
        write(block / "state", "offline")
    offline_cpus = sum((c / "online").read_text().strip() == "0" for c in hotplug_cpus())
    return offline_cpus, len(offline_blocks())


def bare_cpus() -> float:
    started = time.perf_counter()
    for cpu in hotplug_cpus():
        if (cpu / "online").read_text().strip() == "0":
            write(cpu / "online", "1")
    return time.perf_counter() - started


def bare_memory() -> float:
    started = time.perf_counter()
    for block in offline_blocks():
        write(block / "state", "online_movable")
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


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    actuator = Actuator(Kernel())
    boot_blocks = {b.parent.name for b in MEMORY.glob("memory[0-9]*/state")}
    boot_blocks -= {b.name for b in offline_blocks()}
    block_size = int((MEMORY / "block_size_bytes").read_text(), 16)
    runs = []
    for rep in range(args.reps):
        order = ("bare", "agent") if rep % 2 == 0 else ("agent", "bare")
        run: dict[str, float | int] = {}
        for who in order:
            cpus, blocks = reset(boot_blocks)
            run[f"{who}_cpus"] = cpus
            run[f"{who}_cpu_seconds"] = agent_cpus(actuator) if who == "agent" else bare_cpus()
            run[f"{who}_blocks"] = blocks
            run[f"{who}_memory_seconds"] = (
                agent_memory(actuator) if who == "agent" else bare_memory()
            )
        runs.append(run)
        print(f"rep {rep}: {run}", flush=True)
    args.out.write_text(json.dumps({"block_size": block_size, "runs": runs}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
