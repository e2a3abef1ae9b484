"""Pages served on first touch: userfaultfd in missing mode (post-copy's destination side).

A range registered with UFFDIO_REGISTER_MODE_MISSING faults to its
userfaultfd whenever a page of it is touched that has none: the touching
thread sleeps until the holder of the userfaultfd fills the page
(UFFDIO_COPY, UFFDIO_ZEROPAGE) or wakes it. Only anonymous private memory
(and shmem, hugetlbfs) can be registered so.

The userfaultfd must be made in the served process's own memory (an
injected call, hijack.restore.postcopy); everything here works from outside
on our copy of it: the handshake, the registration and the filling all act
on the memory the userfaultfd was made in, not on the caller's.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct

from hijack.sys.dirty import UFFD_API, UFFDIO_API, UFFDIO_API_STRUCT, UFFDIO_REGISTER_STRUCT
from hijack.sys.errors import raise_for_errno
from hijack.sys.libc import libc

PAGE_SIZE = 4096
# Not UFFD_USER_MODE_ONLY: a page the kernel touches for the process (a read()
# into it) must be served too, not refused with EFAULT. Made while the process
# being built still has root's powers (vm.unprivileged_userfaultfd is 0).
USERFAULTFD_FLAGS = os.O_CLOEXEC | os.O_NONBLOCK
UFFDIO_REGISTER_MODE_MISSING = 1
UFFD_EVENT_PAGEFAULT = 0x12
UFFD_EVENT_FORK = 0x13  # {ufd}: the child's userfaultfd, installed in the reader's table
UFFD_EVENT_REMAP = 0x14  # {from, to, len}: an mremap moved registered memory
UFFD_EVENT_REMOVE = 0x15  # {start, end}: MADV_DONTNEED / MADV_REMOVE dropped pages
UFFD_FEATURE_EVENT_FORK = 1 << 1
UFFD_FEATURE_EVENT_REMAP = 1 << 2
UFFD_FEATURE_EVENT_REMOVE = 1 << 3
# Without them a forked child's or a moved range would lose its registration
# (its missing pages then read as zeros), and a page dropped before it arrived
# would come back. (EVENT_FORK wants CAP_SYS_PTRACE: the daemon, root.)
FEATURES = UFFD_FEATURE_EVENT_FORK | UFFD_FEATURE_EVENT_REMAP | UFFD_FEATURE_EVENT_REMOVE
# struct uffd_msg: event u8, 7 reserved bytes, then a union of three u64 at most
# (pagefault {flags, address, ptid}; remap {from, to, len}; remove {start, end})
MESSAGE = struct.Struct("<B7xQQQ")
# struct uffdio_copy {dst, src, len, mode, copy}; struct uffdio_zeropage {start, len, mode,
# zeropage}; struct uffdio_range {start, len}
COPY_STRUCT = struct.Struct("<QQQQq")
ZEROPAGE_STRUCT = struct.Struct("<QQQq")
RANGE_STRUCT = struct.Struct("<QQ")


def _ioc(direction: int, number: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (UFFD_API << 8) | number


UFFDIO_REGISTER = _ioc(3, 0x00, UFFDIO_REGISTER_STRUCT.size)
UFFDIO_WAKE = _ioc(2, 0x02, RANGE_STRUCT.size)
UFFDIO_COPY = _ioc(3, 0x03, COPY_STRUCT.size)
UFFDIO_ZEROPAGE = _ioc(3, 0x04, ZEROPAGE_STRUCT.size)

_ioctl = libc.ioctl
_ioctl.restype = ctypes.c_int


class Busy(Exception):
    """EAGAIN: the process is changing its layout (an mremap, an MADV_DONTNEED) and waits for
    its event to be read; read the events, then try again."""


def _call(uffd: int, request: int, argument: bytearray, name: str) -> int:
    """ioctl with `argument` (updated in place by the kernel): 0, or the errno."""
    buffer = (ctypes.c_char * len(argument)).from_buffer(argument)
    try:
        return 0 if _ioctl(uffd, request, buffer) == 0 else ctypes.get_errno()
    finally:
        del buffer


def handshake(uffd: int) -> None:
    """UFFDIO_API asking for FEATURES: page faults, forks, moved and dropped ranges are
    told."""
    api = bytearray(UFFDIO_API_STRUCT.pack(UFFD_API, FEATURES, 0))
    err = _call(uffd, UFFDIO_API, api, "UFFDIO_API")
    if err:
        raise_for_errno(err, "ioctl(UFFDIO_API)")


def register_missing(uffd: int, start: int, end: int) -> None:
    register = bytearray(
        UFFDIO_REGISTER_STRUCT.pack(start, end - start, UFFDIO_REGISTER_MODE_MISSING, 0)
    )
    err = _call(uffd, UFFDIO_REGISTER, register, "UFFDIO_REGISTER")
    if err:
        raise_for_errno(err, "ioctl(UFFDIO_REGISTER)", what=f"[{start:#x}, {end:#x})")


def events(uffd: int, limit: int = 64) -> list[tuple[int, int, int, int]]:
    """The events waiting on `uffd` as (event, three u64 fields); none: an empty list.

    A page fault's address (its second field) comes rounded down to its page.
    """
    try:
        data = os.read(uffd, MESSAGE.size * limit)
    except BlockingIOError:
        return []
    found = []
    for offset in range(0, len(data) - MESSAGE.size + 1, MESSAGE.size):
        event, first, second, third = MESSAGE.unpack_from(data, offset)
        if event == UFFD_EVENT_PAGEFAULT:
            second &= ~(PAGE_SIZE - 1)
        found.append((event, first, second, third))
    return found


def fill(uffd: int, address: int, data: bytes) -> None:
    """UFFDIO_COPY `data` (whole pages) to `address`, waking whoever waits on them.

    A page filled already (EEXIST) is skipped; a page no longer registered
    (unmapped or replaced by the process since: ENOENT) is dropped; Busy if the
    process is changing its layout (some pages may be filled already).
    """
    keep = ctypes.c_char_p(data)
    source = ctypes.cast(keep, ctypes.c_void_p).value or 0
    done = 0
    whole = True  # one call for all; page by page once a call fails with ENOENT
    while done < len(data):
        length = len(data) - done if whole else PAGE_SIZE
        copy = bytearray(COPY_STRUCT.pack(address + done, source + done, length, 0, 0))
        err = _call(uffd, UFFDIO_COPY, copy, "UFFDIO_COPY")
        copied = max(COPY_STRUCT.unpack(copy)[4], 0)
        if not err:
            done += length
            continue
        done += copied
        if err == errno.EEXIST:
            done += PAGE_SIZE  # this one is there: on with the next
        elif err == errno.EAGAIN:
            raise Busy
        elif err == errno.ENOENT and whole and length > PAGE_SIZE:
            # The range is no longer one registered mapping: the process split it
            # (mprotect) or replaced a part of it since. Its other pages are still
            # missing, and will be read as filled: each is tried on its own.
            whole = False
        elif err == errno.ENOENT:
            done += PAGE_SIZE  # this one is not registered any more: nothing to fill
        elif err in (errno.ESRCH, errno.EINVAL):
            return  # the process is gone
        else:
            raise_for_errno(err, "ioctl(UFFDIO_COPY)", what=f"{address + done:#x}")


def zero(uffd: int, address: int) -> None:
    """A page of zeros at `address` (a page the process never had), or a wake-up if it is
    there already."""
    argument = bytearray(ZEROPAGE_STRUCT.pack(address, PAGE_SIZE, 0, 0))
    err = _call(uffd, UFFDIO_ZEROPAGE, argument, "UFFDIO_ZEROPAGE")
    if err == errno.EAGAIN:
        raise Busy
    if err == errno.EEXIST:
        wake = bytearray(RANGE_STRUCT.pack(address, PAGE_SIZE))
        _call(uffd, UFFDIO_WAKE, wake, "UFFDIO_WAKE")
    elif err not in (0, errno.ENOENT, errno.ESRCH, errno.EINVAL):
        raise_for_errno(err, "ioctl(UFFDIO_ZEROPAGE)", what=f"{address:#x}")
