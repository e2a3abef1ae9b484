"""fanotify groups: what their fdinfo says (init flags, every mark), and making them again.

/proc/PID/fdinfo of a fanotify descriptor shows its fanotify_init flags and
event flags, then one line per mark: an inode mark with the file handle of its
inode, a mount mark with its mount id, a filesystem mark with its device. Each
mark is named by a path here (an inode's found by open_by_handle_at, as inotify
watches are; a mount's by the process's mountinfo; a filesystem's by a mount of
its device), by which fanotify_mark adds it again.
"""

from __future__ import annotations

import ctypes
import os
import re
from dataclasses import dataclass

from hijack.errors import HijackError
from hijack.sys import notify
from hijack.sys.libc import raw_syscall
from hijack.sys.procfs import FdInfo

INODE, MOUNT, FILESYSTEM = 0, 1, 2  # what a mark is on
FAN_MARK_ADD, FAN_MARK_MOUNT, FAN_MARK_FILESYSTEM = 0x1, 0x10, 0x100
FAN_MARK_IGNORED_MASK, FAN_MARK_IGNORED_SURV_MODIFY = 0x20, 0x40
FAN_MARK_IGNORE = 0x400
KIND_FLAGS = {INODE: 0, MOUNT: FAN_MARK_MOUNT, FILESYSTEM: FAN_MARK_FILESYSTEM}
AT_FDCWD = -100

_HEAD = re.compile(r"flags:(?P<flags>[0-9a-f]+) event-flags:(?P<event>[0-9a-f]+)")
_MASKS = (
    r"mflags:(?P<mflags>[0-9a-f]+) mask:(?P<mask>[0-9a-f]+) ignored_mask:(?P<ignored>[0-9a-f]+)"
)
_INODE = re.compile(
    r"ino:[0-9a-f]+ sdev:(?P<sdev>[0-9a-f]+) " + _MASKS + r" fhandle-bytes:[0-9a-f]+"
    r" fhandle-type:(?P<type>[0-9a-f]+) f_handle:(?P<handle>[0-9a-f]*)"
)
_MOUNT = re.compile(r"mnt_id:(?P<mnt>[0-9a-f]+) " + _MASKS)
_FILESYSTEM = re.compile(r"sdev:(?P<sdev>[0-9a-f]+) " + _MASKS)


@dataclass(frozen=True)
class Mark:
    kind: int  # INODE, MOUNT or FILESYSTEM
    mflags: int  # FAN_MARK_IGNORED_SURV_MODIFY, FAN_MARK_EVICTABLE, FAN_MARK_IGNORE
    mask: int
    ignored_mask: int
    path: str  # the inode, the mount point, a mount of the file system


@dataclass(frozen=True)
class Group:
    flags: int  # fanotify_init flags
    event_flags: int  # fanotify_init event_f_flags (O_RDONLY, O_LARGEFILE, ...)
    marks: tuple[Mark, ...]


def read_group(pid: int, info: FdInfo) -> Group:
    """The group behind a fanotify descriptor of process `pid`, its marks named by paths."""
    lines = info.extra.get("fanotify", ())
    head = _HEAD.fullmatch(lines[0]) if lines else None
    if head is None:
        raise HijackError(f"cannot read fanotify flags of {lines[:1]!r}")
    marks = []
    for line in lines[1:]:
        if found := _INODE.fullmatch(line):
            watch = notify.InotifyWatchState(
                wd=0,
                mask=0,
                sdev=int(found["sdev"], 16),
                handle_type=int(found["type"], 16),
                handle=bytes.fromhex(found["handle"]),
            )
            kind, path = INODE, notify.watched_path(watch)
        elif found := _MOUNT.fullmatch(line):
            kind, path = MOUNT, _mount_point(pid, 0, str(int(found["mnt"], 16)))
        elif found := _FILESYSTEM.fullmatch(line):
            sdev = int(found["sdev"], 16)
            kind, path = FILESYSTEM, _mount_point(pid, 2, f"{sdev >> 20}:{sdev & 0xFFFFF}")
        else:
            raise HijackError(f"cannot read fanotify mark {line!r}")
        marks.append(
            Mark(
                kind=kind,
                mflags=int(found["mflags"], 16),
                mask=int(found["mask"], 16),
                ignored_mask=int(found["ignored"], 16),
                path=path,
            )
        )
    return Group(int(head["flags"], 16), int(head["event"], 16), tuple(marks))


def _mount_point(pid: int, field: int, wanted: str) -> str:
    """The mount point (in the process's root) of the first of its mounts whose mountinfo
    `field` is `wanted` (field 0: the mount id; field 2: the device, major:minor)."""
    with open(f"/proc/{pid}/mountinfo") as mounts:
        for line in mounts:
            fields = line.split()
            if fields[field] == wanted:
                return fields[4]
    raise HijackError(f"no mount {wanted} of process {pid} for a fanotify mark")


def make_group(group: Group) -> int:
    """A new fanotify group of ours with `group`'s flags and marks (needs CAP_SYS_ADMIN)."""
    fd = raw_syscall("fanotify_init", group.flags, group.event_flags | os.O_CLOEXEC)
    try:
        for mark in group.marks:
            _add(fd, mark)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _add(fd: int, mark: Mark) -> None:
    path = ctypes.create_string_buffer(os.fsencode(mark.path))
    where = FAN_MARK_ADD | KIND_FLAGS[mark.kind]
    kept = mark.mflags & ~(FAN_MARK_IGNORE | FAN_MARK_IGNORED_SURV_MODIFY)
    if mark.mask:
        raw_syscall(
            "fanotify_mark", fd, where | kept, mark.mask, AT_FDCWD, ctypes.addressof(path),
            what=mark.path,
        )  # fmt: skip
    if mark.ignored_mask:
        ignore = mark.mflags & FAN_MARK_IGNORE or FAN_MARK_IGNORED_MASK
        flags = where | kept | ignore | (mark.mflags & FAN_MARK_IGNORED_SURV_MODIFY)
        raw_syscall(
            "fanotify_mark", fd, flags, mark.ignored_mask, AT_FDCWD, ctypes.addressof(path),
            what=mark.path,
        )  # fmt: skip
