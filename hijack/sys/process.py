"""Process-wide kernel calls: prctl, signals by pid, waiting, the standard descriptors."""

from __future__ import annotations

import ctypes
import errno
import os

from hijack.sys.errors import kernel_call, raise_for_errno
from hijack.sys.libc import libc, raw_syscall
from hijack.sys.syscall_numbers import SYSCALL_NUMBERS

STANDARD_DESCRIPTORS = (0, 1, 2)
PR_SET_NAME = 15
PR_SET_CHILD_SUBREAPER = 36
TASK_COMM_LEN = 16  # a name's bytes, its NUL included

_prctl = libc.prctl
_prctl.restype = ctypes.c_int
_prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]


def set_child_subreaper() -> None:
    """Make orphaned descendants of this process its children, so it can reap them.

    PID 1 on these machines does not reap orphans promptly; whoever starts
    processes that may be orphaned (a shadow whose intermediate parent exited)
    takes them in instead.
    """
    if _prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise_for_errno(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def fill_standard_descriptors() -> None:
    """Open /dev/null at each of descriptors 0, 1 and 2 that is free.

    A process that keeps other programs' descriptors (a shadow) lets its own
    output go elsewhere, but what writes to descriptor 2 below Python (the
    interpreter's fatal errors, faulthandler) still does: were 2 free, the next
    pipe or socket made would take it and those bytes would go into a stream.
    """
    for number in STANDARD_DESCRIPTORS:
        try:
            os.fstat(number)
        except OSError as exc:
            if exc.errno != errno.EBADF:
                raise
            _blank(number)


def close_keeping_standard(fd: int) -> None:
    """Close `fd`, but for 0, 1 or 2: /dev/null takes its place (fill_standard_descriptors
    says why); dup2 closes what it held, as close would (a pipe's reader sees its end)."""
    if fd in STANDARD_DESCRIPTORS:
        _blank(fd)
    else:
        os.close(fd)


def _blank(number: int) -> None:
    """/dev/null at `number`, inherited across execve as a standard descriptor is."""
    null = os.open(os.devnull, os.O_RDWR)
    if null == number:
        os.set_inheritable(null, True)
        return
    try:
        os.dup2(null, number)
    finally:
        os.close(null)


def set_name(name: str) -> None:
    """Name the calling thread (what /proc/PID/comm, ps and a refusal that names a tracer
    show): at most 15 bytes, the rest cut."""
    raw = ctypes.create_string_buffer(name.encode()[: TASK_COMM_LEN - 1])
    if _prctl(PR_SET_NAME, ctypes.addressof(raw), 0, 0, 0) != 0:
        raise_for_errno(ctypes.get_errno(), "prctl(PR_SET_NAME)")


def get_robust_list(tid: int) -> tuple[int, int]:
    """get_robust_list(2) of another thread: (list head address, head size)."""
    head = ctypes.c_uint64()
    length = ctypes.c_size_t()
    raw_syscall(
        "get_robust_list",
        tid,
        ctypes.addressof(head),
        ctypes.addressof(length),
        pid=tid,
        what=f"thread {tid}",
    )
    return head.value, length.value


KCMP_EPOLL_TFD = 7


class KcmpEpollSlot(ctypes.Structure):
    """struct kcmp_epoll_slot: the `toff`-th entry for number `tfd` in epoll `efd`."""

    _fields_ = [("efd", ctypes.c_uint32), ("tfd", ctypes.c_uint32), ("toff", ctypes.c_uint32)]


def epoll_entry_is_open_at(pid: int, epoll_fd: int, tfd: int, toff: int) -> bool:
    """Whether `pid`'s descriptor `tfd` is the very file its epoll `epoll_fd` watches under
    that number (the `toff`-th of its entries for `tfd`; kcmp KCMP_EPOLL_TFD).

    Not so when the process closed `tfd` (or reused the number for another
    file) while someone else kept the watched file open: the entry lives on.
    """
    slot = KcmpEpollSlot(epoll_fd, tfd, toff)
    number = SYSCALL_NUMBERS["kcmp"]
    args = (pid, pid, KCMP_EPOLL_TFD, tfd, ctypes.addressof(slot))
    result = int(libc.syscall(ctypes.c_long(number), *(ctypes.c_long(a) for a in args)))
    if result == 0:
        return True
    err = ctypes.get_errno() if result < 0 else 0
    if err not in (0, errno.EBADF, errno.ENOENT):  # EBADF: tfd closed; ENOENT: no such entry
        raise_for_errno(err, "kcmp(KCMP_EPOLL_TFD)", pid, f"epoll fd {epoll_fd}")
    return False


def mount_namespace_of(pid: int) -> str:
    """ "mnt:[INODE]": the mount namespace process `pid` lives in."""
    with kernel_call("readlink", pid, f"the mount namespace of process {pid}"):
        return os.readlink(f"/proc/{pid}/ns/mnt")


def open_mount_namespace(pid: int, expected: str) -> int | None:
    """A descriptor of the mount namespace of `pid` if it is `expected` ("mnt:[INODE]"),
    else None (no such process, or another namespace: a pid reused meanwhile)."""
    try:
        fd = os.open(f"/proc/{pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    if f"mnt:[{os.fstat(fd).st_ino}]" == expected:
        return fd
    os.close(fd)
    return None


def send_signal(pid: int, signal_number: int) -> None:
    with kernel_call("kill", pid):
        os.kill(pid, signal_number)


WALL = 0x40000000  # __WALL: wait for threads and non-SIGCHLD children too
