"""Where a pre-copied tree's move freeze goes: bench/tree_moves.py's HOLDER tree (1 parent
+ 8 children sharing SIZE MiB since the fork, idle) moved `--precopy --timing` between two
network-namespace nodes, COUNT times (a fresh tree each), each move's freeze and its laps
printed, then the median freeze.

    python -m bench.tree_freeze_probe [SIZE_MIB [COUNT [PROFILE_DIR]]]

With PROFILE_DIR, the mover's freeze (hijack.node.tree_move._frozen) is profiled with
cProfile in each move, one file each (PROFILE_DIR/freeze-N.prof).
"""

from __future__ import annotations

import contextlib
import os
import signal
import statistics
import sys
import tempfile
from pathlib import Path

import bench.testnodes  # noqa: F401  (puts tests/ on the path: support.nodes)
from bench.testnodes import Cluster
from bench.tree_moves import CHILDREN, MEMBER, MOVED, _move, _start
from hijack.process.tree import read_tree

# The mover, its freeze profiled: argv[1] the profile's file, the rest hijack's.
PROFILED = """\
import cProfile, sys
import hijack.node.tree_move as tree_move
path = sys.argv.pop(1)
frozen = tree_move._frozen
def profiled(*args, **kwargs):
    profile = cProfile.Profile()
    try:
        return profile.runcall(frozen, *args, **kwargs)
    finally:
        profile.dump_stats(path)
tree_move._frozen = profiled
from hijack.cli.main import run
sys.argv[0] = "hijack"
run()
"""


def probe(size_mib: int, count: int, profile: Path | None = None) -> list[float]:
    import support.nodes as nodes

    program = nodes.HIJACK_PROGRAM
    freezes: list[float] = []
    with (
        tempfile.TemporaryDirectory(prefix="hijack-bench-tree-freeze-") as directory,
        Cluster(Path(directory), nodes=2) as cluster,
    ):
        a, b = cluster.nodes
        a.start_daemon()
        b.start_daemon()
        for index in range(count):
            if profile is not None:
                nodes.HIJACK_PROGRAM = (
                    sys.executable,
                    "-c",
                    PROFILED,
                    str(profile / f"freeze-{index}.prof"),
                )
            holder = _start(a, size_mib, CHILDREN)
            try:
                freeze, _, printed = _move(a, holder.pid, b, "--precopy", "--timing")
            finally:
                nodes.HIJACK_PROGRAM = program
            holder.wait()
            there = MOVED.search(" ".join(printed.split()))
            if there is not None:
                for member in reversed(read_tree(int(there[3])).pids):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(member, signal.SIGKILL)
            freezes.append(freeze)
            laps = [
                line
                for line in printed.splitlines()
                if line.startswith("freeze ") or MEMBER.match(line) or "sent" in line
            ]
            print(f"move {index}: frozen {freeze:.1f} ms", flush=True)
            for line in laps:
                print(f"  {line}", flush=True)
    return freezes


if __name__ == "__main__":
    size = int(sys.argv[1]) if len(sys.argv) > 1 else 256
    count = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    where = Path(sys.argv[3]) if len(sys.argv) > 3 else None
    if where is not None:
        where.mkdir(parents=True, exist_ok=True)
    found = probe(size, count, where)
    print(
        f"tree move freeze, pre-copy, 1+{CHILDREN} sharing {size} MiB: median"
        f" {statistics.median(found):.1f} ms of {len(found)}"
        f" ({', '.join(f'{f:.0f}' for f in found)})"
    )
