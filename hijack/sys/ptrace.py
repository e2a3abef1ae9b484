"""ptrace(2) requests, including those python-ptrace has no helpers for.

python-ptrace gives the raw call, PTRACE_GETREGS/SETREGS and the register
structure; SEIZE, INTERRUPT, GETREGSET/SETREGSET, the signal mask and the rseq
configuration are issued here with numbers from <linux/ptrace.h>.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno as errno_codes
import os
from dataclasses import dataclass

from ptrace.binding import func as ptrace_binding
from ptrace.binding.linux_struct import user_regs_struct
from ptrace.error import PtraceError

from hijack.errors import AlreadyTraced
from hijack.sys.errors import raise_for_errno
from hijack.sys.libc import Iovec
from hijack.sys.process import WALL

# Requests (<linux/ptrace.h>).
PTRACE_TRACEME = 0
PTRACE_CONT = 7
PTRACE_SINGLESTEP = 9
PTRACE_GETREGS = 12
PTRACE_SETREGS = 13
PTRACE_DETACH = 17
PTRACE_SYSCALL = 24
PTRACE_SETOPTIONS = 0x4200
PTRACE_GETEVENTMSG = 0x4201
PTRACE_GETSIGINFO = 0x4202
PTRACE_GETREGSET = 0x4204
PTRACE_SETREGSET = 0x4205
PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
PTRACE_LISTEN = 0x4208
PTRACE_PEEKSIGINFO = 0x4209
PTRACE_PEEKSIGINFO_SHARED = 1
PTRACE_GETSIGMASK = 0x420A
PTRACE_SETSIGMASK = 0x420B
PTRACE_SECCOMP_GET_FILTER = 0x420C
PTRACE_SECCOMP_GET_METADATA = 0x420D
PTRACE_GET_RSEQ_CONFIGURATION = 0x420F
SOCK_FILTER_SIZE = 8  # struct sock_filter: code u16, jt u8, jf u8, k u32

# Options.
PTRACE_O_TRACESYSGOOD = 0x1
PTRACE_O_TRACEFORK = 0x2
PTRACE_O_TRACEVFORK = 0x4
PTRACE_O_TRACECLONE = 0x8
PTRACE_O_TRACEEXEC = 0x10
PTRACE_O_TRACEEXIT = 0x40
PTRACE_O_EXITKILL = 0x100000

# Events (status >> 16 of a ptrace stop).
PTRACE_EVENT_FORK = 1
PTRACE_EVENT_VFORK = 2
PTRACE_EVENT_CLONE = 3
PTRACE_EVENT_EXEC = 4
PTRACE_EVENT_EXIT = 6
PTRACE_EVENT_STOP = 128

# Register sets (<elf.h>).
NT_PRSTATUS = 1
NT_X86_XSTATE = 0x202

# Largest xstate buffer we offer; the kernel shortens iov_len to the real size.
XSTATE_BUFFER_SIZE = 16384

SYSCALL_TRAP = 0x80 | 5  # SIGTRAP | 0x80, a syscall stop with PTRACE_O_TRACESYSGOOD


@dataclass(frozen=True)
class Registers:
    """x86_64 `struct user_regs_struct`, fields in kernel order and names."""

    r15: int
    r14: int
    r13: int
    r12: int
    rbp: int
    rbx: int
    r11: int
    r10: int
    r9: int
    r8: int
    rax: int
    rcx: int
    rdx: int
    rsi: int
    rdi: int
    orig_rax: int
    rip: int
    cs: int
    eflags: int
    rsp: int
    ss: int
    fs_base: int
    gs_base: int
    ds: int
    es: int
    fs: int
    gs: int

    def replace(self, **changes: int) -> Registers:
        return dataclasses.replace(self, **changes)

    def signed(self, name: str) -> int:
        """A register read as a signed 64-bit value (system call results, orig_rax)."""
        value: int = getattr(self, name)
        return value - (1 << 64) if value >= 1 << 63 else value


REGISTER_NAMES: tuple[str, ...] = tuple(field.name for field in dataclasses.fields(Registers))


@dataclass(frozen=True)
class WaitResult:
    """What waitpid() said about a traced task."""

    tid: int
    status: int

    @property
    def exited(self) -> bool:
        return os.WIFEXITED(self.status) or os.WIFSIGNALED(self.status)

    @property
    def stopped(self) -> bool:
        return os.WIFSTOPPED(self.status)

    @property
    def stop_signal(self) -> int:
        return os.WSTOPSIG(self.status) if self.stopped else 0

    @property
    def event(self) -> int:
        return (self.status >> 16) & 0xFF if self.stopped else 0

    @property
    def is_syscall_stop(self) -> bool:
        return self.stopped and self.stop_signal == SYSCALL_TRAP

    def describe(self) -> str:
        if os.WIFEXITED(self.status):
            return f"exited with status {os.WEXITSTATUS(self.status)}"
        if os.WIFSIGNALED(self.status):
            return f"was killed by signal {os.WTERMSIG(self.status)}"
        if self.event:
            return f"stopped at ptrace event {self.event}"
        return f"stopped by signal {self.stop_signal}"


class _RseqConfiguration(ctypes.Structure):
    _fields_ = [
        ("rseq_abi_pointer", ctypes.c_uint64),
        ("rseq_abi_size", ctypes.c_uint32),
        ("signature", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
    ]


@dataclass(frozen=True)
class RseqConfiguration:
    rseq_abi_pointer: int
    rseq_abi_size: int
    signature: int
    flags: int


def _request(name: str, request: int, tid: int, addr: int = 0, data: int = 0) -> int:
    try:
        return int(ptrace_binding.ptrace(request, tid, addr, data))
    except PtraceError as exc:
        raise_for_errno(exc.errno or errno_codes.EIO, f"ptrace({name})", tid, f"thread {tid}")


def seize(tid: int, options: int) -> None:
    """PTRACE_SEIZE: trace `tid` without stopping it or sending it any signal."""
    try:
        ptrace_binding.ptrace(PTRACE_SEIZE, tid, 0, options)
    except PtraceError as exc:
        if exc.errno == errno_codes.EPERM:
            tracer = _tracer_of(tid)
            if tracer:
                raise AlreadyTraced(
                    f"process {tid} is already traced by pid {tracer} ({_comm_of(tracer)})",
                    pid=tid,
                    errno=exc.errno,
                    syscall="ptrace(PTRACE_SEIZE)",
                ) from None
        raise_for_errno(exc.errno or errno_codes.EIO, "ptrace(PTRACE_SEIZE)", tid)


def _tracer_of(tid: int) -> int:
    try:
        with open(f"/proc/{tid}/status") as status:
            for line in status:
                if line.startswith("TracerPid:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _comm_of(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as comm:
            return comm.read().strip()
    except OSError:
        return "?"


def interrupt(tid: int) -> None:
    _request("PTRACE_INTERRUPT", PTRACE_INTERRUPT, tid)


def set_options(tid: int, options: int) -> None:
    _request("PTRACE_SETOPTIONS", PTRACE_SETOPTIONS, tid, 0, options)


def resume(tid: int, signal_number: int = 0) -> None:
    """PTRACE_CONT, delivering `signal_number` (0 for none)."""
    _request("PTRACE_CONT", PTRACE_CONT, tid, 0, signal_number)


def resume_to_syscall(tid: int, signal_number: int = 0) -> None:
    """PTRACE_SYSCALL: run to the next system call entry or exit."""
    _request("PTRACE_SYSCALL", PTRACE_SYSCALL, tid, 0, signal_number)


def listen(tid: int) -> None:
    _request("PTRACE_LISTEN", PTRACE_LISTEN, tid)


def detach(tid: int, signal_number: int = 0) -> None:
    _request("PTRACE_DETACH", PTRACE_DETACH, tid, 0, signal_number)


def traceme() -> None:
    """PTRACE_TRACEME, for a freshly forked child that its parent will trace."""
    _request("PTRACE_TRACEME", PTRACE_TRACEME, 0)


def get_registers(tid: int) -> Registers:
    raw = user_regs_struct()
    _request("PTRACE_GETREGS", PTRACE_GETREGS, tid, 0, ctypes.addressof(raw))
    return Registers(*(int(getattr(raw, name)) for name in REGISTER_NAMES))


def set_registers(tid: int, registers: Registers) -> None:
    raw = user_regs_struct(*(getattr(registers, name) for name in REGISTER_NAMES))
    _request("PTRACE_SETREGS", PTRACE_SETREGS, tid, 0, ctypes.addressof(raw))


def get_xstate(tid: int) -> bytes:
    """The extended FPU/vector state (NT_X86_XSTATE), as the kernel lays it out."""
    buffer = ctypes.create_string_buffer(XSTATE_BUFFER_SIZE)
    iov = Iovec(ctypes.cast(buffer, ctypes.c_void_p), XSTATE_BUFFER_SIZE)
    _request("PTRACE_GETREGSET", PTRACE_GETREGSET, tid, NT_X86_XSTATE, ctypes.addressof(iov))
    return buffer.raw[: iov.iov_len]


def set_xstate(tid: int, xstate: bytes) -> None:
    buffer = ctypes.create_string_buffer(xstate, len(xstate))
    iov = Iovec(ctypes.cast(buffer, ctypes.c_void_p), len(xstate))
    _request("PTRACE_SETREGSET", PTRACE_SETREGSET, tid, NT_X86_XSTATE, ctypes.addressof(iov))


def get_signal_mask(tid: int) -> int:
    mask = ctypes.c_uint64()
    _request("PTRACE_GETSIGMASK", PTRACE_GETSIGMASK, tid, 8, ctypes.addressof(mask))
    return mask.value


def set_signal_mask(tid: int, mask: int) -> None:
    value = ctypes.c_uint64(mask)
    _request("PTRACE_SETSIGMASK", PTRACE_SETSIGMASK, tid, 8, ctypes.addressof(value))


class _PeekSiginfoArgs(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("flags", ctypes.c_uint32), ("nr", ctypes.c_int32)]


SIGINFO_SIZE = 128


def peek_pending_signals(tid: int, *, shared: bool) -> list[bytes]:
    """The queued siginfos of `tid` (or of its whole process, with `shared`), without dequeuing."""
    batch = 32
    found: list[bytes] = []
    buffer = ctypes.create_string_buffer(SIGINFO_SIZE * batch)
    while True:
        args = _PeekSiginfoArgs(len(found), PTRACE_PEEKSIGINFO_SHARED if shared else 0, batch)
        count = _request(
            "PTRACE_PEEKSIGINFO",
            PTRACE_PEEKSIGINFO,
            tid,
            ctypes.addressof(args),
            ctypes.addressof(buffer),
        )
        raw = buffer.raw
        found += [raw[i * SIGINFO_SIZE : (i + 1) * SIGINFO_SIZE] for i in range(count)]
        if count < batch:
            return found


class _SeccompMetadata(ctypes.Structure):
    _fields_ = [("filter_off", ctypes.c_uint64), ("flags", ctypes.c_uint64)]


def get_seccomp_filter(tid: int, index: int) -> tuple[int, bytes]:
    """The flags and program (sock_filter instructions) of seccomp filter `index` of a
    stopped `tid`. Index 0 is the oldest filter: get_nth_filter() counts back from the
    newest (seen here; seccomp_unotify(2)-era man pages say the reverse)."""
    count = _request("PTRACE_SECCOMP_GET_FILTER", PTRACE_SECCOMP_GET_FILTER, tid, index)
    program = ctypes.create_string_buffer(count * SOCK_FILTER_SIZE)
    _request(
        "PTRACE_SECCOMP_GET_FILTER",
        PTRACE_SECCOMP_GET_FILTER,
        tid,
        index,
        ctypes.addressof(program),
    )
    metadata = _SeccompMetadata(filter_off=index)
    _request(
        "PTRACE_SECCOMP_GET_METADATA",
        PTRACE_SECCOMP_GET_METADATA,
        tid,
        ctypes.sizeof(metadata),
        ctypes.addressof(metadata),
    )
    return metadata.flags, program.raw


def get_siginfo(tid: int) -> bytes:
    """The siginfo of the signal a thread in a signal-delivery-stop is stopped for."""
    buffer = ctypes.create_string_buffer(SIGINFO_SIZE)
    _request("PTRACE_GETSIGINFO", PTRACE_GETSIGINFO, tid, 0, ctypes.addressof(buffer))
    return buffer.raw


def get_event_message(tid: int) -> int:
    message = ctypes.c_ulong()
    _request("PTRACE_GETEVENTMSG", PTRACE_GETEVENTMSG, tid, 0, ctypes.addressof(message))
    return message.value


def get_rseq_configuration(tid: int) -> RseqConfiguration:
    config = _RseqConfiguration()
    _request(
        "PTRACE_GET_RSEQ_CONFIGURATION",
        PTRACE_GET_RSEQ_CONFIGURATION,
        tid,
        ctypes.sizeof(config),
        ctypes.addressof(config),
    )
    return RseqConfiguration(
        config.rseq_abi_pointer, config.rseq_abi_size, config.signature, config.flags
    )


def wait_for(tid: int, *, nohang: bool = False) -> WaitResult | None:
    """waitpid(tid, __WALL): the next state change of a traced task.

    Returns None with `nohang` when nothing changed. A task that no longer
    exists (already reaped elsewhere) raises ProcessGone.
    """
    try:
        pid, status = os.waitpid(tid, WALL | (os.WNOHANG if nohang else 0))
    except ChildProcessError:
        raise_for_errno(errno_codes.ESRCH, "waitpid", tid, f"thread {tid}")
    if pid == 0:
        return None
    return WaitResult(pid, status)
