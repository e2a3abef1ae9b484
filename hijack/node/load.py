"""What a node daemon tells movers of its load (`load`, docs/protocol.md): `hijack drain`'s rule.

Read from /proc when asked, so that a drain compares the nodes as they are
at its start: the 1-minute load average, the processors it is shared by,
and MemAvailable (what the kernel estimates can be had without swapping).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from hijack.errors import HijackError


def node_load(name: str) -> dict[str, Any]:
    """The `load` answer: {"node", "load1", "cpus", "mem_available"} (bytes)."""
    try:
        load1 = float(Path("/proc/loadavg").read_text().split()[0])
        meminfo = Path("/proc/meminfo").read_text()
    except (OSError, ValueError, IndexError) as exc:
        raise HijackError(f"cannot read this node's load: {exc}") from None
    available = 0
    for line in meminfo.splitlines():
        if line.startswith("MemAvailable:"):
            available = int(line.split()[1]) * 1024
    return {
        "node": name,
        "load1": load1,
        "cpus": len(os.sched_getaffinity(0)) or 1,
        "mem_available": available,
    }
