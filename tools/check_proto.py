"""Fail when the committed stubs in vmtide/v1 differ from what proto/ generates.

Run by `make check-proto` (and so by `make test` and CI). Regenerates into a
temporary directory with the pinned grpcio-tools and compares file by file.
"""

from __future__ import annotations

import filecmp
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTOS = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "proto").rglob("*.proto"))
GENERATED = "vmtide/v1"


def main() -> int:
    # protoc finds the mypy plugins (protoc-gen-mypy*) on PATH: the venv's bin,
    # which is not on PATH when make runs .venv/bin/python directly.
    bindir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": os.pathsep.join([bindir, os.environ.get("PATH", "")])}
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "grpc_tools.protoc",
                "-Iproto",
                f"--python_out={tmp}",
                f"--grpc_python_out={tmp}",
                f"--mypy_out={tmp}",
                f"--mypy_grpc_out={tmp}",
                *PROTOS,
            ],
            cwd=ROOT,
            env=env,
            check=True,
        )
        fresh = Path(tmp) / GENERATED
        committed = ROOT / GENERATED
        names = sorted(p.name for p in fresh.iterdir())
        stale = [
            n
            for n in names
            if not (committed / n).exists()
            or not filecmp.cmp(fresh / n, committed / n, shallow=False)
        ]
        if stale:
            print(f"stale generated stubs in {GENERATED}: {', '.join(stale)}", file=sys.stderr)
            print("run `make proto` and commit the result", file=sys.stderr)
            return 1
    print(f"generated stubs in {GENERATED} match {', '.join(PROTOS)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
