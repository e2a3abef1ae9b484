"""Which descriptors of a process share one open file description: kcmp(KCMP_FILE)."""

from __future__ import annotations

from collections.abc import Iterable

from hijack.sys.libc import raw_syscall

KCMP_FILE = 0


def same_description(pid: int, fd: int, other_fd: int) -> bool:
    """Whether descriptors `fd` and `other_fd` of `pid` are one open file description."""
    return raw_syscall("kcmp", pid, pid, KCMP_FILE, fd, other_fd, pid=pid) == 0


def description_ids(pid: int, descriptors: Iterable[tuple[int, int, int]]) -> dict[int, int]:
    """A description id (1, 2, ... in order of first use) for each of `pid`'s descriptors,
    given as (fd, dev, ino) in ascending fd order: equal ids for one open file description.

    Only descriptors of one inode can share a description, so kcmp compares those alone.
    """
    ids: dict[int, int] = {}
    firsts: dict[tuple[int, int], list[int]] = {}  # inode -> the first fd of each description
    count = 0
    for fd, dev, ino in descriptors:
        seen = firsts.setdefault((dev, ino), [])
        shared = next((first for first in seen if same_description(pid, first, fd)), None)
        if shared is None:
            seen.append(fd)
            count += 1
            ids[fd] = count
        else:
            ids[fd] = ids[shared]
    return ids
