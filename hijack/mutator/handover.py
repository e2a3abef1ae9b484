"""Handing a stopped target's descriptors to its shadow, which keeps them for a restore.

The shadow forked at attach time holds what the target had then; a target's
descriptors change (a server accepts connections). Just before `dump --kill`
kills it, the target's current descriptors are copied out (pidfd_getfd) and
passed to the shadow over its control socket (SCM_RIGHTS), which then keeps
them: the sockets stay open, the peers see nothing, and a restore on this node
takes the very same open file descriptions back.
"""

from __future__ import annotations

import os

from hijack.shadow import control
from hijack.sys import pidfd, procfs


def hand_descriptors_to_shadow(pid: int, control_path: str) -> int:
    """Give the shadow at `control_path` every descriptor of `pid`; return how many."""
    handle = pidfd.pidfd_open(pid)
    try:
        numbers = [entry.fd for entry in procfs.list_fds(pid)]
        for first in range(0, len(numbers), control.MAX_FDS):
            batch = numbers[first : first + control.MAX_FDS]
            copies: list[int] = []
            try:
                for number in batch:
                    copies.append(pidfd.pidfd_getfd(handle, number, pid))
                message = {"op": "adopt", "fds": batch, "hold": True}
                control.request(control_path, message, fds=copies)
            finally:
                for copy in copies:
                    os.close(copy)
        return len(numbers)
    finally:
        os.close(handle)
