"""Files with no name to reopen: deleted files, memfds, shared memory; their bytes and seals.

Such a file is read through a descriptor of ours (a copy of the process's, or
its mapping's /proc/PID/map_files link), never by path. Holes stay holes: only
the runs SEEK_DATA / SEEK_HOLE report are read, and a restored file gets its
size with ftruncate, so what was never written is never allocated. A restored
one is made under its old name, filled, and unlinked while we hold it open;
the process's descriptors are reopened from ours (/proc/self/fd/N), each a
description of its own with its own flags.
"""

from __future__ import annotations

import contextlib
import errno as errno_codes
import fcntl
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from hijack.sys.errors import kernel_call, raise_for_errno

MFD_CLOEXEC = 0x1
MFD_ALLOW_SEALING = 0x2
# The name memfd_create() puts before the caller's in the /proc links.
MEMFD_PREFIX = "/memfd:"
DELETED_SUFFIX = " (deleted)"
# Another name beside the old one when that is taken again: "<path>.hijack-<n>".
SPARE_NAMES = 100


def data_runs(fd: int, size: int) -> list[tuple[int, int]]:
    """The [start, end) ranges of file `fd` (of `size` bytes) that hold data, not holes.

    Sought on a description of our own: `fd` may share the process's, whose
    offset must not move.
    """
    own = reopen(fd, os.O_RDONLY)
    try:
        return _data_runs(own, size)
    finally:
        os.close(own)


def _data_runs(fd: int, size: int) -> list[tuple[int, int]]:
    runs = []
    offset = 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno_codes.ENXIO:
                break  # nothing but a hole up to the end
            raise_for_errno(exc.errno or 0, "lseek(SEEK_DATA)")
        with kernel_call("lseek(SEEK_HOLE)"):
            end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        if start >= end:
            break
        runs.append((start, end))
        offset = end
    return runs


def read_chunks(fd: int, start: int, end: int, chunk: int) -> Iterator[tuple[int, bytes]]:
    """(offset, bytes) of file `fd` from `start` to `end`, at most `chunk` bytes each.

    Shorter when the file shrank meanwhile (it cannot while the process is stopped,
    unless another process holds it too): what is there is what is read.
    """
    offset = start
    while offset < end:
        with kernel_call("pread"):
            data = os.pread(fd, min(chunk, end - offset), offset)
        if not data:
            return
        yield offset, data
        offset += len(data)


def write_at(fd: int, offset: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        with kernel_call("pwrite"):
            written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


def set_size(fd: int, size: int) -> None:
    with kernel_call("ftruncate"):
        os.ftruncate(fd, size)


def set_owner(fd: int, uid: int, gid: int, mode: int) -> None:
    """Owner, group and permission bits (chown first: it may clear set-id bits)."""
    with kernel_call("fchown"):
        os.fchown(fd, uid, gid)
    with kernel_call("fchmod"):
        os.fchmod(fd, mode)


def get_seals(fd: int) -> int:
    """A memfd's seals (F_GET_SEALS); 0 for a file that cannot be sealed."""
    try:
        return fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError as exc:
        if exc.errno == errno_codes.EINVAL:
            return 0
        raise_for_errno(exc.errno or 0, "fcntl(F_GET_SEALS)")


def add_seals(fd: int, seals: int) -> None:
    if seals:
        with kernel_call("fcntl(F_ADD_SEALS)"):
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)


def memfd_name(target: str) -> str | None:
    """The name a memfd was created with, from its /proc link ("/memfd:NAME (deleted)")."""
    if not target.startswith(MEMFD_PREFIX):
        return None
    return target.removeprefix(MEMFD_PREFIX).removesuffix(DELETED_SUFFIX)


def create_memfd(name: str) -> int:
    """A new memfd named `name` that can still be sealed (seals come after its bytes)."""
    with kernel_call("memfd_create", what=f"memfd {name}"):
        return os.memfd_create(name, MFD_CLOEXEC | MFD_ALLOW_SEALING)


def open_mapped_file(pid: int, start: int, end: int) -> int:
    """Our descriptor (read-write) of the file mapped at [start, end) in process `pid`."""
    with kernel_call("open", pid, f"the file mapped at {start:#x} in process {pid}"):
        return os.open(f"/proc/{pid}/map_files/{start:x}-{end:x}", os.O_RDWR | os.O_CLOEXEC)


def open_cwd(pid: int) -> int:
    """Our descriptor of the working directory of process `pid` (deleted or not)."""
    with kernel_call("open", pid, f"the cwd of process {pid}"):
        return os.open(f"/proc/{pid}/cwd", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


def reopen(fd: int, flags: int) -> int:
    """A new open file description of the file behind our `fd`, opened with `flags`.

    Through /proc/self/fd/N, which reaches an unlinked file, a memfd or a
    deleted directory as well as any other.
    """
    with kernel_call("open", what=f"a new description of fd {fd}"):
        return os.open(f"/proc/self/fd/{fd}", flags | os.O_CLOEXEC)


def file_status(fd: int) -> os.stat_result:
    with kernel_call("fstat"):
        return os.fstat(fd)


def create_unlinked(path: str, mode: int, uid: int, gid: int) -> int:
    """A file, directory or FIFO (by `mode`'s type) that is gone from the tree at once.

    Made under `path`, or under a spare name beside it when `path` is taken,
    so /proc/PID/fd shows the old name again; parent directories that are
    gone too are made for the moment and removed after. Returns our
    descriptor: read-write for a file or FIFO (which then never blocks),
    read-only for a directory.
    """
    made_parents = _make_parents(Path(path).parent)
    try:
        for name in _names(path):
            try:
                fd = _create(name, mode)
            except FileExistsError:
                continue
            try:
                (os.rmdir if stat.S_ISDIR(mode) else os.unlink)(name)
                set_owner(fd, uid, gid, stat.S_IMODE(mode))
            except BaseException:
                os.close(fd)
                raise
            return fd
        raise_for_errno(errno_codes.EEXIST, "open", what=f"a name for deleted {path}")
    except OSError as exc:
        raise_for_errno(exc.errno or 0, "open", what=f"deleted {path}, made again")
    finally:
        for parent in reversed(made_parents):
            with contextlib.suppress(OSError):
                parent.rmdir()


def _names(path: str) -> Iterator[str]:
    yield path
    for number in range(1, SPARE_NAMES):
        yield f"{path}.hijack-{number}"


def _create(name: str, mode: int) -> int:
    flags = os.O_CLOEXEC | os.O_NOFOLLOW
    if stat.S_ISDIR(mode):
        os.mkdir(name, 0o700)
        return os.open(name, flags | os.O_RDONLY | os.O_DIRECTORY)
    if stat.S_ISFIFO(mode):
        os.mkfifo(name, 0o600)
        return os.open(name, flags | os.O_RDWR | os.O_NONBLOCK)
    return os.open(name, flags | os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)


def _make_parents(directory: Path) -> list[Path]:
    """Make `directory` and its missing ancestors; return those made, outermost first."""
    missing = []
    while not directory.exists():
        missing.append(directory)
        directory = directory.parent
    missing.reverse()
    for parent in missing:
        with kernel_call("mkdir", what=f"{parent}, for a deleted file inside it"):
            parent.mkdir(mode=0o700)
    return missing
