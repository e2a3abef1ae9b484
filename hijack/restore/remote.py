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
        self._batch_data = False  # whether the batch being made holds data (put)

    @contextmanager
    def batched(self, tid: int | None = None) -> Iterator[None]:
        """The calls made meanwhile (call, try_call, whose results the caller must then not
        use) and the data they `put` go in one batch run at the end in thread `tid`: one
        stop for all (hijack.mutator.parasite). A failed `call` stops it: RestoreError.
        A long run of calls that put no data (a layout's unmaps) is cut into batches that
        fit the area."""
        if self._batch is not None:
            yield  # within an outer batch: joins it
            return
        if self._area is None or self._area.address != self.scratch + PUT_SIZE:
            self._area = Area(self.scratch + PUT_SIZE, PARASITE_SIZE, executable=True)
        self._batch, self._batch_tid, self._batch_data = Batch(self._area), tid, False
        try:
            yield
            batch = self._batch
        finally:
            self._batch = None
        self._run(batch, tid)

    def _run(self, batch: Batch, tid: int | None) -> None:
        area = batch.area
        if any(call.name == "rt_sigaction" for call in batch.calls):
            self._sigtrap_ignored = area.sigtrap_ignored = None  # the batch reads it, once
        elif batch.calls:
            if self._sigtrap_ignored is None:
                self._sigtrap_ignored = sigtrap_ignored(self.pid)
            area.sigtrap_ignored = self._sigtrap_ignored
        try:
            batch.run(self.tracee, tid=tid)
        except InjectionFailed as exc:
            raise RestoreError(
                f"{exc.syscall} while rebuilding the process failed: {os.strerror(exc.errno or 0)}",
                errno=exc.errno,
                syscall=exc.syscall,
            ) from None

    def _queue(self, name: str, args: tuple[int, ...], tid: int | None, *, check: bool) -> int:
        assert self._batch is not None
        if tid not in (None, self._batch_tid):
            raise RestoreError(f"{name} for thread {tid} in a batch of thread {self._batch_tid}")
        if len(self._batch.calls) >= BATCH_CALLS and not self._batch_data:
            # Full: run it, go on in a new one (no call's data can be lost with it).
            self._run(self._batch, self._batch_tid)
            self._batch = Batch(self._batch.area)
        self._batch.call(name, *args, check=check)
        return 0

    def call(self, name: str, *args: int, tid: int | None = None) -> int:
        """An injected call that must succeed; its failure is a RestoreError. Within
        `batched`, queued (returns 0)."""
        if self._batch is not None:
            return self._queue(name, args, tid, check=True)
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
            return self._queue(name, args, tid, check=False)
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
