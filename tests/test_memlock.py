"""agent/memlock.py: which mappings may lose their pages before mlockall, and that
dropping them really shrinks a live process that keeps running."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

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
