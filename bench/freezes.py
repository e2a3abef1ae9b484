"""Move freezes as percentiles: one process moved back and forth MOVES times.

The C fixture tests/fixtures/dirtier.c holds SIZE of memory and keeps
rewriting about 10 MB/s of it (plus dropped, zeroed, remapped and mprotected
pages) while it is moved between two network-namespace nodes a <-> b, with
pre-copy, MOVES times; then it checks every page it wrote (the bench fails
if one is wrong). Printed: the p50 and p99 of the freeze each move reported
(issue #17: <= 20 ms and <= 50 ms), the median and range of the whole move
(from the command's start to the copy running, as VM migrations report it),
and where the freeze went: the median of each step on each node (`hijack
move --timing`) and the system calls injected on each side.
"""

from __future__ import annotations

import re
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.testnodes import Cluster, Node, RunningFixture, spawn_fixture

DIRTY_RATE_MB = 10
FREEZE_P50_TARGET_MS = 20.0
FREEZE_P99_TARGET_MS = 50.0
MOVE_TIMEOUT = 300.0  # one move of a GiB on a loaded machine
FINISH_TIMEOUT = 120.0  # the fixture's check of every page, after the last move

MOVED = re.compile(
    r"moved process (\d+) to (\w+): it runs there as (\d+); frozen ([\d.]+) ms, (.+?) sent"
)
ROUNDS = re.compile(r"\((\d+) pre-copy rounds, (.+?) while frozen")
TOOK = re.compile(r"move took (\d+) ms in all")
LAPS = re.compile(r"freeze (here|at \w+) \(ms\): (.*); (\d+) system calls injected")


@dataclass
class Moves:
    freezes: list[float] = field(default_factory=list)
    totals: list[float] = field(default_factory=list)
    rounds: list[int] = field(default_factory=list)
    frozen_sent: list[str] = field(default_factory=list)
    here: dict[str, list[float]] = field(default_factory=dict)
    there: dict[str, list[float]] = field(default_factory=dict)
    injected_here: list[int] = field(default_factory=list)
    injected_there: list[int] = field(default_factory=list)
    # Each move's steps, both sides, as `hijack move --timing` printed them: the slowest's.
    laps: list[str] = field(default_factory=list)

    def slowest(self) -> str:
        """The slowest freeze's steps: what a tail is made of (medians hide it)."""
        index = max(range(len(self.freezes)), key=self.freezes.__getitem__)
        return f"{self.freezes[index]:.1f} ms, move {index + 1}: {self.laps[index]}"

    def add(self, output: str) -> int:
        """Take one `hijack move --timing` output; return the pid the process has now."""
        text = " ".join(output.split())  # rich may wrap the first line
        moved = MOVED.search(text)
        took = TOOK.search(output)
        if moved is None or took is None:
            raise SystemExit(f"bench: unexpected output of hijack move:\n{output}")
        self.freezes.append(float(moved[4]))
        self.totals.append(float(took[1]))
        rounds = ROUNDS.search(text)
        self.rounds.append(int(rounds[1]) if rounds else 0)
        self.frozen_sent.append(rounds[2] if rounds else moved[5])
        self.laps.append("; ".join(f"{side}: {laps}" for side, laps, _ in LAPS.findall(output)))
        for side, laps, injected in LAPS.findall(output):
            steps = self.here if side == "here" else self.there
            for step in laps.split(", "):
                name, _, ms = step.rpartition(" ")
                steps.setdefault(name, []).append(float(ms))
            (self.injected_here if side == "here" else self.injected_there).append(int(injected))
        return int(moved[3])


def percentile(values: list[float], share: float) -> float:
    """The `share` percentile (0..1), interpolated between the two nearest samples."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * share
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def medians(steps: dict[str, list[float]]) -> str:
    return ", ".join(f"{name} {statistics.median(ms):.1f}" for name, ms in steps.items())


def move_once(source: Node, pid: int, destination: Node) -> str:
    assert destination.daemon_endpoint is not None
    result = source.hijack(
        "move", pid, "--to", destination.daemon_endpoint, "--precopy", "--timing",
        timeout=MOVE_TIMEOUT,
    )  # fmt: skip
    if result.returncode != 0:
        raise SystemExit(f"bench: {result.describe()}")
    return result.stdout


def check_ended_well(dirtier: RunningFixture, pid: int, node: Node) -> None:
    """The moved dirtier (the daemon of `node` is its parent) ends with 0 and says PASS."""
    ended = f"process {pid} ended ("
    deadline = time.monotonic() + FINISH_TIMEOUT
    while time.monotonic() < deadline:
        log = (node.directory / "daemon.stderr").read_text(errors="replace")
        if ended in log and f"PASS {dirtier.name}" in dirtier.stdout:
            break
        time.sleep(0.1)  # the daemon's log and the relayed stdout: nothing to wait on
    else:
        raise SystemExit(f"bench: the moved dirtier did not finish\n{dirtier.describe()}")
    if f"{ended}0)" not in log:
        raise SystemExit(f"bench: the moved dirtier failed its check\n{dirtier.describe()}")


def measure_freezes(size_mib: int, moves: int) -> list[str]:
    """MOVES moves of the dirtier holding SIZE_MIB; the lines to print."""
    taken = Moves()
    with (
        tempfile.TemporaryDirectory(prefix="hijack-bench-freezes-") as directory,
        Cluster(Path(directory), nodes=2) as cluster,
    ):
        a, b = cluster.nodes
        a.start_daemon()
        b.start_daemon()
        dirtying = (str(size_mib), str(DIRTY_RATE_MB))
        # It fills every page with its pattern first: seconds a GiB, more on a busy machine.
        with spawn_fixture("dirtier", *dirtying, netns=a.netns, ready_timeout=120) as dirtier:
            pid, here, there = dirtier.pid, a, b
            for number in range(moves):
                pid = taken.add(move_once(here, pid, there))
                if number == 0:
                    dirtier.wait_exit()  # the original, killed by the move: reaped
                here, there = there, here
            # Every page it wrote must hold what it wrote: a fast freeze that
            # lost a page would be no figure at all.
            dirtier.close_control()
            check_ended_well(dirtier, pid, here)  # where the last move took it
    p50 = percentile(taken.freezes, 0.5)
    p99 = percentile(taken.freezes, 0.99)
    label = f"{moves} moves, {size_mib} MiB dirtying {DIRTY_RATE_MB} MB/s"
    return [
        f"{'move freeze p50':<34} {p50:8.1f} ms   | {label:<38}"
        f" {'':8}      | target <= {FREEZE_P50_TARGET_MS:.0f} ms:"
        f" {'met' if p50 <= FREEZE_P50_TARGET_MS else 'NOT met'}",
        f"{'move freeze p99':<34} {p99:8.1f} ms   | {'max':<38} {max(taken.freezes):8.1f} ms   |"
        f" target <= {FREEZE_P99_TARGET_MS:.0f} ms:"
        f" {'met' if p99 <= FREEZE_P99_TARGET_MS else 'NOT met'}",
        f"{'move total time (median)':<34} {statistics.median(taken.totals) / 1000:8.2f} s    |"
        f" {'range':<38} {min(taken.totals) / 1000:.2f}-{max(taken.totals) / 1000:.2f} s"
        f" | pre-copy rounds {min(taken.rounds)}-{max(taken.rounds)},"
        f" frozen image e.g. {taken.frozen_sent[-1]}",
        f"  freeze steps on the mover (median ms): {medians(taken.here)};"
        f" {statistics.median(taken.injected_here):.0f} system calls injected",
        f"  freeze steps at the destination (median ms): {medians(taken.there)};"
        f" {statistics.median(taken.injected_there):.0f} system calls injected",
        f"  the slowest freeze's steps: {taken.slowest()}",
    ]
