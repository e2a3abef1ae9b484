"""Pages that go from a stopped process to its image without passing through hijack.

The process is made to open a pipe and to vmsplice(2) a run of its own pages
into it (injected calls): the pipe then holds references to those pages, not
copies. hijack splice(2)s them from its own copy of the pipe's read end to the
image's descriptor: a file copies them into its page cache (the only copy),
/dev/null drops them, a pipe or a socket takes the pages themselves. The
writer (hijack.image.codec.write_spliced_pages) never sees the bytes: they go
in SPLICED_PAGES sections, whose CRC covers the address, not the data
(docs/crf.md), and zero pages are stored as any other.

The process puts a section's worth of pages (8 MiB) in the pipes of one group by one
batch of injected calls (hijack.mutator.parasite: one stop, however many pipes: a pipe
holds at most 1 MiB where hijack lacks CAP_SYS_RESOURCE, and one injected call costs
two stops), while a thread of ours splices the other group's to the image. A regular
file's writeback is started as its pages come (sync_file_range): its sync at the end
finds most of it on the disk already.

The bytes a reference points at are the image's only while no one writes to
the page: the process is stopped until a file has taken its copy. A pipe or a
socket keeps the references after the dump, so they are used only when the
pages' owner never runs again (`pipes`): a snapshot's copy, which never runs
(a write of the process it was forked from copies the page first: the copy
and the pipe hold it too).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import io
import os
import stat
import struct
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import BinaryIO

from hijack.errors import HijackError
from hijack.mutator.parasite import Batch, Call, parasite_area, sigtrap_ignored
from hijack.mutator.tracee import (
    Tracee,
    put_back_thread,
    signal_pending,
    signals_deferred,
)
from hijack.sys import pipe as pipes_
from hijack.sys import writeback
from hijack.sys.pidfd import copy_fd
from hijack.testpoint import reached

PAGE_SIZE = 4096
SPLICE_F_NONBLOCK = 2  # a full pipe returns what it took instead of blocking the process
O_CLOEXEC = 0o2000000
_IOVEC = struct.Struct("<QQ")
_FDS = struct.Struct("<ii")
# The most pages one fill takes: one PAGES section's worth (codec.write_spliced_pages).
GROUP_BYTES = 8 * 1024 * 1024
# One group's worth per pipe where this user may have such a pipe (above
# fs.pipe-max-size needs CAP_SYS_RESOURCE), else the default limit, which anyone may ask.
PIPE_SIZES = (GROUP_BYTES, 1024 * 1024)
# At most this many pipes a group: where a pipe stays small (64 KiB, say), a group holds
# less, rather than a batch too big for its area.
GROUP_PIPES = 8
_DEV_NULL = os.makedev(1, 3)


@dataclass
class _Pipe:
    write_end: int  # the process's
    read_end: int  # ours
    holds: int = 0  # bytes of pages it holds


@dataclass
class _Group:
    """Pipes the process fills in one batch, each with the pages after the one before."""

    pipes: list[_Pipe]
    held_at: int = 0  # the address of the first pipe's pages
    held: int = 0  # bytes from held_at on, without a gap, that the pipes hold


class PageSplicer:
    """Two groups of pipes from a stopped process's memory to an image's descriptor, in
    turns: while one group's pages are spliced to the image (by a thread of ours), the
    process puts the next pages in the other (ptrace is this thread's)."""

    def __init__(
        self,
        tracee: Tracee,
        batches: Callable[[], Batch],
        groups: list[_Group],
        out: int,
        worker: ThreadPoolExecutor,
    ):
        self._tracee = tracee
        self._batches = batches  # a new batch of injected calls, in the process's area
        self._groups = groups  # the one being filled or put first
        self._out = out
        self._worker = worker
        self._wanted = (0, 0)  # what the last fill() was asked for beyond what it took
        self._pending: bool | None = None  # a signal waited for the injected thread
        self._spliced = False  # a section's pages went to the image already
        self.pipe_capacity = min(pipes_.pipe_size(p.read_end) for g in groups for p in g.pipes)
        self.capacity = self.pipe_capacity * min(len(g.pipes) for g in groups)
        # A regular file: its writeback started as pages come (from where they start).
        self._writeback_from: int | None = None
        if stat.S_ISREG(os.fstat(out).st_mode):
            self._writeback_from = os.lseek(out, 0, os.SEEK_CUR)

    def fill(self, address: int, length: int) -> int:
        """Have the process put its pages at [address, address + length) in pipes, as
        many as one group holds; return how many bytes it took (0: the pages refuse, e.g.
        a mapping vmsplice cannot reach: read them another way)."""
        group = self._groups[0]
        if not group.held or group.held_at != address:
            self._vmsplice(group, address, length)
        self._wanted = (address + group.held, length - group.held)
        return group.held

    def put(self, length: int) -> int:
        """Move the `length` bytes the last fill() took to the image; return `length`.
        Meanwhile the process puts the pages after them in the other group."""
        group, other = self._groups
        moving = self._worker.submit(self._splice_out, group, length)
        try:
            address, left = self._wanted
            if left:
                self._vmsplice(other, address, left)
        finally:
            moved = moving.result()  # never more than one splice at a time: the order
        self._groups.reverse()
        if not self._spliced:
            self._spliced = True
            reached("dump-splicing")  # the next pages wait in the other group
        return moved

    def _splice_out(self, group: _Group, length: int) -> int:
        """The worker's: `length` bytes of the group's pipes, in order, to the image."""
        if length != group.held:
            raise HijackError(f"asked to splice {length} bytes of pages; {group.held} are held")
        for pipe in group.pipes:
            if pipe.holds:
                pipes_.splice_out(pipe.read_end, self._out, pipe.holds)
                pipe.holds = 0
        group.held = 0
        if self._writeback_from is not None:
            written = os.lseek(self._out, 0, os.SEEK_CUR)
            writeback.start_writeback(
                self._out, self._writeback_from, written - self._writeback_from
            )
            self._writeback_from = written
        return length

    def _vmsplice(self, group: _Group, address: int, length: int) -> None:
        """Fill `group` from `address` in one batch: each pipe the pages after the one
        before's, up to `length`."""
        self._discard(group)
        batch = self._batches()
        calls: list[tuple[_Pipe, Call, int]] = []
        at, left = address, length
        for pipe in group.pipes:
            if left <= 0:
                break
            piece = min(left, self.pipe_capacity)
            iovec = batch.put(_IOVEC.pack(at, piece))
            call = batch.call("vmsplice", pipe.write_end, iovec, 1, SPLICE_F_NONBLOCK, check=False)
            calls.append((pipe, call, piece))
            at, left = at + piece, left - piece
        tracee = self._tracee
        batch.run(tracee)
        # Its registers as found between two batches, as after the dump's other injected
        # calls: a hijack killed while pages are spliced leaves it correct (only its pipes'
        # descriptors and an area more, closed and unmapped with the process's end).
        # Whether a signal waits is read once: at each call, that doubled the CPU spent.
        thread = tracee.threads[tracee.injection_tid]
        if self._pending is None:
            self._pending = signal_pending(thread.tid, thread.signal_mask)
        with signals_deferred():
            put_back_thread(thread, self._pending)
        group.held_at, group.held = address, 0
        whole = True  # no gap yet: a pipe's pages follow the one before's
        for pipe, call, piece in calls:
            taken = call.result if call.result is not None and not call.failed else 0
            if taken % PAGE_SIZE:
                raise HijackError(
                    f"vmsplice in process {tracee.pid} took {taken} bytes, not whole pages",
                    pid=tracee.pid,
                )
            pipe.holds = taken
            if whole:
                group.held += taken
                whole = taken == piece
        self._discard(group, keep=group.held)

    def _discard(self, group: _Group, keep: int = 0) -> None:
        """Empty the group's pipes but their first `keep` bytes (pages after a gap: a
        pipe that took less than asked, its followers' pages are not the ones after)."""
        for pipe in group.pipes:
            kept = min(keep, pipe.holds)
            keep -= kept
            if pipe.holds > kept:
                drop = pipe.holds - kept
                if kept:  # cannot be: a short pipe is the group's last kept one
                    raise HijackError("pages to drop behind pages kept in one pipe")
                with open(os.devnull, "wb") as null:
                    pipes_.splice_out(pipe.read_end, null.fileno(), drop)
                pipe.holds = 0


def spliceable(out: BinaryIO, *, pipes: bool) -> int | None:
    """The descriptor of `out` if splice(2) can write an image to it safely: a regular
    file not in append mode, /dev/null, and with `pipes` a blocking pipe or socket."""
    try:
        fd = out.fileno()
        status = os.fstat(fd)
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    except (OSError, ValueError, io.UnsupportedOperation):
        return None
    mode = status.st_mode
    if stat.S_ISREG(mode):
        return None if flags & os.O_APPEND else fd  # splice refuses O_APPEND (EINVAL)
    if stat.S_ISCHR(mode) and status.st_rdev == _DEV_NULL:
        return fd
    if pipes and (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)) and not flags & os.O_NONBLOCK:
        return fd
    return None


@contextlib.contextmanager
def page_splicer(tracee: Tracee, out: BinaryIO, *, pipes: bool) -> Iterator[PageSplicer | None]:
    """A PageSplicer from the stopped `tracee` to `out`, or None where none can be had
    (`out` takes no splice, the process may open no more descriptors): the pages are then
    read and written as before. `pipes`: the pages' owner never runs again (see above).
    Injects calls: the registers are put back at the end."""
    fd = spliceable(out, pipes=pipes)
    if fd is None:
        yield None
        return
    with contextlib.ExitStack() as stack:
        stack.callback(tracee.put_back)
        try:
            area = stack.enter_context(parasite_area(tracee))
            # Read once: only our batches run in it until the end, none touching SIGTRAP.
            area.sigtrap_ignored = sigtrap_ignored(tracee.pid)
            batches = functools.partial(Batch, area)
            made = stack.enter_context(_process_pipes(tracee, batches))
            per_group = max(1, len(made) // 2)
            groups = [_Group(made[:per_group]), _Group(made[per_group : 2 * per_group])]
            if not groups[1].pipes:
                raise HijackError(f"process {tracee.pid} could open one pipe only")
            worker = stack.enter_context(ThreadPoolExecutor(1, "splice"))
            splicer = PageSplicer(tracee, batches, groups, fd, worker)
        except HijackError:
            splicer = None  # as before: read and written
        yield splicer


@contextlib.contextmanager
def _process_pipes(tracee: Tracee, batches: Callable[[], Batch]) -> Iterator[list[_Pipe]]:
    """Pipes the process opens (close-on-exec), as many as two groups want: their write
    ends there, our copies of their read ends (the process's closed), each as big as this
    user may have it. Every end is closed at the end; fewer where it may open fewer."""
    made: list[_Pipe] = []
    try:
        first = _open_pipes(tracee, batches, 1)
        made += first
        per_group = min(GROUP_PIPES, max(1, GROUP_BYTES // pipes_.pipe_size(first[0].read_end)))
        made += _open_pipes(tracee, batches, 2 * per_group - 1)
        yield made
    finally:
        with contextlib.suppress(HijackError):
            closing = batches()
            for pipe in made:
                closing.call("close", pipe.write_end, check=False)
                os.close(pipe.read_end)
            closing.run(tracee)


def _open_pipes(tracee: Tracee, batches: Callable[[], Batch], count: int) -> list[_Pipe]:
    """`count` pipes opened in the process by one batch (as many as it could open)."""
    opening = batches()
    ends = [opening.buffer(_FDS.size) for _ in range(count)]
    calls = [opening.call("pipe2", end, O_CLOEXEC, check=False) for end in ends]
    opening.run(tracee)
    made: list[_Pipe] = []
    closing = batches()
    try:
        for end, call in zip(ends, calls, strict=True):
            if call.failed or call.result is None:
                continue
            read_end, write_end = _FDS.unpack(opening.read(end, _FDS.size))
            closing.call("close", read_end, check=False)
            try:
                ours = copy_fd(tracee.pid, read_end)
            except HijackError:
                closing.call("close", write_end, check=False)
                continue
            for size in PIPE_SIZES:
                with contextlib.suppress(HijackError):
                    pipes_.set_pipe_size(ours, size)
                    break
            made.append(_Pipe(write_end, ours))
    finally:
        closing.run(tracee)
    if not made:
        failed = next((c for c in calls if c.failed), None)
        reason = os.strerror(-failed.result) if failed and failed.result else "none opened"
        raise HijackError(f"pipe2 in process {tracee.pid}: {reason}", pid=tracee.pid)
    return made
