"""`hijack dump PID` of a big process: pre-copy rounds to the image, a freeze for the rest.

A fork's page-table copy (hijack.mutator.snapshot) costs 20-28 ms a GiB at
the freeze, whatever else is cut. Here nothing proportional to the memory is
done while the process is stopped, as a live move does (hijack.mutator.precopy):

1. The process is stopped for a moment to start tracking what it writes (a
   userfaultfd in write-protect async mode, made inside it and taken out); the
   first scan, which protects every page, runs once it is released: a page
   written before the scan protected it is read by round 0, which comes after.
2. Round 0 writes every page a plain image would hold to the image, while the
   process runs; each later round the pages written since (docs/crf.md §7a),
   until a round is small or stops shrinking (Precopy.should_continue).
3. The freeze: the pages written since the last round, the threads,
   settings, timers, descriptors, and the final IMAGE, whose PRECOPIED
   segments the rounds before it hold. It is written to memory while the
   process is stopped and to `out` once it runs again: a slow reader of `out`
   (a pipe) never lengthens the freeze.

The image is `{ ROUND } IMAGE` (docs/crf.md §7a, "In a file"): restore,
show, core and recode read it; a later round's page overrides an earlier one's
and the final image's override every round's.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import BinaryIO

from hijack.errors import HijackError, Unsupported
from hijack.mutator.dump import (
    DumpResult,
    dump_options,
    read_signal_actions,
    widen_if_pipe,
    write_image,
)
from hijack.mutator.precopy import Precopy, RoundSent, _userfaultfd_inside, armed_tracking
from hijack.mutator.tracee import Tracee, scratch_below_stack
from hijack.objects import pipe
from hijack.objects.base import DEFAULT_GHOST_LIMIT
from hijack.process import aio
from hijack.sys import procfs
from hijack.testpoint import reached
from hijack.timing import Laps

# Below this much private memory a fork's page-table copy costs less than the
# tracking's own stop (measured: a fork ~2.5 ms per 100 MiB at load 4-12, the
# tracking's stop 1.5-3 ms, its rounds a second image's worth of reads): the
# forked snapshot is the quicker freeze. Above it, rounds.
ROUNDS_MIN_BYTES = 256 * 1024 * 1024


def worth_rounds(pid: int) -> bool:
    """Whether `pid`'s snapshot freezes it for less with rounds than with a fork: enough
    private memory, and nothing a move's rounds leave out (System V shared memory) or
    refuse (an AIO context)."""
    smaps = procfs.read_smaps(pid)
    if any(
        entry.path.startswith("/SYSV") or aio.is_aio_ring(entry) for entry in procfs.read_maps(pid)
    ):
        return False
    return sum(entry.anonymous for entry in smaps.values()) >= ROUNDS_MIN_BYTES


def rounds_dump(
    pid: int,
    out: BinaryIO,
    *,
    no_binary: bool = False,
    no_shared_libs: bool = False,
    on_complete: Callable[[], None] | None = None,
    ghost_limit: int = DEFAULT_GHOST_LIMIT,
    connections: bool = True,
) -> DumpResult:
    """Write `{ ROUND } IMAGE` of `pid` to `out`: the state at a freeze of milliseconds.
    `connections`: as hijack.mutator.snapshot.snapshot_dump's."""
    widen_if_pipe(out)
    dump_options(no_binary=no_binary, no_shared_libs=no_shared_libs)  # checks them first
    precopy = start_tracking(pid)
    try:
        before: RoundSent | None = None
        while True:
            last = precopy.send_round(out)
            precopy.bytes_sent += last.image_bytes
            if not precopy.should_continue(last, before):
                break
            before = last
        precopy.prepare_freeze()
        holders_before = pipe.scan_holders_before(pid)
        final = io.BytesIO()
        with Tracee.seize(pid) as tracee:
            laps = Laps(tracee.stopped_at or None)
            laps.lap("stop")
            reached("dump-seized")
            precopy.freeze()
            laps.lap("dirty scan")
            end, threads, _ = write_image(
                tracee,
                final,
                no_binary=no_binary,
                no_shared_libs=no_shared_libs,
                precopied=precopy,
                ghost_limit=ghost_limit,
                laps=laps,
                holders_before=holders_before,
                connections=connections,
            )
        laps.lap("release")
    finally:
        precopy.close()
    out.write(final.getbuffer())
    out.flush()
    reached("dump-written")
    if on_complete is not None:
        on_complete()
    return DumpResult(
        pid,
        threads,
        precopy.bytes_sent + len(final.getbuffer()),
        end.pages_stored,
        tracee.pause_ms,
        freeze_steps=laps.laps,
        injected=tracee.injected,
        rounds=precopy.rounds,
        tracking_pause_ms=precopy.pause_ms,
    )


class TrackingUnavailable(Unsupported):
    """The process's writes cannot be tracked (no userfaultfd for it: a seccomp filter, a
    kernel without asynchronous write-protection): `auto` falls back to the fork."""


def start_tracking(pid: int) -> Precopy:
    """Precopy.start with the least stopped: the signal actions (read at the freeze from
    these, asking again only those caught since) and the userfaultfd; its arming scan
    after the release (see the module's docstring)."""
    with Tracee.seize(pid) as tracee:
        with scratch_below_stack(tracee, procfs.read_maps(pid)) as scratch:
            actions = read_signal_actions(tracee, scratch)
        try:
            uffd = _userfaultfd_inside(tracee)
        except HijackError as exc:
            raise TrackingUnavailable(
                f"cannot track the writes of process {pid} for a snapshot by rounds: {exc}"
            ) from None
    precopy = Precopy(pid, armed_tracking(pid, uffd), tracee.pause_ms)
    precopy.signal_actions = actions
    return precopy
