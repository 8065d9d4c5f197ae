"""agent/memlock.py: which mappings may lose their pages before mlockall, that
dropping them really shrinks a live process that keeps running, and that
shedding after warm-up gives pages back while everything stays locked."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap

import pytest

from agent import memlock
from agent.memlock import Mapping, parse_smaps

# Trimmed from a live agent's /proc/self/smaps (Linux 6.x): cygrpc's code, its
# relocated RELRO segment, its data, the heap, a mapped device, and a mapping
# whose fields are cut short.
SMAPS = """\
7f23678c4000-7f236848a000 r-xp 000c4000 fe:00 5333793                    /venv/grpc/cygrpc.so
Size:              12056 kB
Rss:                9344 kB
Shared_Clean:          0 kB
Shared_Dirty:          0 kB
Private_Clean:      9344 kB
Private_Dirty:         0 kB
Anonymous:             0 kB
VmFlags: rd ex mr mw me sd
7f23687e2000-7f2368832000 r--p 00fe1000 fe:00 5333793                    /venv/grpc/cygrpc.so
Size:                320 kB
Rss:                 320 kB
Shared_Dirty:          0 kB
Private_Dirty:       320 kB
Anonymous:           320 kB
VmFlags: rd mr mw me ac sd
7f2368832000-7f2368855000 rw-p 01031000 fe:00 5333793                    /venv/grpc/cygrpc.so
Size:                140 kB
Rss:                  12 kB
Shared_Dirty:          0 kB
Private_Dirty:         0 kB
Anonymous:             0 kB
VmFlags: rd wr mr mw me ac sd
55d0c0a00000-55d0c0c00000 rw-p 00000000 00:00 0                          [heap]
Rss:                2048 kB
Shared_Dirty:          0 kB
Private_Dirty:      2048 kB
Anonymous:          2048 kB
7f0000000000-7f0000001000 r--s 00000000 00:05 12                         /dev/hugepages/x
Rss:                   4 kB
Shared_Dirty:          0 kB
Private_Dirty:         0 kB
Anonymous:             0 kB
7f0000100000-7f0000200000 r--p 00000000 fe:00 77                         /usr/lib/with space.so
Rss:                  64 kB
"""


def test_only_clean_read_only_file_pages_are_droppable() -> None:
    mappings = list(parse_smaps(SMAPS.splitlines(keepends=True)))
    assert [(m.perms, m.path, m.droppable) for m in mappings] == [
        ("r-xp", "/venv/grpc/cygrpc.so", True),  # code: the file holds every page
        ("r--p", "/venv/grpc/cygrpc.so", False),  # relocated: anonymous copies
        ("rw-p", "/venv/grpc/cygrpc.so", False),  # writable
        ("rw-p", "[heap]", False),
        ("r--s", "/dev/hugepages/x", False),  # a device's memory, not a file's cache
        ("r--p", "/usr/lib/with space.so", False),  # no Anonymous or dirty counts: kept
    ]
    code = mappings[0]
    assert (code.start, code.end, code.rss_kib) == (0x7F23678C4000, 0x7F236848A000, 9344)


def test_a_mapping_with_no_resident_page_is_left_alone() -> None:
    empty = Mapping(0, 4096, "r-xp", "/usr/lib/x.so", anonymous_kib=0, dirty_kib=0, rss_kib=0)
    assert not empty.droppable


def test_dropping_shrinks_a_live_process_that_keeps_working() -> None:
    # A real process with grpc imported, as the agent is when it locks: the
    # pages go, and the code they held still runs (it faults back in).
    script = textwrap.dedent(
        """
        import json, re
        import grpc
        from agent.memlock import drop_clean_file_pages

        def rss_file():
            status = open("/proc/self/status").read()
            return int(re.search(r"RssFile:\\s+(\\d+)", status).group(1))

        before = rss_file()
        dropped = drop_clean_file_pages()
        after = rss_file()
        channel = grpc.insecure_channel("unix:/nonexistent.sock")
        channel.close()
        print(json.dumps({"before": before, "dropped": dropped, "after": after}))
        """
    )
    run = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert run.returncode == 0, run.stderr
    figures = json.loads(run.stdout)
    assert figures["dropped"] > 4096, figures  # grpc's code alone is several MiB
    assert figures["after"] < figures["before"] - 4096, figures


# A live process locked as the agent locks itself, that has run a gRPC call
# (start-up), sheds, and runs calls again (steady work). Printed: what it
# shed, and RssFile and the mappings left unlocked before, after and again.
SHED_SCRIPT = """
import asyncio, json, re
import grpc
from agent.memlock import lock_memory, parse_smaps, shed_start_up_pages

def status(key):
    return int(re.search(key + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1))

def unlocked():
    # smaps' VmFlags carries "lo" for a locked mapping; parse_smaps drops it.
    out, header = [], None
    for line in open("/proc/self/smaps"):
        if line.startswith("VmFlags:"):
            name = " ".join(header[5:]) or header[0]
            # mlockall skips guard pages and the kernel's own ([vdso] and the like).
            if " lo" not in line and header[1] != "---p" and not name.startswith("[v"):
                out.append(name)
        elif not line.split()[0].endswith(":"):
            header = line.split()
    return out

async def call(target):
    async with grpc.aio.insecure_channel(target) as channel:
        hello = channel.unary_unary("/t/Hello", request_serializer=None, response_deserializer=None)
        for _ in range(20):
            assert await hello(b"ping") == b"ping"

async def main():
    server = grpc.aio.server()
    handler = grpc.method_handlers_generic_handler(
        "t", {"Hello": grpc.unary_unary_rpc_method_handler(lambda req, ctx: req)}
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    target = f"127.0.0.1:{port}"
    await call(target)
    before = {"file": status("RssFile"), "unlocked": unlocked()}
    shed = shed_start_up_pages()
    after = {"file": status("RssFile"), "unlocked": unlocked()}
    await call(target)  # steady work, from pages faulted back in
    again = {"file": status("RssFile"), "unlocked": unlocked()}
    await server.stop(None)
    print(json.dumps({"shed": shed, "before": before, "after": after, "again": again}))

if not lock_memory():
    print(json.dumps({"skip": "mlockall refused (no CAP_IPC_LOCK or RLIMIT_MEMLOCK)"}))
else:
    asyncio.run(main())
"""


def test_shedding_gives_pages_back_and_keeps_everything_locked() -> None:
    run = subprocess.run(
        [sys.executable, "-c", SHED_SCRIPT],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    figures = json.loads(run.stdout)
    if "skip" in figures:
        pytest.skip(figures["skip"])
    assert figures["before"]["unlocked"] == [], figures  # mlockall: every mapping
    # grpc's code that only start-up ran goes back: megabytes of it.
    assert figures["shed"] > 2048, figures
    assert figures["after"]["file"] < figures["before"]["file"] - 2048, figures
    # Unmapped, then locked again: what the calls fault back in is locked too.
    assert figures["after"]["unlocked"] == [], figures
    assert figures["again"]["unlocked"] == [], figures
    assert figures["again"]["file"] > figures["after"]["file"], figures


async def test_shedding_waits_for_warm_up_and_a_calm_guest(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    shed: list[int] = []

    def shed_once() -> int:
        shed.append(1)
        return 4096

    monkeypatch.setattr(memlock, "shed_start_up_pages", shed_once)
    answers = iter([False, False, True])
    asked: list[bool] = []

    def calm() -> bool:
        assert not shed, "shed while the guest was under pressure"
        asked.append(next(answers))
        return asked[-1]

    await asyncio.wait_for(
        memlock.shed_when_warm(asyncio.Event(), calm, warm_up=0.01, retry=0.01), 10
    )
    assert asked == [False, False, True]
    assert shed == [1]  # once


async def test_no_shedding_once_the_agent_stops(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memlock, "shed_start_up_pages", lambda: pytest.fail("shed after stop"))
    stop = asyncio.Event()
    stop.set()
    await asyncio.wait_for(memlock.shed_when_warm(stop, lambda: True, warm_up=30), 10)


async def test_a_failed_shed_leaves_the_agent_running(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken() -> int:
        raise ValueError("smaps: unexpected line")

    monkeypatch.setattr(memlock, "shed_start_up_pages", broken)
    await asyncio.wait_for(memlock.shed_when_warm(asyncio.Event(), lambda: True, warm_up=0), 10)
    assert "shedding the agent's start-up pages failed" in caplog.text
