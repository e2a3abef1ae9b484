"""AIO contexts of io_setup(2): the ring mapped again at its old address.

An AIO context is a ring the kernel maps into the process, shared, as a deleted
file of its internal aio file system: /proc/PID/maps shows "/[aio] (deleted)",
and the process's aio_context_t is the ring's address. Its size follows
io_setup's nr_events (the ring header's `nr`, at offset 4: 127 for 1 to 63
events, 383 for 128, 2047 for 1000, measured on Linux 6.18: the kernel doubles
nr_events, adds 2 and fills whole pages), so io_setup((nr - 2) / 2)
makes a ring as big, as long as that is at least 4 events per possible CPU.

At dump the ring is left out of the segments and kept as an AioRing (address,
size, nr). A restore injects io_setup((nr - 2) / 2) into the stub and mremap()s the
new ring to the old address (the kernel follows a moved ring: aio_ring_mremap),
so the process's aio_context_t names it again, as CRIU does.

Completed events not yet reaped (the ring's head != tail) are kept too: the kernel
puts the next event at its own copy of the tail (kioctx.tail, which no call sets),
so the restore makes it complete `head` requests of its own (reads of no byte from
/dev/null, submitted in batches) and reaps them, then as many as there were events,
not reaped (the kernel counts the ring's free slots from its completions and head
and tail: as the original's were), then writes the saved events over theirs.
io_getevents (or a program reading the ring itself) then returns them, the kernel
putting the next one after them. Refused by name: a move of a process with an AIO
context. Requests still in flight at the dump are lost.
"""

from __future__ import annotations

import struct

from hijack.errors import RestoreError, Unsupported
from hijack.image import records as rec
from hijack.restore.remote import Stub
from hijack.sys import memory, procfs

AIO_RING_PATH = "/[aio]"
AIO_RING_HEADER = struct.Struct("<8I")  # id, nr, head, tail, magic, compat, incompat, header
MREMAP_MAYMOVE, MREMAP_FIXED = 1, 2
# struct iocb: data, key, rw_flags, opcode (IOCB_CMD_PREAD 0), reqprio, fildes, buf,
# nbytes, offset, reserved, flags, resfd
IOCB = struct.Struct("<QIiHhIQQqQIi")
SUBMIT_BATCH = 256  # pointers to one iocb: the kernel copies it at each submission
AT_FDCWD, O_RDONLY_CLOEXEC = -100, 0o2000000


def is_aio_ring(entry: procfs.MapEntry) -> bool:
    return entry.path == AIO_RING_PATH and entry.shared


def read_rings(pid: int, maps: list[procfs.MapEntry], *, moving: bool) -> tuple[rec.AioRing, ...]:
    """The AIO rings among `maps` of stopped process `pid`; refuses what cannot come back."""
    rings = []
    for entry in filter(is_aio_ring, maps):
        if moving:
            raise Unsupported(
                f"process {pid} has an AIO context (io_setup) at {entry.start:#x}: pre-copy"
                " rounds (a move, `dump --snapshot rounds`) do not carry it"
            )
        _id, nr, head, tail, *_ = AIO_RING_HEADER.unpack(
            memory.read(pid, entry.start, AIO_RING_HEADER.size)
        )
        head %= nr  # (the program may write it; the kernel reads it so)
        if tail >= nr:
            raise Unsupported(
                f"process {pid}'s AIO context at {entry.start:#x} has a tail ({tail}) past"
                f" its {nr} events"
            )
        rings.append(
            rec.AioRing(
                address=entry.start,
                size=entry.end - entry.start,
                nr=nr,
                head=head,
                tail=tail,
                events=_unreaped(pid, entry.start, nr, head, tail),
            )
        )
    return tuple(rings)


def _event_at(ring: int, index: int) -> int:
    return ring + AIO_RING_HEADER.size + index * rec.AIO_EVENT_SIZE


def _unreaped(pid: int, ring: int, nr: int, head: int, tail: int) -> bytes:
    """The io_events from `head` to `tail` of the ring at `ring`, wrapping at `nr`."""
    if tail >= head:
        return memory.read(pid, _event_at(ring, head), (tail - head) * rec.AIO_EVENT_SIZE)
    return memory.read(pid, _event_at(ring, head), (nr - head) * rec.AIO_EVENT_SIZE) + (
        memory.read(pid, _event_at(ring, 0), tail * rec.AIO_EVENT_SIZE)
    )


def _complete_requests(stub: Stub, context: int, reaped: int, kept: int) -> None:
    """Have the kernel complete `reaped` requests on `context` and reap them, then `kept`
    more, not reaped: its head and tail then at `reaped` and `reaped + kept`, and the
    slots it counts free are the ring's (it gives a completed request's slot back when
    its event is no longer between head and tail)."""
    stub.reset_scratch()
    null = stub.call("openat", AT_FDCWD, stub.put_string("/dev/null"), O_RDONLY_CLOEXEC)
    try:
        buffer = stub.put(bytes(8))
        iocb = stub.put(IOCB.pack(0, 0, 0, 0, 0, null, buffer, 0, 0, 0, 0, 0))
        pointers = stub.put_u64s(*([iocb] * SUBMIT_BATCH))
        events = stub.put(bytes(SUBMIT_BATCH * rec.AIO_EVENT_SIZE))
        for count, reap in ((reaped, True), (kept, False)):
            done = 0
            while done < count:
                batch = min(count - done, SUBMIT_BATCH)
                submitted = stub.call("io_submit", context, batch, pointers)
                if reap:
                    stub.call("io_getevents", context, submitted, submitted, events, 0)
                done += submitted
    finally:
        stub.call("close", null)


def _put_back_events(stub: Stub, ring: rec.AioRing) -> None:
    """The saved events between head and tail where the kernel's completions put theirs
    (checked: head and tail where they were)."""
    _id, _nr, head, tail, *_ = AIO_RING_HEADER.unpack(
        memory.read(stub.pid, ring.address, AIO_RING_HEADER.size)
    )
    if (head, tail) != (ring.head, ring.tail):
        raise RestoreError(
            f"the AIO context at {ring.address:#x} came back with head {head} and tail"
            f" {tail}, not {ring.head} and {ring.tail}"
        )
    first = min(len(ring.events), (ring.nr - ring.head) * rec.AIO_EVENT_SIZE)
    memory.write(stub.pid, _event_at(ring.address, ring.head), ring.events[:first])
    if first < len(ring.events):
        memory.write(stub.pid, _event_at(ring.address, 0), ring.events[first:])


def rebuild_rings(stub: Stub, settings: rec.ProcessSettings) -> None:
    """io_setup each context again and move its ring to the old address."""
    for ring in settings.aio_rings:
        stub.reset_scratch()
        at = stub.put(bytes(8))
        stub.call("io_setup", (ring.nr - 2) // 2, at)
        (made,) = struct.unpack("<Q", memory.read(stub.pid, at, 8))
        size = next(m.end - m.start for m in procfs.read_maps(stub.pid) if m.start == made)
        if size != ring.size:
            raise RestoreError(
                f"the AIO context at {ring.address:#x} came back {size} bytes big, not"
                f" {ring.size} (fewer CPUs here?)"
            )
        if made != ring.address:
            stub.call("mremap", made, size, size, MREMAP_MAYMOVE | MREMAP_FIXED, ring.address)
        if ring.head != ring.tail:
            kept = len(ring.events) // rec.AIO_EVENT_SIZE
            _complete_requests(stub, ring.address, ring.head, kept)
            _put_back_events(stub, ring)


def describe(settings: rec.ProcessSettings) -> list[str]:
    return [
        f"AIO context at {r.address:#x}: {r.nr} events"
        + (f", {len(r.events) // rec.AIO_EVENT_SIZE} completed not reaped" if r.events else "")
        for r in settings.aio_rings
    ]
