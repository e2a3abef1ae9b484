"""Snapshot dumps: how long `hijack dump PID` freezes a 1 GiB process, and what a dump costs.

- freeze: a snapshot dump (without --kill) stops the process only to read its
  threads, timers, settings and descriptors and to fork a copy whose memory is
  the image's; the figure is the median (and range) of DUMPS dumps to
  /dev/null, each as `hijack dump` prints it, beside the freeze of a dump that
  keeps the process stopped throughout (as `dump --kill` does, and `dump` did);
  then the median of each step of the freeze (DumpResult.freeze_steps), the
  system calls injected, and a plain fork() of a process holding as much (the
  page-table copy the snapshot's own fork makes: the floor of this design);
- CPU-seconds per GiB: user + system time of hijack (this process) and of the
  target during one dump to /dev/null, per GiB held; and of a dump that keeps
  the process stopped (as --kill) to a file, synced (bench/__main__.py measures
  it: its page cache copy and the sync are in it). Both splice the pages from
  the process into the image (hijack.mutator.spliced_pages): zero-copy.
"""

from __future__ import annotations

import os
import resource
import statistics
import subprocess
import sys
from collections.abc import Callable

from hijack.mutator.dump import dump, write_image
from hijack.mutator.tracee import Tracee
from hijack.sys import procfs
from hijack.timing import describe

GIB = 1024**3
FREEZE_LIMIT_MS = 10.0
CPU_LIMIT_S = 0.6  # CPU-seconds per GiB dumped


def _cpu_of(pid: int) -> float:
    stat = procfs.read_stat(pid)
    return (stat.utime + stat.stime) / os.sysconf("SC_CLK_TCK")


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def cpu_per_gib(pid: int | None, size: int, action: Callable[[], object]) -> float:
    """User + system seconds of this process and of `pid` (if any) during `action`, per GiB
    of `size`."""
    ours, theirs = _own_cpu(), _cpu_of(pid) if pid else 0.0
    action()
    return (_own_cpu() - ours + (_cpu_of(pid) if pid else 0.0) - theirs) * GIB / size


def cpu_line(name: str, per_gib: float, beside: str) -> str:
    verdict = "met" if per_gib <= CPU_LIMIT_S else "NOT met"
    return f"{name:<34} {per_gib:8.2f} s    | {beside:<52} | target <= {CPU_LIMIT_S} s: {verdict}"


# A process holding `size` bytes as the bench's holder does times its own fork()s: the
# page-table copy a snapshot's freeze cannot go below (its copy is made by a fork).
FORKER = """
import os, statistics, sys, time
size, forks = int(sys.argv[1]), int(sys.argv[2])
data = bytearray(os.urandom(1 << 20) * (size >> 20))
taken = []
for _ in range(forks):
    started = time.perf_counter()
    child = os.fork()
    if child == 0:
        os._exit(0)
    taken.append((time.perf_counter() - started) * 1000)
    os.waitpid(child, 0)
print(statistics.median(taken), min(taken), max(taken))
"""


def fork_floor_ms(size: int, forks: int) -> tuple[float, float, float]:
    """Median, least and most ms of a plain fork() of a process holding `size` bytes."""
    found = subprocess.run(
        [sys.executable, "-c", FORKER, str(size), str(forks)],
        capture_output=True,
        text=True,
        check=True,
    )
    median, least, most = (float(word) for word in found.stdout.split())
    return median, least, most


def measure_snapshots(pid: int, size: int, dumps: int) -> list[str]:
    freezes = []
    cpu = []
    steps: dict[str, list[float]] = {}
    injected = []
    for _ in range(dumps):
        ours, theirs = _own_cpu(), _cpu_of(pid)
        with open(os.devnull, "wb") as out:
            result = dump(pid, out)
        freezes.append(result.frozen_ms)
        injected.append(result.injected)
        for name, ms in result.freeze_steps.items():
            steps.setdefault(name, []).append(ms)
        cpu.append((_own_cpu() - ours + _cpu_of(pid) - theirs) * GIB / size)
    floor, floor_least, floor_most = fork_floor_ms(size, dumps)
    with open(os.devnull, "wb") as out, Tracee.seize(pid) as tracee:
        write_image(tracee, out, splice=True)
    stopped_ms = tracee.pause_ms
    median = statistics.median(freezes)
    step_medians = {name: statistics.median(ms) for name, ms in steps.items()}
    per_gib = statistics.median(cpu)
    return [
        f"{'snapshot dump freeze (median)':<34} {median:8.1f} ms   | "
        f"{'stopped throughout (dump --kill)':<38} {stopped_ms:8.1f} ms   |"
        f" range of {dumps} {min(freezes):.1f}-{max(freezes):.1f} ms;"
        f" target <= {FREEZE_LIMIT_MS:.0f} ms: {'met' if median <= FREEZE_LIMIT_MS else 'NOT met'}",
        f"{'dump CPU per GiB (median)':<34} {per_gib:8.2f} s    | "
        f"{'user+sys of hijack and target, range':<38}"
        f" {min(cpu):6.2f}-{max(cpu):.2f} s  | "
        f"target <= {CPU_LIMIT_S} s: {'met' if per_gib <= CPU_LIMIT_S else 'NOT met'}",
        f"  snapshot freeze steps (median ms): {describe(step_medians)};"
        f" {statistics.median(injected):.0f} system calls injected;"
        f" a plain fork() of the same memory, same run: {floor:.1f} ms"
        f" (range {floor_least:.1f}-{floor_most:.1f})",
    ]
