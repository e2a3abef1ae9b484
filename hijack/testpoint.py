"""Test points: a command stops itself at a named stage, for fault-injection tests.

With `HIJACK_STOP_AT=STAGE[,STAGE...]` in its environment, a hijack command
(or a node daemon) that reaches one of those stages sends itself SIGSTOP. Its
parent (the test) sees it stop with waitpid(WUNTRACED), sends the signal under
test (SIGINT, SIGTERM, SIGKILL) or changes the world (a link down), and
continues it with SIGCONT: the signal lands exactly at that stage, with no
sleep deciding when. Without the variable a test point costs one lookup.

The stages (docs/faults.md lists what each one holds at that instant):
attach-seized, attach-forked, attach-shadow-ready; dump-seized, dump-splicing,
dump-written, dump-handed-over; restore-tree-forked, restore-tree-rebuilt; move-attached,
move-connected, move-first-round, move-layout-read, move-prebuilt, move-frozen, move-streaming,
move-prepared, move-committed, move-postcopy; daemon-committed; swap-frozen, swap-joined.
"""

from __future__ import annotations

import os
import signal
import threading

VARIABLE = "HIJACK_STOP_AT"


def reached(stage: str) -> None:
    """Stop here (SIGSTOP to ourselves) if the environment asks for `stage`."""
    wanted = os.environ.get(VARIABLE)
    if wanted and stage in wanted.split(","):
        # To this thread: it takes the stop itself on its way out of the call.
        # Sent to the process, another thread may take it while this one runs
        # on past the stage for a moment (a daemon's answer already out).
        signal.pthread_kill(threading.get_ident(), signal.SIGSTOP)
