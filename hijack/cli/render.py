"""Everything the CLI shows, rendered with rich. Tests render into a captured Console."""

from __future__ import annotations

import json

from rich.console import Console
from rich.table import Table

from hijack.mutator.attach import AttachResult


def attach_result(console: Console, result: AttachResult, *, as_json: bool = False) -> None:
    record = result.record
    if as_json:
        console.print_json(
            json.dumps(
                {
                    "pid": record.pid,
                    "program": record.program,
                    "shadow_pid": record.shadow_pid,
                    "control": record.shadow_control,
                    "pause_ms": round(result.pause_ms, 3),
                    "fds": result.fds,
                }
            )
        )
        return
    console.print(
        f"attached process [bold]{record.pid}[/] ({record.program}): "
        f"shadow [bold]{record.shadow_pid}[/] holds {len(result.fds)} descriptors "
        f"(target paused {result.pause_ms:.1f} ms)"
    )
    table = Table("fd", "kind", "open file description", title="held by the shadow")
    for fd in result.fds:
        table.add_row(str(fd["fd"]), str(fd["kind"]), str(fd["target"]))
    console.print(table)
