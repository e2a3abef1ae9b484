"""Make a seized target fork its shadow.

The shadow must inherit every open file description of the target, yet must not
stay the target's child (the target's wait() and SIGCHLD stay undisturbed). So,
all by injected system calls:

    target:        clone(exit_signal 0) -> intermediate
    intermediate:  clone(SIGCHLD) -> shadow; then exit(0)
    target:        wait4(intermediate, __WALL)
    shadow:        setsid(); fcntl(fd, F_SETFD, 0) for each inherited fd;
                   execve(python -m hijack.shadow ...)

An exit signal of 0 means the intermediate's death sends the target no SIGCHLD,
and the target reaps it inside the injection, so no zombie is left either. The
shadow is re-parented to the nearest child subreaper (or init).

Only the two clones and the wait4 need the target stopped: `fork_shadow_copy`
does them and leaves the new copy stopped under our trace, the caller lets the
target run, and `become_shadow` then turns the copy into the shadow (its
setsid, descriptor flags and execve are the copy's own calls).
"""

from __future__ import annotations

import contextlib
import os
import signal
import struct
from collections.abc import Callable, Sequence

from hijack.errors import HijackError, ShadowError
from hijack.mutator.tracee import (
    MINUS_ONE,
    ThreadState,
    TracedThread,
    Tracee,
    inject_syscall,
    signals_deferred,
)
from hijack.sys import memory, procfs
from hijack.sys import ptrace as pt
from hijack.sys.process import WALL
from hijack.sys.syscall_numbers import SYSCALL_NUMBERS

O_CLOEXEC = 0o2000000
F_SETFD = 2
CLONE_VM = 0x100
PROT_READ_WRITE = 0x1 | 0x2
MAP_PRIVATE_ANONYMOUS = 0x02 | 0x20
PAGE_SIZE = 4096
CHILD_OPTIONS = (
    pt.PTRACE_O_TRACESYSGOOD
    | pt.PTRACE_O_TRACEFORK
    | pt.PTRACE_O_TRACEEXEC
    | pt.PTRACE_O_EXITKILL  # if hijack dies mid-way, no half-made shadow survives
)


ShadowCommand = Callable[[list[int]], Sequence[str]]


def fork_shadow(tracee: Tracee, command: ShadowCommand, env: dict[str, str]) -> int:
    """Fork a shadow out of `tracee`; it execs `command(inherited_fds)` (argv[0] a path).

    Returns the shadow's pid. The target's own registers are not restored here:
    the caller's release() of the tracee does that. (`hijack attach` releases
    the target between `fork_shadow_copy` and `become_shadow` instead.)
    """
    copy = fork_shadow_copy(tracee)
    return become_shadow(copy, tracee.syscall_address, command, env)


def fork_shadow_copy(tracee: Tracee, *, intermediate_shares_memory: bool = False) -> int:
    """The part that needs the target stopped: a copy of it, no longer its child; its pid.

    `intermediate_shares_memory`: the intermediate is cloned with CLONE_VM, so
    the target's page tables are copied once (for the copy), not twice and
    torn down once more (a snapshot's freeze: about 20 ms a GiB less).

    The copy is traced from birth (PTRACE_O_TRACEFORK) and stops by itself;
    `become_shadow` waits for that stop, after the target runs again.

    Atomic for SIGINT and SIGTERM (about a millisecond): an exception between
    the clone and the adoption of its child would leave a copy of the target
    running the target's own code once we are gone. The copy is traced with
    PTRACE_O_EXITKILL: if we die before it execs, it dies too.
    """
    copy_pid = 0
    try:
        with signals_deferred():
            copy_pid = _fork_copy(tracee, CLONE_VM if intermediate_shares_memory else 0)
    except BaseException:
        # A signal held back above is raised as the block ends, with the
        # copy already made: end it, since no one will get its pid.
        if copy_pid:
            discard_copy(copy_pid)
        raise
    return copy_pid


def become_shadow(
    copy_pid: int, syscall_address: int, command: ShadowCommand, env: dict[str, str]
) -> int:
    """Turn the copy into the shadow (the target may run meanwhile); its pid."""
    try:
        with signals_deferred():
            copy = _adopt_new_child(copy_pid)
            _become_shadow(copy, syscall_address, command, env)
    except BaseException:
        _kill_quietly(copy_pid)
        raise
    return copy_pid


def adopt_copy(copy_pid: int) -> TracedThread:
    """The copy, stopped at its birth (it never runs): injected calls may go into it."""
    return _adopt_new_child(copy_pid)


def discard_copy(copy_pid: int) -> None:
    """End a copy that will not become the shadow."""
    _kill_quietly(copy_pid)


def _fork_copy(tracee: Tracee, intermediate_flags: int = 0) -> int:
    # With CLONE_VM the intermediate runs on the target's stack: harmless, it
    # only ever runs our injected clone and exit, which touch no memory.
    intermediate = _spawn_child(tracee, clone_flags=intermediate_flags)
    try:
        pt.set_options(intermediate.tid, CHILD_OPTIONS)
        copy_pid = _clone_inside(intermediate, tracee.syscall_address, signal.SIGCHLD)
    except BaseException:
        _discard_intermediate(tracee, intermediate)
        raise
    try:
        _finish_intermediate(tracee, intermediate)
        tracee.put_back()  # the target's part is done: a killed hijack leaves it correct
    except BaseException:
        _kill_quietly(copy_pid)
        raise
    return copy_pid


def _spawn_child(tracee: Tracee, clone_flags: int) -> TracedThread:
    child_pid = tracee.checked_syscall("clone", clone_flags, 0, 0, 0, 0)
    return _adopt_new_child(child_pid)


def _clone_inside(parent: TracedThread, syscall_address: int, exit_signal: int) -> int:
    """clone() in `parent`: the child's pid (traced from birth: its first stop comes later)."""
    child_pid = inject_syscall(parent, syscall_address, "clone", exit_signal, 0, 0, 0, 0)
    if child_pid < 0:
        raise ShadowError(f"clone inside the intermediate failed: {os.strerror(-child_pid)}")
    return child_pid


def _adopt_new_child(child_pid: int) -> TracedThread:
    """Wait for the first stop of a child auto-attached by TRACECLONE/TRACEFORK."""
    result = pt.wait_for(child_pid)
    assert result is not None
    if result.exited:
        raise ShadowError(f"the forked child {child_pid} {result.describe()}", pid=child_pid)
    registers = pt.get_registers(child_pid)
    return TracedThread(
        child_pid,
        state=ThreadState.STOPPED,
        registers=registers,
        signal_mask=pt.get_signal_mask(child_pid),
    )


def _finish_intermediate(tracee: Tracee, intermediate: TracedThread) -> None:
    """Let the intermediate exit untraced, then reap it inside the target."""
    exit_call = intermediate.saved_registers.replace(
        rax=SYSCALL_NUMBERS["exit"], rdi=0, rip=tracee.syscall_address, orig_rax=MINUS_ONE
    )
    pt.set_registers(intermediate.tid, exit_call)
    pt.detach(intermediate.tid)
    intermediate.state = ThreadState.RELEASED
    reaped = tracee.checked_syscall("wait4", intermediate.tid, 0, WALL, 0)
    if reaped != intermediate.tid:
        raise ShadowError(f"the target reaped {reaped}, not the intermediate {intermediate.tid}")


def _discard_intermediate(tracee: Tracee, intermediate: TracedThread) -> None:
    _kill_quietly(intermediate.tid)
    tracee.syscall("wait4", intermediate.tid, 0, WALL, 0)


def _kill_quietly(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    # As its tracer we see its death first; best effort on an error path.
    with contextlib.suppress(HijackError):
        pt.wait_for(pid)


def _become_shadow(
    shadow: TracedThread, syscall_address: int, command: ShadowCommand, env: dict[str, str]
) -> None:
    def call(name: str, *args: int) -> int:
        result = inject_syscall(shadow, syscall_address, name, *args)
        if -4096 < result < 0:
            raise ShadowError(f"{name} in the new shadow failed: {os.strerror(-result)}")
        return result

    # Its own session: the terminal's ^C and job control reach the target, not it.
    call("setsid")
    inherited = [entry.fd for entry in procfs.list_fds(shadow.tid)]
    for fd in inherited:
        if procfs.read_fdinfo(shadow.tid, fd).flags & O_CLOEXEC:
            call("fcntl", fd, F_SETFD, 0)
    argv = command(inherited)
    strings = exec_arguments_block(0, argv, env)
    size = (len(strings.block) + PAGE_SIZE - 1) // PAGE_SIZE * PAGE_SIZE
    base = call("mmap", 0, size, PROT_READ_WRITE, MAP_PRIVATE_ANONYMOUS, MINUS_ONE, 0)
    strings = exec_arguments_block(base, argv, env)
    memory.write(shadow.tid, base, strings.block)
    # execve keeps the signal mask; the injection blocked everything.
    pt.set_signal_mask(shadow.tid, 0)
    call("execve", strings.path, strings.argv, strings.envp)
    # After execve the registers are the new program's: nothing to put back.
    pt.detach(shadow.tid)
    shadow.state = ThreadState.RELEASED


class ExecArguments:
    """execve's three pointers and the memory block they point into."""

    def __init__(self, block: bytes, path: int, argv: int, envp: int) -> None:
        self.block = block
        self.path = path
        self.argv = argv
        self.envp = envp


def exec_arguments_block(base: int, argv: Sequence[str], env: dict[str, str]) -> ExecArguments:
    """Lay out argv, envp and their strings for execve at address `base`."""
    arguments = [a.encode() + b"\0" for a in argv]
    environment = [f"{k}={v}".encode() + b"\0" for k, v in env.items()]
    pointer_bytes = (len(arguments) + 1 + len(environment) + 1) * 8
    strings = b"".join(arguments + environment)
    offsets: list[int] = []
    position = base + pointer_bytes
    for text in arguments + environment:
        offsets.append(position)
        position += len(text)
    argv_pointers = [*offsets[: len(arguments)], 0]
    envp_pointers = [*offsets[len(arguments) :], 0]
    pointers = struct.pack(
        f"<{len(argv_pointers) + len(envp_pointers)}Q", *argv_pointers, *envp_pointers
    )
    return ExecArguments(
        pointers + strings,
        path=offsets[0],
        argv=base,
        envp=base + len(argv_pointers) * 8,
    )
