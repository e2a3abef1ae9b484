"""The receiving side of pre-copy: a stub built from a move's rounds, waiting for its final image.

Round 0 (docs/crf.md §7a) spawns the stub and builds its address space as a
restore would; each later round writes the pages written since into it. The
final image is then restored into this very stub (restore(..., prebuilt=)),
which keeps what PRECOPIED segments hold and rebuilds the rest. The stub
inherited none of the process's descriptors (they are decided only once the
process is frozen): the final restore hands them over by injected
pidfd_getfd. Anything that goes wrong kills the stub, never a half-built
process that runs.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO

from hijack.errors import ImageError, RestoreError
from hijack.image import records as rec
from hijack.image.codec import read_round
from hijack.mutator.parasite import Call
from hijack.mutator.tracee import find_syscall_instruction
from hijack.restore.address_space import AddressSpace
from hijack.restore.remote import Stub
from hijack.sys import procfs
from hijack.sys.stub import kill_stub, spawn_stub

MADV_DONTNEED = 4
PR_SET_MM, PR_SET_MM_MAP = 35, 14
# struct prctl_mm_map: start_code .. env_end (11), auxv, auxv_size, exe_fd (-1: kept)
PRCTL_MM_MAP = struct.Struct("<12QIi")
O_RDONLY, O_CLOEXEC = 0, 0o2000000
AT_FDCWD = -100
HAND_OVER_BATCH = 128  # pidfd_getfd calls a batch (its area holds ~250 calls)


@dataclass(frozen=True)
class RoundReceived:
    number: int
    pages: int


class Prebuilt:
    """A stub and its address space, as far as the rounds received so far built them."""

    def __init__(
        self,
        admit: Callable[[rec.Segments], None] | None = None,
        mount_namespace: int | None = None,
    ) -> None:
        self.admit = admit  # refuses (raising) a layout this node must not build
        self.mount_namespace = mount_namespace  # the stub's (hijack.sys.stub.spawn_stub)
        self.stub: Stub | None = None
        self.space: AddressSpace | None = None
        self.rounds = 0
        self.taken = False  # the final restore owns the stub now
        self.handed: dict[int, int] = {}  # hand_over_early's: image number -> the stub's
        self.exe = ""  # the file the stub's exe link names, set_exe's
        # restorer.clone_ahead's: the process's tids (but its leader's) -> the stub's threads
        self.cloned: dict[int, int] = {}

    def receive_round(self, stream: BinaryIO) -> RoundReceived:
        records = read_round(stream)
        opening = next(records)
        segments = next(records)
        assert isinstance(opening, rec.Round) and isinstance(segments, rec.Segments)
        if opening.number != self.rounds:
            raise ImageError(f"pre-copy round {opening.number} came where {self.rounds} was due")
        if self.space is None:
            if self.admit is not None:
                self.admit(segments)
            pid = spawn_stub(opening.pid, self.mount_namespace)
            try:
                self.stub = Stub(pid, find_syscall_instruction(pid))
                self.space = AddressSpace(self.stub, segments.segments)
            except BaseException:
                kill_stub(pid)
                raise
            self.space.build()
        pages = 0
        for record in records:
            if isinstance(record, rec.Pages):
                self.space.write_pages(record)
                pages += len(record.data) // rec.PAGE_SIZE
        self.rounds += 1
        return RoundReceived(opening.number, pages)

    def drop(self, runs: list[tuple[int, int]]) -> None:
        """Drop the pages of `runs` (MADV_DONTNEED) from the stub's private anonymous memory:
        written since they were sent, they will come again (post-copy)."""
        # (Here, not at the top: the mover's module imports the dump, which imports
        # the restorer, which imports this one.)
        from hijack.mutator.precopy import clip_runs

        if self.space is None:
            raise RestoreError("pages to drop came before any pre-copy round")
        stub = self._stub()
        for segment in self.space.segments:
            if segment.inode or segment.shared:
                continue  # a file's page dropped would read as the file's
            for start, end in clip_runs(runs, segment.start, segment.end):
                stub.call("madvise", start, end - start, MADV_DONTNEED)

    def set_exe(self, path: str) -> None:
        """Point the stub's exe link (/proc/PID/exe) at `path`, the process's executable as
        the move's request names it, after round 0 (set_exe); the final restore then
        leaves the link as it is if the image names the same file (restorer._set_mm_map)."""
        if set_exe(self._stub(), path):
            self.exe = path

    def hand_over_early(self, provided: dict[int, int]) -> None:
        """hand_over() before the final image (a move's relays, made as its message came);
        the final restore's hand_over() then gives only the others."""
        self.handed.update(self.hand_over(provided))

    def hand_over(self, provided: dict[int, int]) -> dict[int, int]:
        """Copies in the stub of our descriptors `provided` (image number -> ours), but
        those handed over early: image number -> the stub's number."""
        stub = self._stub()
        provided = {number: fd for number, fd in provided.items() if number not in self.handed}
        if not provided:
            return dict(self.handed)
        # In batches of chained calls (Stub.queue): one stop each, not two a call (a move's
        # relays, while its process is frozen). A failure kills the stub: nothing leaks.
        pending = list(provided.items())
        given: dict[int, int] = {}
        handle: int | Call = 0
        while pending:
            part, pending = pending[:HAND_OVER_BATCH], pending[HAND_OVER_BATCH:]
            with stub.batched():
                if not given:
                    handle = stub.queue("pidfd_open", os.getpid(), 0)
                taken = {number: stub.queue("pidfd_getfd", handle, fd, 0) for number, fd in part}
                if not pending:
                    stub.queue("close", handle)
            if isinstance(handle, Call):
                assert handle.result is not None
                handle = handle.result
            for number, call in taken.items():
                assert call.result is not None
                given[number] = call.result
        return {**self.handed, **given}

    def _stub(self) -> Stub:
        if self.stub is None:
            raise RestoreError("the move's final image came before any pre-copy round")
        return self.stub

    def discard(self) -> None:
        """Kill the stub, unless the final restore has taken it."""
        if self.space is not None:
            self.space.close()
        if self.stub is not None and not self.taken:
            kill_stub(self.stub.pid)


def set_exe(stub: Stub, path: str) -> bool:
    """Point the stub's exe link (/proc/PID/exe) at `path`, the process's executable as
    the move names it: PR_SET_MM_MAP with the stub's own fields and the file opened in the
    stub, once its round 0 is built (the stub's own program, no longer mapped, may be
    replaced then: never once the process's is mapped). The final restore then leaves
    the link as it is if the image names the same file (two injected calls fewer in the
    freeze, restorer._set_mm_map), and opens it itself otherwise (its open fails for a
    file gone since, as it would have). Best effort: False if the link is not set."""
    stub.reset_scratch()
    opened = stub.try_call("openat", AT_FDCWD, stub.put_string(path), O_RDONLY | O_CLOEXEC)
    if opened < 0:
        return False
    try:
        own = procfs.read_stat(stub.pid)
        fields = PRCTL_MM_MAP.pack(
            own.start_code,
            own.end_code,
            own.start_data,
            own.end_data,
            own.start_brk,
            own.start_brk,  # its break: the final restore sets the process's
            own.start_stack,
            own.arg_start,
            own.arg_end,
            own.env_start,
            own.env_end,
            0,  # its auxv as it is
            0,
            opened,
        )
        done = stub.try_call("prctl", PR_SET_MM, PR_SET_MM_MAP, stub.put(fields), len(fields), 0)
    finally:
        stub.try_call("close", opened)
    return done == 0
