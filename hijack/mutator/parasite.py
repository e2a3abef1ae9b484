"""Batched injected system calls: a small code blob run in a stopped target.

One injected call (tracee.inject_syscall) costs two ptrace stops: the target is
woken, enters the call, stops, is woken again, leaves it, stops; each stop is a
wakeup of hijack. Under load each is a trip through the scheduler (45-116 ms for
a move's 14 calls at load 10-16). A `Batch` writes a table of calls and the blob
below into an executable area of the target and resumes it once: the blob runs
every call and traps (int3) once, as CRIU's parasite does.

The area is one the caller maps (`parasite_area`: an anonymous mapping made
PROT_READ|WRITE|EXEC by one injected call, unmapped by another) or already has
(a restore's stub maps its scratch area executable). Where none can be had (a
process under a seccomp filter, or whose MDWE or LSM refuses writable code) or
where the int3 would
change the target (SIGTRAP ignored: a forced signal resets an ignored handler
to default), the same batch runs one call at a time: same results, more stops.

Calls only a given thread can make (a thread's own clear-child-tid address, its
alternate signal stack) go in a batch of that thread's: such batches share the
area, each in its own part after the one blob, and run side by side
(`run_side_by_side`, `run_in_threads`): every thread resumed, then each waited
for, one trip through the scheduler for all of them rather than one each.

Calls may chain: an argument given as an earlier `Call` is that call's result,
taken inside the target (`open` then `dup2` of what it returned). A call made
with check=True stops the batch when it fails, and `run` raises for it; an
unchecked call's failure is its result.
"""

from __future__ import annotations

import os
import signal
import struct
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import TypeVar

from hijack.errors import HijackError, InjectionFailed
from hijack.mutator.tracee import (
    MAP_PRIVATE_ANONYMOUS,
    MINUS_ONE,
    PROT_READ_WRITE,
    TracedThread,
    Tracee,
    run_code_across,
    syscalls_side_by_side,
)
from hijack.sys import memory, procfs
from hijack.sys.syscall_numbers import SYSCALL_NUMBERS

# The blob, hand-assembled from hijack/native/parasite.S (kept beside it as the
# source; tests/test_parasite.py assembles it with gcc and compares). Bytes here
# rather than built by make: it is 107 bytes that never change, and hijack runs
# without any native build (the relay pump is optional; this is not).
# On entry: rbx = table, r12 = entries. At the int3: r14 = entries run.
BLOB = bytes.fromhex(
    "4531f6"  # 00 xor r14d, r14d                         ; index = 0
    "4d39e6"  # 03 next_call: cmp r14, r12
    "7362"  # 06 jae done (+0x62 -> 0x6a)                 ; every entry ran
    "4d89f7"  # 08 mov r15, r14
    "49c1e706"  # 0b shl r15, 6
    "4901df"  # 0f add r15, rbx                           ; r15 = table + 64 * index
    "418b4f04"  # 12 mov ecx, [r15+4]                     ; the entry's flags
    "31ed"  # 16 xor ebp, ebp                             ; argument j = 0
    "0fa3e9"  # 18 chain: bt ecx, ebp
    "7313"  # 1b jnc plain (+0x13 -> 0x30)                ; argument j is a value
    "498b44ef08"  # 1d mov rax, [r15+rbp*8+8]             ; ... else an entry's index
    "48c1e006"  # 22 shl rax, 6
    "488b440338"  # 26 mov rax, [rbx+rax+56]              ; that entry's result
    "498944ef08"  # 2b mov [r15+rbp*8+8], rax             ; becomes argument j
    "ffc5"  # 30 plain: inc ebp
    "83fd06"  # 32 cmp ebp, 6
    "72e1"  # 35 jb chain (-0x1f -> 0x18)
    "418b07"  # 37 mov eax, [r15]                         ; the call's number
    "498b7f08"  # 3a mov rdi, [r15+8]
    "498b7710"  # 3e mov rsi, [r15+16]
    "498b5718"  # 42 mov rdx, [r15+24]
    "4d8b5720"  # 46 mov r10, [r15+32]
    "4d8b4728"  # 4a mov r8, [r15+40]
    "4d8b4f30"  # 4e mov r9, [r15+48]
    "0f05"  # 52 syscall
    "49894738"  # 54 mov [r15+56], rax                    ; its result
    "49ffc6"  # 58 inc r14
    "483d01f0ffff"  # 5b cmp rax, -4095
    "72a0"  # 61 jb next_call (-0x60 -> 0x03)             ; not an error
    "41f6470501"  # 63 test byte [r15+5], 1               ; stop on this error?
    "7499"  # 68 jz next_call (-0x67 -> 0x03)
    "cc"  # 6a done: int3
)
TRAP_OFFSET = len(BLOB)  # rip at the int3's stop: just past it
CODE_SIZE = 128  # the blob, rounded up: what follows stays 16-aligned
ENTRY = struct.Struct("<II6qq")  # number, flags, arguments, result
RESULT_OFFSET = 56
STOP_ON_ERROR = 1 << 8
assert ENTRY.size == 64

PROT_READ_WRITE_EXEC = PROT_READ_WRITE | 0x4
# MAP_NORESERVE and MAP_STACK (VM_NORESERVE, VM_NOHUGEPAGE): flags few mappings have, so
# the kernel does not merge the area with a neighbour and it stays its own line in maps.
AREA_FLAGS = MAP_PRIVATE_ANONYMOUS | 0x4000 | 0x20000
PARASITE_SIZE = 16 * 1024  # the blob, a table of ~100 calls and what they write

T = TypeVar("T")


@dataclass
class Area:
    """Where a batch lives in the target: `executable` when the blob may run there."""

    address: int
    size: int
    executable: bool
    blob_written: bool = False
    mapped: bool = False  # by map_area (and so to unmap)
    # Whether the process ignores SIGTRAP, where its user knows it cannot change while
    # the area is in use (only our batches run, none touching SIGTRAP): else read from
    # /proc for each batch (~0.2 ms; an injected rt_sigaction may have changed it).
    sigtrap_ignored: bool | None = None


@dataclass
class Call:
    name: str
    args: tuple[int | Call, ...]
    check: bool
    index: int
    result: int | None = None  # None: not run (a checked call before it failed)
    # What its failure means, for the caller's error ("cannot reopen fd 3 (/x)"), its
    # errno's name after it; "" for the call's own name.
    failure: str = ""

    @property
    def failed(self) -> bool:
        return self.result is not None and -4096 < self.result < 0


@dataclass
class Batch:
    """Calls to run in one go inside a stopped target, in `area` from `start` on (batches
    run side by side each have their own part of it; the blob before them is shared)."""

    area: Area
    start: int = 0
    calls: list[Call] = field(default_factory=list)
    _data: bytearray = field(default_factory=bytearray)  # from area + _base
    _read: bytes = b""
    _base: int = field(init=False)  # after the blob where it may run; else `start`

    def __post_init__(self) -> None:
        self._base = max(self.start, CODE_SIZE) if self.area.executable else self.start

    @property
    def end(self) -> int:
        """Where its part of the area ends (its data, then its table where the blob may run
        it: one call at a time needs none): the next part's start."""
        table = ENTRY.size * len(self.calls) if self.area.executable else 0
        return self._base + len(self._data) + table

    @property
    def size(self) -> int:
        """How much of the area its part takes."""
        return self.end - self._base

    def call(self, name: str, *args: int | Call, check: bool = True, failure: str = "") -> Call:
        if len(args) > 6:
            raise ValueError(f"{name}: at most 6 arguments")
        for arg in args:
            if isinstance(arg, Call) and not (
                arg.index < len(self.calls) and self.calls[arg.index] is arg
            ):
                raise ValueError(f"{name}: chained to a call of another batch")
        call = Call(name, args, check, len(self.calls), failure=failure)
        self.calls.append(call)
        return call

    def buffer(self, size: int) -> int:
        """`size` bytes (zeroed) for a call to write into; read them back with `read`."""
        return self.put(bytes(size))

    def put(self, data: bytes) -> int:
        """Copy `data` into the area (at the run); return its address in the target.
        Whether it fits is told at the run (a caller laying batches out may start again)."""
        address = self.area.address + self._base + len(self._data)
        self._data += data
        self._data += bytes(-len(self._data) % 16)
        return address

    def read(self, address: int, size: int) -> bytes:
        """After the run: `size` bytes the calls wrote at `address` (from `buffer`)."""
        start = address - self.area.address - self._base
        if start < 0 or start + size > len(self._read):
            raise ValueError(f"{address:#x} is not in this batch's data")
        return self._read[start : start + size]

    def run(self, tracee: Tracee, tid: int | None = None) -> None:
        """Run every call in thread `tid` (the injection thread by default); raise
        InjectionFailed for the first checked call that failed (none after it ran)."""
        run_side_by_side(tracee, [(tid or tracee.injection_tid, self)])

    def _fits(self, pid: int) -> None:
        if self.end > self.area.size:
            raise InjectionFailed(
                f"a batch of {len(self.calls)} calls and {len(self._data)} bytes needs"
                f" {self.end} bytes; the area has {self.area.size}",
                pid=pid,
            )

    def _raise_failed(self, pid: int) -> None:
        failed = next((c for c in self.calls if c.check and c.failed), None)
        if failed is not None:
            assert failed.result is not None
            raise InjectionFailed(
                f"{failed.name} inside process {pid} failed: {os.strerror(-failed.result)}",
                pid=pid,
                errno=-failed.result,
                syscall=failed.name,
            )

    def _touches_sigtrap(self) -> bool:
        """Whether a call may ignore or block SIGTRAP before the int3 (rt_sigaction of it,
        rt_sigprocmask): a forced SIGTRAP then resets the handler (see tracee.run_code).
        One that only reads (its new action or set NULL) changes nothing: a dump reads
        every signal's action, SIGTRAP's too, and runs its batch whole all the same."""
        return any(
            (call.name == "rt_sigprocmask" and _sets(call))
            or (call.name == "rt_sigaction" and call.args[:1] == (signal.SIGTRAP,) and _sets(call))
            for call in self.calls
        )

    def _table(self) -> bytes:
        entries = []
        for call in self.calls:
            values = [0] * 6
            chained = 0
            for j, arg in enumerate(call.args):
                if isinstance(arg, Call):
                    chained |= 1 << j
                    values[j] = arg.index
                else:
                    values[j] = _signed(arg)
            flags = chained | (STOP_ON_ERROR if call.check else 0)
            entries.append(ENTRY.pack(SYSCALL_NUMBERS[call.name], flags, *values, 0))
        return b"".join(entries)

    def _take(self, part: bytes, ran: int) -> None:
        """Its part of the area as read back after the blob ran `ran` of its calls."""
        self._read = part[: len(self._data)]
        for call in self.calls[:ran]:
            at = len(self._data) + call.index * ENTRY.size + RESULT_OFFSET
            (call.result,) = struct.unpack_from("<q", part, at)

    def _run_one_by_one(self, tracee: Tracee, tid: int | None) -> None:
        if self._data:
            memory.write(tracee.pid, self.area.address + self._base, self._data)
        for call in self.calls:
            args = [a.result if isinstance(a, Call) else a for a in call.args]
            call.result = tracee.syscall(call.name, *(a or 0 for a in args), tid=tid)
            if call.check and call.failed:
                break
        self._read = (
            memory.read(tracee.pid, self.area.address + self._base, len(self._data))
            if self._data
            else b""
        )


def _sets(call: Call) -> bool:
    """Whether rt_sigaction's new action or rt_sigprocmask's new set is given (not NULL)."""
    return call.args[1:2] != (0,)


def run_side_by_side(tracee: Tracee, batches: Sequence[tuple[int, Batch]]) -> None:
    """Run each batch in its own thread (by tid), every one in its own part of one area;
    raise InjectionFailed for the first checked call that failed, once all ran.

    Where the blob may run, every thread is resumed before any is waited for
    (tracee.run_code_side_by_side): one trip through the scheduler for them all, as
    CRIU's parasite runs its per-thread daemons. Where it may not (the area is not
    executable; SIGTRAP ignored, or a batch that may ignore or block it), a batch runs one
    call at a time, one thread after the other.
    """
    run_across([(tracee, batches)])


def run_across(groups: Sequence[tuple[Tracee, Sequence[tuple[int, Batch]]]]) -> None:
    """run_side_by_side for several stopped processes (a tree's members: each process, its
    batches by tid, in one area of its own): every thread of every process whose blob may
    run is resumed before any is waited for (one trip through the scheduler for all, not
    one each: ~1 ms each under load); then the others' batches one call at a time. The
    first checked call that failed raised once all ran."""
    together: list[tuple[Tracee, list[tuple[int, Batch]]]] = []
    for tracee, batches in groups:
        for _, batch in batches:
            batch._fits(tracee.pid)
        queued = [(tid, batch) for tid, batch in batches if batch.calls]
        blobs = [(t, b) for t, b in queued if b.area.executable and not b._touches_sigtrap()]
        if blobs and not _sigtrap_ignored(tracee, blobs[0][1].area):
            together.append((tracee, blobs))
    if together:
        _run_blobs(together)
    ran = {id(batch) for _, blobs in together for _, batch in blobs}
    for tracee, batches in groups:
        for tid, batch in batches:
            if batch.calls and id(batch) not in ran:
                batch._run_one_by_one(tracee, tid)
    for tracee, batches in groups:
        for _, batch in batches:
            batch._raise_failed(tracee.pid)


def _sigtrap_ignored(tracee: Tracee, area: Area) -> bool:
    return sigtrap_ignored(tracee.pid) if area.sigtrap_ignored is None else area.sigtrap_ignored


def _run_blobs(groups: Sequence[tuple[Tracee, Sequence[tuple[int, Batch]]]]) -> None:
    """In each process: the blob once, each batch's data and table in its part, all in one
    write; every thread of every process run side by side; every part read back in one
    read."""
    runs: list[tuple[TracedThread, int, int, dict[str, int]]] = []
    for tracee, batches in groups:
        area = batches[0][1].area
        if any(batch.area is not area for _, batch in batches):
            raise ValueError("batches run side by side share one area")
        tables = [batch._table() for _, batch in batches]
        low = CODE_SIZE if area.blob_written else 0
        high = max(batch.end for _, batch in batches)
        image = bytearray(high - low)
        if not area.blob_written:
            image[:CODE_SIZE] = BLOB.ljust(CODE_SIZE, b"\xcc")
        for (_, batch), table in zip(batches, tables, strict=True):
            image[batch._base - low : batch.end - low] = batch._data + table
        memory.write(tracee.pid, area.address + low, bytes(image))
        area.blob_written = True
        runs += [
            (
                tracee.threads[tid],
                area.address,
                area.address + TRAP_OFFSET,
                {"rbx": area.address + batch._base + len(batch._data), "r12": len(batch.calls)},
            )
            for tid, batch in batches
        ]
    results = iter(run_code_across(runs))
    for tracee, batches in groups:
        area = batches[0][1].area
        done = [next(results) for _ in batches]
        tracee.stops += len(batches)
        first = min(batch._base for _, batch in batches)
        high = max(batch.end for _, batch in batches)
        back = memory.read(tracee.pid, area.address + first, high - first)
        for (_, batch), (ran, _) in zip(batches, done, strict=True):
            tracee.injected += ran
            batch._take(back[batch._base - first : batch.end - first], ran)
        for (tid, _), (_, strays) in zip(batches, done, strict=True):
            for siginfo in strays:  # over the data, read back already
                requeue_sigtrap(tracee, tid, siginfo, area.address + CODE_SIZE)


def run_in_threads(
    tracee: Tracee,
    area: Area,
    threads: Sequence[TracedThread],
    queue: Callable[[TracedThread, Batch], T],
    *,
    queued: Sequence[tuple[int, Batch]] = (),
) -> list[T]:
    """`queue(thread, batch)` for each thread, then each batch run in its thread, side by
    side (run_side_by_side): the batches laid out one after the other in `area`, as many
    at a time as it holds; what `queue` returned, in order (to read them once run).
    `queued`: batches filled already (by thread; in `area` from its start, one after
    the other), run with the first of them."""
    results: list[T] = []
    group = list(queued)
    start = max((batch.end for _, batch in group), default=0)
    for thread in threads:
        batch = Batch(area, start)
        result = queue(thread, batch)
        if batch.end > area.size and group:  # the area is full: run those, start again
            run_side_by_side(tracee, group)
            group = []
            batch = Batch(area)
            result = queue(thread, batch)
        group.append((thread.tid, batch))
        results.append(result)
        start = batch.end
    run_side_by_side(tracee, group)
    return results


def _signed(value: int) -> int:
    value &= MINUS_ONE
    return value - (1 << 64) if value >= 1 << 63 else value


def sigtrap_ignored(pid: int) -> bool:
    return bool(procfs.read_status(pid).sig_ign & (1 << (signal.SIGTRAP - 1)))


def requeue_sigtrap(tracee: Tracee, tid: int, siginfo: bytes, scratch: int) -> None:
    """A SIGTRAP someone sent while the blob ran (it is left unblocked then: see
    tracee.run_code) was taken at its delivery stop; queue it again for the thread to
    receive once released: as it was (a thread may queue any siginfo to itself), or, where
    the kernel refuses that, as a plain tgkill."""
    memory.write(tracee.pid, scratch, siginfo)
    queued = tracee.syscall("rt_tgsigqueueinfo", tracee.pid, tid, signal.SIGTRAP, scratch, tid=tid)
    if -4096 < queued < 0:
        tracee.checked_syscall("tgkill", tracee.pid, tid, signal.SIGTRAP, tid=tid)


@contextmanager
def parasite_area(tracee: Tracee, size: int = PARASITE_SIZE) -> Iterator[Area]:
    """map_area, and unmap_area at the end."""
    area = map_area(tracee, size)
    try:
        yield area
    finally:
        unmap_area(tracee, area)


def map_area(tracee: Tracee, size: int = PARASITE_SIZE) -> Area:
    """An area for batches in the target: mapped executable (one injected call), or, where
    the process may not map writable code, readable and writable only (the batches then run
    one call at a time). An mmap waits for every reader of the memory map (a thread reading
    /proc/PID/smaps holds it for milliseconds a GiB): map the area before starting one."""
    # Under a seccomp filter, an mmap of writable code is not asked at all: a filter may
    # kill for it (systemd's MemoryDenyWriteExecute only fails it, EPERM).
    executable = not procfs.read_status(tracee.pid, tracee.injection_tid).seccomp
    if executable:
        address = tracee.syscall("mmap", 0, size, PROT_READ_WRITE_EXEC, AREA_FLAGS, -1, 0)
        executable = not -4096 < address < 0
    if not executable:
        address = tracee.checked_syscall("mmap", 0, size, PROT_READ_WRITE, AREA_FLAGS, -1, 0)
    return Area(address, size, executable, mapped=True)


def unmap_area(tracee: Tracee, area: Area) -> None:
    if area.mapped:
        tracee.syscall("munmap", area.address, area.size)
        area.mapped = False


PAGE_SIZE = 4096
THREAD_BATCH = 256  # bytes of an area for each thread's own batch (2 calls, 48 bytes)


def area_size(threads: int) -> int:
    """An area for a process's batches with `threads` threads, each batch laid out at once
    (a tree's member's, run side by side with the others': run_across)."""
    return PARASITE_SIZE + -(-THREAD_BATCH * threads // PAGE_SIZE) * PAGE_SIZE


def map_areas(tracees: Sequence[Tracee]) -> list[Area]:
    """map_area in each of several stopped processes (a tree's members; each as big as
    area_size tells), their mmaps run side by side (syscalls_side_by_side: two trips
    through the scheduler for all, not two each); one under a seccomp filter, or refused
    writable code, as map_area maps it. If one fails, those mapped are unmapped again
    before the error is raised."""
    areas: dict[int, Area] = {}
    sizes = {t.pid: area_size(len(t.thread_ids)) for t in tracees}
    plain = [t for t in tracees if not procfs.read_status(t.pid, t.injection_tid).seccomp]
    calls = [(t, "mmap", (0, sizes[t.pid], PROT_READ_WRITE_EXEC, AREA_FLAGS, -1, 0)) for t in plain]
    failure: HijackError | None = None
    for tracee, address in zip(plain, syscalls_side_by_side(calls), strict=True):
        if isinstance(address, HijackError):
            failure = failure or address
        elif not -4096 < address < 0:
            areas[tracee.pid] = Area(address, sizes[tracee.pid], True, mapped=True)
    try:
        if failure is not None:
            raise failure
        for tracee in tracees:
            if tracee.pid not in areas:
                areas[tracee.pid] = map_area(tracee, sizes[tracee.pid])
    except BaseException:
        for tracee in tracees:
            if tracee.pid in areas:
                with suppress(HijackError):
                    unmap_area(tracee, areas[tracee.pid])
        raise
    return [areas[tracee.pid] for tracee in tracees]


def unmap_areas(areas: Sequence[tuple[Tracee, Area]]) -> None:
    """unmap_area of each (process, its area) still mapped, the munmaps side by side; the
    first error raised once every one was tried."""
    mapped = [(tracee, area) for tracee, area in areas if area.mapped]
    calls = [(t, "munmap", (area.address, area.size)) for t, area in mapped]
    failure: HijackError | None = None
    for (_, area), result in zip(mapped, syscalls_side_by_side(calls), strict=True):
        if isinstance(result, HijackError):
            failure = failure or result
        else:
            area.mapped = False
    if failure is not None:
        raise failure


def without_area(maps: list[procfs.MapEntry], area: Area) -> list[procfs.MapEntry] | None:
    """`maps` less the area; None if it merged with a neighbour (not told apart then)."""
    if not any(m.start == area.address and m.end == area.address + area.size for m in maps):
        return None
    return [m for m in maps if m.start != area.address]
