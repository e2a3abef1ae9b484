"""The small settings a process notices when lost: prctl flags, OOM score, timer slack,
audit login uid, membarrier registrations, mlockall flags, and each thread's
scheduling (policy, priority, nice, CPUs).

What /proc shows is read from outside; the prctl flags and membarrier
registrations only the process can tell, so they are asked by injected calls.
mlockall(MCL_FUTURE) is nowhere to be read: the kernel gives every new mapping
VM_LOCKED (VM_LOCKONFAULT with MCL_ONFAULT), so the dump's own scratch page,
mapped in the process anyway, shows it in smaps ("lo", "lf"). At restore, the
prctl flags are set by injected calls after the credentials (a change of
credentials resets the parent-death signal and the dumpable flag), the rest
from outside, once every thread exists.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

from hijack.image import records as rec
from hijack.in_thread import InThread
from hijack.mutator.parasite import Area, Batch
from hijack.mutator.tracee import BORROWED_SCRATCH, Tracee
from hijack.process import aio, seccomp
from hijack.restore.remote import Stub
from hijack.sys import dirty, procfs, scheduling

PR_SET_PDEATHSIG, PR_GET_PDEATHSIG = 1, 2
PR_GET_DUMPABLE, PR_SET_DUMPABLE = 3, 4
PR_SET_CHILD_SUBREAPER, PR_GET_CHILD_SUBREAPER = 36, 37
PR_SET_THP_DISABLE, PR_GET_THP_DISABLE = 41, 42
LOGINUID_UNSET = 2**32 - 1
SUID_DUMP_USER = 1  # what a fresh process has
AT_FDCWD, O_WRONLY = -100, 1
MADV_GUARD_INSTALL = 102
MEMBARRIER_CMD_GET_REGISTRATIONS = 1 << 9  # Linux 6.3+; EINVAL before: none read
# The REGISTER_* commands GET_REGISTRATIONS reports: GLOBAL_EXPEDITED, PRIVATE_EXPEDITED,
# PRIVATE_EXPEDITED_SYNC_CORE, PRIVATE_EXPEDITED_RSEQ.
MEMBARRIER_REGISTRATIONS = (1 << 2, 1 << 4, 1 << 6, 1 << 8)
MCL_FUTURE, MCL_ONFAULT = 2, 4
MLOCK_ONFAULT = 1


def read_settings(
    tracee: Tracee,
    scratch: int,
    thread_ids: list[int],
    *,
    aio_rings: tuple[rec.AioRing, ...] = (),
    mm_flags: tuple[int, bool] | None = None,
) -> rec.ProcessSettings:
    """queue_settings, run at once with `scratch` (at least 16 bytes) for what it writes."""
    batch = Batch(Area(scratch, BORROWED_SCRATCH, executable=False))
    read = queue_settings(
        tracee, batch, scratch, thread_ids, aio_rings=aio_rings, mm_flags=mm_flags
    )
    batch.run(tracee)
    return read()


def queue_settings(
    tracee: Tracee,
    batch: Batch,
    fresh_page: int,
    thread_ids: list[int],
    *,
    aio_rings: tuple[rec.AioRing, ...] = (),
    mm_flags: tuple[int, bool] | None = None,
    guard_regions: Callable[[], list[tuple[int, int]]] | None = None,
) -> Callable[[], rec.ProcessSettings]:
    """The settings of a stopped process; their injected calls go in `batch`, and the
    returned function tells them once it ran. `fresh_page`: an address in a page the dump
    mapped (tells mlockall(MCL_FUTURE)). `mm_flags`: the dumpable and THP-disable flags if
    known (read_mm_flags), not asked. `guard_regions`: tells its guard pages (a move's,
    scanned beside the batch), else they are scanned with the reads from outside."""
    pid = tracee.pid
    if mm_flags is None:
        dumpable_call = batch.call("prctl", PR_GET_DUMPABLE, 0, 0, 0, 0)
        thp_call = batch.call("prctl", PR_GET_THP_DISABLE, 0, 0, 0, 0)
    written = batch.buffer(8)
    batch.call("prctl", PR_GET_PDEATHSIG, written, 0, 0, 0)
    batch.call("prctl", PR_GET_CHILD_SUBREAPER, written + 4, 0, 0, 0)
    membarrier = batch.call("membarrier", MEMBARRIER_CMD_GET_REGISTRATIONS, 0, 0, check=False)
    # What /proc and the scheduler tell from outside needs no injected call: read by a
    # thread of ours while the batch runs (a JVM's 31 threads: 3.6-11 ms of a move's
    # freeze, one after the other before). Nothing the batch runs changes it.
    outside = InThread(
        _read_outside, pid, fresh_page, thread_ids, guard_regions is None, name="hijack-settings"
    )

    def read() -> rec.ProcessSettings:
        if mm_flags is None:
            assert dumpable_call.result is not None and thp_call.result is not None
            dumpable, thp_disable = dumpable_call.result, bool(thp_call.result)
        else:
            dumpable, thp_disable = mm_flags
        pdeath_signal, subreaper = struct.unpack("<ii", batch.read(written, 8))
        assert membarrier.result is not None
        found = outside.result()
        return rec.ProcessSettings(
            dumpable=dumpable,
            thp_disable=thp_disable,
            child_subreaper=bool(subreaper),
            pdeath_signal=pdeath_signal,
            timer_slack_ns=found.timer_slack_ns,
            oom_score_adj=found.oom_score_adj,
            loginuid=found.loginuid,
            # An older kernel (EINVAL) tells none.
            membarrier=membarrier.result if membarrier.result > 0 else 0,
            mlockall=found.mlockall,
            threads=found.threads,
            # The filters' programs by ptrace, from this (the tracing) thread.
            seccomp=seccomp.read_seccomp(tracee, found.seccomp_modes),
            guard_pages=tuple(
                rec.PageRange(start=start, end=end)
                for start, end in (guard_regions() if guard_regions is not None else found.guards)
            ),
            aio_rings=aio_rings,
        )

    return read


@dataclass(frozen=True)
class _Found:
    """What _read_outside read; the rest of ProcessSettings is the batch's."""

    timer_slack_ns: int
    oom_score_adj: int
    loginuid: int
    mlockall: int
    threads: tuple[rec.ThreadScheduling, ...]
    seccomp_modes: dict[int, tuple[int, int]]
    guards: list[tuple[int, int]]  # the guard pages, unless the caller scans them


def _read_outside(pid: int, fresh_page: int, thread_ids: list[int], scan_guards: bool) -> _Found:
    threads = []
    for tid in thread_ids:
        found = scheduling.read_scheduling(tid)
        threads.append(
            rec.ThreadScheduling(
                tid=tid,
                policy=found.policy,
                priority=found.priority,
                nice=found.nice,
                affinity=found.affinity,
            )
        )
    return _Found(
        timer_slack_ns=procfs.read_timer_slack_ns(pid),
        oom_score_adj=procfs.read_oom_score_adj(pid),
        loginuid=procfs.read_loginuid(pid),
        mlockall=_mlockall_flags(pid, fresh_page),
        threads=tuple(threads),
        seccomp_modes=seccomp.seccomp_modes(pid, thread_ids),
        guards=dirty.guard_regions(pid) if scan_guards else [],
    )


def read_mm_flags(tracee: Tracee) -> tuple[int, bool]:
    """The dumpable and THP-disable flags: the memory's (mm) flags, which a fork copies (so a
    snapshot's copy tells them after the freeze)."""
    dumpable = tracee.checked_syscall("prctl", PR_GET_DUMPABLE, 0, 0, 0, 0)
    return dumpable, bool(tracee.checked_syscall("prctl", PR_GET_THP_DISABLE, 0, 0, 0, 0))


def _mlockall_flags(pid: int, scratch: int) -> int:
    """MCL_FUTURE (| MCL_ONFAULT) when the page the dump mapped at `scratch` came locked."""
    # A page mapped VM_LOCKED counts in VmLck: none locked, no mlockall. Most processes
    # lock nothing, and so never pay for smaps (it walks every page table: 15 ms a GiB).
    if procfs.read_status(pid).locked_bytes == 0:
        return 0
    start = next(
        entry.start for entry in procfs.read_maps(pid) if entry.start <= scratch < entry.end
    )
    flags = procfs.read_smaps_flags(pid).get(start, ())
    if "lo" not in flags:
        return 0
    return MCL_FUTURE | (MCL_ONFAULT if "lf" in flags else 0)


def apply_settings(stub: Stub, settings: rec.ProcessSettings, thread_ids: dict[int, int]) -> None:
    """Give the stub `settings`; `thread_ids` maps the image's tids to the stub's.

    Runs after the credentials are restored and before the process starts.
    """
    with stub.batched():  # one stop for them all (hijack.mutator.parasite)
        if settings.dumpable != SUID_DUMP_USER:
            stub.call("prctl", PR_SET_DUMPABLE, settings.dumpable, 0, 0, 0)
        if settings.thp_disable:
            stub.call("prctl", PR_SET_THP_DISABLE, 1, 0, 0, 0)
        if settings.child_subreaper:
            stub.call("prctl", PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
        for command in MEMBARRIER_REGISTRATIONS:
            if settings.membarrier & command:
                stub.call("membarrier", command, 0, 0)
    # The parent-death signal is kept in the image but not set: a restored process's
    # parent is the restorer, which exits at once, so the signal would fire for a
    # death that never happened. A process tree's restore, which gives each member
    # its own parent back, sets it.
    scheduling.write_timer_slack_ns(stub.pid, settings.timer_slack_ns)
    scheduling.write_oom_score_adj(stub.pid, settings.oom_score_adj)
    for thread in settings.threads:
        scheduling.set_scheduling(
            thread_ids[thread.tid],
            scheduling.Scheduling(thread.policy, thread.priority, thread.nice, thread.affinity),
        )


def apply_parent_death_signal(stub: Stub, settings: rec.ProcessSettings) -> None:
    """The parent-death signal, for a member of a tree whose restore gave it its own parent
    back; after the credentials, whose change clears it."""
    if settings.pdeath_signal:
        stub.call("prctl", PR_SET_PDEATHSIG, settings.pdeath_signal, 0, 0, 0)


def apply_login_uid(stub: Stub, settings: rec.ProcessSettings) -> None:
    """The audit login uid. Only a process itself may write its /proc/self/loginuid, and
    changing one already set takes CAP_AUDIT_CONTROL: injected while the stub is still
    root, before its credentials are restored."""
    if settings.loginuid in (LOGINUID_UNSET, procfs.read_loginuid(stub.pid)):
        return
    stub.reset_scratch()
    fd = stub.call("openat", AT_FDCWD, stub.put_string("/proc/self/loginuid"), O_WRONLY, 0)
    try:
        text = str(settings.loginuid).encode()
        stub.call("write", fd, stub.put(text), len(text))
    finally:
        stub.call("close", fd)


def install_guard_pages(stub: Stub, settings: rec.ProcessSettings) -> None:
    """Make the guard pages again (a touch kills with SIGSEGV); their memory was never
    read, since a guard page holds nothing."""
    for guard in settings.guard_pages:
        stub.call("madvise", guard.start, guard.end - guard.start, MADV_GUARD_INSTALL)


def lock_memory(stub: Stub, segments: rec.Segments) -> None:
    """mlock() again what was locked (smaps VmFlags "lo"; "lf": locked on fault, mlock2
    MLOCK_ONFAULT), while the stub may still lock any amount (it is root until its
    credentials are restored)."""
    for segment in segments.segments:
        if "lf" in segment.vm_flags:
            stub.call("mlock2", segment.start, segment.size, MLOCK_ONFAULT)
        elif "lo" in segment.vm_flags:
            stub.call("mlock", segment.start, segment.size)


def lock_future_memory(stub: Stub, settings: rec.ProcessSettings) -> None:
    """mlockall(MCL_FUTURE [| MCL_ONFAULT]) again, once the image's memory is mapped (what
    the restorer maps for itself afterwards is unmapped before the process runs)."""
    if settings.mlockall:
        stub.call("mlockall", settings.mlockall)


def describe(settings: rec.ProcessSettings) -> list[str]:
    """Lines for `hijack show`: what differs from a fresh process's defaults."""
    lines = [
        f"oom_score_adj {settings.oom_score_adj}, timer slack {settings.timer_slack_ns} ns,"
        f" dumpable {settings.dumpable}"
    ]
    flags = [
        name
        for name, on in (
            ("THP disabled", settings.thp_disable),
            ("child subreaper", settings.child_subreaper),
            ("mlockall MCL_FUTURE", settings.mlockall & MCL_FUTURE),
            ("MCL_ONFAULT", settings.mlockall & MCL_ONFAULT),
        )
        if on
    ]
    if settings.membarrier:
        flags.append(f"membarrier registrations {settings.membarrier:#x}")
    if settings.pdeath_signal:
        flags.append(f"parent-death signal {settings.pdeath_signal}")
    if settings.loginuid != LOGINUID_UNSET:
        flags.append(f"loginuid {settings.loginuid}")
    if flags:
        lines.append(", ".join(flags))
    for thread in settings.threads:
        lines.append(
            f"thread {thread.tid}: policy {thread.policy}, priority {thread.priority},"
            f" nice {thread.nice}, CPUs {_cpu_list(thread.affinity)}"
        )
    lines += [f"guard pages {g.start:#x}-{g.end:#x}" for g in settings.guard_pages]
    return lines + aio.describe(settings) + seccomp.describe(settings.seccomp)


def _cpu_list(cpus: tuple[int, ...]) -> str:
    """ "0-3,6" for (0, 1, 2, 3, 6)."""
    runs: list[list[int]] = []
    for cpu in cpus:
        if runs and runs[-1][1] == cpu - 1:
            runs[-1][1] = cpu
        else:
            runs.append([cpu, cpu])
    return ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs)
