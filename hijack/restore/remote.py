"""The stub as the restorer drives it: injected calls and a scratch area for their arguments."""

from __future__ import annotations

import os
import struct

from hijack.errors import RestoreError
from hijack.mutator.tracee import ThreadState, TracedThread, Tracee
from hijack.sys import memory
from hijack.sys import ptrace as pt

PAGE_SIZE = 4096
SCRATCH_SIZE = 64 * 1024  # paths, structs and arrays passed to injected calls


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

    def call(self, name: str, *args: int, tid: int | None = None) -> int:
        """An injected call that must succeed; its failure is a RestoreError."""
        result = self.tracee.syscall(name, *args, tid=tid)
        if -4096 < result < 0:
            raise RestoreError(
                f"{name} while rebuilding the process failed: {os.strerror(-result)}",
                errno=-result,
                syscall=name,
            )
        return result

    def try_call(self, name: str, *args: int, tid: int | None = None) -> int:
        """An injected call whose failure the caller handles: the raw result."""
        return self.tracee.syscall(name, *args, tid=tid)

    # -- the scratch area: a bump allocator, reset between uses ----------------

    def use_scratch(self, address: int) -> None:
        self.scratch = address
        self._scratch_used = 0

    def reset_scratch(self) -> None:
        self._scratch_used = 0

    def put(self, data: bytes) -> int:
        """Copy `data` into the scratch area; return its address in the stub."""
        size = (len(data) + 15) // 16 * 16
        if not self.scratch or self._scratch_used + size > SCRATCH_SIZE:
            raise RestoreError(f"scratch area exhausted ({len(data)} bytes asked)")
        address = self.scratch + self._scratch_used
        memory.write(self.pid, address, data)
        self._scratch_used += size
        return address

    def put_string(self, text: str) -> int:
        return self.put(os.fsencode(text) + b"\0")

    def put_u64s(self, *values: int) -> int:
        return self.put(struct.pack(f"<{len(values)}Q", *values))
