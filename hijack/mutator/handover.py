"""Handing descriptors to a shadow, which keeps them: a stopped target's before a restore,
and the members' of a tree at attach time.

The shadow forked at attach time holds what the target had then; a target's
descriptors change (a server accepts connections). Just before `dump --kill`
kills it, the target's current descriptors are copied out (pidfd_getfd) and
passed to the shadow over its control socket (SCM_RIGHTS), which then keeps
them: the sockets stay open, the peers see nothing, and a restore on this node
takes the very same open file descriptions back.

The shadow of a tree is forked from its root alone; every other member's
descriptors reach it the same way, keyed by the member's pid. A description
the shadow holds already (kcmp KCMP_FILE says so: a socket a child inherited
from its parent) is not sent again: the member's number is mapped to the
shadow's copy ("shared").
"""

from __future__ import annotations

import os

from hijack.errors import HijackError
from hijack.shadow import control
from hijack.sys import kcmp, pidfd, procfs


def hand_descriptors_to_shadow(pid: int, control_path: str, *, as_member: bool = False) -> int:
    """Give the shadow at `control_path` every descriptor of `pid` and have it keep them
    (it stops following the process); return how many. `as_member`: `pid` is a member of
    the shadow's tree, not its root."""
    return hand_over(pid, control_path, member=pid if as_member else 0, hold=True)


def hand_over(pid: int, control_path: str, *, member: int, hold: bool) -> int:
    """Give the shadow at `control_path` the descriptors of `pid` (of member `member`, or of
    its root when 0) it does not hold already; return how many descriptors are named."""
    held: dict[tuple[int, int], set[int]] = {}  # (dev, ino) -> our descriptors of that file
    shadow_pid = 0
    if member:
        # What it holds already, for a member's aliases (the root's are all sent: a
        # move's freeze spares this round trip).
        status = control.request(control_path, {"op": "status"})
        shadow_pid = int(status["shadow_pid"])
        members = status.get("members", [])
        for entry in [*status["fds"], *(f for m in members for f in m["fds"])]:
            dev_ino = (int(entry["dev"]), int(entry["ino"]))
            held.setdefault(dev_ino, set()).add(int(entry["own_fd"]))
    handle = pidfd.pidfd_open(pid)
    try:
        entries = procfs.list_fds(pid)
        shared: dict[str, int] = {}
        numbers: list[int] = []
        for entry in entries:
            if not member:
                numbers.append(entry.fd)  # the root's own numbers are always sent: no aliases
                continue
            try:
                own = next(
                    (
                        fd
                        for fd in sorted(held.get((entry.dev, entry.ino), ()))
                        if kcmp.same_description_in(shadow_pid, fd, pid, entry.fd)
                    ),
                    None,
                )
            except HijackError:
                if _still_open(pid, entry.fd):
                    raise
                continue  # the member, running, closed it meanwhile
            if own is None:
                numbers.append(entry.fd)
            else:
                shared[str(entry.fd)] = own
        first = True
        for start in range(0, max(len(numbers), 1), control.MAX_FDS):
            batch: list[int] = []
            copies: list[int] = []
            try:
                for number in numbers[start : start + control.MAX_FDS]:
                    try:
                        copies.append(pidfd.pidfd_getfd(handle, number, pid))
                    except HijackError:
                        if not member or _still_open(pid, number):
                            raise  # a stopped root's descriptors do not go away
                        continue  # the member, running, closed it meanwhile
                    batch.append(number)
                # brief: its answer is not read (the status fields cost the shadow
                # milliseconds of socket tables, while a move's process is frozen).
                message: control.Message = {
                    "op": "adopt",
                    "fds": batch,
                    "hold": hold,
                    "brief": True,
                }
                if member:
                    message["member"] = member
                if first:
                    message["shared"], first = shared, False
                control.request(control_path, message, fds=copies)
            finally:
                for copy in copies:
                    os.close(copy)
        return len(entries)
    finally:
        os.close(handle)


def _still_open(pid: int, fd: int) -> bool:
    return os.path.lexists(f"/proc/{pid}/fd/{fd}")
