"""AIO contexts of io_setup(2): refused by name, before anything is written or killed.

An AIO context is a ring the kernel maps into the process, shared, as a deleted file
on its internal aio file system: /proc/PID/maps shows "/[aio] (deleted)", and the
process's aio_context_t is the ring's address. Its size follows the nr_events of
io_setup (the ring header's `nr`, at offset 4: 127 for 1 to 63 events, 383 for 128,
2047 for 1000: measured on Linux 6.18). Rebuilding it would be io_setup(nr / 2)
injected at restore, the new ring mremap()ed to the old address (the kernel follows
a moved ring: aio_ring_mremap) and the completed events not yet reaped copied in,
as CRIU does; the restore's address space does not do that yet, so such a process
is refused by name rather than restored with a ring that is no longer one.
"""

from __future__ import annotations

from hijack.errors import Unsupported
from hijack.sys import procfs

AIO_RING_PATH = "/[aio]"


def aio_rings(maps: list[procfs.MapEntry]) -> list[procfs.MapEntry]:
    """The mappings that are AIO rings."""
    return [entry for entry in maps if entry.path == AIO_RING_PATH and entry.shared]


def refuse_aio(pid: int, maps: list[procfs.MapEntry]) -> None:
    """Refuse a process holding an AIO context, naming each ring."""
    rings = aio_rings(maps)
    if rings:
        named = ", ".join(f"{ring.start:#x}" for ring in rings)
        raise Unsupported(
            f"process {pid} has AIO contexts (io_setup) whose rings are not rebuilt: {named}"
        )
