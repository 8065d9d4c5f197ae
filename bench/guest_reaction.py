"""Inside the benchmark guest: step the load, time how the agent reacts, step back.

    python guest_reaction.py --resource cpus --amount 2 --runs 10 --log agent.log
        --out results.jsonl --go go --rest rest   (one command line)

Run by `bench/vm_reaction.py` in a real guest next to `vmtide-agent`. Each run
waits until the guest is at rest, starts the load (busy loops, or a process
writing to MiB of memory) and notes the time, polls sysfs every 10 ms until a
CPU or memory block more is online, and appends one JSON line: the load step,
the moment the guest needed more (for memory, when the writer had used up the
agent's headroom: /proc/meminfo, polled with sysfs), the agent's decision, the
grant reaching it and the new resource seen online, all on this guest's clock
(the agent's log is on the same clock). Then it stops the load and waits for
the guest to shrink back before the next run.

Standard library only, and cheap: every millisecond it spends runs under TCG
next to the agent it measures.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

CPU = Path("/sys/devices/system/cpu")
MEMORY = Path("/sys/devices/system/memory")
# Fast while timing a growth; slow while waiting for rest, where a Python
# loop polling sysfs every 10 ms under TCG is load the agent sees.
POLL_SECONDS = 0.01
REST_POLL_SECONDS = 0.2
# The shrink window of the benchmark's agent config plus the unplug.
REST_TIMEOUT_SECONDS = 240.0
GROW_TIMEOUT_SECONDS = 120.0
# At rest this long before a step, so PSI averages have decayed.
QUIET_SECONDS = 3.0
# The host polls the share every 0.2 s for the notice that a step comes.
STEP_NOTICE_SECONDS = 0.5

LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \w+ vmtide\.agent: (.*)$")


def listed_cpus(text: str) -> int:
    """CPUs in a list like /sys/devices/system/cpu/online's ("0-2,4")."""
    total = 0
    for part in text.strip().split(","):
        low, _, high = part.partition("-")
        total += int(high or low) - int(low) + 1
    return total


def cpu_count(name: str) -> int:
    """CPUs in /sys/devices/system/cpu/{online,present}."""
    return listed_cpus((CPU / name).read_text())


def blocks(state: str | None) -> int:
    """Memory blocks in `state`, or all of them with None."""
    count = 0
    for block in MEMORY.glob("memory[0-9]*"):
        if state is None:
            count += 1
            continue
        try:
            if (block / "state").read_text().strip() == state:
                count += 1
        except OSError:  # removed while listing
            pass
    return count


def online(resource: str) -> int:
    return cpu_count("online") if resource == "cpus" else blocks("online")


def present(resource: str) -> int:
    return cpu_count("present") if resource == "cpus" else blocks(None)


def memory_short(rest_bytes: int, headroom_min: int, headroom_share: float) -> bool:
    """Whether the guest needs more memory than `rest_bytes` online, by the
    agent's headroom rule (agent/policy.py, _memory_facts): the moment a
    detector with no delay would grow."""
    fields = {}
    with open("/proc/meminfo", "rb") as f:
        for line in f:
            name, _, rest = line.partition(b":")
            if name in (b"MemTotal", b"MemAvailable"):
                fields[name] = int(rest.split()[0]) * 1024
    total, available = fields[b"MemTotal"], fields[b"MemAvailable"]
    used = total - available
    overhead = max(0, rest_bytes - total)
    return overhead + max(used + headroom_min, used / (1 - headroom_share)) > rest_bytes


def until(
    condition: Callable[[], bool],
    deadline: float,
    what: str | Callable[[], str],
    poll: float = POLL_SECONDS,
    since: float | None = None,
) -> float:
    """Poll until `condition` holds (its time.time()), or time.monotonic() passes
    `deadline`; `what` names what was awaited, or says what was seen instead.
    `since` is when the wait began, for a deadline shared by several calls."""
    started = time.monotonic() if since is None else since
    while not condition():
        if time.monotonic() > deadline:
            waited = time.monotonic() - started
            said = what if isinstance(what, str) else what()
            raise TimeoutError(f"timed out after {waited:.0f} s waiting for {said}")
        time.sleep(poll)
    return time.time()


def start_load(resource: str, amount: int) -> list[int]:
    """Busy loops (one per CPU of `amount`) or one process writing `amount` MiB."""
    pids = []
    for _ in range(amount if resource == "cpus" else 1):
        pid = os.fork()
        if pid == 0:
            if resource == "memory":
                held = b"x" * (amount << 20)  # written, so resident
                while held:
                    time.sleep(3600)
            while True:
                pass
        pids.append(pid)
    return pids


def stop_load(pids: list[int]) -> None:
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def agent_events(log: Path, offset: int) -> list[tuple[float, str]]:
    """The agent's log lines from `offset` on: (time on this clock, message)."""
    with log.open("rb") as f:
        f.seek(offset)
        text = f.read().decode(errors="replace")
    events = []
    for line in text.splitlines():
        match = LOG_LINE.match(line)
        if match:
            when = datetime.datetime.strptime(match[1], "%Y-%m-%d %H:%M:%S,%f")
            events.append((when.timestamp(), match[2]))
    return events


def first(events: list[tuple[float, str]], pattern: str, after: float) -> tuple[float | None, str]:
    """The time and message of the first event matching `pattern` at or after `after`."""
    wanted = re.compile(pattern)
    return next(((t, msg) for t, msg in events if t >= after and wanted.search(msg)), (None, ""))


def run_once(args: argparse.Namespace, base_online: int, base_present: int) -> dict[str, object]:
    offset = args.log.stat().st_size
    rest_bytes = base_online * args.block_size
    step = time.time()
    # Busy loops want their CPUs at once; memory is wanted once the writing
    # process has used up the headroom, partway through its fill.
    needed: list[float] = [step] if args.resource == "cpus" else []

    def grown() -> bool:
        if not needed and memory_short(rest_bytes, args.headroom_min, args.headroom_share):
            needed.append(time.time())
        return online(args.resource) > base_online

    pids = start_load(args.resource, args.amount)
    try:
        seen = until(grown, time.monotonic() + GROW_TIMEOUT_SECONDS, "growth")
    finally:
        stop_load(pids)
    time.sleep(0.5)  # the agent logs its grant and onlining after the write itself
    events = agent_events(args.log, offset)
    # Log times have millisecond resolution: the step may read up to 1 ms late.
    decided, decision = first(events, rf"^decision {args.resource} grow", step - 0.001)
    granted, _ = first(events, r"^grant \d+: may hold", decided or step)
    return {
        "resource": args.resource,
        "step": step,
        "needed": needed[0] if needed else None,
        "decided": decided,
        "decision": decision,
        "granted": granted,
        "online": seen,
        "plugged_before": base_present,
        "plugged_after": present(args.resource),
    }


def wait_for_rest(log: Path, rested: Callable[[], bool], what: Callable[[], str]) -> None:
    """Back to the boot size (and unplugged again), and quiet: no change and no
    grow decision for QUIET_SECONDS (an agent starting under TCG sees its own
    start-up as load, and grows for it)."""
    started = time.monotonic()
    deadline = started + REST_TIMEOUT_SECONDS
    while True:
        until(rested, deadline, what, REST_POLL_SECONDS, since=started)
        offset = log.stat().st_size
        quiet_until = time.monotonic() + QUIET_SECONDS
        while rested() and time.monotonic() < quiet_until:
            time.sleep(REST_POLL_SECONDS)
        events = agent_events(log, offset)
        grew = any(msg.startswith("decision") and " grow " in msg for _, msg in events)
        if rested() and not grew:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {REST_TIMEOUT_SECONDS:.0f} s waiting for {what()}")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--resource", choices=("cpus", "memory"), required=True)
    parser.add_argument("--amount", type=int, required=True, help="busy loops, or MiB")
    parser.add_argument("--runs", type=int, required=True)
    parser.add_argument("--log", type=Path, required=True, help="the agent's log")
    parser.add_argument("--out", type=Path, required=True, help="JSON lines, one per run")
    parser.add_argument("--go", type=Path, required=True, help="start once this exists")
    parser.add_argument(
        "--rest",
        type=Path,
        required=True,
        help="the boot size, taken before the agent started: two lines, online and"
        " plugged (CPU lists for cpus, block counts for memory)",
    )
    parser.add_argument("--headroom-min", type=int, default=384 << 20, help="bytes")
    parser.add_argument("--headroom-share", type=float, default=0.1)
    args = parser.parse_args()
    args.block_size = int((MEMORY / "block_size_bytes").read_text(), 16)
    # Not read here: this script starts beside the agent, and under TCG the
    # agent may have grown the guest for its own start-up by then.
    first, second = args.rest.read_text().split()
    if args.resource == "cpus":
        base_online, base_present = listed_cpus(first), listed_cpus(second)
    else:
        base_online, base_present = int(first), int(second)
    print(f"at rest: {args.resource} {base_online} online, {base_present} plugged", flush=True)
    until(args.go.exists, time.monotonic() + 600, str(args.go), REST_POLL_SECONDS)

    def rested() -> bool:
        return online(args.resource) == base_online and present(args.resource) == base_present

    def at_rest_before(run: int) -> Callable[[], str]:
        return lambda: (
            f"rest before run {run} ({args.resource}: {online(args.resource)} online,"
            f" {present(args.resource)} plugged; at rest {base_online} and {base_present})"
        )

    for run in range(args.runs):
        wait_for_rest(args.log, rested, at_rest_before(run))
        # Tell the host, which reads the broker's hot-plug time from here on.
        (args.out.parent / f"stepping-{run}").touch()
        time.sleep(STEP_NOTICE_SECONDS)
        if not rested():
            continue
        result = run_once(args, base_online, base_present)
        with args.out.open("a") as f:
            f.write(json.dumps({"run": run, **result}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
