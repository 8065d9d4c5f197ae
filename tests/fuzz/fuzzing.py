"""What the fuzz harnesses share: tests/ on the path (the checks live in
tests/test_bad_input.py) and decoders from fuzzer bytes to protocol values.

Each fuzz_*.py is a libFuzzer harness under atheris; run one directly with
libFuzzer's flags, e.g. `.venv/bin/python tests/fuzz/fuzz_broker.py -runs=20000`
or `-max_total_time=600`. A crash (an invariant broken, or an exception the
code under test lets out) stops the run, prints the traceback and writes the
input to crash-<sha1>; replay it with `fuzz_broker.py crash-<sha1>`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

TESTS = Path(__file__).resolve().parents[1]
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

U32_MAX = (1 << 32) - 1
# The code under test, instrumented for coverage when imported under atheris.
PACKAGES = ["agent", "broker", "vmtide"]


def u32(fdp: Any) -> int:
    """Mostly small (ids and counts a peer would send), sometimes anything."""
    return int(fdp.ConsumeIntInRange(0, 6) if fdp.ConsumeBool() else fdp.ConsumeUInt(4))


def u64(fdp: Any, unit: int = 1) -> int:
    """A multiple of `unit` (a memory block) in a plausible range, or anything."""
    if fdp.ConsumeBool():
        return int(fdp.ConsumeIntInRange(0, 20)) * unit
    return int(fdp.ConsumeUInt(8))


def text(fdp: Any, limit: int = 40) -> str:
    return str(fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, limit)))
