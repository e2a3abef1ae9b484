"""Seccomp: strict mode and filter chains, per thread, shared as they were.

Read at dump from outside: /proc/PID/task/TID/status says each thread's mode
and how many filters it has, PTRACE_SECCOMP_GET_FILTER and
PTRACE_SECCOMP_GET_METADATA give each filter's program and flags.

A filter also judges the calls injected into its thread, so a restore installs
the chains after every other injected call, as the very last thing before the
registers are set. Its program cannot go in the scratch page (unmapped by
then: removing it would be a call the filter judges): it is written below the
thread's saved stack pointer, under the red zone, where the program keeps
nothing. When every thread had the same chain, it is installed once with
SECCOMP_FILTER_FLAG_TSYNC, so the threads share it as before.
"""

from __future__ import annotations

import struct

from hijack.errors import RestoreError
from hijack.image import records as rec
from hijack.mutator.tracee import Tracee
from hijack.restore.remote import Stub
from hijack.sys import memory, procfs
from hijack.sys import ptrace as pt

SECCOMP_MODE_STRICT, SECCOMP_MODE_FILTER = 1, 2
SECCOMP_SET_MODE_FILTER = 1
SECCOMP_FILTER_FLAG_TSYNC = 1
PR_SET_SECCOMP = 22
RED_ZONE = 128  # bytes below the stack pointer the x86_64 ABI lets a function use
SOCK_FPROG = struct.Struct("<H6xQ")  # struct sock_fprog: len, then the filter's address


def read_seccomp(
    tracee: Tracee, modes: dict[int, tuple[int, int]] | None = None
) -> tuple[rec.ThreadSeccomp, ...]:
    """Each thread's seccomp state; `modes`: seccomp_modes of its threads, if read already.
    The filters' programs are asked by ptrace (from the tracing thread, the process stopped)."""
    if modes is None:
        modes = seccomp_modes(tracee.pid, tracee.thread_ids)
    threads = []
    for tid, (mode, count) in modes.items():
        if not mode:
            continue
        # Index 0 is the oldest filter (seen here; the kernel walks back from the newest).
        filters = [
            rec.SeccompFilter(flags=flags, program=program)
            for flags, program in (pt.get_seccomp_filter(tid, index) for index in range(count))
        ]
        threads.append(rec.ThreadSeccomp(tid=tid, mode=mode, filters=tuple(filters)))
    return tuple(threads)


def seccomp_modes(pid: int, thread_ids: list[int]) -> dict[int, tuple[int, int]]:
    """Each thread's seccomp mode and how many filters it has (its status), by tid: read
    from outside, in any thread of ours."""
    modes = {}
    for tid in thread_ids:
        status = procfs.read_status(pid, tid)
        modes[tid] = (status.seccomp, status.seccomp_filters)
    return modes


def install_seccomp(
    stub: Stub,
    settings: rec.ProcessSettings,
    threads: list[rec.Thread],
    segments: rec.Segments,
    thread_ids: dict[int, int],
) -> None:
    """Put every thread's seccomp state back. Must be the last injected calls."""
    if not settings.seccomp:
        return
    saved = {thread.tid: thread for thread in threads}
    chains = {state.filters for state in settings.seccomp}
    shared = (
        len(settings.seccomp) == len(threads)
        and len(chains) == 1
        and all(state.mode == SECCOMP_MODE_FILTER for state in settings.seccomp)
        and len(threads) > 1
    )
    states = settings.seccomp[:1] if shared else settings.seccomp
    for state in states:
        tid = thread_ids[state.tid]
        for seccomp_filter in state.filters:
            address = _place_program(stub, saved[state.tid], segments, seccomp_filter.program)
            flags = seccomp_filter.flags | (SECCOMP_FILTER_FLAG_TSYNC if shared else 0)
            result = stub.try_call("seccomp", SECCOMP_SET_MODE_FILTER, flags, address, tid=tid)
            if result != 0:  # TSYNC answers with a thread id it could not sync
                raise RestoreError(f"cannot install a seccomp filter in thread {tid}: {result}")
        if state.mode == SECCOMP_MODE_STRICT:
            stub.call("prctl", PR_SET_SECCOMP, SECCOMP_MODE_STRICT, 0, 0, 0, tid=tid)


def _place_program(stub: Stub, thread: rec.Thread, segments: rec.Segments, program: bytes) -> int:
    """Write a sock_fprog and its program below `thread`'s stack pointer; its address."""
    top = thread.regs.rsp - RED_ZONE
    instructions = (top - len(program)) & ~15
    fprog = instructions - SOCK_FPROG.size
    stack = next(
        (s for s in segments.segments if s.start <= fprog and top <= s.end),
        None,
    )
    if stack is None or not stack.prot & rec.Prot.WRITE:
        raise RestoreError(f"no room below the stack of thread {thread.tid} for its seccomp filter")
    memory.write(stub.pid, instructions, program)
    count = len(program) // pt.SOCK_FILTER_SIZE
    memory.write(stub.pid, fprog, SOCK_FPROG.pack(count, instructions))
    return fprog


def describe(states: tuple[rec.ThreadSeccomp, ...]) -> list[str]:
    """Lines for `hijack show`."""
    lines = []
    for state in states:
        if state.mode == SECCOMP_MODE_STRICT:
            lines.append(f"thread {state.tid}: seccomp strict")
        else:
            sizes = ", ".join(str(len(f.program) // pt.SOCK_FILTER_SIZE) for f in state.filters)
            lines.append(f"thread {state.tid}: seccomp filters of {sizes} instructions")
    return lines
