"""File locks and leases: the kernel's lines about them, and the structs that set them.

The kernel prints each lock the same way in /proc/locks (every lock of the
system) and in the "lock:" lines of /proc/PID/fdinfo/N (the locks taken through
that open file: flock, OFD locks and leases owned by it, and the POSIX locks
the process took through it), fs/locks.c lock_get_status():

    1: POSIX  ADVISORY  WRITE 11386 fe:00:2158042 10 19
    1: FLOCK  ADVISORY  WRITE 11386 fe:00:2158029 0 EOF
    1: OFDLCK ADVISORY  WRITE -1 fe:00:2158043 5 11
    1: LEASE  ACTIVE    READ 11386 fe:00:2158044 0 EOF

i.e. id, class, state (ADVISORY for locks; ACTIVE, BREAKING or BREAKER for
leases), type (a lease shows the type it is being broken to), pid (-1 for an
OFD lock), the inode's device and number, the first byte and the last one
(EOF: to the end of the file, whatever it grows to). A request blocked on a
lock is printed under it, "1: -> POSIX ...", in /proc/locks only.
"""

from __future__ import annotations

import enum
import fcntl
import re
import struct
from dataclasses import dataclass

from hijack.errors import HijackError
from hijack.sys.errors import kernel_call

# fcntl commands and flock operations (<fcntl.h>, <sys/file.h>)
F_SETLK = 6
F_GETLK = 5
F_OFD_GETLK, F_OFD_SETLK = 36, 37
F_SETLEASE, F_GETLEASE = 1024, 1025
F_SETSIG, F_GETSIG = 10, 11
F_RDLCK, F_WRLCK, F_UNLCK = 0, 1, 2
LOCK_SH, LOCK_EX, LOCK_NB = 1, 2, 4
SEEK_SET = 0
# struct flock on x86_64: l_type, l_whence (short), 4 bytes of padding, l_start, l_len
# (off_t), l_pid (pid_t), padding to 32 bytes
FLOCK = struct.Struct("<hh4xqqi4x")
OFFSET_MAX = 2**63 - 1  # the last byte of a lock "to EOF"


class LockClass(enum.Enum):
    """Who owns a lock, as the second column names it."""

    FLOCK = "FLOCK"  # flock(2): the open file description
    POSIX = "POSIX"  # fcntl F_SETLK: the process (its files table)
    OFD = "OFDLCK"  # fcntl F_OFD_SETLK: the open file description
    LEASE = "LEASE"  # fcntl F_SETLEASE: the open file description
    DELEG = "DELEG"  # an NFS server's delegation, never a process's own
    ACCESS = "ACCESS"  # a transient check by the kernel itself


@dataclass(frozen=True, slots=True)
class HeldLock:
    """One line of /proc/locks or of an fdinfo's "lock:" lines."""

    lock_class: LockClass
    state: str  # "ADVISORY"; a lease's "ACTIVE", "BREAKING" or "BREAKER"
    write: bool  # WRITE, else READ (UNLCK: a lease being broken to nothing, see `unlocking`)
    unlocking: bool
    pid: int  # -1 for OFD locks
    dev_major: int
    dev_minor: int
    ino: int
    start: int
    end: int  # the last byte locked, OFFSET_MAX for "EOF"
    blocked: bool  # a request waiting for this line's lock ("->"), /proc/locks only

    @property
    def length(self) -> int:
        """struct flock's l_len: 0 for "to the end of the file"."""
        return 0 if self.end == OFFSET_MAX else self.end - self.start + 1

    @property
    def type_number(self) -> int:
        """F_RDLCK, F_WRLCK or F_UNLCK."""
        return F_UNLCK if self.unlocking else F_WRLCK if self.write else F_RDLCK


_LOCK_LINE = re.compile(
    r"\d+: (-> )?(\S+) +(\S+) +(READ|WRITE|UNLCK) (-?\d+) "
    r"([0-9a-f]+):([0-9a-f]+):(\d+) (-?\d+) (\d+|EOF)"
)


def parse_lock_line(line: str) -> HeldLock:
    """One line as the kernel prints it (without fdinfo's "lock:\\t" prefix)."""
    parsed = _LOCK_LINE.fullmatch(line.strip())
    if parsed is None:
        raise HijackError(f"cannot parse a file lock line: {line!r}")
    arrow, kind, state, lock_type, pid, major, minor, ino, start, end = parsed.groups()
    try:
        lock_class = LockClass(kind)
    except ValueError:
        raise HijackError(f"unknown file lock class {kind!r} in {line!r}") from None
    return HeldLock(
        lock_class=lock_class,
        state=state,
        write=lock_type == "WRITE",
        unlocking=lock_type == "UNLCK",
        pid=int(pid),
        dev_major=int(major, 16),
        dev_minor=int(minor, 16),
        ino=int(ino),
        start=int(start),
        end=OFFSET_MAX if end == "EOF" else int(end),
        blocked=arrow is not None,
    )


def parse_fdinfo_locks(lines: tuple[str, ...]) -> list[HeldLock]:
    """The locks of an fdinfo's "lock:" lines (procfs.FdInfo.extra["lock"])."""
    return [parse_lock_line(line) for line in lines]


def read_proc_locks() -> list[HeldLock]:
    """Every lock and lease of the system, and the requests blocked on them (/proc/locks)."""
    with open("/proc/locks", encoding="ascii") as table:
        return [parse_lock_line(line) for line in table if line.strip()]


def owner_signal(fd: int) -> int:
    """F_GETSIG of an open file: the signal its lease break (or O_ASYNC) sends; 0 for SIGIO."""
    with kernel_call("F_GETSIG"):
        return fcntl.fcntl(fd, F_GETSIG)


def pack_flock(lock_type: int, start: int, length: int) -> bytes:
    """struct flock for F_SETLK / F_OFD_SETLK / F_GETLK (l_whence SEEK_SET, l_pid 0)."""
    return FLOCK.pack(lock_type, SEEK_SET, start, length, 0)


def unpack_flock(data: bytes) -> tuple[int, int, int, int]:
    """(l_type, l_start, l_len, l_pid) of a struct flock F_GETLK filled in."""
    lock_type, _whence, start, length, pid = FLOCK.unpack(data)
    return lock_type, start, length, pid
