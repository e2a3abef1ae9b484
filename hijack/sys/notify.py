"""timerfd, signalfd and inotify: what their fdinfo says, and making them again in this process.

The restorer makes each of these in its own process and hands it to the stub
(hijack.objects gives it), so every call here is a plain call of ours.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import re
import struct
import termios
from dataclasses import dataclass

from hijack.errors import HijackError
from hijack.sys.libc import raw_syscall
from hijack.sys.procfs import FdInfo

NS = 1_000_000_000
TFD_IOC_SET_TICKS = 0x40085400  # _IOW('T', 0, u64): needs CONFIG_CHECKPOINT_RESTORE
ITIMERSPEC = struct.Struct("<4q")
O_PATH = 0o10000000
MOUNTINFO = "/proc/self/mountinfo"


@dataclass(frozen=True)
class TimerfdState:
    clock_id: int
    settime_flags: int  # TFD_TIMER_ABSTIME, TFD_TIMER_CANCEL_ON_SET
    ticks: int  # expirations not read yet
    value_ns: int  # time left until the next expiry (fdinfo shows it relative)
    interval_ns: int


def _timespec_ns(text: str) -> int:
    seconds, nanoseconds = (int(part) for part in text.strip("()").split(","))
    return seconds * NS + nanoseconds


def timerfd_state(info: FdInfo) -> TimerfdState:
    def field(name: str) -> str:
        return info.extra[name][0]

    return TimerfdState(
        clock_id=int(field("clockid")),
        settime_flags=int(field("settime flags"), 8),
        ticks=int(field("ticks")),
        value_ns=_timespec_ns(field("it_value")),
        interval_ns=_timespec_ns(field("it_interval")),
    )


def make_timerfd(state: TimerfdState, flags: int) -> int:
    """A timerfd of ours like `state`: armed for the time it had left, its unread ticks set."""
    fd = raw_syscall("timerfd_create", state.clock_id, flags | os.O_CLOEXEC)
    try:
        # A periodic timer that expired with its ticks unread shows no time left: the
        # kernel moves it on when they are read. One interval from now stands for that.
        first = state.value_ns or state.interval_ns
        if first:
            spec = ctypes.create_string_buffer(
                ITIMERSPEC.pack(*divmod(state.interval_ns, NS), *divmod(first, NS))
            )
            raw_syscall("timerfd_settime", fd, 0, ctypes.addressof(spec), 0)
        if state.ticks:
            try:
                fcntl.ioctl(fd, TFD_IOC_SET_TICKS, struct.pack("<Q", state.ticks))
            except OSError as exc:
                raise HijackError(
                    f"cannot give a timerfd its {state.ticks} unread ticks: {exc.strerror}"
                ) from None
    except BaseException:
        os.close(fd)
        raise
    return fd


def signalfd_mask(info: FdInfo) -> int:
    return int(info.extra["sigmask"][0], 16)


def make_signalfd(mask: int, flags: int) -> int:
    sigset = ctypes.create_string_buffer(struct.pack("<Q", mask))
    return raw_syscall("signalfd4", -1, ctypes.addressof(sigset), 8, flags | os.O_CLOEXEC)


@dataclass(frozen=True)
class InotifyWatchState:
    wd: int
    mask: int
    sdev: int  # the kernel's dev_t of the watched inode's file system (major << 20 | minor)
    handle_type: int
    handle: bytes  # the file handle that names the watched inode


_INOTIFY_LINE = re.compile(
    r"wd:(?P<wd>\d+) ino:[0-9a-f]+ sdev:(?P<sdev>[0-9a-f]+) mask:(?P<mask>[0-9a-f]+)"
    r" ignored_mask:[0-9a-f]+ fhandle-bytes:[0-9a-f]+ fhandle-type:(?P<type>[0-9a-f]+)"
    r" f_handle:(?P<handle>[0-9a-f]*)"
)


def inotify_watches(info: FdInfo) -> list[InotifyWatchState]:
    watches = []
    for line in info.extra.get("inotify", ()):
        found = _INOTIFY_LINE.fullmatch(line)
        if found is None:
            raise HijackError(f"cannot read inotify watch {line!r}")
        watches.append(
            InotifyWatchState(
                wd=int(found["wd"]),
                mask=int(found["mask"], 16),
                sdev=int(found["sdev"], 16),
                handle_type=int(found["type"], 16),
                handle=bytes.fromhex(found["handle"]),
            )
        )
    return sorted(watches, key=lambda watch: watch.wd)


def _mount_point_of(sdev: int) -> str:
    wanted = f"{sdev >> 20}:{sdev & 0xFFFFF}"
    with open(MOUNTINFO) as mounts:
        for line in mounts:
            fields = line.split()
            if fields[2] == wanted:
                return fields[4]
    raise HijackError(f"no mount of device {wanted} for an inotify watch")


def watched_path(watch: InotifyWatchState) -> str:
    """The path of the inode a watch names (open_by_handle_at: needs CAP_DAC_READ_SEARCH)."""
    mount = os.open(_mount_point_of(watch.sdev), os.O_RDONLY | os.O_CLOEXEC)
    try:
        handle = ctypes.create_string_buffer(
            struct.pack("<Ii", len(watch.handle), watch.handle_type) + watch.handle
        )
        opened = raw_syscall(
            "open_by_handle_at", mount, ctypes.addressof(handle), O_PATH | os.O_CLOEXEC
        )
    finally:
        os.close(mount)
    try:
        return os.readlink(f"/proc/self/fd/{opened}")
    finally:
        os.close(opened)


def make_inotify(flags: int) -> int:
    return raw_syscall("inotify_init1", flags | os.O_CLOEXEC)


def add_watch(fd: int, path: str, mask: int) -> int:
    name = ctypes.create_string_buffer(os.fsencode(path))
    return raw_syscall("inotify_add_watch", fd, ctypes.addressof(name), mask, what=path)


def remove_watch(fd: int, wd: int) -> None:
    raw_syscall("inotify_rm_watch", fd, wd)


def discard_events(fd: int) -> None:
    """Read and drop the events queued on inotify instance `fd` (without blocking)."""
    queued = struct.unpack("<i", fcntl.ioctl(fd, termios.FIONREAD, b"\0" * 4))[0]
    if queued:
        os.read(fd, queued)
