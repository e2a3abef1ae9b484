"""The attach + detach pause: how long a busy process is stopped by `hijack attach`.

A process that only counts is attached and detached CYCLES times; each attach
reports how long the target was stopped (from the first interrupt to its
release: the fork of the shadow's copy happens in between, the shadow's own
start after). Detach does not stop the target. The figure is the median.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import subprocess
import sys
from pathlib import Path

from hijack.mutator import attach as attaching
from hijack.registry import Registry

BUSY = """
import sys
print("ready", flush=True)
count = 0
while True:
    count += 1
"""


def reap(pid: int) -> None:
    """Wait for an ended shadow (it becomes our child: bench is a child subreaper)."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


def measure_pauses(directory: Path, cycles: int) -> list[str]:
    busy = subprocess.Popen([sys.executable, "-c", BUSY], stdout=subprocess.PIPE, text=True)
    assert busy.stdout is not None
    pauses = []
    try:
        busy.stdout.readline()
        with Registry(directory / "pause-state") as registry:
            for _ in range(cycles):
                result = attaching.attach(busy.pid, registry)
                pauses.append(result.pause_ms)
                attaching.detach(busy.pid, registry)
                if result.record.shadow_pid:
                    reap(result.record.shadow_pid)
    finally:
        busy.kill()
        busy.wait()
    median = statistics.median(pauses)
    return [
        f"{'attach + detach pause (median)':<34} {median:8.2f} ms   | "
        f"{f'{cycles} cycles on a busy process, max':<38} {max(pauses):8.2f} ms   | "
        f"target <= 5 ms: {'met' if median <= 5 else 'NOT met'}"
    ]
