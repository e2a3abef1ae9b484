"""Pages that go from a stopped process to its image without passing through hijack.

The process is made to open a pipe and to vmsplice(2) a run of its own pages
into it (injected calls): the pipe then holds references to those pages, not
copies. hijack splice(2)s them from its own copy of the pipe's read end to the
image's descriptor: a file copies them into its page cache (the only copy),
/dev/null drops them, a pipe or a socket takes the pages themselves. The
writer (hijack.image.codec.write_spliced_pages) never sees the bytes: they go
in SPLICED_PAGES sections, whose CRC covers the address, not the data
(docs/crf.md), and zero pages are stored as any other.

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
import io
import os
import stat
import struct
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import BinaryIO

from hijack.errors import HijackError
from hijack.mutator.tracee import (
    Tracee,
    put_back_thread,
    scratch_page,
    signal_pending,
    signals_deferred,
)
from hijack.sys import memory
from hijack.sys import pipe as pipes_
from hijack.sys.pidfd import copy_fd
from hijack.testpoint import reached

PAGE_SIZE = 4096
SPLICE_F_NONBLOCK = 2  # a full pipe returns what it took instead of blocking the process
O_CLOEXEC = 0o2000000
_IOVEC = struct.Struct("<QQ")
_FDS = struct.Struct("<ii")
# One PAGES section's worth per vmsplice where this user may have such a pipe (above
# fs.pipe-max-size needs CAP_SYS_RESOURCE), else the default limit, which anyone may ask.
PIPE_SIZES = (8 * 1024 * 1024, 1024 * 1024)
_DEV_NULL = os.makedev(1, 3)


@dataclass
class _Pipe:
    write_end: int  # the process's
    read_end: int  # ours
    holds: tuple[int, int] = (0, 0)  # address and length of the pages it holds


class PageSplicer:
    """Two pipes from a stopped process's memory to an image's descriptor, in turns: while
    one pipe's pages are spliced to the image (by a thread of ours), the process puts
    the next pages in the other (ptrace is this thread's)."""

    def __init__(
        self, tracee: Tracee, iovec: int, pipes: list[_Pipe], out: int, worker: ThreadPoolExecutor
    ):
        self._tracee = tracee
        self._iovec = iovec  # a scratch page in the process, for vmsplice's iovec
        self._pipes = pipes  # the one being filled or put first
        self._out = out
        self._worker = worker
        self._wanted = (0, 0)  # what the last fill() was asked for beyond what it took
        self._pending: bool | None = None  # a signal waited for the injected thread
        self._spliced = False  # a section's pages went to the image already
        self.capacity = min(pipes_.pipe_size(pipe.read_end) for pipe in pipes)

    def fill(self, address: int, length: int) -> int:
        """Have the process put its pages at [address, address + length) in a pipe, as
        many as it holds; return how many bytes it took (0: the pages refuse, e.g. a
        mapping vmsplice cannot reach: read them another way)."""
        pipe = self._pipes[0]
        held_at, taken = pipe.holds
        if not taken or held_at != address:
            taken = self._vmsplice(pipe, address, length)
        self._wanted = (address + taken, length - taken)
        return taken

    def put(self, length: int) -> int:
        """Move the `length` bytes the last fill() took to the image; return `length`.
        Meanwhile the process puts the pages after them in the other pipe."""
        pipe, other = self._pipes
        pipe.holds = (0, 0)
        moving = self._worker.submit(pipes_.splice_out, pipe.read_end, self._out, length)
        try:
            address, left = self._wanted
            if left:
                other.holds = (address, self._vmsplice(other, address, left))
        finally:
            moved = moving.result()  # never more than one splice at a time: the order
        self._pipes.reverse()
        if not self._spliced:
            self._spliced = True
            reached("dump-splicing")  # the next pages wait in the other pipe
        return moved

    def _vmsplice(self, pipe: _Pipe, address: int, length: int) -> int:
        iovec = _IOVEC.pack(address, min(length, self.capacity))
        memory.write(self._tracee.pid, self._iovec, iovec)
        tracee = self._tracee
        taken = tracee.syscall("vmsplice", pipe.write_end, self._iovec, 1, SPLICE_F_NONBLOCK)
        # Its registers as found between two calls, as after the dump's other injected
        # calls: a hijack killed while pages are spliced leaves it correct (only two
        # descriptors and a page more, closed and unmapped with the process's end).
        # Whether a signal waits is read once: at each call, that doubled the CPU spent.
        thread = tracee.threads[tracee.injection_tid]
        if self._pending is None:
            self._pending = signal_pending(thread.tid, thread.signal_mask)
        with signals_deferred():
            put_back_thread(thread, self._pending)
        if taken < 0:
            return 0
        if taken % PAGE_SIZE:
            raise HijackError(
                f"vmsplice in process {self._tracee.pid} took {taken} bytes at {address:#x},"
                " not whole pages",
                pid=self._tracee.pid,
            )
        return taken


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
            iovec = stack.enter_context(scratch_page(tracee))
            pair = [_Pipe(*stack.enter_context(_process_pipe(tracee, iovec))) for _ in "ab"]
            worker = stack.enter_context(ThreadPoolExecutor(1, "splice"))
            splicer = PageSplicer(tracee, iovec, pair, fd, worker)
        except HijackError:
            splicer = None  # as before: read and written
        yield splicer


@contextlib.contextmanager
def _process_pipe(tracee: Tracee, scratch: int) -> Iterator[tuple[int, int]]:
    """A pipe the process opens (close-on-exec): its write end there, and our copy of its
    read end, as big as this user may have it. Both of its ends are closed at the end."""
    result = tracee.syscall("pipe2", scratch, O_CLOEXEC)
    if result < 0:
        raise HijackError(
            f"pipe2 in process {tracee.pid}: {os.strerror(-result)}",
            pid=tracee.pid,
            errno=-result,
        )
    read_end, write_end = _FDS.unpack(memory.read(tracee.pid, scratch, _FDS.size))
    try:
        ours = copy_fd(tracee.pid, read_end)
        try:
            for size in PIPE_SIZES:
                with contextlib.suppress(HijackError):
                    pipes_.set_pipe_size(ours, size)
                    break
            yield write_end, ours
        finally:
            os.close(ours)
    finally:
        tracee.syscall("close", read_end)
        tracee.syscall("close", write_end)
