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
is locked as it runs; the rest stays the kernel's to reclaim.

Start-up itself touches more than the agent's steady work: the first gRPC
session (channel, resolver, HTTP/2 and transport set-up), the first rescan,
the first metrics scrape. All of that is locked as it runs, and grpc's code
alone came back to 10 MiB. So once the agent has warmed up, and while the
guest is calm, it sheds those pages once: each clean file mapping is
unlocked, unmapped and locked again as touched (munlock, madvise, mlock2 with
MLOCK_ONFAULT), and the heap's free pages go back (malloc_trim) the same way.
What the agent runs from then on faults back in from the page cache and is
locked again; the rest goes back to the guest. Its anonymous memory (Python's
objects, and the bytecode of every decision path) stays locked throughout.
With the lock taken after the agent's imports as well, the footprint bench's
agent went from 44 to 33 MiB (docs/bench/footprint.md). It is done once, not
periodically: under pressure a shed page might come back only from disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import gc
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil

log = logging.getLogger("vmtide.agent")

# mlockall(2) flags; MCL_ONFAULT (Linux 4.4) locks pages as they are touched,
# so the agent's resident set stays small but is never paged out.
MCL_CURRENT, MCL_FUTURE, MCL_ONFAULT = 1, 2, 4
MLOCK_ONFAULT = 1
MADV_DONTNEED = 4
# Long enough for the first session and the first rescan (every 30 s by default).
WARM_UP_SECONDS = 60.0


@functools.cache
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    # size_t and a pointer: the default int would truncate addresses.
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.munlock.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mlock2.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint]
    libc.malloc_trim.argtypes = [ctypes.c_size_t]
    libc.sbrk.argtypes = [ctypes.c_ssize_t]
    libc.sbrk.restype = ctypes.c_void_p
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


def _unmap(m: Mapping) -> int:
    """Unmap a droppable mapping's pages (the page cache keeps them); KiB dropped."""
    if _libc().madvise(m.start, m.end - m.start, MADV_DONTNEED) == 0:
        return m.rss_kib
    log.debug("madvise %s: %s", m.path, os.strerror(ctypes.get_errno()))
    return 0


def drop_clean_file_pages(smaps: Path = Path("/proc/self/smaps")) -> int:
    """Unmap the pages of this process's clean read-only file mappings; KiB dropped."""
    with smaps.open() as f:
        mappings = [m for m in parse_smaps(f) if m.droppable]
    return sum(_unmap(m) for m in mappings)


def lock_memory() -> bool:
    """Lock the agent's memory as it is touched, after dropping what imports
    mapped around; False if it cannot be locked."""
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
        return False
    return True


def _rss_kib() -> int:
    return int(psutil.Process().memory_info().rss) // 1024


def _unlocked(start: int, end: int, work: Callable[[], int]) -> None:
    """Unlock [start, end), run `work`, and lock the range again, as touched, up
    to the end `work` returns (a trimmed heap ends lower)."""
    libc = _libc()
    if libc.munlock(start, end - start) != 0:
        log.debug("munlock %#x-%#x: %s", start, end, os.strerror(ctypes.get_errno()))
        return
    try:
        end = work()
    finally:
        if end > start and libc.mlock2(start, end - start, MLOCK_ONFAULT) != 0:
            log.warning(
                "cannot lock %#x-%#x again (%s); it may be paged out under pressure",
                start,
                end,
                os.strerror(ctypes.get_errno()),
            )


def shed_start_up_pages(smaps: Path = Path("/proc/self/smaps")) -> int:
    """In a process locked by `lock_memory`: give back the clean file pages and
    the free heap pages it holds, the ranges locked again as they are touched.
    KiB of resident memory shed."""
    gc.collect()  # start-up's garbage: its heap pages become free to trim
    # The ranges read here still hold the same files when they are unmapped:
    # nothing in the agent unmaps a library at run time (Python never
    # dlcloses an extension module).
    with smaps.open() as f:
        mappings = list(parse_smaps(f))
    before = _rss_kib()
    libc = _libc()
    page = os.sysconf("SC_PAGE_SIZE")
    for m in mappings:
        if m.droppable:

            def unmap(m: Mapping = m) -> int:
                _unmap(m)
                return m.end

            _unlocked(m.start, m.end, unmap)
        elif m.path == "[heap]":

            def trim(m: Mapping = m) -> int:
                libc.malloc_trim(0)
                brk = libc.sbrk(0) or m.end  # the trim may have moved the break down
                return min(m.end, -(-brk // page) * page)

            _unlocked(m.start, m.end, trim)
    return before - _rss_kib()


async def shed_when_warm(
    stop: asyncio.Event,
    calm: Callable[[], bool],
    warm_up: float = WARM_UP_SECONDS,
    retry: float = 5.0,
) -> None:
    """Once the agent has warmed up, and at the first moment the guest is calm,
    `shed_start_up_pages`: under pressure a shed page could come back only from
    disk, and the agent is needed most then."""
    delay = warm_up
    while True:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), delay)
        if stop.is_set():
            return
        if calm():
            break
        delay = retry
    try:
        shed = shed_start_up_pages()
        resident = _rss_kib()
    except OSError as err:
        log.warning("cannot shed the agent's start-up pages (%s); they stay locked", err)
        return
    except Exception:
        # Only memory is at stake here: a bug must not stop the agent.
        log.exception("shedding the agent's start-up pages failed")
        return
    log.info(
        "gave back %.1f MiB that only start-up used; %.1f MiB resident, locked",
        shed / 1024,
        resident / 1024,
    )
