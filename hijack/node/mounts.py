"""The mount namespace a moved process sees its files in.

A process may live in a mount namespace of its own (`ip netns exec` makes
one, and so do systemd's PrivateTmp and PrivateDevices): the paths of its
descriptors, mappings and cwd name files of that namespace, which another
namespace may not have, or have other files under. A move names the
process's namespace and the processes that hold it — the frozen process
itself, which holds it until the copy runs, and its home shadow, forked
from it in it — and the destination daemon builds the process inside it
(hijack.sys.stub.spawn_stub): every path is opened as the process saw it,
and it lives on in its namespace, so it can move again. A namespace the
destination cannot enter (no process it can see holds it: on another
machine) is refused by name before anything is built. A process in its
machine's own namespace (pid 1's) is built in the destination machine's
own, whatever namespace the daemon itself runs in. Where pid 1 may not be
looked at (a sandbox whose init holds capabilities hijack lacks), the
machine's own is the one hijack runs in: else a process there, moved to a
node with pid and mount namespaces of its own, would be refused, its holders'
pids being none that node can see.
"""

from __future__ import annotations

import os
from typing import Any

from hijack.errors import HijackError
from hijack.sys.process import mount_namespace_of, open_mount_namespace

HOST = 1  # pid 1 holds the machine's own mount namespace


def describe(pid: int, shadow: int | None) -> dict[str, Any]:
    """The `mount_namespace` field of a move: the process's namespace and who holds it."""
    own = mount_namespace_of(pid)
    return {"id": own, "holders": [pid, shadow or 0], "host": own == _host_namespace()}


def _host_namespace() -> str:
    """The machine's own mount namespace: pid 1's, or where pid 1 may not be looked at (a
    sandbox), hijack's own."""
    try:
        return mount_namespace_of(HOST)
    except HijackError:
        return mount_namespace_of(os.getpid())


def open_namespace(described: Any, who: str) -> int | None:
    """A descriptor of the namespace to build the process in (the caller closes it), or
    None for this daemon's own; HijackError if it cannot be entered from here."""
    if described is None:
        return None  # a mover that does not say: as before
    if not isinstance(described, dict):
        raise HijackError(f"malformed mount_namespace for {who}")
    wanted, holders = described.get("id"), described.get("holders")
    if not isinstance(wanted, str) or not isinstance(holders, list):
        raise HijackError(f"malformed mount_namespace for {who}")
    if described.get("host"):  # the machine's own: this machine's own, then
        wanted, holders = _host_namespace(), [HOST]
    if mount_namespace_of(os.getpid()) == wanted:
        return None
    for pid in holders:
        if isinstance(pid, int) and pid > 0:
            fd = open_mount_namespace(pid, wanted)
            if fd is not None:
                return fd
    raise HijackError(
        f"refusing {who}: it lives in a mount namespace of its own ({wanted}) that this node"
        " cannot enter (no process here holds it any more): its paths would name other files"
    )
