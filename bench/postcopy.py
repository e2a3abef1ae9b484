"""Figures of post-copy moves: a freeze that does not grow with the dirty rate.

A process holding SIZE that dirties 200 MB/s of it (faster than pre-copy's
rounds converge here) is moved three ways, each in the same run: by default
(pre-copy, and post-copy once the rounds stop shrinking), with `--postcopy`
(post-copy after one round) and with `--precopy` (pre-copy only: the freeze
sends what the rounds could not). Printed: each freeze, the pages served
after the start and the whole move's time, the freeze beside its limit.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from bench.moves import DIRTIER, Nodes, kill_moved, started

MIB = 1024 * 1024
FAST_DIRTY_RATE = 200 * 1000 * 1000
FREEZE_TARGET_MS = 100.0  # issue #17: a post-copy move of such a process freezes it <= 100 ms

MOVED = re.compile(r"runs there as (\d+); frozen ([\d.]+) ms")
SERVED = re.compile(r"post-copy: ([\d.]+ ?\w+) served after the start, in (\d+) ms")
TOTAL = re.compile(r"([\d.]+) s in all")


def measure_postcopy(directory: Path, size: int) -> list[str]:
    (directory / "postcopy").mkdir()
    nodes = Nodes(directory / "postcopy")  # a cluster of its own (bench/moves.py has one)
    nodes.start()
    lines = []
    try:
        found = {}
        for options in ((), ("--postcopy",), ("--precopy",)):
            program = [sys.executable, "-c", DIRTIER, str(size), str(FAST_DIRTY_RATE)]
            with started(program, nodes.env("a")) as (holder, _):
                output = nodes.hijack(
                    "a", "move", str(holder.pid), "--to", f"127.0.0.1:{nodes.ports['b']}", *options
                )
                output = " ".join(output.split())  # the line may wrap
                moved = MOVED.search(output)
                if moved is None:
                    raise SystemExit(f"bench: unexpected move output: {output}")
                kill_moved(int(moved[1]))
                served = SERVED.search(output)
                total = TOTAL.search(output)
                found[options] = (
                    float(moved[2]),
                    served[1] if served else "nothing",
                    float(total[1]) if total else 0.0,
                )
        label = f"{size // MIB} MiB dirtying 200 MB/s"
        precopy_ms = found[("--precopy",)][0]
        for options, name in (((), "default (auto)"), (("--postcopy",), "--postcopy")):
            freeze_ms, served_text, total_s = found[options]
            lines.append(
                f"{'move freeze, ' + label + ', ' + name:<52} {freeze_ms:8.1f} ms   | "
                f"{'--precopy (pre-copy only)':<27} {precopy_ms:8.1f} ms   | "
                f"ratio {precopy_ms / max(freeze_ms, 0.001):5.1f}; {served_text} served after"
                f" the start, {total_s:.2f} s in all (pre-copy only:"
                f" {found[('--precopy',)][2]:.2f} s); target <= {FREEZE_TARGET_MS:.0f} ms:"
                f" {'met' if freeze_ms <= FREEZE_TARGET_MS else 'NOT met'}"
            )
    finally:
        nodes.stop()
    return lines
