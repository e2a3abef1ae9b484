"""Snapshot dumps: how long `hijack dump PID` freezes a 1 GiB process, and what a dump costs.

- freeze: a snapshot dump (without --kill) by pre-copy rounds (what `hijack
  dump` chooses for a big process: hijack.mutator.snapshot_rounds) stops the
  process to start tracking its writes, writes rounds while it runs, and
  freezes it only for the pages written since, its threads, timers, settings
  and descriptors; the figure is the median (and range) of DUMPS dumps to
  /dev/null, each as `hijack dump` prints it, beside the same by a fork (a copy
  whose memory is the image's: hijack.mutator.snapshot, what a small process
  gets), then the tracking's own stop, the median of each step of each freeze
  (DumpResult.freeze_steps), the system calls injected, the freeze of a dump
  that keeps the process stopped throughout (as `dump --kill` does), and a
  plain fork() of a process holding as much (the page-table copy the fork's
  snapshot makes: the floor of that design); with a directory, both to a
  synced file and their restores;
- CPU-seconds per GiB: user + system time of hijack (this process) and of the
  target during one dump by a fork to /dev/null, per GiB held (beside: by
  rounds, whose pages pass through hijack's memory); and of a dump that keeps
  the process stopped (as --kill) to a file, synced (bench/__main__.py measures
  it: its page cache copy and the sync are in it). Both splice the pages from
  the process into the image (hijack.mutator.spliced_pages): zero-copy.
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from hijack.mutator.dump import dump, dump_to_file, write_image
from hijack.mutator.snapshot_rounds import worth_rounds
from hijack.mutator.tracee import Tracee
from hijack.restore.restorer import RestoreResult
from hijack.restore.tree import restore_image
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


def _snapshot_dumps(
    pid: int, size: int, dumps: int, snapshot: str
) -> tuple[list[float], list[float], list[int], list[float], dict[str, list[float]], list[int]]:
    """`dumps` snapshot dumps of `pid` to /dev/null by `snapshot` ("rounds" or "fork"): each
    one's freeze, tracking pause, injected calls, CPU per GiB, steps, rounds."""
    freezes: list[float] = []
    pauses: list[float] = []
    injected: list[int] = []
    cpu: list[float] = []
    steps: dict[str, list[float]] = {}
    rounds: list[int] = []
    for _ in range(dumps):
        ours, theirs = _own_cpu(), _cpu_of(pid)
        with open(os.devnull, "wb") as out:
            result = dump(pid, out, snapshot=snapshot)
        freezes.append(result.frozen_ms)
        pauses.append(result.tracking_pause_ms)
        injected.append(result.injected)
        rounds.append(result.rounds)
        for name, ms in result.freeze_steps.items():
            steps.setdefault(name, []).append(ms)
        cpu.append((_own_cpu() - ours + _cpu_of(pid) - theirs) * GIB / size)
    return freezes, pauses, injected, cpu, steps, rounds


def _to_synced_file(pid: int, directory: Path, snapshot: str) -> tuple[float, float, int, float]:
    """Seconds of a snapshot dump to a synced file by `snapshot`, of its restore, its size,
    and the floor of folding it into another file (read back, written again, synced: what
    a plain image made of the rounds after the freeze would cost at least)."""
    image = directory / f"snapshot-{snapshot}.crf"
    started = time.perf_counter()
    dump_to_file(pid, image, snapshot=snapshot)
    dumped = time.perf_counter() - started
    size = image.stat().st_size
    started = time.perf_counter()
    folded = directory / "folded.crf"
    with open(image, "rb") as source, open(folded, "wb") as out:
        shutil.copyfileobj(source, out, 8 << 20)
        out.flush()
        os.fsync(out.fileno())
    fold_s = time.perf_counter() - started
    folded.unlink()
    started = time.perf_counter()
    with open(image, "rb") as stream:
        restored = restore_image(stream, skip_unsupported=True)  # its stdio pipes
    restore_s = time.perf_counter() - started
    assert isinstance(restored, RestoreResult)
    os.kill(restored.pid, signal.SIGKILL)
    os.waitpid(restored.pid, 0)
    image.unlink()
    return dumped, restore_s, size, fold_s


def measure_snapshots(pid: int, size: int, dumps: int, directory: Path | None = None) -> list[str]:
    freezes, pauses, injected, cpu, steps, rounds = _snapshot_dumps(pid, size, dumps, "rounds")
    forked, _, forked_injected, forked_cpu, forked_steps, _ = _snapshot_dumps(
        pid, size, dumps, "fork"
    )
    floor, floor_least, floor_most = fork_floor_ms(size, dumps)
    with open(os.devnull, "wb") as out, Tracee.seize(pid) as tracee:
        write_image(tracee, out, splice=True)
    stopped_ms = tracee.pause_ms
    median = statistics.median(freezes)
    auto = "rounds" if worth_rounds(pid) else "fork"
    step_medians = {name: statistics.median(ms) for name, ms in steps.items()}
    forked_medians = {name: statistics.median(ms) for name, ms in forked_steps.items()}
    per_gib = statistics.median(cpu)
    forked_per_gib = statistics.median(forked_cpu)
    lines = [
        f"{'snapshot dump freeze (median)':<34} {median:8.1f} ms   | "
        f"{'by a fork (the plain image)':<38} {statistics.median(forked):8.1f} ms   |"
        f" rounds: range of {dumps} {min(freezes):.1f}-{max(freezes):.1f} ms;"
        f" target <= {FREEZE_LIMIT_MS:.0f} ms: {'met' if median <= FREEZE_LIMIT_MS else 'NOT met'}",
        f"  by pre-copy rounds ({statistics.median(rounds):.0f} rounds, this size's auto: {auto}):"
        f" tracking start stopped it {statistics.median(pauses):.1f} ms"
        f" (range {min(pauses):.1f}-{max(pauses):.1f}) before the rounds; freeze steps"
        f" (median ms): {describe(step_medians)}; {statistics.median(injected):.0f} system"
        f" calls injected; stopped throughout (dump --kill) {stopped_ms:.1f} ms",
        f"  by a fork: range {min(forked):.1f}-{max(forked):.1f} ms; steps (median ms):"
        f" {describe(forked_medians)}; {statistics.median(forked_injected):.0f} system calls"
        f" injected; a plain fork() of the same memory, same run: {floor:.1f} ms"
        f" (range {floor_least:.1f}-{floor_most:.1f})",
        f"{'dump CPU per GiB (median)':<34} {forked_per_gib:8.2f} s    | "
        f"{'by rounds (through user space)':<38} {per_gib:6.2f} s    | "
        f"by a fork, user+sys of hijack and target, range {min(forked_cpu):.2f}-"
        f"{max(forked_cpu):.2f} s; target <= {CPU_LIMIT_S} s:"
        f" {'met' if forked_per_gib <= CPU_LIMIT_S else 'NOT met'}",
    ]
    if directory is not None:
        rounds_file, rounds_restore, rounds_size, fold = _to_synced_file(pid, directory, "rounds")
        fork_file, fork_restore, fork_size, _ = _to_synced_file(pid, directory, "fork")
        lines.append(
            f"  snapshot dump to a synced file: by rounds {rounds_file:.2f} s"
            f" ({rounds_size / 2**20:.0f} MiB), by a fork {fork_file:.2f} s"
            f" ({fork_size / 2**20:.0f} MiB); its restore: {rounds_restore:.2f} s,"
            f" {fork_restore:.2f} s; folding the rounds into a plain image after the freeze"
            f" would add at least {fold:.2f} s (read back, written again, synced)"
        )
    return lines
