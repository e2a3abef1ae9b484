"""A process tree's move beside one process's: freeze time and image size.

A parent fills SIZE of private memory, then forks 8 children that keep it
(shared copy-on-write since the fork, as a pre-forking server's workers do)
and sleep; it is moved between two network-namespace nodes with `hijack move`
(the tree moves as one), frozen while its whole image is sent (--no-precopy),
then again with pre-copy (rounds while it runs: the pages shared since the fork
sent once). Beside it, the same moves of one process holding the same SIZE.
Printed: the freezes and image sizes, the tree's as a ratio to the single
one's (pages the members still share since the fork are stored once: CRF 6),
and the pre-copied tree's freeze beside its frozen one, with where its freeze went
(the laps of --timing, here and at the destination); the tree's memory (the sum
of its members' PSS) before and after each move (the destination forks each
child from its built parent: the pages shared since the fork are shared again).

Then a tree whose members keep writing (each rewrites a byte of every page of its copy
of the region, over and over: far faster than any link drains) moved with `--precopy`
(rounds only: its freeze carries what they never caught up with) and with `--postcopy`
(the pages written since the first round left on the source, served after the start):
the post-copy freeze beside the pre-copy one.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.testnodes import Cluster, Node
from hijack.process.tree import read_tree

CHILDREN = 8
MOVE_TIMEOUT = 600.0  # seconds: a tree of 9 x 256 MiB on a loaded machine
READY_TIMEOUT = 120.0
MOVED = re.compile(r"moved process (\d+) to (\w+): it runs there as (\d+); frozen ([\d.]+) ms")
IMAGE = re.compile(r"image ([\d.]+) (KiB|MiB|GiB|B)\b")
MEMBER = re.compile(r"^  (\d+) \S+ as \d+: image ([\d.]+) (KiB|MiB|GiB|B)", re.M)
UNITS = {"B": 1 / (1 << 20), "KiB": 1 / 1024, "MiB": 1.0, "GiB": 1024.0}

# argv[1] MiB of private memory, a page each written; then argv[2] children forked,
# each keeping it; "ready" once they all run. They sleep until killed.
HOLDER = """\
import mmap, os, signal, sys
size = int(sys.argv[1]) << 20
memory = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
for offset in range(0, size, 4096):
    memory[offset] = 1 + (offset >> 12) % 250
for _ in range(int(sys.argv[2])):
    if os.fork() == 0:
        while True:
            signal.pause()
print("ready", flush=True)
while True:
    signal.pause()
"""


# As HOLDER, but every member rewrites a byte of each page of the region, then sleeps
# 10 ms, until killed (its copy of the region is its own after the first sweep).
DIRTIER = """\
import mmap, os, sys, time
size = int(sys.argv[1]) << 20
memory = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
for offset in range(0, size, 4096):
    memory[offset] = 1
for _ in range(int(sys.argv[2])):
    if os.fork() == 0:
        break
else:
    print("ready", flush=True)
value = 0
while True:
    value = value % 250 + 1
    for offset in range(0, size, 4096):
        memory[offset] = value
    time.sleep(0.01)
"""


def _start(
    node: Node, size_mib: int, children: int, program: str = HOLDER
) -> subprocess.Popen[str]:
    holder: subprocess.Popen[str] = node.spawn(
        [sys.executable, "-c", program, str(size_mib), str(children)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None and holder.stderr is not None
    if holder.stdout.readline().strip() != "ready":
        holder.kill()
        raise SystemExit(f"bench: the tree holder did not start: {holder.stderr.read()}")
    holder.stderr.close()  # nothing more is read from it
    return holder


def _pss_mib(root: int) -> float:
    """The memory of the tree under `root`: the sum of its members' PSS."""
    total = 0
    for pid in read_tree(root).pids:
        rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
        total += int(rollup.split("Pss:")[1].split()[0])
    return total / 1024


def _move(source: Node, pid: int, destination: Node, *options: str) -> tuple[float, float, str]:
    """One move: its freeze (ms), its image (MiB) and what it printed."""
    assert destination.daemon_endpoint is not None
    result = source.hijack(
        "move", pid, "--to", destination.daemon_endpoint, *options, timeout=MOVE_TIMEOUT
    )
    text = " ".join(result.stdout.split())
    moved = MOVED.search(text)
    if result.returncode != 0 or moved is None:
        raise SystemExit(f"bench: {result.describe()}")
    members = MEMBER.findall(result.stdout)
    if members:
        image = sum(float(size) * UNITS[unit] for _, size, unit in members)
    else:
        sent = re.search(r"frozen [\d.]+ ms, ([\d.]+) (KiB|MiB|GiB|B) sent", text)
        image = float(sent[1]) * UNITS[sent[2]] if sent else 0.0
    return float(moved[4]), image, result.stdout


def measure_tree_moves(size_mib: int) -> list[str]:
    """Move 1 parent + 8 children sharing SIZE_MIB frozen (--no-precopy) and with pre-copy
    (the default), then one process holding it, the same two ways; the lines."""
    with (
        tempfile.TemporaryDirectory(prefix="hijack-bench-trees-") as directory,
        Cluster(Path(directory), nodes=2) as cluster,
    ):
        a, b = cluster.nodes
        a.start_daemon()
        b.start_daemon()
        moved: dict[tuple[int, str], tuple[float, float, str]] = {}
        memory: dict[str, tuple[float, float]] = {}  # the tree's PSS before and after (MiB)
        for children in (CHILDREN, 0):
            for option in ("--no-precopy", "--precopy"):
                holder = _start(a, size_mib, children)
                before = _pss_mib(holder.pid)
                moved[children, option] = _move(a, holder.pid, b, option, "--timing")
                there = MOVED.search(" ".join(moved[children, option][2].split()))
                if children and there is not None:
                    memory[option] = (before, _pss_mib(int(there[3])))
                holder.wait()  # the original, killed by the move
        for option in ("--precopy", "--postcopy"):
            dirtier = _start(a, _dirty_mib(size_mib), CHILDREN, DIRTIER)
            moved[-1, option] = _move(a, dirtier.pid, b, option)
            dirtier.wait()
            # The copy writes on there: ended now, not left to load the machine.
            there = MOVED.search(" ".join(moved[-1, option][2].split()))
            if there is not None:
                for member in read_tree(int(there[3])).pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(member, signal.SIGKILL)
    tree_freeze, tree_image, printed = moved[CHILDREN, "--no-precopy"]
    single_freeze, single_image, _ = moved[0, "--no-precopy"]
    tree_precopy, _, precopy_printed = moved[CHILDREN, "--precopy"]
    single_precopy, _, _ = moved[0, "--precopy"]
    members = MEMBER.findall(printed)
    biggest = max((float(s) * UNITS[u] for _, s, u in members), default=0.0)
    label = f"1 process, {size_mib} MiB"
    sent = re.search(r"frozen [\d.]+ ms, ([\d.]+) (KiB|MiB|GiB|B) sent", precopy_printed)
    sent_mib = float(sent[1]) * UNITS[sent[2]] if sent else 0.0
    tree = f"1+{CHILDREN} sharing {size_mib} MiB"
    # Where the pre-copied tree's freeze went, here and there (ms).
    laps = re.findall(r"^freeze (?:here|at \w+) \(ms\): .*$", precopy_printed, re.M)
    return [
        f"{f'tree move freeze, {tree}':<34} {tree_freeze:8.1f} ms  "
        f" | {label + ', frozen':<38} {single_freeze:8.1f} ms  "
        f" | x{tree_freeze / single_freeze:.1f}",
        f"{f'tree move image, {tree}':<34} {tree_image:8.1f} MiB "
        f" | {label:<38} {single_image:8.1f} MiB  | x{tree_image / single_image:.1f}"
        f" (largest member {biggest:.1f} MiB)",
        f"{f'tree move freeze, pre-copy, {tree}':<34} {tree_precopy:8.1f} ms  "
        f" | {label + ', pre-copy':<38} {single_precopy:8.1f} ms   |"
        f" x{tree_precopy / single_precopy:.1f} ({sent_mib:.1f} MiB sent in all;"
        f" x{tree_precopy / tree_freeze:.2f} of the tree's frozen move)",
        *(f"  pre-copied tree, {line}" for line in laps),
        *(
            f"tree move memory (sum of PSS), {tree}, {option}: {after:.0f} MiB moved, original"
            f" {before:.0f} MiB: x{after / before:.2f} (unshared: x{CHILDREN + 1} at most)"
            for option, (before, after) in memory.items()
        ),
        _postcopy_line(moved[-1, "--postcopy"], moved[-1, "--precopy"], _dirty_mib(size_mib)),
    ]


def _dirty_mib(size_mib: int) -> int:
    """Each member's region in the dirtying tree: 1/16 of SIZE (9 members rewriting it all
    the time: what the rounds would send again and again)."""
    return max(size_mib // 16, 4)


def _postcopy_line(
    postcopy: tuple[float, float, str], precopy: tuple[float, float, str], size_mib: int
) -> str:
    """The dirtying tree's post-copy freeze beside its pre-copy one."""
    served = re.search(
        r"post-copy: ([\d.]+) (KiB|MiB|GiB|B) served after the start, in (\d+) ms",
        " ".join(postcopy[2].split()),
    )
    lazy = f"{float(served[1]) * UNITS[served[2]]:.1f} MiB" if served else "nothing"
    after = f" in {int(served[3]) / 1000:.1f} s" if served else ""
    tree = f"1+{CHILDREN} dirtying {size_mib} MiB each"
    return (
        f"{f'tree move freeze, post-copy, {tree}':<34} {postcopy[0]:8.1f} ms  "
        f" | {'the same tree, --precopy (rounds only)':<38} {precopy[0]:8.1f} ms   |"
        f" x{postcopy[0] / precopy[0]:.2f} ({lazy} served after the start{after})"
    )


if __name__ == "__main__":
    for line in measure_tree_moves(int(sys.argv[1]) if len(sys.argv) > 1 else 256):
        print(line)
