"""How the kernel schedules a thread, read and set from outside (root may, for any thread)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from hijack.sys.errors import kernel_call

SCHED_RESET_ON_FORK = 0x40000000
REAL_TIME_POLICIES = (os.SCHED_FIFO, os.SCHED_RR)


@dataclass(frozen=True)
class Scheduling:
    policy: int  # with SCHED_RESET_ON_FORK when set
    priority: int
    nice: int
    affinity: tuple[int, ...]


def read_scheduling(tid: int) -> Scheduling:
    with kernel_call("sched_getscheduler", tid):
        policy = os.sched_getscheduler(tid)
        priority = os.sched_getparam(tid).sched_priority
        nice = os.getpriority(os.PRIO_PROCESS, tid)
        affinity = tuple(sorted(os.sched_getaffinity(tid)))
    return Scheduling(policy, priority, nice, affinity)


def set_scheduling(tid: int, scheduling: Scheduling) -> None:
    """Give thread `tid` the policy, priority, nice value and CPUs of `scheduling`.

    CPUs this machine does not have are left out; none left means any CPU.
    """
    with kernel_call("sched_setscheduler", tid):
        os.sched_setscheduler(tid, scheduling.policy, os.sched_param(scheduling.priority))
        # The nice value is the normal policies' priority: a real-time thread keeps its own.
        if scheduling.policy & ~SCHED_RESET_ON_FORK not in REAL_TIME_POLICIES:
            os.setpriority(os.PRIO_PROCESS, tid, scheduling.nice)
        here = set(scheduling.affinity) & os.sched_getaffinity(0)
        os.sched_setaffinity(tid, here or os.sched_getaffinity(0))


def write_oom_score_adj(pid: int, value: int) -> None:
    with (
        kernel_call("write", pid, f"/proc/{pid}/oom_score_adj"),
        open(f"/proc/{pid}/oom_score_adj", "w") as adjust,
    ):
        adjust.write(str(value))


def write_timer_slack_ns(pid: int, value: int) -> None:
    with (
        kernel_call("write", pid, f"/proc/{pid}/timerslack_ns"),
        open(f"/proc/{pid}/timerslack_ns", "w") as slack,
    ):
        slack.write(str(value))
