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

Calls may chain: an argument given as an earlier `Call` is that call's result,
taken inside the target (`open` then `dup2` of what it returned). A call made
with check=True stops the batch when it fails, and `run` raises for it; an
unchecked call's failure is its result.
"""

from __future__ import annotations

import os
import signal
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from hijack.errors import InjectionFailed
from hijack.mutator.tracee import (
    MAP_PRIVATE_ANONYMOUS,
    MINUS_ONE,
    PROT_READ_WRITE,
    Tracee,
    run_code,
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

    @property
    def failed(self) -> bool:
        return self.result is not None and -4096 < self.result < 0


@dataclass
class Batch:
    """Calls to run in one go inside a stopped target, in `area`."""

    area: Area
    calls: list[Call] = field(default_factory=list)
    _data: bytearray = field(default_factory=bytearray)  # from area + _base
    _read: bytes = b""
    _base: int = field(init=False)  # after the blob where it may run; else the start

    def __post_init__(self) -> None:
        self._base = CODE_SIZE if self.area.executable else 0

    def call(self, name: str, *args: int | Call, check: bool = True) -> Call:
        if len(args) > 6:
            raise ValueError(f"{name}: at most 6 arguments")
        call = Call(name, args, check, len(self.calls))
        self.calls.append(call)
        return call

    def buffer(self, size: int) -> int:
        """`size` bytes (zeroed) for a call to write into; read them back with `read`."""
        return self.put(bytes(size))

    def put(self, data: bytes) -> int:
        """Copy `data` into the area (at the run); return its address in the target."""
        address = self.area.address + self._base + len(self._data)
        if self._base + len(self._data) + len(data) > self.area.size:
            raise InjectionFailed(
                f"{len(data)} bytes more do not fit in a batch area of {self.area.size}"
            )
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
        if self.calls:
            if self._base and not self._touches_sigtrap() and not self._sigtrap_ignored(tracee):
                self._run_blob(tracee, tid)
            else:
                self._run_one_by_one(tracee, tid)
        failed = next((c for c in self.calls if c.check and c.failed), None)
        if failed is not None:
            assert failed.result is not None
            raise InjectionFailed(
                f"{failed.name} inside process {tracee.pid} failed: {os.strerror(-failed.result)}",
                pid=tracee.pid,
                errno=-failed.result,
                syscall=failed.name,
            )

    def _touches_sigtrap(self) -> bool:
        """Whether a call may ignore or block SIGTRAP before the int3 (rt_sigaction of it,
        rt_sigprocmask): a forced SIGTRAP then resets the handler (see tracee.run_code)."""
        return any(
            call.name == "rt_sigprocmask"
            or (call.name == "rt_sigaction" and call.args[:1] == (signal.SIGTRAP,))
            for call in self.calls
        )

    def _sigtrap_ignored(self, tracee: Tracee) -> bool:
        known = self.area.sigtrap_ignored
        return sigtrap_ignored(tracee.pid) if known is None else known

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

    def _run_blob(self, tracee: Tracee, tid: int | None) -> None:
        table_offset = CODE_SIZE + len(self._data)
        table = self._table()
        end = table_offset + len(table)
        if end > self.area.size:
            raise InjectionFailed(
                f"a batch of {len(self.calls)} calls needs {end} bytes; the area has "
                f"{self.area.size}",
                pid=tracee.pid,
            )
        start = 0 if not self.area.blob_written else CODE_SIZE
        image = BLOB.ljust(CODE_SIZE, b"\xcc") + self._data + table
        memory.write(tracee.pid, self.area.address + start, image[start:])
        self.area.blob_written = True
        thread = tracee.threads[tid or tracee.injection_tid]
        ran, strays = run_code(
            thread,
            self.area.address,
            self.area.address + TRAP_OFFSET,
            rbx=self.area.address + table_offset,
            r12=len(self.calls),
        )
        tracee.injected += ran
        tracee.stops += 1
        back = memory.read(tracee.pid, self.area.address + CODE_SIZE, end - CODE_SIZE)
        self._read = back[: len(self._data)]
        for call in self.calls[:ran]:
            at = len(self._data) + call.index * ENTRY.size + RESULT_OFFSET
            (call.result,) = struct.unpack_from("<q", back, at)
        for siginfo in strays:  # over the data, read back already
            requeue_sigtrap(tracee, thread.tid, siginfo, self.area.address + CODE_SIZE)

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


def without_area(maps: list[procfs.MapEntry], area: Area) -> list[procfs.MapEntry] | None:
    """`maps` less the area; None if it merged with a neighbour (not told apart then)."""
    if not any(m.start == area.address and m.end == area.address + area.size for m in maps):
        return None
    return [m for m in maps if m.start != area.address]
