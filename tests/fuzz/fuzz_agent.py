"""Fuzz the agent's handling of broker messages (Welcome, Grant, Reclaim, LimitsUpdate).

Each input is decoded into a few messages, built field by field or parsed from
raw bytes, and a fresh agent on a simulated guest takes them; the checks are
tests/test_bad_input.py's (no write below the minimum, cpu0 and boot memory
never offlined, nothing written that does not exist, every refusal named in
the Ack, no error logged). See fuzzing.py for how to run it.
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


def limits(fdp: Any) -> pb.Limits:
    message = pb.Limits()
    if fdp.ConsumeBool():
        message.cpus.CopyFrom(pb.ResourceLimits(minimum=u32(fdp), maximum=u32(fdp), burst=u32(fdp)))
    if fdp.ConsumeBool():
        message.memory_bytes.CopyFrom(
            pb.ResourceLimits(
                minimum=u64(fdp, BLOCK), maximum=u64(fdp, BLOCK), burst=u64(fdp, BLOCK)
            )
        )
    return message


def message(fdp: Any) -> pb.BrokerMessage | None:
    kind = fdp.ConsumeIntInRange(0, 5)
    if kind == 0:
        try:
            return pb.BrokerMessage.FromString(fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 64)))
        except DecodeError:
            return None
    if kind == 1:
        return pb.BrokerMessage(
            grant=pb.Grant(
                grant_id=u32(fdp),
                request_id=u32(fdp),
                cpus=u32(fdp),
                memory_bytes=u64(fdp, BLOCK),
                cpu_ids=[u32(fdp) for _ in range(fdp.ConsumeIntInRange(0, 3))],
            )
        )
    if kind == 2:
        return pb.BrokerMessage(
            reclaim=pb.Reclaim(
                reclaim_id=u32(fdp),
                cpus=u32(fdp),
                memory_bytes=u64(fdp, BLOCK),
                deadline_ms=fdp.ConsumeIntInRange(0, 3000),
            )
        )
    if kind == 3:
        return pb.BrokerMessage(limits=pb.LimitsUpdate(limits=limits(fdp)))
    if kind == 4:
        welcome = pb.Welcome(session_id=text(fdp, 10), guest_id=text(fdp, 5))
        if fdp.ConsumeBool():
            welcome.limits.CopyFrom(limits(fdp))
        return pb.BrokerMessage(welcome=welcome)
    return pb.BrokerMessage()


def target(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    cpu_minimum = fdp.ConsumeIntInRange(1, 3)
    memory_minimum = fdp.ConsumeIntInRange(1, 12) * BLOCK
    messages: list[pb.BrokerMessage] = []
    while fdp.remaining_bytes() and len(messages) < 8:
        if (m := message(fdp)) is not None:
            messages.append(m)
    checks.check_agent_messages(messages, cpu_minimum, memory_minimum)


def main() -> None:
    atheris.Setup(sys.argv, target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
