"""Which descriptors of a process share one open file description: kcmp(KCMP_FILE)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from hijack.sys.libc import raw_syscall

KCMP_FILE = 0
# kcmp's answers: equal, first less, first greater (an order on the kernel's
# objects, consistent within one boot), different without an order.
_EQUAL, _LESS, _GREATER = 0, 1, 2


def _compare(pid: int, fd: int, other_fd: int) -> int:
    return raw_syscall("kcmp", pid, pid, KCMP_FILE, fd, other_fd, pid=pid)


def same_description(pid: int, fd: int, other_fd: int) -> bool:
    """Whether descriptors `fd` and `other_fd` of `pid` are one open file description."""
    return _compare(pid, fd, other_fd) == _EQUAL


def description_ids(pid: int, descriptors: Iterable[tuple[int, int, int]]) -> dict[int, int]:
    """A description id (1, 2, ... in order of first use) for each of `pid`'s descriptors,
    given as (fd, dev, ino) in ascending fd order: equal ids for one open file description.

    Only descriptors of one inode can share a description, so kcmp compares those alone,
    by binary search in kcmp's order (every eventfd or epoll shares one anonymous inode:
    a process may hold thousands).
    """
    ids: dict[int, int] = {}
    descriptions = 0
    firsts: dict[tuple[int, int], list[int]] = {}  # inode -> first fds, in kcmp's order
    for fd, dev, ino in descriptors:
        ordered = firsts.setdefault((dev, ino), [])
        low, high = 0, len(ordered)
        while low < high:
            middle = (low + high) // 2
            answer = _compare(pid, fd, ordered[middle])
            if answer == _EQUAL:
                ids[fd] = ids[ordered[middle]]
                break
            if answer == _LESS:
                high = middle
            elif answer == _GREATER:
                low = middle + 1
            else:  # no order given: compare with each
                found = next((f for f in ordered if same_description(pid, f, fd)), None)
                if found is not None:
                    ids[fd] = ids[found]
                break
        if fd not in ids:
            ordered.insert(low, fd)
            descriptions += 1
            ids[fd] = descriptions
    return ids


def same_description_in(pid: int, fd: int, other_pid: int, other_fd: int) -> bool:
    """Whether descriptor `fd` of `pid` and `other_fd` of `other_pid` are one open file
    description (one inherited across a fork, or passed between them)."""
    answer = raw_syscall("kcmp", pid, other_pid, KCMP_FILE, fd, other_fd, pid=other_pid)
    return answer == _EQUAL


def descriptions_across(
    processes: Sequence[tuple[int, Iterable[tuple[int, int, int]]]],
) -> dict[tuple[int, int], tuple[int, int]]:
    """Descriptors of several processes that are one open file description with a
    descriptor of a process listed before: (pid, fd) -> (first pid, its fd).

    `processes`: each pid with its descriptors as (fd, dev, ino). Only descriptors of one
    inode can share a description: kcmp compares those alone. Within one process, a
    description held twice (dup) is description_ids' business: each process is
    compared with the processes before it, and its own first descriptor of each one.
    """
    firsts: dict[tuple[int, int], list[tuple[int, int]]] = {}  # inode -> (pid, fd) seen
    shared: dict[tuple[int, int], tuple[int, int]] = {}
    for pid, descriptors in processes:
        mine: list[tuple[tuple[int, int], tuple[int, int]]] = []
        for fd, dev, ino in descriptors:
            holder = next(
                (
                    (other, other_fd)
                    for other, other_fd in firsts.get((dev, ino), ())
                    if same_description_in(other, other_fd, pid, fd)
                ),
                None,
            )
            if holder is not None:
                shared[(pid, fd)] = holder
            else:
                mine.append(((dev, ino), (pid, fd)))
        for inode, first in mine:
            firsts.setdefault(inode, []).append(first)
    return shared


KCMP_VM, KCMP_FILES, KCMP_FS, KCMP_SIGHAND = 1, 2, 3, 4
SHARED_CONTEXTS = {
    KCMP_VM: "its memory (CLONE_VM)",
    KCMP_FILES: "its descriptor table (CLONE_FILES)",
    KCMP_FS: "its root, cwd and umask (CLONE_FS)",
    KCMP_SIGHAND: "its signal handlers (CLONE_SIGHAND)",
}


def shares_context(pid: int, other_pid: int, kind: int) -> bool:
    """Whether processes `pid` and `other_pid` share one kernel context of `kind`
    (KCMP_VM, KCMP_FILES, KCMP_FS, KCMP_SIGHAND): made by clone with its CLONE_ flag."""
    return raw_syscall("kcmp", pid, other_pid, kind, 0, 0, pid=other_pid) == _EQUAL
