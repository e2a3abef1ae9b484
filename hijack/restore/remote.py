"""The stub as the restorer drives it: injected calls and a scratch area for their arguments."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager

from hijack.errors import InjectionFailed, RestoreError
from hijack.mutator.parasite import (
    PARASITE_SIZE,
    PROT_READ_WRITE_EXEC,
    Area,
    Batch,
    Call,
    run_side_by_side,
    sigtrap_ignored,
)
from hijack.mutator.tracee import ThreadState, TracedThread, Tracee
from hijack.sys import memory
from hijack.sys import ptrace as pt

PAGE_SIZE = 4096
SCRATCH_SIZE = 64 * 1024  # paths, structs and arrays passed to injected calls
# Executable: its top PARASITE_SIZE bytes hold batches of calls (Stub.batched). The stub
# is ours (/bin/true at its exec trap); the area goes before the process starts.
SCRATCH_PROT = PROT_READ_WRITE_EXEC
PUT_SIZE = SCRATCH_SIZE - PARASITE_SIZE
# Calls a batch of calls that put no data is cut at: the area holds its code and ~250
# entries of 64 bytes.
BATCH_CALLS = 200


class Stub:
    """A traced process being built; calls are injected into one of its threads."""

    def __init__(self, pid: int, syscall_address: int) -> None:
        leader = TracedThread(
            pid,
            state=ThreadState.STOPPED,
            registers=pt.get_registers(pid),
            signal_mask=pt.get_signal_mask(pid),
        )
        self.pid = pid
        self.tracee = Tracee(pid, {pid: leader}, syscall_address, pid)
        self.scratch = 0
        self._scratch_used = 0
        self._area: Area | None = None
        self._batch: Batch | None = None
        self._batch_tid: int | None = None
        # Whether the stub ignores SIGTRAP (a batch cannot run where it does), as last
        # read: only an rt_sigaction changes it, and each batch read it again (~0.2 ms
        # of /proc under load; a move's copy runs one batch per thread, frozen).
        self._sigtrap_ignored: bool | None = None
        # Whether the batch being made holds data (put) or chained calls (queue): either
        # is lost if the batch is cut in two.
        self._batch_data = False
        self._parts: list[tuple[int, Batch]] | None = None  # side_by_side's, by thread

    @contextmanager
    def batched(self, tid: int | None = None) -> Iterator[None]:
        """The calls made meanwhile (call, try_call, whose results the caller must then not
        use) and the data they `put` go in one batch run at the end in thread `tid`: one
        stop for all (hijack.mutator.parasite). A failed `call` stops it: RestoreError.
        A long run of calls that put no data (a layout's unmaps) is cut into batches that
        fit the area. Within `side_by_side`, the batch is the thread's part, run with the
        others'."""
        if self._batch is not None:
            yield  # within an outer batch: joins it
            return
        in_parts = self._parts is not None
        first = self._part(tid) if in_parts else Batch(self._batch_area())
        self._batch, self._batch_tid, self._batch_data = first, tid, False
        try:
            yield
            batch = self._batch  # a new one where _queue cut a long run
        finally:
            self._batch = None
        if not in_parts:
            self._run([(tid or self.pid, batch)])

    @contextmanager
    def side_by_side(self) -> Iterator[None]:
        """Each `batched(tid)` block meanwhile queues its thread's calls in a part of the
        area of that thread's own (blocks of one thread one after the other join one part),
        and the parts run at the end side by side (parasite.run_side_by_side): one trip
        through the scheduler for every thread rather than one each. Calls made outside a
        `batched` block run at once, as always."""
        if self._parts is not None:
            yield
            return
        self._parts = []
        try:
            yield
            parts = self._parts
        finally:
            self._parts = None
        self._run(parts)

    def _batch_area(self) -> Area:
        if self._area is None or self._area.address != self.scratch + PUT_SIZE:
            self._area = Area(self.scratch + PUT_SIZE, PARASITE_SIZE, executable=True)
        return self._area

    def _part(self, tid: int | None) -> Batch:
        """Thread `tid`'s part in side_by_side: its last one, or a new one after the others;
        where less room is left than twice the largest part so far, those run first (the
        threads' parts are alike in size: a part found too big at its run fails it)."""
        parts = self._parts
        assert parts is not None
        tid = tid or self.pid
        if parts and parts[-1][0] == tid:
            return parts[-1][1]
        area = self._batch_area()
        start = parts[-1][1].end if parts else 0
        if parts and area.size - start < 2 * max(batch.size for _, batch in parts):
            self._run(parts)
            parts.clear()
            start = 0
        batch = Batch(area, start)
        parts.append((tid, batch))
        return batch

    def _run(self, batches: list[tuple[int, Batch]]) -> None:
        calls = [call for _, batch in batches for call in batch.calls]
        if calls:
            area = batches[0][1].area
            if any(call.name == "rt_sigaction" for call in calls):
                self._sigtrap_ignored = area.sigtrap_ignored = None  # the batch reads it, once
            else:
                if self._sigtrap_ignored is None:
                    self._sigtrap_ignored = sigtrap_ignored(self.pid)
                area.sigtrap_ignored = self._sigtrap_ignored
        try:
            run_side_by_side(self.tracee, batches)
        except InjectionFailed as exc:
            if exc.syscall is None:  # not a call's failure: the batch's own (too big, a stop)
                raise RestoreError(f"while rebuilding the process: {exc}") from None
            failed = next((c for c in calls if c.check and c.failed and c.failure), None)
            if failed is not None:  # its caller's words for it (queue(failure=))
                raise RestoreError(
                    f"{failed.failure}: {os.strerror(exc.errno or 0)}",
                    errno=exc.errno,
                    syscall=exc.syscall,
                ) from None
            raise RestoreError(
                f"{exc.syscall} while rebuilding the process failed: {os.strerror(exc.errno or 0)}",
                errno=exc.errno,
                syscall=exc.syscall,
            ) from None

    def _queue(
        self,
        name: str,
        args: tuple[int | Call, ...],
        tid: int | None,
        *,
        check: bool,
        failure: str = "",
    ) -> Call:
        assert self._batch is not None
        if tid not in (None, self._batch_tid):
            raise RestoreError(f"{name} for thread {tid} in a batch of thread {self._batch_tid}")
        if len(self._batch.calls) >= BATCH_CALLS and not self._batch_data and self._parts is None:
            # Full: run it, go on in a new one (no call's data can be lost with it). Not a
            # thread's part in side_by_side: a few calls each, the others' parts after it.
            self._run([(self._batch_tid or self.pid, self._batch)])
            self._batch = Batch(self._batch.area)
        return self._batch.call(name, *args, check=check, failure=failure)

    def batch_room(self) -> int | None:
        """Bytes of the area the batch being made leaves free (its data and table are in
        the area when it runs); None outside a batch."""
        if self._batch is None:
            return None
        return self._batch.area.size - self._batch.end

    def queue(self, name: str, *args: int | Call, check: bool = True, failure: str = "") -> Call:
        """Within `batched`: call `name`, run with the batch; its result (Call.result) is
        there once the batch ran, and a later call of the batch may take it as an argument,
        taken inside the stub (`openat` then `dup3` of what it returned). A checked call's
        failure stops the batch: RestoreError, `failure` its words ("cannot reopen ..."),
        else the call's name."""
        if self._batch is None:
            raise RestoreError(f"{name} queued outside a batch of calls")
        queued = self._queue(name, args, None, check=check, failure=failure)
        self._batch_data = True  # chained calls must stay in one batch
        return queued

    def call(self, name: str, *args: int, tid: int | None = None) -> int:
        """An injected call that must succeed; its failure is a RestoreError. Within
        `batched`, queued (returns 0)."""
        if self._batch is not None:
            self._queue(name, args, tid, check=True)
            return 0
        if name == "rt_sigaction":
            self._sigtrap_ignored = None
        result = self.tracee.syscall(name, *args, tid=tid)
        if -4096 < result < 0:
            raise RestoreError(
                f"{name} while rebuilding the process failed: {os.strerror(-result)}",
                errno=-result,
                syscall=name,
            )
        return result

    def try_call(self, name: str, *args: int, tid: int | None = None) -> int:
        """An injected call whose failure the caller handles: the raw result. Within
        `batched`, queued, its failure let pass (returns 0)."""
        if self._batch is not None:
            self._queue(name, args, tid, check=False)
            return 0
        if name == "rt_sigaction":
            self._sigtrap_ignored = None
        return self.tracee.syscall(name, *args, tid=tid)

    # -- the scratch area: a bump allocator, reset between uses ----------------

    def use_scratch(self, address: int) -> None:
        self.scratch = address
        self._scratch_used = 0

    def reset_scratch(self) -> None:
        if self._batch is None:  # a batch's data all stay until it runs
            self._scratch_used = 0

    def put(self, data: bytes) -> int:
        """Copy `data` into the scratch area; return its address in the stub."""
        if self._batch is not None:
            self._batch_data = True
            return self._batch.put(data)
        size = (len(data) + 15) // 16 * 16
        if not self.scratch or self._scratch_used + size > PUT_SIZE:
            raise RestoreError(f"scratch area exhausted ({len(data)} bytes asked)")
        address = self.scratch + self._scratch_used
        memory.write(self.pid, address, data)
        self._scratch_used += size
        return address

    def put_string(self, text: str) -> int:
        return self.put(os.fsencode(text) + b"\0")

    def put_u64s(self, *values: int) -> int:
        return self.put(struct.pack(f"<{len(values)}Q", *values))
