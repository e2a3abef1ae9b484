"""Anonymous pipes: rebuilt from the image when every end is in the process (self-pipes).

At dump the pipe's buffer is read without taking it (tee into a pipe of ours,
hijack.sys.pipe), with its size and, in packet mode, the packets' lengths.
The restorer makes the pipe itself, sets its size, writes the bytes in, keeps
both ends until the restore ends, and gives the stub each end it had. A
pipe an outside process also holds (the other end of a shell pipeline, a
parent's pipe) cannot be made again: it is refused by name, unless the
process's shadow keeps it (attach before dump).

Named FIFOs, and deleted ones, use the same reading and filling (hijack.objects.fifo,
hijack.objects.ghost).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Hashable
from weakref import WeakKeyDictionary

from hijack.image import records as rec
from hijack.image.files import ImageFiles
from hijack.objects.base import DumpContext, Kind, RestoreContext, describe_fd
from hijack.sys import pipe, procfs

O_ACCMODE, O_RDONLY = 0o3, 0

# Who else holds each pipe and FIFO of the process: one scan of /proc per dump.
_outside: WeakKeyDictionary[DumpContext, dict[str, set[int]]] = WeakKeyDictionary()


def outside_holders(dump: DumpContext, target: str) -> set[int]:
    """The processes besides the dumped one (and us) holding descriptor link `target`."""
    found = _outside.get(dump)
    if found is None:
        kinds = (procfs.FdKind.PIPE, procfs.FdKind.FIFO)
        targets = frozenset(e.target for e in dump.entries if e.kind in kinds)
        found = holders_since(targets, _besides(dump.pid), dump.holders_before)
        _outside[dump] = found
    return found.get(target, set())


def scan_holders_before(*pids: int) -> procfs.HolderScan:
    """Who holds the anonymous pipes of running process `pid` (or of every member of a
    tree, `pids`: one scan for all): the scan of every process (15 ms on a busy host),
    made before a freeze so that the freeze checks only what changed since
    (outside_holders)."""
    targets = frozenset(
        e.target for pid in pids for e in procfs.list_fds(pid) if e.kind is procfs.FdKind.PIPE
    )
    return procfs.scan_holders(frozenset(targets), besides=frozenset(pids) | {os.getpid()})


def _besides(pid: int) -> frozenset[int]:
    return frozenset({pid, os.getpid()})


def holders_since(
    targets: frozenset[str], besides: frozenset[int], before: procfs.HolderScan | None
) -> dict[str, set[int]]:
    """Which processes, `besides` left out, hold `targets` now, using the scan `before`
    (scan_holders_before) where it still holds (a freeze: a dump's, a tree's plan's). A
    pipe spreads only through its holders: a fork (a process new since the scan: its
    descriptors are read), or a holder passing it (over SCM_RIGHTS, pidfd_getfd,
    /proc/PID/fd). A pipe one of its holders let go of is scanned for anew, as are FIFOs
    (anyone may open one by its path) and pipes the process got since. Not seen: a process
    that was there at the scan and got a pipe from the dumped process itself between the
    scan and the freeze."""
    if before is None:
        return procfs.holders(targets, besides=besides)
    known = frozenset(target for target in targets if target in before.found)
    checked = set(procfs.list_pids()) - before.pids
    for target in known:
        checked |= before.found[target]
    found = procfs.holders(known, besides=besides, among=sorted(checked))
    let_go = frozenset(target for target in known if not before.found[target] <= found[target])
    if rescan := (targets - known) | let_go:
        found.update(procfs.holders(rescan, besides=besides))
    return found


# (object id, pipe size, packet lengths, outside holders) -> the record
MakeRecord = Callable[[int, int, tuple[int, ...], set[int]], rec.ObjectRecord]


def dump_buffered(
    dump: DumpContext,
    entry: procfs.FdEntry,
    key: Hashable,
    make_record: MakeRecord,
    *,
    members_inside: bool = False,
) -> int:
    """The id of the pipe or FIFO behind `entry`, whose record `make_record` makes once,
    with its buffered bytes as its data unless another process holds it (then they
    are that traffic's, and stay in the kernel's pipe). `members_inside`: the other
    members of a tree dumped with the process are not outside (a tree's restore makes
    the pipe once, for all of them: hijack.restore.tree)."""
    taken: list[bytes] = []

    def make(object_id: int) -> rec.ObjectRecord:
        outside = outside_holders(dump, entry.target)
        if members_inside:
            outside -= dump.tree
        size, chunks, packets = _read_buffer(dump, entry, with_bytes=not outside)
        taken.extend(chunks)
        lengths = tuple(len(chunk) for chunk in chunks) if packets else ()
        return make_record(object_id, size, lengths, outside)

    object_id = dump.add_object(key, make)
    if taken:  # after the record, as OBJECT_DATA must be
        dump.add_data(object_id, b"".join(taken))
    return object_id


def _read_buffer(
    dump: DumpContext, entry: procfs.FdEntry, *, with_bytes: bool
) -> tuple[int, list[bytes], bool]:
    """The size of the pipe behind `entry`, with `with_bytes` its buffered bytes (as
    chunks, one per packet in packet mode) and whether they are packets; nothing is
    taken from it."""
    copy = dump.copy_fd(entry.fd)
    if not with_bytes:
        return pipe.pipe_size(copy), [], False
    writable_only = procfs.read_fdinfo(dump.pid, entry.fd).flags & O_ACCMODE == os.O_WRONLY
    size, chunks = peek_buffer(copy, writable_only=writable_only)
    return size, chunks, len(chunks) > 1 or _writer_in_packet_mode(dump, entry.target)


def peek_buffer(fd: int, *, writable_only: bool = True) -> tuple[int, list[bytes]]:
    """The size of the pipe or FIFO behind our descriptor `fd` and its buffered bytes (one
    chunk per packet in packet mode), left in it. tee reads from a read end: when `fd`
    may be a write end only, through a new reader of ours (which the pipe's writers do
    not notice: the dumped process is stopped)."""
    reader = pipe.open_end(fd, writable=False) if writable_only else fd
    try:
        return pipe.pipe_size(reader), pipe.peek(reader)
    finally:
        if reader != fd:
            os.close(reader)


def _writer_in_packet_mode(dump: DumpContext, target: str) -> bool:
    return any(
        procfs.read_fdinfo(dump.pid, entry.fd).flags & pipe.O_DIRECT
        for entry in dump.entries
        if entry.target == target
    )


def fill(
    write_fd: int, image: ImageFiles, object_id: int, size: int, packets: tuple[int, ...]
) -> None:
    """Give the pipe behind our `write_fd` its size (0: leave it) and the image's bytes."""
    if size:
        pipe.set_pipe_size(write_fd, size)
    data = image.data(object_id)
    if not packets:
        pipe.fill(write_fd, [data] if data else [], packets=False)
        return
    offsets = itertools.pairwise(itertools.accumulate(packets, initial=0))
    pipe.fill(write_fd, [data[start:end] for start, end in offsets], packets=True)


class Pipe(Kind):
    name = "pipe"
    record_types = (rec.PipeObject,)

    def claims(self, entry: procfs.FdEntry, dump: DumpContext) -> bool:
        return entry.kind is procfs.FdKind.PIPE

    def dump(self, entry: procfs.FdEntry, info: procfs.FdInfo, dump: DumpContext) -> int:
        def make(
            object_id: int, size: int, packets: tuple[int, ...], outside: set[int]
        ) -> rec.ObjectRecord:
            return rec.PipeObject(
                id=object_id, pipe_size=size, packets=packets, outside_pid=min(outside, default=0)
            )

        return dump_buffered(dump, entry, ("pipe", entry.ino), make, members_inside=True)

    def refusal(self, descriptor: rec.FileDescriptor, image: ImageFiles) -> str | None:
        found = image.object_of(descriptor, rec.PipeObject)
        if found.outside_pid:
            return f"{describe_fd(descriptor)}, whose other end process {found.outside_pid} holds"
        return None

    def restore(self, descriptor: rec.FileDescriptor, restore: RestoreContext) -> None:
        found = restore.image.object_of(descriptor, rec.PipeObject)
        # Both ends as pipe2 made them are kept: an end opened anew (/proc/self/fd)
        # would carry O_LARGEFILE, which the process's did not.
        writing = descriptor.flags & O_ACCMODE != O_RDONLY
        end = restore.built((found.id, writing))
        if end is None:
            reader, writer = pipe.make_pipe()
            restore.keep((found.id, False), reader)
            restore.keep((found.id, True), writer)
            fill(writer, restore.image, found.id, found.pipe_size, found.packets)
            end = writer if writing else reader
        restore.give(end, descriptor)

    def describe(self, descriptor: rec.FileDescriptor, image: ImageFiles) -> str:
        found = image.object_of(descriptor, rec.PipeObject)
        end = "read end" if descriptor.flags & O_ACCMODE == O_RDONLY else "write end"
        if found.outside_pid:
            return f"{end}, shared with process {found.outside_pid}"
        return f"{end}, {describe_buffer(image, found.id, found.pipe_size, found.packets)}"


def describe_buffer(image: ImageFiles, object_id: int, size: int, packets: tuple[int, ...]) -> str:
    held = len(image.data(object_id))
    return f"{held} bytes buffered of {size}" + (f" in {len(packets)} packets" if packets else "")
