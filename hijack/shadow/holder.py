"""The resting shadow: a small native program the shadow becomes while it only holds.

A Python shadow costs about 22 MiB resident, 12.7 MiB proportional (PSS); 200
attached processes cost 2.5 GiB. Most of them only hold their descriptors: at
home the shadow follows its process, holding it keeps a checkpointed one's. So a
shadow idle for REST_AFTER seconds in those modes, with nothing relayed and no
endpoint open, execve's shadow-holder (hijack/native/shadow_holder.c, built at
install: `make`), which does just that in about 0.1 MiB, in the same process:
same pid, session, credentials, descriptors, control socket. Its state goes on
the command line. The first control request it gets (but `release`, which it
answers itself: it ends) makes it execve the Python shadow again with that
state and the request's connection unread, so every request is answered by
hijack.shadow.program as before, only later by a Python start.

Designs weighed (bench/results.txt): 200 resting shadows cost 0.11 MiB of PSS
each, Python ones 14.2 MiB. A per-node zygote forking Python shadows (its
modules imported, pages shared copy-on-write, gc.freeze'd or not) was measured
too: 50 forked shadows idle in their loop kept 2.1 MiB private dirty each
(libpython's data 0.44 MiB, arenas and heap the rest: reference counts), over
the 1 MiB limit, and a host process to start, reap and survive. One Python
process serving many shadows would give one failure (a crash, a stuck relay)
to all of them and change the meaning of a shadow's pid. Resting keeps one
process per shadow with nothing shared: no host to start or lose.

HIJACK_SHADOW_REST: seconds idle before resting (default REST_AFTER; 0: at the first
look, a second after the last request); "off"
keeps every shadow in Python.
"""

from __future__ import annotations

import os
from pathlib import Path

from hijack.shadow import pump

SOURCE = Path(__file__).resolve().parent.parent / "native" / "shadow_holder.c"
PROGRAM = SOURCE.with_name("shadow-holder")
REST_AFTER = 5.0  # seconds without a request: a move or a status in progress asks again sooner
MAX_KEYS = 4096  # shadow_holder.c's tables
MAX_MEMBERS = 256
ROLE = "hijack.shadow"  # its second word: a shadow, to whoever reads its command line


def rest_after() -> float | None:
    """Seconds idle before a shadow rests; None: it never does."""
    setting = os.environ.get("HIJACK_SHADOW_REST", "").strip()
    if setting.lower() in ("off", "no", "never"):
        return None
    if not setting:
        return REST_AFTER
    try:
        return max(0.0, float(setting))
    except ValueError:
        return REST_AFTER


def available() -> bool:
    return os.access(PROGRAM, os.X_OK)


def build() -> None:
    """Compile the holder beside its source if it is missing or older (at install: `make`)."""
    pump.build_program(SOURCE, PROGRAM)


def keys(table: dict[int, int]) -> str:
    """A descriptor table (the process's number -> ours) as the holder reads it."""
    return ",".join(f"{number}={fd}" for number, fd in sorted(table.items()))


def parse_keys(text: str) -> dict[int, int]:
    table = {}
    for item in filter(None, text.split(",")):
        number, _, fd = item.partition("=")
        table[int(number)] = int(fd)
    return table


def command(
    *,
    python: str,
    target: int,
    control: str,
    log: str,
    listener: int,
    home: bool,
    started_at: float,
    held: dict[int, int],
    members: dict[int, tuple[bool, dict[int, int]]],
) -> list[str]:
    """The holder's argv (see shadow_holder.c); `members`: pid -> (followed, table)."""
    argv = [
        str(PROGRAM),
        ROLE,
        "--python",
        python,
        "--target",
        str(target),
        "--control",
        control,
        "--log",
        log,
        "--listener",
        str(listener),
        "--mode",
        "home" if home else "holding",
        "--started-at",
        repr(started_at),
    ]
    if held:
        argv += ["--held", keys(held)]
    for pid, (followed, table) in sorted(members.items()):
        argv += ["--member", f"{pid}:{int(followed)}:{keys(table)}"]
    return argv


def parse_member(text: str) -> tuple[int, bool, dict[int, int]]:
    """One `--member PID:FOLLOWED:N=FD,...` of the holder's hand-over to Python."""
    pid, followed, table = text.split(":", 2)
    return int(pid), followed == "1", parse_keys(table)


if __name__ == "__main__":
    build()
