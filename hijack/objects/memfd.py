"""memfds, and the files in memory behind shared mappings: one object, its bytes once.

A memfd (memfd_create) has a name, bytes (holes kept, as for deleted files)
and seals (F_GET_SEALS). It is one object however it is reached: by
descriptors (this kind), by MAP_SHARED mappings with or without a descriptor
left (`dump_mappings`), and the same holds for a deleted file mapped shared.
A mapping of such an object stores no pages: the object's ObjectData hold its
bytes, once. At restore the memfd is made in the restorer (memfd_create,
filled, sealed last), every descriptor is a new description of it, and every
mapping maps it again (`map_objects`), so a write through a descriptor is seen
in the mapping and the other way round. A mapping is made from a description
opened read-write when the original could be made writable later (VM_MAYWRITE,
smaps "mw"), read-only otherwise, as the process had it.

Shared anonymous memory (MAP_SHARED | MAP_ANONYMOUS: "/dev/zero (deleted)")
is one object too, reached by mappings only (several, after an mremap or an
mprotect of a part): its bytes are read once through /proc/PID/map_files, and
at restore it is made once in the stub and each segment maps its pages again
(AddressSpace.map_shared_anonymous), so the segments share them as they did.

In a tree stream the bytes of such an object are stored once, by the first member
whose image records it; the later members' records name that member (`bytes_in`),
and their restore is given the object made for it (hijack.restore.shared).
"""

from __future__ import annotations

import dataclasses
import os
import stat

from hijack.errors import ImageError
from hijack.image import records as rec
from hijack.image.files import ImageFiles
from hijack.objects import packet
from hijack.objects.base import DumpContext, Kind, RestoreContext
from hijack.objects.ghost import (
    add_with_contents,
    dump_ghost,
    fill,
    ghost_fd,
    inode_key,
    require_bytes_here,
)
from hijack.objects.regular import reopen_flags
from hijack.restore.address_space import AddressSpace, may_write
from hijack.sys import filedata, procfs

SEEK_SET = 0
O_RDONLY, O_RDWR = 0, 2
O_CLOEXEC = 0o2000000
AT_FDCWD = -100
F_SEAL_FUTURE_WRITE = 0x10
SHARED_ANONYMOUS = "/dev/zero"  # the name the kernel gives MAP_SHARED | MAP_ANONYMOUS memory
SYSV_SHM = "/SYSV"  # SysV shared memory segments: not ours


def dump_memfd(dump: DumpContext, fd: int, name: str) -> int:
    """The object id of the memfd behind our descriptor `fd`."""
    status = filedata.file_status(fd)
    runs = filedata.data_runs(fd, status.st_size)
    seals = filedata.get_seals(fd)

    def make(object_id: int) -> rec.MemfdObject:
        return rec.MemfdObject(
            id=object_id,
            dev=status.st_dev,
            ino=status.st_ino,
            size=status.st_size,
            seals=seals,
            mode=status.st_mode,
            uid=status.st_uid,
            gid=status.st_gid,
            name=name,
        )

    return add_with_contents(dump, inode_key(status.st_dev, status.st_ino), make, fd, runs)


def memfd_fd(restore: RestoreContext, memfd: rec.MemfdObject) -> int:
    """Our descriptor of the memfd, made and filled the first time it is asked (sealed once
    it is mapped: seal_memfds)."""
    found = restore.built(memfd.id)
    if found is not None:
        return found
    require_bytes_here(memfd)
    made = filedata.create_memfd(memfd.name)
    restore.keep(memfd.id, made)
    fill(made, restore.image, memfd.id, memfd.size)
    filedata.set_owner(made, memfd.uid, memfd.gid, stat.S_IMODE(memfd.mode))
    return made


def seal_memfds(restore: RestoreContext) -> None:
    """Seal every memfd the restore made, once all its mappings exist: F_SEAL_FUTURE_WRITE
    leaves the writable mappings made before it, but forbids making them after. In a tree,
    once every member maps it (TreeShared.seal)."""
    for found in restore.image.objects.values():
        if not isinstance(found, rec.MemfdObject):
            continue
        made = restore.built(found.id)
        if made is not None and restore.shared is not None:
            restore.shared.seal_later(made, found.seals)
        elif made is not None:
            filedata.add_seals(made, found.seals)


def object_fd(restore: RestoreContext, object_id: int) -> int:
    """Our descriptor of a file object (a memfd or a deleted file), made when first asked."""
    found = restore.image.objects.get(object_id)
    if isinstance(found, rec.MemfdObject):
        return memfd_fd(restore, found)
    if isinstance(found, rec.GhostFile):
        return ghost_fd(restore, object_id)
    raise ImageError(f"object {object_id} is mapped, but it is neither a memfd nor a file")


def holds_object(mapping: procfs.MapEntry) -> bool:
    """Whether a mapping shares the pages of a memory object with no name: a memfd, a
    deleted file, shared anonymous memory."""
    return (
        mapping.shared
        and mapping.deleted
        and mapping.inode != 0
        and not mapping.path.startswith(SYSV_SHM)
    )


def dump_mappings(dump: DumpContext) -> None:
    """Add the object of every shared mapping of a memfd, a deleted file or shared anonymous
    memory: the same object as its descriptors' and its other mappings'."""
    for mapping in dump.maps:
        if not holds_object(mapping):
            continue
        fd = filedata.open_mapped_file(dump.pid, mapping.start, mapping.end)
        try:
            name = filedata.memfd_name(mapping.path)
            if mapping.path == SHARED_ANONYMOUS:
                dump_shared_anonymous(dump, fd)
            elif name is None:
                dump_ghost(dump, fd, mapping.path, dump.ghost_limit)
            else:
                dump_memfd(dump, fd, name)
        finally:
            os.close(fd)


def dump_shared_anonymous(dump: DumpContext, fd: int) -> int:
    status = filedata.file_status(fd)
    runs = filedata.data_runs(fd, status.st_size)

    def make(object_id: int) -> rec.SharedAnonymous:
        return rec.SharedAnonymous(
            id=object_id, dev=status.st_dev, ino=status.st_ino, size=status.st_size
        )

    return add_with_contents(dump, inode_key(status.st_dev, status.st_ino), make, fd, runs)


def mapped_objects(segments: tuple[rec.Segment, ...], image: ImageFiles) -> dict[int, int]:
    """The object each shared segment of a memory object maps: start -> object id."""
    by_inode = {
        (found.dev, found.ino): found.id
        for found in image.objects.values()
        if isinstance(found, rec.MemfdObject | rec.GhostFile | rec.SharedAnonymous)
    }
    mapped = {}
    for segment in segments:
        key = (os.makedev(segment.dev_major, segment.dev_minor), segment.inode)
        if segment.shared and key in by_inode:
            mapped[segment.start] = by_inode[key]
    return mapped | packet.ring_segments(image)


def held_by_objects(segments: list[rec.Segment], image: ImageFiles) -> list[rec.Segment]:
    """The segments, with contents NONE where an object of `image` holds their pages."""
    mapped = mapped_objects(tuple(segments), image)
    return [
        dataclasses.replace(s, contents=rec.ContentsKind.NONE) if s.start in mapped else s
        for s in segments
    ]


def map_objects(space: AddressSpace, restore: RestoreContext, mapped: dict[int, int]) -> None:
    """Map each segment of `mapped` (start -> object id) from its object, made again:
    shared anonymous memory in the stub, a memfd or deleted file in the restorer; the rings
    of packet sockets from the sockets, restored already."""
    packet.map_rings(restore)
    for found in restore.image.objects.values():
        if isinstance(found, rec.SharedAnonymous):
            segments = [s for s in space.segments if mapped.get(s.start) == found.id]
            _map_shared_anonymous(space, restore, found, segments)
    for segment in space.segments:
        object_id = mapped.get(segment.start)
        if object_id is None or isinstance(
            restore.image.objects[object_id], rec.SharedAnonymous | rec.PacketSocket
        ):
            continue
        taken = _stub_file(restore, object_id, O_RDWR if may_write(segment) else O_RDONLY)
        try:
            space.map_segment_from(segment, taken)
        finally:
            restore.stub.call("close", taken)


def _map_shared_anonymous(
    space: AddressSpace,
    restore: RestoreContext,
    found: rec.SharedAnonymous,
    segments: list[rec.Segment],
) -> None:
    """Make the object filled from the image and map it at `segments`; in a member of a
    tree, map the one made for a member before it instead, and keep ours for those after."""
    key = ("shared anonymous", found.dev, found.ino)
    made = restore.shared.built(key) if restore.shared is not None else None
    if made is None:
        require_bytes_here(found)
        chunks = [(c.offset, c.data) for c in restore.image.chunks.get(found.id, ())]
        space.map_shared_anonymous(found.size, chunks, segments)
        if restore.shared is not None and segments:
            first = segments[0]
            restore.shared.keep(
                key, filedata.open_mapped_file(restore.stub.pid, first.start, first.end)
            )
        return
    for segment in segments:
        lent = restore.lend(made)
        try:
            space.map_segment_from(segment, lent)
        finally:
            restore.stub.call("close", lent)


def _stub_file(restore: RestoreContext, object_id: int, mode: int) -> int:
    """A descriptor in the stub of file object `object_id`, a new description opened with
    `mode`: of the stub's own descriptor of it where it has one (made from the image, or
    the very file its shadow kept), so descriptor and mapping share the file; else of ours."""
    holders = [
        d
        for d in restore.image.descriptors
        if d.object_id == object_id and d.fd in restore.restored
    ]
    found = restore.image.objects[object_id]
    kept_sealed = (
        isinstance(found, rec.MemfdObject)
        and found.seals & F_SEAL_FUTURE_WRITE
        and restore.built(object_id) is None
    )
    if holders and kept_sealed and mode == O_RDWR:
        # The memfd the shadow kept takes no new writable mapping: the process gets a
        # copy from the image instead, for its descriptors and its mappings alike.
        for descriptor in holders:
            Memfd().restore(descriptor, restore)
    if holders:
        stub = restore.stub
        stub.reset_scratch()
        path = stub.put_string(f"/proc/self/fd/{holders[0].fd}")
        return stub.call("openat", AT_FDCWD, path, mode | O_CLOEXEC, 0)
    opened = filedata.reopen(object_fd(restore, object_id), mode)
    try:
        return restore.lend(opened)
    finally:
        os.close(opened)


class Memfd(Kind):
    name = "memfd"
    record_types = (rec.MemfdObject,)

    def claims(self, entry: procfs.FdEntry, dump: DumpContext) -> bool:
        return entry.kind is procfs.FdKind.MEMFD

    def dump(self, entry: procfs.FdEntry, info: procfs.FdInfo, dump: DumpContext) -> int:
        name = filedata.memfd_name(entry.target) or ""
        return dump_memfd(dump, dump.copy_fd(entry.fd), name)

    def dump_process(self, dump: DumpContext) -> None:
        dump_mappings(dump)

    def restore(self, descriptor: rec.FileDescriptor, restore: RestoreContext) -> None:
        memfd = restore.image.object_of(descriptor, rec.MemfdObject)
        opened = filedata.reopen(memfd_fd(restore, memfd), reopen_flags(descriptor))
        try:
            os.lseek(opened, descriptor.pos, SEEK_SET)
            restore.give(opened, descriptor)
        finally:
            os.close(opened)

    def describe(self, descriptor: rec.FileDescriptor, image: ImageFiles) -> str:
        memfd = image.object_of(descriptor, rec.MemfdObject)
        return (
            f"{memfd.name!r}, {memfd.size} bytes, seals {memfd.seals:#x}, offset {descriptor.pos}"
        )
