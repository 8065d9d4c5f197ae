"""Fuzz the broker's handling of guest messages (LoadReport, ResourceRequest, Ack,
a second Hello, no body) and of Hellos at session start.

Each input is decoded into a script of guest messages, arbitrations and clock
ticks for two simulated guests; tests/test_bad_input.py's checks run after
every step (nothing negative, nothing granted above a guest's burst or beyond
the pool, nobody counted above what is plugged, the books equal to what the
hypervisor has plugged, no error logged). See fuzzing.py for how to run it.
"""

from __future__ import annotations

import sys
from typing import Any

import atheris  # type: ignore[import-untyped,import-not-found,unused-ignore]
import fuzzing
from fuzzing import text, u32, u64
from google.protobuf.message import DecodeError

with atheris.instrument_imports(include=fuzzing.PACKAGES):
    import test_bad_input as checks

from vmtide.v1 import broker_pb2 as pb

BLOCK = checks.BLOCK


def item(fdp: Any) -> pb.ItemResult:
    return pb.ItemResult(
        kind=pb.ResourceKind.ValueType(fdp.ConsumeIntInRange(-1, 3)),
        index=fdp.ConsumeIntInRange(0, 16) if fdp.ConsumeBool() else u32(fdp),
        action=pb.Action.ValueType(fdp.ConsumeIntInRange(-1, 3)),
        outcome=pb.Outcome.ValueType(fdp.ConsumeIntInRange(-1, 6)),
        errno=fdp.ConsumeIntInRange(-(1 << 31), (1 << 31) - 1),
        detail=text(fdp, 10),
    )


def guest_message(fdp: Any) -> pb.GuestMessage | None:
    kind = fdp.ConsumeIntInRange(0, 4)
    if kind == 0:
        try:
            return pb.GuestMessage.FromString(fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 64)))
        except DecodeError:
            return None
    if kind == 1:
        return pb.GuestMessage(
            request=pb.ResourceRequest(
                request_id=u32(fdp),
                cpus=u32(fdp),
                memory_bytes=u64(fdp, BLOCK),
                reason=text(fdp),
                urgency=pb.Urgency.ValueType(fdp.ConsumeIntInRange(-2, 6)),
                seen_grant_id=u32(fdp),
            )
        )
    if kind == 2:
        ack = pb.Ack(
            items=[item(fdp) for _ in range(fdp.ConsumeIntInRange(0, 5))],
            online_cpus=u32(fdp),
            online_memory_bytes=u64(fdp, BLOCK),
            note=text(fdp, 10),
        )
        if fdp.ConsumeBool():
            ack.reclaim_id = u32(fdp)
        else:
            ack.grant_id = u32(fdp)
        return pb.GuestMessage(ack=ack)
    if kind == 3:
        return pb.GuestMessage(
            report=pb.LoadReport(
                cpu_busy=fdp.ConsumeRegularFloat() if fdp.ConsumeBool() else fdp.ConsumeFloat(),
                memory_some_avg10=fdp.ConsumeFloat(),
                online_cpus=u32(fdp),
                online_memory_bytes=u64(fdp, BLOCK),
                memory_total_bytes=u64(fdp, BLOCK),
            )
        )
    return pb.GuestMessage(hello=pb.Hello(protocol_version=u32(fdp), guest_id=text(fdp, 5)))


def step(fdp: Any) -> checks.Step | None:
    kind = fdp.ConsumeIntInRange(0, 5)
    if kind == 0:
        return checks.Step("rebalance")
    if kind == 1:
        return checks.Step("tick", seconds=[0.01, 0.5, 2.0, 40.0][fdp.ConsumeIntInRange(0, 3)])
    message = guest_message(fdp)
    if message is None:
        return None
    guest = checks.GUEST_IDS[fdp.ConsumeIntInRange(0, len(checks.GUEST_IDS) - 1)]
    return checks.Step("message", guest, message, use_latest=fdp.ConsumeBool())


def target(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    script: list[checks.Step] = []
    while fdp.remaining_bytes() and len(script) < 25:
        if (s := step(fdp)) is not None:
            script.append(s)
    checks.check_broker_script(script)


def main() -> None:
    atheris.Setup(sys.argv, target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
