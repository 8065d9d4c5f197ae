"""Inside a test guest: hold MiB of anonymous memory that the kernel cannot migrate.

    python pin_pages.py MIB

Each MiB is written, then vmsplice(2)d into a pipe nobody reads: the pipe
holds a reference on every page, so page migration fails on them (their
refcount is not what migration expects) and a memory block that holds one
cannot go offline: the kernel retries the migration until a signal arrives.
That is the block a real guest refuses to give back, made on purpose.

Standard library only (ctypes for vmsplice). Prints "pinned N MiB" once the
pages are held, then sleeps until killed.
"""

from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
import sys
import time

MiB = 1 << 20
F_SETPIPE_SZ = 1031  # fcntl.F_SETPIPE_SZ on Python 3.10+, spelled out for clarity


class IoVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


def pin(mib: int) -> list[tuple[int, int, mmap.mmap]]:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.vmsplice.argtypes = [ctypes.c_int, ctypes.POINTER(IoVec), ctypes.c_ulong, ctypes.c_uint]
    libc.vmsplice.restype = ctypes.c_ssize_t
    held = []
    for _ in range(mib):
        read_end, write_end = os.pipe()
        fcntl.fcntl(write_end, F_SETPIPE_SZ, MiB)
        buffer = mmap.mmap(-1, MiB)
        buffer.write(b"p" * MiB)  # fault every page in before it is spliced
        address = ctypes.addressof(ctypes.c_char.from_buffer(buffer))
        iov = IoVec(address, MiB)
        done = 0
        while done < MiB:
            iov.iov_base, iov.iov_len = address + done, MiB - done
            n = libc.vmsplice(write_end, ctypes.byref(iov), 1, 0)
            if n < 0:
                err = ctypes.get_errno()
                raise OSError(err, f"vmsplice: {os.strerror(err)}")
            done += n
        held.append((read_end, write_end, buffer))
    return held


def main() -> int:
    mib = int(sys.argv[1])
    held = pin(mib)
    print(f"pinned {len(held)} MiB", flush=True)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    sys.exit(main())
