"""Locking the agent's memory: the pages it uses, not every page its imports touched.

The agent must keep deciding while the guest thrashes, so it locks its memory
(mlockall): none of it is paged out, and none of it is reclaimable either.
MCL_ONFAULT locks pages as they are touched, not whole mappings, but by then
the imports have touched many, and on each page fault the kernel also maps
the neighbouring pages of the file that are in the page cache ("fault-around",
64 KiB). Some of that code never runs again: Python's OpenSSL (asyncio imports
ssl; the agent's gRPC carries its own TLS) was 3 MiB of it, startup and import
code more. Locked, those pages could not go back to the guest under pressure.

So, just before locking, the agent unmaps the pages of its clean, read-only,
file-backed mappings (madvise MADV_DONTNEED). For such a mapping that loses
nothing: the page cache keeps the file's pages, and the next touch maps the
page again, from the same file. A mapping with any anonymous page (a
relocated RELRO segment, a copied-on-write page) or any dirty page is left
alone: there the pages hold what the file does not. What the agent then runs
is locked as it runs; the rest stays the kernel's to reclaim. The footprint
bench's agent holds about 5 MiB less (docs/bench/footprint.md). grpc's code
(13 MiB resident) all comes back: the agent's calls touch most of its 64 KiB
windows.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("vmtide.agent")

# mlockall(2) flags; MCL_ONFAULT (Linux 4.4) locks pages as they are touched,
# so the agent's resident set stays small but is never paged out.
MCL_CURRENT, MCL_FUTURE, MCL_ONFAULT = 1, 2, 4
MADV_DONTNEED = 4


@functools.cache
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    # size_t and a pointer: the default int would truncate addresses.
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc


@dataclass(frozen=True)
class Mapping:
    start: int
    end: int
    perms: str  # "r-xp"
    path: str  # "" for anonymous memory, "[heap]" and the like for the kernel's
    anonymous_kib: int
    dirty_kib: int  # Private_Dirty + Shared_Dirty
    rss_kib: int

    @property
    def droppable(self) -> bool:
        """Clean, read-only pages of a file: the page cache holds every one of them."""
        return (
            self.path.startswith("/")
            and not self.path.startswith("/dev/")
            and self.perms.startswith("r")
            and "w" not in self.perms
            and self.anonymous_kib == 0
            and self.dirty_kib == 0
            and self.rss_kib > 0
        )


def parse_smaps(lines: Iterable[str]) -> Iterator[Mapping]:
    """The mappings of /proc/<pid>/smaps (proc(5)). A mapping without its
    Anonymous or dirty counts is taken as dirty: it is never dropped."""
    header: list[str] | None = None
    fields: dict[str, int] = {}

    def mapping() -> Mapping:
        assert header is not None
        start, end = (int(part, 16) for part in header[0].split("-"))
        missing = 1 << 30
        return Mapping(
            start=start,
            end=end,
            perms=header[1],
            path=" ".join(header[5:]),
            anonymous_kib=fields.get("Anonymous", missing),
            dirty_kib=fields.get("Private_Dirty", missing) + fields.get("Shared_Dirty", missing),
            rss_kib=fields.get("Rss", 0),
        )

    for line in lines:
        key, _, rest = line.partition(" ")
        if key.endswith(":"):
            value = rest.split()
            if value and value[0].isdigit():
                fields[key[:-1]] = int(value[0])
            continue
        if "-" not in key:
            continue
        if header is not None:
            yield mapping()
        header, fields = line.split(), {}
    if header is not None:
        yield mapping()


def drop_clean_file_pages(smaps: Path = Path("/proc/self/smaps")) -> int:
    """Unmap the pages of this process's clean read-only file mappings; KiB dropped."""
    with smaps.open() as f:
        mappings = [m for m in parse_smaps(f) if m.droppable]
    dropped = 0
    for m in mappings:
        if _libc().madvise(m.start, m.end - m.start, MADV_DONTNEED) == 0:
            dropped += m.rss_kib
        else:
            log.debug("madvise %s: %s", m.path, os.strerror(ctypes.get_errno()))
    return dropped


def lock_memory() -> None:
    """Lock the agent's memory as it is touched, after dropping what imports mapped around."""
    try:
        dropped = drop_clean_file_pages()
    except OSError as err:
        log.debug("cannot read the agent's mappings (%s); locking them as they are", err)
    else:
        log.debug("unmapped %d KiB of clean file pages before locking", dropped)
    if _libc().mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT) != 0:
        log.warning(
            "cannot lock the agent's memory (%s); it may be paged out under pressure",
            os.strerror(ctypes.get_errno()),
        )
