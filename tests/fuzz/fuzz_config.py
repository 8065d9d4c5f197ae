"""Fuzz the agent's and the broker's config loaders (vmtide/config.py underneath).

An input is either raw file bytes or a TOML document built from keys both
configs know, with values of any type; each loader must return a config or
raise ConfigError naming the file, the key and the reason (the check is
tests/test_bad_input.py's). See fuzzing.py for how to run it.
"""

from __future__ import annotations

import sys
from typing import Any

import atheris  # type: ignore[import-untyped,import-not-found,unused-ignore]
import fuzzing
from fuzzing import text

with atheris.instrument_imports(include=fuzzing.PACKAGES):
    import test_bad_input as checks

SIZES = ["512MiB", "4G", "1.5GiB", "0", "-1", "12XB", "9" * 400 + "TiB", "128 MB", ""]
WORDS = ["unix:/run/x.sock", "127.0.0.1:0", "qmp", "simulated", "online_kernel", "vsock:2:7470"]


def value(fdp: Any, depth: int = 0) -> object:
    kind = fdp.ConsumeIntInRange(0, 8 if depth < 2 else 6)
    if kind == 0:
        return fdp.ConsumeBool()
    if kind == 1:
        return fdp.ConsumeIntInRange(-(1 << 63), (1 << 63) - 1)
    if kind == 2:
        return fdp.ConsumeIntInRange(-2, 70_000)
    if kind == 3:
        return fdp.ConsumeFloat()
    if kind == 4:
        return SIZES[fdp.ConsumeIntInRange(0, len(SIZES) - 1)]
    if kind == 5:
        return WORDS[fdp.ConsumeIntInRange(0, len(WORDS) - 1)]
    if kind == 6:
        return text(fdp, 12)
    if kind == 7:
        return [value(fdp, depth + 1) for _ in range(fdp.ConsumeIntInRange(0, 3))]
    return table(fdp, depth + 1)


def table(fdp: Any, depth: int = 0) -> dict[str, object]:
    return {
        checks.KEYS[fdp.ConsumeIntInRange(0, len(checks.KEYS) - 1)]: value(fdp, depth)
        for _ in range(fdp.ConsumeIntInRange(0, 5))
    }


def target(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    if fdp.ConsumeBool():
        checks.check_config_bytes(fdp.ConsumeBytes(fdp.remaining_bytes()))
    else:
        checks.check_config_bytes(checks.toml_document(table(fdp)).encode())


def main() -> None:
    atheris.Setup(sys.argv, target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
