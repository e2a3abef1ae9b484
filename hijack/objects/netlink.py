"""Netlink sockets: made again with their protocol, port id and multicast groups.

At dump a copy of the socket tells its type, protocol, port id (getsockname)
and the groups it joined (NETLINK_LIST_MEMBERSHIPS). The restorer makes the
socket, binds it to the same port id (a restore keeps the process's pid, which
an automatically bound socket took as its port), joins the groups and gives it
to the process. Messages queued on it at the dump are lost: they were the
kernel's answers and notifications, not data of the process's peers.
"""

from __future__ import annotations

import os
import socket
import struct

from hijack.errors import HijackError, RestoreError
from hijack.image import records as rec
from hijack.image.files import ImageFiles
from hijack.objects.base import DumpContext, Kind, RestoreContext, describe_fd
from hijack.sys import procfs

SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
NETLINK_LIST_MEMBERSHIPS = 9
MEMBERSHIP_BYTES = 1024  # room for 8192 groups (Python's getsockopt limit)


def _groups(sock: socket.socket) -> tuple[int, ...]:
    bitmap = sock.getsockopt(SOL_NETLINK, NETLINK_LIST_MEMBERSHIPS, MEMBERSHIP_BYTES)
    words = struct.unpack(f"<{len(bitmap) // 4}I", bitmap[: len(bitmap) // 4 * 4])
    # Group n is bit n - 1.
    return tuple(
        32 * index + bit + 1
        for index, word in enumerate(words)
        for bit in range(32)
        if word >> bit & 1
    )


class Netlink(Kind):
    name = "netlink"
    record_types = (rec.NetlinkSocket,)

    def claims(self, entry: procfs.FdEntry, dump: DumpContext) -> bool:
        if not dump.connections or entry.kind is not procfs.FdKind.SOCKET:
            return False
        if entry.ino in dump.socket_table():
            return False  # inet or unix
        try:
            with socket.socket(fileno=os.dup(dump.copy_fd(entry.fd))) as sock:
                return sock.family == socket.AF_NETLINK
        except (OSError, HijackError):
            return False

    def dump(self, entry: procfs.FdEntry, info: procfs.FdInfo, dump: DumpContext) -> int:
        with socket.socket(fileno=os.dup(dump.copy_fd(entry.fd))) as sock:
            port_id, _ = sock.getsockname()
            kind, protocol, groups = int(sock.type), sock.proto, _groups(sock)
        return dump.add_object(
            ("socket", entry.ino),
            lambda id: rec.NetlinkSocket(
                id=id, type=kind, protocol=protocol, port_id=port_id, groups=groups
            ),
        )

    def restore(self, descriptor: rec.FileDescriptor, restore: RestoreContext) -> None:
        found = restore.image.object_of(descriptor, rec.NetlinkSocket)
        with socket.socket(socket.AF_NETLINK, found.type, found.protocol) as sock:
            try:
                if found.port_id:
                    sock.bind((found.port_id, 0))
                for group in found.groups:
                    sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, group)
            except OSError as error:
                raise RestoreError(
                    f"cannot make the netlink socket of {describe_fd(descriptor)} again"
                    f" (port {found.port_id}, groups {list(found.groups)}): {error.strerror}"
                ) from None
            restore.give(sock.fileno(), descriptor)

    def describe(self, descriptor: rec.FileDescriptor, image: ImageFiles) -> str:
        found = image.object_of(descriptor, rec.NetlinkSocket)
        groups = ",".join(map(str, found.groups)) or "none"
        return f"protocol {found.protocol}, port {found.port_id}, groups {groups}"
