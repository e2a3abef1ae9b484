"""hijack.sys.userfault against the real kernel: a post-copy fill of a range the process
split since it was registered.

A moved process may mprotect part of a range whose pages are still missing: the one
mapping becomes two, and a single UFFDIO_COPY across them fails whole (ENOENT, nothing
copied). fill must still fill every page of both (post-copy marks them filled: a page
left missing would later read as zeros).
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager

from hijack.sys import procfs, userfault

PAGE = 4096
PAGES = 8
PROT_READ, PROT_READ_WRITE = 1, 3
MAP_PRIVATE_ANONYMOUS = 0x22
SYS_USERFAULTFD = 323

libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int]
libc.mmap.argtypes += [ctypes.c_int, ctypes.c_long]
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


@contextmanager
def registered_missing() -> Iterator[tuple[int, int]]:
    """(uffd, address): PAGES pages of our own anonymous memory, all missing, registered."""
    address = libc.mmap(None, PAGES * PAGE, PROT_READ_WRITE, MAP_PRIVATE_ANONYMOUS, -1, 0)
    assert address not in (None, ctypes.c_void_p(-1).value), os.strerror(ctypes.get_errno())
    uffd = libc.syscall(SYS_USERFAULTFD, os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        assert uffd >= 0, os.strerror(ctypes.get_errno())
        userfault.handshake(uffd)
        userfault.register_missing(uffd, address, address + PAGES * PAGE)
        yield uffd, address
    finally:
        if uffd >= 0:
            os.close(uffd)
        libc.munmap(address, PAGES * PAGE)


def test_a_fill_across_a_range_split_since_it_was_registered_fills_every_page() -> None:
    data = b"".join(bytes([page + 1]) * PAGE for page in range(PAGES))
    with registered_missing() as (uffd, address):
        # Its upper half read-only now: two mappings, both still registered.
        assert libc.mprotect(address + PAGES // 2 * PAGE, PAGES // 2 * PAGE, PROT_READ) == 0
        # (What a single copy across the two gets: ENOENT, nothing copied.)
        source = ctypes.create_string_buffer(data, len(data))
        copy = bytearray(
            userfault.COPY_STRUCT.pack(address, ctypes.addressof(source), len(data), 0, 0)
        )
        assert userfault._call(uffd, userfault.UFFDIO_COPY, copy, "UFFDIO_COPY") == errno.ENOENT
        userfault.fill(uffd, address, data)
        # Every page there now (asked of the page table first: touching a missing one
        # would block this thread for good, nobody serves it).
        assert procfs.present_runs(os.getpid(), address, address + len(data)) == [
            (address, address + len(data))
        ]
        assert ctypes.string_at(address, len(data)) == data


def test_a_fill_skips_the_pages_no_longer_registered_and_fills_the_rest() -> None:
    data = b"".join(bytes([page + 1]) * PAGE for page in range(PAGES))
    with registered_missing() as (uffd, address):
        # Its first two pages replaced by a mapping of the process's own (unregistered),
        # written since: a fill must leave them as they are.
        mine = libc.mmap(address, 2 * PAGE, PROT_READ_WRITE, MAP_PRIVATE_ANONYMOUS | 0x10, -1, 0)
        assert mine == address
        ctypes.memset(address, 0x55, 2 * PAGE)
        userfault.fill(uffd, address, data)
        assert procfs.present_runs(os.getpid(), address, address + len(data)) == [
            (address, address + len(data))
        ]
        assert ctypes.string_at(address, 2 * PAGE) == b"\x55" * 2 * PAGE
        assert ctypes.string_at(address + 2 * PAGE, len(data) - 2 * PAGE) == data[2 * PAGE :]
