"""Named crash points, a test hook: `VMTIDE_CRASH_AT=<point>[@<n>]`.

With the variable set, the agent SIGKILLs itself the n-th time (default: the
first) it reaches the named point, so a fault-injection test can stop it
between any two steps of an online or offline sequence and check what a
restart rebuilds from sysfs and the broker (tests/test_faults.py, tests/soak.py).
Unset, a point costs one comparison. Never set it on a real guest.

Points, in the order a grant or a reclaim passes them:

- `grant.received`: the entitlement is raised, nothing written yet;
- `online.before-write`, `online.after-write`: around each CPU or block onlined;
- `grant.before-ack`: everything onlined, the Ack not sent;
- `reclaim.received`: the reclaim is read, nothing written yet;
- `offline.before-write`, `offline.after-write`: around each CPU or block offlined;
- `reclaim.before-ack`: everything offlined, the Ack not sent (so nothing unplugged).
"""

from __future__ import annotations

import itertools
import logging
import os
import signal

ENV = "VMTIDE_CRASH_AT"
POINTS = (
    "grant.received",
    "online.before-write",
    "online.after-write",
    "grant.before-ack",
    "reclaim.received",
    "offline.before-write",
    "offline.after-write",
    "reclaim.before-ack",
)

log = logging.getLogger("vmtide.agent.crashpoint")


def parse(spec: str) -> tuple[str, int] | None:
    """`point` or `point@n` as (point, n); None for an empty spec."""
    if not spec:
        return None
    name, sep, count = spec.partition("@")
    if name not in POINTS:
        raise ValueError(
            f"{ENV}={spec!r}: unknown crash point {name!r} (known: {', '.join(POINTS)})"
        )
    if sep and (not count.isdigit() or int(count) < 1):
        raise ValueError(f"{ENV}={spec!r}: the count after '@' must be a positive integer")
    return name, int(count) if sep else 1


_armed = parse(os.environ.get(ENV, ""))
# next() on a count is atomic: points are reached from the loop and the worker thread.
_hits = itertools.count(1)


def crash_point(name: str) -> None:
    """SIGKILL this process if `name` is the armed point and its count is reached."""
    if _armed is None or _armed[0] != name or next(_hits) < _armed[1]:
        return
    log.warning("crash point %s reached (%s): killing the agent", name, os.environ.get(ENV))
    os.kill(os.getpid(), signal.SIGKILL)
