"""Deleted files, directories and FIFOs the process still holds ("ghosts"), and a deleted cwd.

Their names are gone, so they cannot be reopened by path: the image carries
them. A file's bytes go in as ObjectData sections, one run of data each
(SEEK_DATA / SEEK_HOLE), so holes stay holes; a file holding more than the
dump's ghost limit (`hijack dump --ghost-limit`) is refused by name before
anything is written. At restore each ghost is made again under its old name
(or one beside it), filled, and unlinked at once while the restorer holds it;
every descriptor of it is reopened from that (/proc/self/fd/N) with its own
flags and offset, so two descriptions stay two and share one inode. A
directory comes back empty (a deleted one is); a FIFO with its pipe size and
the bytes it buffered, in order (read without being taken, and written back,
as a named FIFO's: hijack.objects.pipe), one stream of bytes: packet
boundaries of a FIFO in packet mode are not kept.
"""

from __future__ import annotations

import dataclasses
import os
import stat
from collections.abc import Callable, Hashable

from hijack.errors import RestoreError, Unsupported
from hijack.image import records as rec
from hijack.image.files import ImageFiles
from hijack.objects.base import DumpContext, Kind, RestoreContext
from hijack.objects.pipe import fill as fill_pipe
from hijack.objects.pipe import peek_buffer
from hijack.objects.regular import is_deleted, reopen_flags
from hijack.sys import filedata, procfs

O_NONBLOCK = 0o4000
SEEK_SET = 0
GHOST_KINDS = (procfs.FdKind.REGULAR, procfs.FdKind.DIRECTORY, procfs.FdKind.FIFO)


def inode_key(dev: int, ino: int) -> Hashable:
    """The key of a file object in a dump: its descriptors and its mappings share it."""
    return ("inode", dev, ino)


def add_with_contents(
    dump: DumpContext,
    key: Hashable,
    make: Callable[[int], rec.MemoryObject],
    fd: int,
    runs: list[tuple[int, int]],
) -> int:
    """The id of the file object `key`; the first time, its record, then its data `runs`
    read from our descriptor `fd`, one ObjectData section per run (or per 8 MiB of one).
    A tree's member whose object a member before it stored (DumpContext.tree_bytes) records
    which member holds the bytes instead: they are neither read nor stored again."""
    fresh = False
    # (Only an object with bytes: one without, a directory, is made alike from any image.)
    holder = dump.tree_bytes.get(key) if dump.tree_bytes is not None and runs else None

    def made(object_id: int) -> rec.ObjectRecord:
        nonlocal fresh
        fresh = True
        record = make(object_id)
        return record if holder is None else dataclasses.replace(record, bytes_in=holder)

    object_id = dump.add_object(key, made)
    if fresh and holder is None:
        for start, end in runs:
            for offset, data in filedata.read_chunks(fd, start, end, rec.MAX_OBJECT_DATA):
                dump.add_data(object_id, data, offset)
        if dump.tree_bytes is not None and runs:
            dump.tree_bytes[key] = dump.pid
    return object_id


def require_bytes_here(found: rec.MemoryObject) -> None:
    """A memory object about to be made from its image must hold its bytes: one whose
    bytes another member's image holds was made for that member, if rebuilt before."""
    if found.bytes_in != rec.BYTES_HERE:
        raise RestoreError(
            f"object {found.id} ({type(found).__name__}) is made from the image of process"
            f" {found.bytes_in}, which holds its bytes, but no member rebuilt before made it"
        )


def fill(fd: int, image: ImageFiles, object_id: int, size: int) -> None:
    """Write an object's ObjectData into our new file `fd` at their offsets; then its size
    (the gaps between them stay holes)."""
    for chunk in image.chunks.get(object_id, ()):
        filedata.write_at(fd, chunk.offset, chunk.data)
    filedata.set_size(fd, size)


def dump_ghost(dump: DumpContext, fd: int, path: str, limit: int) -> int:
    """The object id of the deleted file, directory or FIFO behind our descriptor `fd`."""
    status = filedata.file_status(fd)
    runs: list[tuple[int, int]] = []
    size = 0
    if stat.S_ISREG(status.st_mode):
        size = status.st_size
        runs = filedata.data_runs(fd, size)
        stored = sum(end - start for start, end in runs)
        if stored > limit:
            raise Unsupported(
                f"deleted file {path} holds {stored} bytes of data, more than the ghost limit"
                f" of {limit} (hijack dump --ghost-limit SIZE)"
            )
    elif stat.S_ISFIFO(status.st_mode):
        return _dump_fifo(dump, fd, path, status)

    def make(object_id: int) -> rec.GhostFile:
        return _record(object_id, status, size, path)

    return add_with_contents(dump, inode_key(status.st_dev, status.st_ino), make, fd, runs)


def _dump_fifo(dump: DumpContext, fd: int, path: str, status: os.stat_result) -> int:
    """A deleted FIFO: its record's size is its pipe size, its data the bytes it buffers
    (read once, when its first descriptor is dumped)."""
    taken: list[bytes] = []

    def make(object_id: int) -> rec.GhostFile:
        size, chunks = peek_buffer(fd)
        taken.extend(chunks)
        return _record(object_id, status, size, path)

    object_id = dump.add_object(inode_key(status.st_dev, status.st_ino), make)
    dump.add_data(object_id, b"".join(taken), 0)  # after the record, as OBJECT_DATA must be
    return object_id


def _record(object_id: int, status: os.stat_result, size: int, path: str) -> rec.GhostFile:
    return rec.GhostFile(
        id=object_id,
        dev=status.st_dev,
        ino=status.st_ino,
        mode=status.st_mode,
        uid=status.st_uid,
        gid=status.st_gid,
        size=size,
        path=path,
    )


def dump_deleted_cwd(dump: DumpContext) -> None:
    """Add the process's cwd if that directory is deleted."""
    cwd = procfs.read_cwd(dump.pid)
    if not cwd.endswith(filedata.DELETED_SUFFIX):
        return
    fd = filedata.open_cwd(dump.pid)
    try:
        status = filedata.file_status(fd)
        if is_deleted(cwd, status.st_dev, status.st_ino):
            dump_ghost(dump, fd, cwd.removesuffix(filedata.DELETED_SUFFIX), dump.ghost_limit)
    finally:
        os.close(fd)


def deleted_cwd(cwd: rec.Cwd, image: ImageFiles) -> rec.GhostFile | None:
    """The deleted directory the image's process had as its cwd, if it had one."""
    if not cwd.cwd.endswith(filedata.DELETED_SUFFIX):
        return None
    path = cwd.cwd.removesuffix(filedata.DELETED_SUFFIX)
    for found in image.objects.values():
        if isinstance(found, rec.GhostFile) and stat.S_ISDIR(found.mode) and found.path == path:
            return found
    return None


def enter_deleted_cwd(restore: RestoreContext, directory: rec.GhostFile) -> None:
    """Make the deleted directory again and the stub's cwd (fchdir: it has no name)."""
    taken = restore.lend(ghost_fd(restore, directory.id))
    try:
        restore.stub.call("fchdir", taken)
    finally:
        restore.stub.call("close", taken)


def ghost_fd(restore: RestoreContext, object_id: int) -> int:
    """Our descriptor of the ghost `object_id`, made (and filled) the first time it is asked."""
    found = restore.built(object_id)
    if found is not None:
        return found
    ghost = restore.image.objects.get(object_id)
    if not isinstance(ghost, rec.GhostFile):
        raise Unsupported(f"object {object_id} is not a deleted file")
    require_bytes_here(ghost)
    made = filedata.create_unlinked(ghost.path, ghost.mode, ghost.uid, ghost.gid)
    restore.keep(object_id, made)
    if stat.S_ISREG(ghost.mode):
        fill(made, restore.image, object_id, ghost.size)
    elif stat.S_ISFIFO(ghost.mode):
        fill_pipe(made, restore.image, object_id, ghost.size, ())
    return made


class Ghost(Kind):
    name = "ghost"
    record_types = (rec.GhostFile,)

    def claims(self, entry: procfs.FdEntry, dump: DumpContext) -> bool:
        return entry.kind in GHOST_KINDS and is_deleted(entry.target, entry.dev, entry.ino)

    def dump(self, entry: procfs.FdEntry, info: procfs.FdInfo, dump: DumpContext) -> int:
        path = entry.target.removesuffix(filedata.DELETED_SUFFIX)
        try:
            return dump_ghost(dump, dump.copy_fd(entry.fd), path, dump.ghost_limit)
        except Unsupported as refused:
            raise Unsupported(f"fd {entry.fd}: {refused}") from None

    def dump_process(self, dump: DumpContext) -> None:
        dump_deleted_cwd(dump)

    def restore(self, descriptor: rec.FileDescriptor, restore: RestoreContext) -> None:
        ours = ghost_fd(restore, descriptor.object_id)
        flags = reopen_flags(descriptor)
        if descriptor.kind is rec.FdKind.FIFO:
            flags |= O_NONBLOCK  # give() puts the descriptor's own status flags back
        opened = filedata.reopen(ours, flags)
        try:
            if descriptor.kind is rec.FdKind.REGULAR:
                os.lseek(opened, descriptor.pos, SEEK_SET)
            restore.give(opened, descriptor)
        finally:
            os.close(opened)

    def describe(self, descriptor: rec.FileDescriptor, image: ImageFiles) -> str:
        ghost = image.object_of(descriptor, rec.GhostFile)
        if not stat.S_ISREG(ghost.mode):
            return f"deleted {ghost.path}"
        return f"deleted {ghost.path}, {ghost.size} bytes, offset {descriptor.pos}"
