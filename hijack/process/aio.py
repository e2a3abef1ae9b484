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
so the process's aio_context_t names it again, as CRIU does. Refused by name:
a ring holding completed events not yet reaped (head != tail), and a move of a
process with an AIO context. Requests still in flight at the dump are lost.
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


def is_aio_ring(entry: procfs.MapEntry) -> bool:
    return entry.path == AIO_RING_PATH and entry.shared


def read_rings(pid: int, maps: list[procfs.MapEntry], *, moving: bool) -> tuple[rec.AioRing, ...]:
    """The AIO rings among `maps` of stopped process `pid`; refuses what cannot come back."""
    rings = []
    for entry in filter(is_aio_ring, maps):
        if moving:
            raise Unsupported(
                f"process {pid} has an AIO context (io_setup) at {entry.start:#x}: a move"
                " does not carry it"
            )
        _id, nr, head, tail, *_ = AIO_RING_HEADER.unpack(
            memory.read(pid, entry.start, AIO_RING_HEADER.size)
        )
        if head != tail:
            raise Unsupported(
                f"process {pid} has completed AIO events not yet reaped in its context at"
                f" {entry.start:#x} (io_getevents them first)"
            )
        rings.append(rec.AioRing(address=entry.start, size=entry.end - entry.start, nr=nr))
    return tuple(rings)


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


def describe(settings: rec.ProcessSettings) -> list[str]:
    return [f"AIO context at {r.address:#x}: {r.nr} events" for r in settings.aio_rings]
