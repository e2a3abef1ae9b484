"""Credentials: a thread's ids, groups, capability sets and no_new_privs, given back.

The kernel keeps credentials per thread, and a restore injects them in each
thread (docs/crf.md, CREDENTIALS and THREAD_CREDENTIALS). The stub starts with
the restorer's (root's: every capability), so a thread would come back with
more than it had unless each set is cut to the image's: the bounding set by
PR_CAPBSET_DROP, the inheritable, permitted and effective sets by capset(2),
the ambient set raised cap by cap. The order is the kernel's:

- the inheritable set first, and the bounding set cut, while the thread still
  has CAP_SETPCAP;
- PR_SET_KEEPCAPS, so that setresuid(2) from root keeps the permitted set
  (it would clear it, and no capset could raise it again);
- the groups, then the gids (setfsgid needs CAP_SETGID: before the uids), then
  the uids; setresuid sets the fs uid to the effective one, so a different fs
  uid is set after, with the permitted set made effective for it (CAP_SETUID);
- capset to the image's sets (never more than the thread has), the ambient
  set (each cap must be permitted and inheritable by then), KEEPCAPS off again,
  and no_new_privs, which nothing undoes.

Everything a restore injects after these must need no privilege of the
process's own (what does is done from outside, by the restorer).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from hijack.image import records as rec
from hijack.restore.remote import Stub
from hijack.sys import procfs

PR_SET_KEEPCAPS = 8
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE = 47, 2
LINUX_CAPABILITY_VERSION_3 = 0x20080522
CAP_HEADER = struct.Struct("<Ii")  # version, pid (0: the calling thread)
CAP_DATA = struct.Struct("<6I")  # effective, permitted, inheritable: low 32 bits, then high


@dataclass(frozen=True)
class Powers:
    """The capability sets a stub's thread starts with (the restorer's, inherited)."""

    inheritable: int
    permitted: int
    effective: int
    bounding: int

    @classmethod
    def of(cls, pid: int) -> Powers:
        status = procfs.read_status(pid)
        return cls(status.cap_inh, status.cap_prm, status.cap_eff, status.cap_bnd)


def set_credentials(stub: Stub, wanted: rec.Credentials, tid: int, start: Powers) -> None:
    """Give thread `tid` of the stub the credentials `wanted`; `start`: what it has now."""
    stub.reset_scratch()
    if wanted.cap_inheritable != start.inheritable:
        _capset(stub, tid, start.effective, start.permitted, wanted.cap_inheritable)
    for cap in _bits(start.bounding & ~wanted.cap_bounding):
        stub.call("prctl", PR_CAPBSET_DROP, cap, 0, 0, 0, tid=tid)
    keep = bool(wanted.cap_permitted) or wanted.fsuid != wanted.euid
    if keep:
        stub.call("prctl", PR_SET_KEEPCAPS, 1, 0, 0, 0, tid=tid)
    groups = stub.put(struct.pack(f"<{len(wanted.groups)}I", *wanted.groups))
    stub.call("setgroups", len(wanted.groups), groups, tid=tid)
    stub.call("setresgid", wanted.gid, wanted.egid, wanted.sgid, tid=tid)
    if wanted.fsgid != wanted.egid:
        stub.call("setfsgid", wanted.fsgid, tid=tid)  # returns the old one: never fails
    stub.call("setresuid", wanted.uid, wanted.euid, wanted.suid, tid=tid)
    if wanted.fsuid != wanted.euid:
        # setresuid from root cleared the effective set; CAP_SETUID lets setfsuid work.
        _capset(stub, tid, start.permitted, start.permitted, wanted.cap_inheritable)
        stub.call("setfsuid", wanted.fsuid, tid=tid)
    _capset(stub, tid, wanted.cap_effective, wanted.cap_permitted, wanted.cap_inheritable)
    for cap in _bits(wanted.cap_ambient):
        stub.call("prctl", PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, cap, 0, 0, tid=tid)
    if keep:
        stub.call("prctl", PR_SET_KEEPCAPS, 0, 0, 0, 0, tid=tid)
    if wanted.no_new_privs:
        stub.call("prctl", PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0, tid=tid)


def _capset(stub: Stub, tid: int, effective: int, permitted: int, inheritable: int) -> None:
    header = stub.put(CAP_HEADER.pack(LINUX_CAPABILITY_VERSION_3, 0))
    low, high = 0xFFFFFFFF, 32
    data = stub.put(
        CAP_DATA.pack(
            effective & low,
            permitted & low,
            inheritable & low,
            effective >> high,
            permitted >> high,
            inheritable >> high,
        )
    )
    stub.call("capset", header, data, tid=tid)


def _bits(mask: int) -> list[int]:
    return [bit for bit in range(mask.bit_length()) if mask >> bit & 1]
