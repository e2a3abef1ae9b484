"""A seized process: every thread stopped, system calls injected into one of them.

The life of a `Tracee` (reptyr's explicit states, CRIU's seize loop):

    seize() ─► all threads SEIZED, then STOPPED (PTRACE_INTERRUPT, no SIGSTOP)
            ─► syscall(...) any number of times in the injection thread
            ─► release(): every thread gets back its registers and signal mask,
               and is detached; a blocking call it was in is restarted as the
               kernel would have restarted it.

`release()` runs on success, on an exception, on SIGINT or SIGTERM (the CLI
turns those into exceptions), so the target is left as it was found.
"""

from __future__ import annotations

import enum
import errno as errno_codes
import os
import signal
import struct
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from types import TracebackType

from hijack.errors import (
    AccessDenied,
    AlreadyTraced,
    HijackError,
    InjectionFailed,
    NotAttachable,
    ProcessGone,
)
from hijack.sys import memory, procfs
from hijack.sys import ptrace as pt
from hijack.sys.syscall_numbers import SYSCALL_NUMBERS

# rax values of a task stopped inside an interrupted system call.
ERESTARTSYS = -512
ERESTARTNOINTR = -513
ERESTARTNOHAND = -514
ERESTART_RESTARTBLOCK = -516
RESTART_SYSCALL_NR = SYSCALL_NUMBERS["restart_syscall"]
TIMER_ABSTIME = 1
FUTEX_CMD_MASK = 0x7F  # without FUTEX_PRIVATE_FLAG and FUTEX_CLOCK_REALTIME
FUTEX_WAIT_BITSET = 9  # its timeout is absolute
# The kernel function restart_syscall runs for a call it continues, as a
# thread's kernel stack shows it, and that call: a thread left in
# restart_syscall shows the call's arguments in its registers, but not its number.
RESTART_FUNCTIONS = {
    "do_restart_poll": SYSCALL_NUMBERS["poll"],
    "futex_wait_restart": SYSCALL_NUMBERS["futex"],
}
# Calls that fail with EINTR (not -ERESTART*) when a stop interrupts them.
EINTR_ON_STOP = frozenset(
    SYSCALL_NUMBERS[name]
    for name in (
        "epoll_wait",
        "epoll_pwait",
        "epoll_pwait2",
        "rt_sigtimedwait",
        "semop",
        "semtimedop",
        "io_getevents",
        "io_pgetevents",
    )
)

SYSCALL_INSTRUCTION = b"\x0f\x05"
SYSCALL_INSTRUCTION_LENGTH = len(SYSCALL_INSTRUCTION)
MINUS_ONE = (1 << 64) - 1
# Every signal blocked while we inject: nothing is delivered (or lost) mid-call;
# the kernel ignores the bits of SIGKILL and SIGSTOP.
ALL_SIGNALS_BLOCKED = MINUS_ONE

# How many times the thread list is re-read before we give up on a process
# that keeps creating threads faster than we seize them.
SEIZE_ROUNDS = 100

SEIZE_OPTIONS = pt.PTRACE_O_TRACESYSGOOD | pt.PTRACE_O_TRACECLONE

SCRATCH_SIZE = 4096  # one page
BORROWED_SCRATCH = 256  # bytes; the calls of a dump write at most 32 at once
RED_ZONE = 128  # bytes below the stack pointer the x86-64 ABI lets a function keep
PROT_READ_WRITE = 0x1 | 0x2
MAP_PRIVATE_ANONYMOUS = 0x02 | 0x20


class ThreadState(enum.Enum):
    SEIZED = "seized"  # traced, still running
    STOPPED = "stopped"  # in a ptrace-stop, registers saved
    INJECTING = "injecting"  # registers changed by us; must be put back
    # Registers and signal mask already as the release leaves them: still
    # stopped, but a tracer that dies now (SIGKILL) leaves the thread correct.
    PUT_BACK = "put back"
    RELEASED = "released"  # detached, running as before
    GONE = "gone"  # exited while we held it


@dataclass
class TracedThread:
    tid: int
    state: ThreadState = ThreadState.SEIZED
    registers: pt.Registers | None = None  # as found at the stop
    signal_mask: int = 0
    # Traced from birth (TRACECLONE): its first stop comes without an
    # interrupt, and one sent while it sits in that stop makes a second.
    first_stop_pending: bool = False
    # The call the kernel continues in restart_syscall for it, if any (seen
    # on its kernel stack before the stop; the stop itself hides it).
    restarted_call: int | None = None

    @property
    def saved_registers(self) -> pt.Registers:
        if self.registers is None:
            raise HijackError(f"thread {self.tid} has no saved registers", pid=self.tid)
        return self.registers


@dataclass
class Tracee:
    """A process whose threads hijack holds stopped."""

    pid: int
    threads: dict[int, TracedThread] = field(default_factory=dict)
    syscall_address: int = 0
    injection_tid: int = 0
    stopped_at: float = 0.0  # perf_counter() when we began stopping it
    released_at: float = 0.0  # perf_counter() when every thread ran again
    injected: int = 0  # system calls injected so far (each a few ptrace round trips)
    stops: int = 0  # ptrace stops they took: two a single call, one a batch a thread (parasite)

    @property
    def pause_ms(self) -> float:
        """How long the target was stopped (from our first interrupt to its release)."""
        if not self.stopped_at:
            return 0.0
        return ((self.released_at or time.perf_counter()) - self.stopped_at) * 1000

    # -- the context-manager form: `with Tracee.seize(pid) as tracee:` ----------

    @classmethod
    def seize(cls, pid: int, *, job_stopped: bool = False) -> Tracee:
        """Seize and stop every thread of `pid`; `job_stopped`: a process stopped by job
        control is taken too (a tree's member: it stays stopped when released)."""
        tracee = cls(pid)
        check_attachable(pid, job_stopped=job_stopped)
        # Read while the target still runs: its vdso and text do not move. Except
        # inside an execve: a process seized just after its exec began (its parent
        # saw its close-on-exec descriptors close) may have no vdso or text mapped
        # yet; its stop comes once the exec is done, so look again then.
        with suppress(InjectionFailed):
            tracee.syscall_address = find_syscall_instruction(pid)
        try:
            # Atomic for SIGINT/SIGTERM: a stop collected but not yet recorded
            # would leave release() waiting for a stop that never comes.
            with signals_deferred():
                tracee._seize_all_threads()
                tracee._note_restarted_calls()
                tracee._stop_all_threads()
            tracee.injection_tid = pid if pid in tracee.threads else min(tracee.threads)
            if not tracee.syscall_address:
                tracee.syscall_address = find_syscall_instruction(pid)
        except BaseException:
            tracee.release()
            raise
        return tracee

    def __enter__(self) -> Tracee:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    # -- stopping ---------------------------------------------------------------

    def _seize_all_threads(self) -> None:
        """Seize every thread, re-reading the list until no new thread appears.

        With PTRACE_O_TRACECLONE, threads created by a seized thread are traced
        from birth; only threads created by not-yet-seized ones need the re-read.
        """
        for _ in range(SEIZE_ROUNDS):
            fresh = [tid for tid in procfs.list_threads(self.pid) if tid not in self.threads]
            if not fresh:
                if not self.threads:
                    raise ProcessGone(f"process {self.pid} has no threads left", pid=self.pid)
                return
            for tid in fresh:
                traced_from_birth = self._seize_thread(tid)
                if traced_from_birth is not None:
                    self.threads[tid] = TracedThread(tid, first_stop_pending=traced_from_birth)
        raise HijackError(
            f"process {self.pid} keeps creating threads; could not seize them all", pid=self.pid
        )

    def _seize_thread(self, tid: int) -> bool | None:
        """Seize one thread of the list: whether it was traced from birth; None if it exited.

        The kernel refuses (EPERM) to seize a thread that a seized thread has
        just created: TRACECLONE made it ours at birth, with its first stop
        already pending. It refuses a dying thread too.
        """
        try:
            pt.seize(tid, SEIZE_OPTIONS)
        except ProcessGone:
            if tid == self.pid:
                raise
            return None  # a thread that exited between the listing and the seize
        except (AlreadyTraced, AccessDenied):
            if tid == self.pid:
                raise
            try:
                status = procfs.read_status(tid)
            except ProcessGone:
                return None
            if status.state in ("Z", "X"):
                return None
            if status.tracer_pid != threading.get_native_id():
                raise
            return True
        return False

    def _note_restarted_calls(self) -> None:
        """Before the stop: which call each thread sleeping in restart_syscall continues."""
        for thread in self.threads.values():
            thread.restarted_call = restarted_call(self.pid, thread.tid)

    def _stop_all_threads(self) -> None:
        self.stopped_at = time.perf_counter()
        for thread in list(self.threads.values()):
            if thread.first_stop_pending:
                continue
            try:
                pt.interrupt(thread.tid)
            except ProcessGone:
                thread.state = ThreadState.GONE
        # Wait on each thread by its own id: a wait on -1 would also reap
        # children of ours that are not the target's threads.
        pending = [t.tid for t in self.threads.values() if t.state is ThreadState.SEIZED]
        while pending:
            tid = pending.pop()
            result = pt.wait_for(tid)
            assert result is not None
            born = self._on_stop_while_stopping(self.threads[tid], result)
            # A thread born to a seized one may be known already, from the list.
            if born is not None and born not in self.threads:
                self.threads[born] = TracedThread(born)
                pending.append(born)
            if self.threads[tid].state is ThreadState.SEIZED:
                pending.append(tid)
        if self.threads[self.pid].state is ThreadState.GONE:
            raise ProcessGone(f"process {self.pid} exited while being stopped", pid=self.pid)

    @staticmethod
    def _on_stop_while_stopping(thread: TracedThread, result: pt.WaitResult) -> int | None:
        """Move `thread` on after one wait result; return the tid of a thread it created."""
        if result.exited:
            thread.state = ThreadState.GONE
            return None
        if result.event == pt.PTRACE_EVENT_STOP:
            # Either our interrupt or a job-control stop that was in force
            # before we came; the kernel puts the latter back on detach.
            thread.registers = pt.get_registers(thread.tid)
            thread.signal_mask = pt.get_signal_mask(thread.tid)
            thread.state = ThreadState.STOPPED
            return None
        # Any other stop came before our interrupt and consumed it (the kernel
        # clears a pending STOP trap at every trap): interrupt again, which
        # stops the thread as soon as it is resumed.
        pt.interrupt(thread.tid)
        if result.event == pt.PTRACE_EVENT_CLONE:
            # It made a thread before our interrupt reached it. The new thread
            # is traced from birth (TRACECLONE) and reports its own first stop.
            born = pt.get_event_message(thread.tid)
            pt.resume(thread.tid)
            return born
        # A signal arrived before the interrupt: deliver it as the kernel would
        # have (a handler runs, or the default action happens).
        pt.resume(thread.tid, result.stop_signal)
        return None

    # -- injecting ----------------------------------------------------------------

    def syscall(self, name: str, *args: int, tid: int | None = None) -> int:
        """Run system call `name` inside the target; return its raw (signed) result.

        The call runs through a `syscall` instruction the target already has, so
        no code is ever patched. Only the registers change, and release() puts
        them back.
        """
        thread = self.threads[tid or self.injection_tid]
        self.injected += 1
        self.stops += 2
        return inject_syscall(thread, self.syscall_address, name, *args)

    def checked_syscall(self, name: str, *args: int, tid: int | None = None) -> int:
        """syscall(), raising InjectionFailed when the call returns an error."""
        result = self.syscall(name, *args, tid=tid)
        if -4096 < result < 0:
            raise InjectionFailed(
                f"{name} inside process {self.pid} failed: {os.strerror(-result)}",
                pid=self.pid,
                errno=-result,
                syscall=name,
            )
        return result

    # -- releasing ----------------------------------------------------------------

    def put_back(self) -> None:
        """Give every thread we injected into its own registers and mask again, still stopped.

        Done once the injected calls are over, so that if hijack is killed
        (SIGKILL) while it goes on working from outside, the kernel's detach
        lets the threads run on correctly. Injecting again is allowed.
        """
        for thread in self.threads.values():
            try:
                with signals_deferred():
                    put_back_thread(thread)
            except ProcessGone:
                thread.state = ThreadState.GONE

    def release(self) -> None:
        """Put every thread back as it was and let it run. Safe to call twice."""
        failures: list[str] = []
        for thread in self.threads.values():
            try:
                release_thread(thread)
            except ProcessGone:
                thread.state = ThreadState.GONE
            except HijackError as exc:
                failures.append(str(exc))
        if self.stopped_at and not self.released_at:
            self.released_at = time.perf_counter()
        if failures:
            raise HijackError(
                f"could not release every thread of process {self.pid}: {'; '.join(failures)}",
                pid=self.pid,
            )

    @property
    def thread_ids(self) -> list[int]:
        return sorted(t.tid for t in self.threads.values() if t.state is not ThreadState.GONE)


@contextmanager
def scratch_page(tracee: Tracee) -> Iterator[int]:
    """A private page mapped inside the target for injected calls to write into."""
    address = tracee.checked_syscall(
        "mmap", 0, SCRATCH_SIZE, PROT_READ_WRITE, MAP_PRIVATE_ANONYMOUS, -1, 0
    )
    try:
        yield address
    finally:
        tracee.syscall("munmap", address, SCRATCH_SIZE)


@contextmanager
def scratch_below_stack(tracee: Tracee, maps: list[procfs.MapEntry]) -> Iterator[int]:
    """BORROWED_SCRATCH bytes for injected calls to write into, without mapping a page (two
    injected calls fewer than scratch_page): below the injection thread's stack pointer and
    its red zone, where a signal handler may write anyway, and put back as found. A
    scratch_page where those bytes are not in a writable mapping of `maps` (the layout
    now), or where the process locks its memory (settings read mlockall(MCL_FUTURE) off
    a fresh page)."""
    stack_pointer = tracee.threads[tracee.injection_tid].saved_registers.rsp
    address = (stack_pointer - RED_ZONE - BORROWED_SCRATCH) & ~0xF
    writable = any(
        entry.start <= address and address + BORROWED_SCRATCH <= entry.end and entry.writable
        for entry in maps
    )
    if not writable or procfs.read_status(tracee.pid).locked_bytes:
        with scratch_page(tracee) as scratch:
            yield scratch
        return
    found = memory.read(tracee.pid, address, BORROWED_SCRATCH)
    try:
        yield address
    finally:
        memory.write(tracee.pid, address, found)


def restarted_call(pid: int, tid: int) -> int | None:
    """The call a thread blocked in restart_syscall continues, from its kernel stack."""
    try:
        if procfs.read_task_syscall(pid, tid) != RESTART_SYSCALL_NR:
            return None
        stack = procfs.read_task_kernel_stack(pid, tid)
    except HijackError:
        return None  # gone, or a stack we may not read: the call stays unknown
    return next((RESTART_FUNCTIONS[f] for f in stack if f in RESTART_FUNCTIONS), None)


def recorded_registers(thread: TracedThread) -> pt.Registers:
    """A stopped thread's registers for an image, which a new process must be able to resume.

    A thread stopped in restart_syscall shows orig_rax = restart_syscall; a
    new process has no restart block to continue, so the image names the call
    it continues instead (its arguments are still in the registers), for the
    restore to re-issue it (resume_registers).
    """
    registers = thread.saved_registers
    if (
        thread.restarted_call is not None
        and registers.orig_rax == RESTART_SYSCALL_NR
        and registers.signed("rax") == ERESTART_RESTARTBLOCK
    ):
        return registers.replace(orig_rax=thread.restarted_call)
    return registers


def check_attachable(pid: int, *, job_stopped: bool = False) -> None:
    """Refuse, with a clear reason, the processes hijack must not seize (one stopped by
    job control too, unless `job_stopped`)."""
    if pid <= 0:
        raise NotAttachable(f"{pid} is not a valid process id", pid=pid)
    if pid == os.getpid():
        raise NotAttachable("hijack cannot attach to itself", pid=pid)
    status = procfs.read_status(pid)
    if status.tgid != pid:
        raise NotAttachable(
            f"{pid} is a thread of process {status.tgid}; give the process id", pid=pid
        )
    if procfs.is_kernel_thread(pid):
        raise NotAttachable(f"process {pid} ({status.name}) is a kernel thread", pid=pid)
    if status.state.startswith(("Z", "X")):
        raise NotAttachable(f"process {pid} ({status.name}) is a zombie", pid=pid)
    if status.state.startswith("T") and not job_stopped:
        # A job-control stop is re-entered whenever we resume a thread to inject.
        raise NotAttachable(
            f"process {pid} ({status.name}) is stopped by job control;"
            f" continue it first (kill -CONT {pid})",
            pid=pid,
        )
    if status.nspid and status.nspid[-1] == 1:
        # Orphans in a pid namespace go to its init: a shadow forked there
        # would end up the target's own child, and its death would end them all.
        raise NotAttachable(
            f"process {pid} ({status.name}) is the init of a pid namespace", pid=pid
        )


def find_syscall_instruction(pid: int) -> int:
    """Address of a `syscall` instruction in the target's vdso (or, failing that, its text).

    The vdso always has one (its fallback paths make real system calls); any
    executable mapping of libc does too, for a process started without a vdso.
    """
    maps = procfs.read_maps(pid)
    candidates = [m for m in maps if m.path == "[vdso]"]
    candidates += [m for m in maps if "x" in m.perms and m.path not in ("[vdso]", "[vsyscall]")]
    for mapping in candidates:
        try:
            text = memory.read(pid, mapping.start, mapping.end - mapping.start)
        except HijackError:
            continue
        offset = text.find(SYSCALL_INSTRUCTION)
        if offset >= 0:
            return mapping.start + offset
    raise InjectionFailed(f"no syscall instruction found in process {pid}", pid=pid)


@contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM while a traced thread is between two of our stops.

    An exception there would unwind while the thread runs with injected
    registers that no one can put back until it stops again; the signal is
    handled (and raises) the moment the block ends, with the thread stopped.
    """
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


MAX_JOB_CONTROL_STOPS = 2


def inject_syscall(thread: TracedThread, syscall_address: int, name: str, *args: int) -> int:
    """One injected system call in a stopped thread: set registers, run it, read rax."""
    with signals_deferred():
        return _inject_syscall(thread, syscall_address, name, *args)


def _inject_syscall(thread: TracedThread, syscall_address: int, name: str, *args: int) -> int:
    _set_syscall(thread, syscall_address, name, *args)
    _run_to_syscall_stop(thread.tid, name, entering=True)
    _run_to_syscall_stop(thread.tid, name, entering=False)
    return pt.get_registers(thread.tid).signed("rax")


def syscalls_side_by_side(
    calls: Sequence[tuple[Tracee, str, tuple[int, ...]]],
) -> list[int | HijackError]:
    """One injected system call in each of several stopped processes (a tree's members:
    `tracee`, `name`, `args`), run at once: each is set and resumed before any is waited
    for, at its entry and at its exit, so that they cost two trips through the scheduler,
    not two each (under load ~1 ms a trip). Each call's raw result, in order, or the
    error that stopped it (the others are taken to their exit all the same, each stopped
    again then, as after Tracee.syscall)."""
    results: list[int | HijackError] = []
    running: list[tuple[int, TracedThread, str]] = []  # (index in calls, thread, name)
    with signals_deferred():
        for index, (tracee, name, args) in enumerate(calls):
            thread = tracee.threads[tracee.injection_tid]
            tracee.injected += 1
            tracee.stops += 2
            results.append(0)
            try:
                _set_syscall(thread, tracee.syscall_address, name, *args)
                pt.resume_to_syscall(thread.tid)
            except HijackError as exc:
                results[index] = exc
                continue
            running.append((index, thread, name))
        for entering in (True, False):
            stopped: list[tuple[int, TracedThread, str]] = []
            for index, thread, name in running:
                try:
                    _await_syscall_stop(thread.tid, name, entering=entering)
                    if entering:
                        pt.resume_to_syscall(thread.tid)  # on to its exit
                    else:
                        results[index] = pt.get_registers(thread.tid).signed("rax")
                except HijackError as exc:
                    results[index] = exc
                    continue
                stopped.append((index, thread, name))
            running = stopped
    return results


def _set_syscall(thread: TracedThread, syscall_address: int, name: str, *args: int) -> None:
    """A stopped thread's registers set for system call `name` (inject_syscall's)."""
    if len(args) > 6:
        raise ValueError(f"{name}: at most 6 arguments")
    if thread.state in (ThreadState.STOPPED, ThreadState.PUT_BACK):
        pt.set_signal_mask(thread.tid, ALL_SIGNALS_BLOCKED)
        thread.state = ThreadState.INJECTING
    elif thread.state is not ThreadState.INJECTING:
        raise InjectionFailed(f"thread {thread.tid} is {thread.state.value}", pid=thread.tid)
    argument_registers = ("rdi", "rsi", "rdx", "r10", "r8", "r9")
    values = {reg: arg & MINUS_ONE for reg, arg in zip(argument_registers, args, strict=False)}
    call = thread.saved_registers.replace(
        rax=SYSCALL_NUMBERS[name], rip=syscall_address, orig_rax=MINUS_ONE, **values
    )
    pt.set_registers(thread.tid, call)


# While code of ours runs in a thread, every signal is blocked but SIGTRAP: the int3 that
# ends it raises a forced SIGTRAP, and the kernel resets the handler of a forced signal
# that is blocked (force_sig_info_to_task), which would change the process (CRIU's
# compel leaves it unblocked for the same reason).
CODE_SIGNAL_MASK = ALL_SIGNALS_BLOCKED & ~(1 << (signal.SIGTRAP - 1))
SI_KERNEL = 0x80  # si_code of the SIGTRAP an int3 raises


def run_code(
    thread: TracedThread, entry: int, trap: int, **registers: int
) -> tuple[int, list[bytes]]:
    """Run code of ours at `entry` in a stopped thread until its int3 (rip `trap` at the
    stop), with `registers` set; return r14 there and the siginfos of any SIGTRAP others
    sent meanwhile (taken at their delivery stop, for the caller to queue again).

    Stops are handled as inject_syscall handles them; the thread's registers and mask
    are put back by put_back/release as for any injected call.
    """
    [ran] = run_code_side_by_side([(thread, registers)], entry, trap)
    return ran


def run_code_side_by_side(
    runs: Sequence[tuple[TracedThread, Mapping[str, int]]], entry: int, trap: int
) -> list[tuple[int, list[bytes]]]:
    """run_code in several stopped threads at once, each with its own registers: every
    thread is set and resumed before any is waited for, so that their runs cost one trip
    through the scheduler, not one each (a JVM's 30 threads: ~1 ms each under load).

    Where one fails, the others are still waited for (to their int3 or their own failure)
    before the first failure is raised: every thread is stopped again then, for put_back
    and release to find it so.
    """
    return run_code_across([(thread, entry, trap, registers) for thread, registers in runs])


def run_code_across(
    runs: Sequence[tuple[TracedThread, int, int, Mapping[str, int]]],
) -> list[tuple[int, list[bytes]]]:
    """run_code_side_by_side where each thread has its own code (`thread`, its `entry`, its
    `trap`, `registers`): threads of several processes (a tree's members, each its own
    area), all resumed before any is waited for."""
    failure: HijackError | None = None
    started: list[tuple[TracedThread, int]] = []
    results: list[tuple[int, list[bytes]]] = []
    with signals_deferred():
        for thread, entry, trap, registers in runs:
            try:
                _start_code(thread, entry, registers)
            except HijackError as exc:
                failure = exc
                break
            started.append((thread, trap))
        for thread, trap in started:
            try:
                results.append(_wait_for_trap(thread, trap))
            except HijackError as exc:
                failure = failure or exc
    if failure is not None:
        raise failure
    return results


def _start_code(thread: TracedThread, entry: int, registers: Mapping[str, int]) -> None:
    if thread.state in (ThreadState.STOPPED, ThreadState.PUT_BACK):
        thread.state = ThreadState.INJECTING
    elif thread.state is not ThreadState.INJECTING:
        raise InjectionFailed(f"thread {thread.tid} is {thread.state.value}", pid=thread.tid)
    pt.set_signal_mask(thread.tid, CODE_SIGNAL_MASK)
    pt.set_registers(
        thread.tid, thread.saved_registers.replace(rip=entry, orig_rax=MINUS_ONE, **registers)
    )
    pt.resume(thread.tid)


def _wait_for_trap(thread: TracedThread, trap: int) -> tuple[int, list[bytes]]:
    """Wait for a thread running code of ours to stop at its int3; its r14 and strays."""
    strays: list[bytes] = []
    job_control_stops = 0
    while True:
        result = pt.wait_for(thread.tid)
        assert result is not None
        if result.exited:
            raise ProcessGone(
                f"thread {thread.tid} {result.describe()} during injected code",
                pid=thread.tid,
            )
        if result.stop_signal == signal.SIGTRAP and not result.event:
            siginfo = pt.get_siginfo(thread.tid)
            (code,) = struct.unpack_from("<i", siginfo, 8)
            at_trap = pt.get_registers(thread.tid)
            if code == SI_KERNEL and at_trap.rip == trap:
                break
            strays.append(siginfo)  # someone's kill(SIGTRAP): kept for later
            pt.resume(thread.tid)
            continue
        if result.event == pt.PTRACE_EVENT_STOP and job_control_stops < MAX_JOB_CONTROL_STOPS:
            job_control_stops += 1  # as in _run_to_syscall_stop
            pt.resume(thread.tid)
            continue
        raise InjectionFailed(
            f"thread {thread.tid} {result.describe()} during injected code", pid=thread.tid
        )
    # Single calls after this run with every signal blocked again.
    pt.set_signal_mask(thread.tid, ALL_SIGNALS_BLOCKED)
    return at_trap.r14, strays


def _run_to_syscall_stop(tid: int, name: str, *, entering: bool) -> None:
    pt.resume_to_syscall(tid)
    _await_syscall_stop(tid, name, entering=entering)


def _await_syscall_stop(tid: int, name: str, *, entering: bool) -> None:
    """Wait for a thread resumed to its next syscall stop to reach it (stops on the way
    handled as they come)."""
    job_control_stops = 0
    while True:
        result = pt.wait_for(tid)
        assert result is not None
        if result.exited:
            raise ProcessGone(f"thread {tid} {result.describe()} during injected {name}", pid=tid)
        if result.is_syscall_stop:
            return
        if result.event == pt.PTRACE_EVENT_STOP and job_control_stops < MAX_JOB_CONTROL_STOPS:
            # A thread stopped by job control traps again once when first resumed
            # (measured); resumed once more it runs the call, and the kernel puts
            # its stop back on detach.
            job_control_stops += 1
            pt.resume_to_syscall(tid)
            continue
        if result.event in (pt.PTRACE_EVENT_CLONE, pt.PTRACE_EVENT_FORK, pt.PTRACE_EVENT_EXEC):
            # The injected clone/fork/execve reports its event between the entry
            # and exit stops; the caller picks the new child up by waiting on it.
            pt.resume_to_syscall(tid)
            continue
        raise InjectionFailed(
            f"thread {tid} {result.describe()} during injected {name}"
            f" ({'entry' if entering else 'exit'})",
            pid=tid,
        )


def release_thread(thread: TracedThread) -> None:
    with signals_deferred():
        _release_thread(thread)


def put_back_thread(thread: TracedThread, pending: bool | None = None) -> None:
    """An injected thread's registers (rewound into its interrupted call) and mask, as found.
    `pending`: whether a signal it does not block waits, if known (read from /proc if not)."""
    if thread.state is not ThreadState.INJECTING:
        return
    found = thread.saved_registers
    if pending is None:
        pending = pending_matters(found) and signal_pending(thread.tid, thread.signal_mask)
    # We left the kernel's signal path to inject, so it will not restart the
    # interrupted call for us: rewind to it ourselves (KERNEL-NOTES).
    pt.set_registers(
        thread.tid, resume_registers(found, restart_block_available=True, signal_pending=pending)
    )
    pt.set_signal_mask(thread.tid, thread.signal_mask)
    thread.state = ThreadState.PUT_BACK


def _release_thread(thread: TracedThread) -> None:
    if thread.state in (ThreadState.RELEASED, ThreadState.GONE):
        return
    if thread.state in (ThreadState.INJECTING, ThreadState.PUT_BACK):
        put_back_thread(thread)
        pt.detach(thread.tid)
        thread.state = ThreadState.RELEASED
        return
    if thread.state is ThreadState.SEIZED:
        # Never stopped (an error came first): detaching a running task needs a stop.
        pt.interrupt(thread.tid)
        _wait_for_stop(thread.tid)
        pt.detach(thread.tid)
        thread.state = ThreadState.RELEASED
        return
    found = thread.saved_registers
    pending = pending_matters(found) and signal_pending(thread.tid, thread.signal_mask)
    # Still in the kernel's signal path: it restarts -ERESTART* calls
    # itself; the calls that our stop made fail with EINTR need us, and so
    # does a call it would continue through restart_syscall where
    # re-running the call itself is exact (see _reissue_when_live).
    resumed = restart_spurious_eintr(found, signal_pending=pending)
    if not pending and found.signed("rax") == ERESTART_RESTARTBLOCK and _reissue_when_live(found):
        resumed = resume_registers(found, restart_block_available=True, signal_pending=False)
    if resumed != found:
        pt.set_registers(thread.tid, resumed)
    pt.detach(thread.tid)
    thread.state = ThreadState.RELEASED


def pending_matters(registers: pt.Registers) -> bool:
    """Whether how a thread stopped with `registers` resumes depends on a signal waiting
    for it: only where it was in a call a stop alone fails with EINTR
    (restart_spurious_eintr), or one the kernel continues through restart_syscall
    (_release_thread). Every other thread is spared the read of /proc (~40 us each, idle:
    a 31-thread JVM's put_back spent 1-3 ms in them)."""
    result = registers.signed("rax")
    return (result == -errno_codes.EINTR and registers.orig_rax in EINTR_ON_STOP) or (
        result == ERESTART_RESTARTBLOCK and registers.signed("orig_rax") >= 0
    )


def signal_pending(tid: int, blocked: int) -> bool:
    """Whether a signal the thread does not block waits for it (thread or process queue)."""
    try:
        status = procfs.read_status(tid)
    except HijackError:
        return False
    return bool((status.sig_pnd | status.shd_pnd) & ~blocked)


def _wait_for_stop(tid: int) -> None:
    while True:
        result = pt.wait_for(tid)
        assert result is not None
        if result.exited:
            raise ProcessGone(f"thread {tid} {result.describe()}", pid=tid)
        if result.event == pt.PTRACE_EVENT_STOP:
            return
        pt.interrupt(tid)  # that stop consumed the pending interrupt
        pt.resume(tid, 0 if result.event else result.stop_signal)


def resume_registers(
    registers: pt.Registers, *, restart_block_available: bool, signal_pending: bool
) -> pt.Registers:
    """Registers that re-enter the system call a thread was stopped in, as the kernel would.

    -ERESTARTSYS/-ERESTARTNOINTR/-ERESTARTNOHAND re-run the call itself.
    -ERESTART_RESTARTBLOCK continues through restart_syscall on the live task,
    whose kernel keeps the restart block (what is left of a timed wait) —
    unless re-issuing the call is as good (_reissue_when_live). A new process
    (a restore) has no restart block, so the call is re-issued: a sleep with
    the time that was left (the kernel wrote it to the caller's `rem`), an
    absolute futex timeout as it was; a poll, a relative futex wait or a
    sleep without `rem` with its whole timeout again — up to one timeout
    longer than the program asked for, never shorter, never EINTR.
    """
    if registers.signed("orig_rax") < 0:
        return registers
    result = registers.signed("rax")
    rewound = registers.rip - SYSCALL_INSTRUCTION_LENGTH
    if result in (ERESTARTSYS, ERESTARTNOINTR, ERESTARTNOHAND):
        return registers.replace(rax=registers.orig_rax, rip=rewound)
    if result == ERESTART_RESTARTBLOCK:
        if restart_block_available and not _reissue_when_live(registers):
            return registers.replace(rax=RESTART_SYSCALL_NR, rip=rewound)
        return _reissue_sleep(registers).replace(rax=registers.orig_rax, rip=rewound)
    return restart_spurious_eintr(registers, signal_pending=signal_pending)


def _reissue_when_live(registers: pt.Registers) -> bool:
    """Whether a live thread re-runs the call itself rather than restart_syscall.

    Where that does what restart_syscall would, it is preferred: a thread left
    in restart_syscall no longer shows which call it is in, and a later dump
    of it (a move after attach) must find the call on its kernel stack
    (RESTART_FUNCTIONS). A poll or relative futex wait with a finite timeout
    goes on through restart_syscall: re-issued, it would wait its whole
    timeout again at every attach.
    """
    if registers.orig_rax == SYSCALL_NUMBERS["poll"]:
        # poll's timeout is an int: a negative one (bit 31 of edx) waits for ever.
        return bool(registers.rdx & 0x80000000)
    if registers.orig_rax == SYSCALL_NUMBERS["futex"]:
        # glibc's timed waits (condition variables, semaphores) use an absolute time.
        return registers.rsi & FUTEX_CMD_MASK == FUTEX_WAIT_BITSET
    # A sleep: with a `rem`, where the kernel wrote the time left, exact (our
    # stop lengthens it by the pause, which a sleep is allowed to be);
    # without, its whole request again: a sleep may last longer, and its
    # restart is one no stack shows (RESTART_FUNCTIONS), so no image could
    # re-run it from restart_syscall.
    return registers.orig_rax in (SYSCALL_NUMBERS["nanosleep"], SYSCALL_NUMBERS["clock_nanosleep"])


def restart_spurious_eintr(registers: pt.Registers, *, signal_pending: bool) -> pt.Registers:
    """Undo the EINTR a ptrace stop alone makes some calls return (ptrace(2), BUGS).

    epoll_wait and a few others fail with EINTR on any stop, ours included,
    and are never restarted by the kernel. With no signal waiting, the EINTR
    was ours: re-enter the call.
    """
    if signal_pending or registers.signed("rax") != -errno_codes.EINTR:
        return registers
    if registers.orig_rax not in EINTR_ON_STOP:
        return registers
    return registers.replace(rax=registers.orig_rax, rip=registers.rip - SYSCALL_INSTRUCTION_LENGTH)


def _sleep_rem(registers: pt.Registers) -> int:
    """The `rem` pointer of an interrupted relative sleep (0: none, or no sleep)."""
    if registers.orig_rax == SYSCALL_NUMBERS["nanosleep"]:
        return registers.rsi
    if registers.orig_rax == SYSCALL_NUMBERS["clock_nanosleep"]:
        return 0 if registers.rsi & TIMER_ABSTIME else registers.r10
    return 0


def _reissue_sleep(registers: pt.Registers) -> pt.Registers:
    rem = _sleep_rem(registers)  # sleep what was left
    if not rem:
        return registers
    if registers.orig_rax == SYSCALL_NUMBERS["nanosleep"]:
        return registers.replace(rdi=rem)
    return registers.replace(rdx=rem)
