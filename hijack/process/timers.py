"""Interval timers (setitimer) and POSIX timers (timer_create) of a process.

Read at dump by injected getitimer / timer_gettime (the time left is only the
process's to tell; /proc/PID/timers names the POSIX timers, their clock and how
they notify). At restore each comes back with its interval and the time that
was left, POSIX timers under their old ids (prctl PR_TIMER_CREATE_RESTORE_IDS,
Linux 6.17+, makes timer_create take the id it is given). They are armed last,
just before the process runs, so the restore's own time does not eat into
them.

A POSIX timer's overrun (timer_getoverrun: the expirations its last signal stood
for, less one) is kept too, though no call sets it and timer_settime starts it at
0: the kernel counts it when the signal is taken, as the intervals from the expiry
that queued it to then. So the restore arms the timer absolute (TIMER_ABSTIME) with
its interval and a first expiry overrun + 1 intervals before the one it is due next,
in the past: the kernel queues the signal at once; taken at once in the stub
(rt_sigtimedwait: every signal is blocked while it runs), the kernel counts the
overrun and re-arms the timer for the expiry due next (measured on Linux 6.18:
timer_getoverrun then tells the overrun exactly, timer_gettime the time left).
Not kept (the timer armed as before, its overrun 0) when the image has the timer's
signal pending (it would be taken in its place), when that first expiry would fall
before the clock's 0 (CLOCK_MONOTONIC: more intervals than the time since boot),
or for a CPU-time clock (whose time the new process starts again).
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from hijack.errors import RestoreError, Unsupported
from hijack.image import records as rec
from hijack.mutator.parasite import Area, Batch
from hijack.mutator.tracee import Tracee
from hijack.restore.remote import Stub
from hijack.sys import memory, procfs

ITIMER_WHICH = (0, 1, 2)  # ITIMER_REAL, ITIMER_VIRTUAL, ITIMER_PROF
ITIMERVAL = struct.Struct("<4q")  # struct itimerval: interval {sec, usec}, value {sec, usec}
ITIMERSPEC = struct.Struct("<4q")  # struct itimerspec: interval {sec, nsec}, value {sec, nsec}
# struct sigevent: sigev_value, sigev_signo, sigev_notify, then _sigev_un (_tid first), 64 bytes.
SIGEVENT = struct.Struct("<Qiii44x")
SIGEV_SIGNAL, SIGEV_NONE, SIGEV_THREAD_ID = 0, 1, 4
NOTIFY_KINDS = {"signal": SIGEV_SIGNAL, "none": SIGEV_NONE, "thread": SIGEV_THREAD_ID}
PR_TIMER_CREATE_RESTORE_IDS = 77
NS = 1_000_000_000
TIMER_ABSTIME = 1
TIMESPEC = struct.Struct("<qq")
SIGINFO_TIMER = struct.Struct("<iii4xi")  # si_signo, si_errno, si_code, _, si_tid (timerid)
SI_TIMER = -2
OVERRUN_TRIES = 3  # the signal taken after the expiry due next: armed again, later
OVERRUN_MARGIN_NS = 20_000_000  # ... that many ns later each try


def read_timers(tracee: Tracee, scratch: int) -> rec.Timers:
    """queue_timers, with `scratch` (at least 32 bytes) for what each call writes: one call
    at a time (a borrowed scratch holds few timers' values)."""
    area = Area(scratch, ITIMERSPEC.size, executable=False)
    itimers = []
    for which in ITIMER_WHICH:
        batch = Batch(area)
        read_itimer = _queue_itimer(batch, which)
        batch.run(tracee)
        itimers += read_itimer()
    posix = []
    for timer in _posix_timers(tracee.pid):
        batch = Batch(area)
        read_posix = _queue_posix_timer(batch, timer)
        batch.run(tracee)
        posix.append(read_posix())
    return rec.Timers(itimers=tuple(itimers), posix=tuple(posix))


def queue_timers(tracee: Tracee, batch: Batch) -> Callable[[], rec.Timers]:
    """The timers of a stopped process; their calls go in `batch`, and the returned
    function tells them once it ran."""
    itimers = [_queue_itimer(batch, which) for which in ITIMER_WHICH]
    posix = [_queue_posix_timer(batch, timer) for timer in _posix_timers(tracee.pid)]

    def read() -> rec.Timers:
        return rec.Timers(
            itimers=tuple(itimer for found in itimers for itimer in found()),
            posix=tuple(found() for found in posix),
        )

    return read


def _posix_timers(pid: int) -> list[procfs.PosixTimerEntry]:
    timers = sorted(procfs.read_posix_timers(pid), key=lambda found: found.timer_id)
    for timer in timers:
        if timer.notify not in NOTIFY_KINDS:
            raise Unsupported(f"POSIX timer {timer.timer_id} notifies by {timer.notify!r}")
    return timers


def _queue_itimer(batch: Batch, which: int) -> Callable[[], list[rec.Itimer]]:
    written = batch.buffer(ITIMERVAL.size)
    batch.call("getitimer", which, written)

    def read() -> list[rec.Itimer]:
        isec, iusec, vsec, vusec = ITIMERVAL.unpack(batch.read(written, ITIMERVAL.size))
        if not (vsec or vusec or isec or iusec):
            return []
        return [
            rec.Itimer(
                which=which,
                interval_ns=isec * NS + iusec * 1000,
                value_ns=vsec * NS + vusec * 1000,
            )
        ]

    return read


def _queue_posix_timer(batch: Batch, timer: procfs.PosixTimerEntry) -> Callable[[], rec.PosixTimer]:
    written = batch.buffer(ITIMERSPEC.size)
    batch.call("timer_gettime", timer.timer_id, written)
    overrun = batch.call("timer_getoverrun", timer.timer_id)

    def read() -> rec.PosixTimer:
        isec, insec, vsec, vnsec = ITIMERSPEC.unpack(batch.read(written, ITIMERSPEC.size))
        notify = NOTIFY_KINDS[timer.notify]
        assert overrun.result is not None
        return rec.PosixTimer(
            timer_id=timer.timer_id,
            clock_id=timer.clock_id,
            notify=notify,
            signal=timer.signal,
            value=timer.value,
            thread=timer.notify_tid if notify == SIGEV_THREAD_ID else 0,
            interval_ns=isec * NS + insec,
            value_ns=vsec * NS + vnsec,
            overrun=overrun.result,
        )

    return read


def create_posix_timers(stub: Stub, timers: rec.Timers, thread_ids: dict[int, int]) -> None:
    """Make every POSIX timer under its old id, still disarmed (arm_timers arms them)."""
    if not timers.posix:
        return
    stub.call("prctl", PR_TIMER_CREATE_RESTORE_IDS, 1, 0, 0, 0)
    try:
        for timer in timers.posix:
            stub.reset_scratch()
            event = SIGEVENT.pack(
                timer.value, timer.signal, timer.notify, thread_ids.get(timer.thread, 0)
            )
            timer_id = stub.put(struct.pack("<i", timer.timer_id))
            stub.call("timer_create", timer.clock_id, stub.put(event), timer_id)
            (made,) = struct.unpack("<i", memory.read(stub.pid, timer_id, 4))
            if made != timer.timer_id:
                raise RestoreError(f"POSIX timer {timer.timer_id} came back as {made}")
    finally:
        stub.call("prctl", PR_TIMER_CREATE_RESTORE_IDS, 0, 0, 0, 0)


def arm_timers(
    stub: Stub, timers: rec.Timers, thread_ids: dict[int, int], pending: frozenset[int]
) -> None:
    """Arm every timer with its interval and the time it had left (and a POSIX timer's
    overrun, unless the image has its signal, `pending`, queued)."""
    for itimer in timers.itimers:
        stub.reset_scratch()
        value = ITIMERVAL.pack(
            *divmod(itimer.interval_ns // 1000, 1_000_000),
            *divmod(max(_next_expiry_ns(itimer) // 1000, 1), 1_000_000),
        )
        stub.call("setitimer", itimer.which, stub.put(value), 0)
    for timer in timers.posix:
        if not _next_expiry_ns(timer):
            continue  # disarmed: as created
        if timer.signal not in pending and _arm_with_overrun(stub, timer, thread_ids):
            continue
        stub.reset_scratch()
        spec = ITIMERSPEC.pack(*divmod(timer.interval_ns, NS), *divmod(_next_expiry_ns(timer), NS))
        stub.call("timer_settime", timer.timer_id, 0, stub.put(spec), 0)


def _arm_with_overrun(stub: Stub, timer: rec.PosixTimer, thread_ids: dict[int, int]) -> bool:
    """Arm `timer` so that its overrun is `timer.overrun` and it expires next when it was
    due; False when that cannot be (it is to be armed plainly)."""
    if (
        timer.overrun <= 0
        or not timer.interval_ns
        or timer.notify == SIGEV_NONE
        or timer.clock_id < 0  # a CPU-time clock
    ):
        return False
    tid = thread_ids.get(timer.thread, stub.pid) if timer.notify == SIGEV_THREAD_ID else stub.pid
    for attempt in range(OVERRUN_TRIES):
        stub.reset_scratch()
        now = stub.put(bytes(TIMESPEC.size))
        stub.call("clock_gettime", timer.clock_id, now)
        seconds, nanoseconds = TIMESPEC.unpack(memory.read(stub.pid, now, TIMESPEC.size))
        due = seconds * NS + nanoseconds + _next_expiry_ns(timer) + attempt * OVERRUN_MARGIN_NS
        first = due - (timer.overrun + 1) * timer.interval_ns
        if first < 0:
            return False
        spec = ITIMERSPEC.pack(*divmod(timer.interval_ns, NS), *divmod(first, NS))
        stub.call("timer_settime", timer.timer_id, TIMER_ABSTIME, stub.put(spec), 0)
        info = stub.put(bytes(128))
        taken = stub.put(struct.pack("<Q", 1 << (timer.signal - 1)))
        wait = stub.put(TIMESPEC.pack(1, 0))
        signal = stub.call("rt_sigtimedwait", taken, info, wait, 8, tid=tid)
        _signo, _errno, code, timer_id = SIGINFO_TIMER.unpack(
            memory.read(stub.pid, info, SIGINFO_TIMER.size)
        )
        if (signal, code, timer_id) != (timer.signal, SI_TIMER, timer.timer_id):
            raise RestoreError(
                f"POSIX timer {timer.timer_id}: signal {signal} (code {code}, timer"
                f" {timer_id}) taken in place of its own while its overrun was set"
            )
        if stub.call("timer_getoverrun", timer.timer_id) == timer.overrun:
            return True
    raise RestoreError(
        f"POSIX timer {timer.timer_id}: its overrun did not come back as {timer.overrun}"
        f" in {OVERRUN_TRIES} tries"
    )


def _next_expiry_ns(timer: rec.Itimer | rec.PosixTimer) -> int:
    """When to fire first after the restore. A periodic timer that expired while its
    signal was still pending shows no time left: the kernel re-arms it only when the
    signal is taken (and the image queues that signal again). One interval from now
    stands for that."""
    return timer.value_ns or timer.interval_ns


def describe(timers: rec.Timers) -> list[str]:
    """Lines for `hijack show`."""
    names = {0: "ITIMER_REAL", 1: "ITIMER_VIRTUAL", 2: "ITIMER_PROF"}
    notified = {SIGEV_SIGNAL: "signal", SIGEV_NONE: "none", SIGEV_THREAD_ID: "thread"}
    lines = [
        f"{names[t.which]}: every {t.interval_ns / 1e6:g} ms, next in {t.value_ns / 1e6:g} ms"
        for t in timers.itimers
    ]
    for timer in timers.posix:
        target = f" {timer.thread}" if timer.notify == SIGEV_THREAD_ID else ""
        lines.append(
            f"POSIX timer {timer.timer_id}: clock {timer.clock_id}, signal {timer.signal}"
            f" to {notified[timer.notify]}{target}, every {timer.interval_ns / 1e6:g} ms,"
            f" next in {timer.value_ns / 1e6:g} ms"
            + (f", overrun {timer.overrun}" if timer.overrun else "")
        )
    return lines
