"""Packet sockets (AF_PACKET, SOCK_RAW or SOCK_DGRAM): made again with their protocol, the
interface they are bound to, their memberships, fanout group and PACKET_* options.

At dump packet_diag (hijack.sys.packet_diag) tells the interface, the memberships
(PACKET_ADD_MEMBERSHIP: multicast, promiscuous, ...), the rings and the fanout
group; a copy of the socket tells its options (SocketOptions: PACKET_VERSION,
PACKET_AUXDATA, ...). The restorer makes the socket (CAP_NET_RAW, as the original
needed), sets its options, binds it to the interface of the same index (a restore
runs in the restorer's network namespace: the process's, when it is run there),
adds its memberships, joins its fanout group last (a group takes bound sockets
only) and gives it to the process. Frames queued on it are lost: a packet socket
sees copies of traffic, which goes on without it.

Refused by name: a socket with a PACKET_RX_RING or PACKET_TX_RING. Its ring is
mapped in the process (/proc/PID/maps shows "socket:[INODE]", shared), which the
dump would store as plain memory, no longer the socket's ring.
"""

from __future__ import annotations

import socket
import struct

from hijack.errors import HijackError, RestoreError
from hijack.image import records as rec
from hijack.image.files import ImageFiles
from hijack.objects import sockopts
from hijack.objects.base import DumpContext, Kind, RestoreContext, describe_fd
from hijack.objects.sockets import copy_socket, unlisted_socket_is
from hijack.sys import packet_diag, procfs

SOL_PACKET = 263
PACKET_ADD_MEMBERSHIP, PACKET_FANOUT = 1, 18
PACKET_MREQ = struct.Struct("=iHH8s")  # struct packet_mreq: ifindex, type, alen, address
MEMBERSHIP_TYPES = {0: "multicast", 1: "promiscuous", 2: "allmulti", 3: "unicast"}


class Packet(Kind):
    name = "packet"
    record_types = (rec.PacketSocket,)

    def claims(self, entry: procfs.FdEntry, dump: DumpContext) -> bool:
        return unlisted_socket_is(entry, dump, lambda sock: sock.family == socket.AF_PACKET)

    def dump(self, entry: procfs.FdEntry, info: procfs.FdInfo, dump: DumpContext) -> int:
        diag = packet_diag.packet_sockets(dump.pid).get(entry.ino)
        if diag is None:
            raise HijackError(f"fd {entry.fd}: packet_diag does not know socket {entry.ino}")

        def make(id: int) -> rec.PacketSocket:
            return rec.PacketSocket(
                id=id,
                type=diag.type,
                protocol=diag.protocol,
                ifindex=diag.ifindex,
                fanout=diag.fanout,
                memberships=tuple(
                    rec.PacketMembership(
                        ifindex=m.ifindex, count=m.count, type=m.type, address=m.address
                    )
                    for m in diag.memberships
                ),
                rx_ring=diag.rx_ring,
                tx_ring=diag.tx_ring,
            )

        object_id = dump.add_object(("socket", entry.ino), make)
        with copy_socket(entry, dump) as sock:
            sockopts.dump_options(sock, object_id, entry.ino, dump)
        return object_id

    def refusal(self, descriptor: rec.FileDescriptor, image: ImageFiles) -> str | None:
        packet = image.object_of(descriptor, rec.PacketSocket)
        rings = [name for name, ring in (("RX", packet.rx_ring), ("TX", packet.tx_ring)) if ring]
        if rings:
            named = " and ".join(f"PACKET_{name}_RING" for name in rings)
            return f"{describe_fd(descriptor)} with a {named}: its mapped ring is not rebuilt"
        return None

    def restore(self, descriptor: rec.FileDescriptor, restore: RestoreContext) -> None:
        packet = restore.image.object_of(descriptor, rec.PacketSocket)
        options = sockopts.options_of(restore.image, packet.id)
        try:
            sock = socket.socket(socket.AF_PACKET, packet.type, socket.htons(packet.protocol))
        except OSError as error:
            raise RestoreError(
                f"cannot make the packet socket of {describe_fd(descriptor)} again:"
                f" {error.strerror}"
            ) from None
        with sock:
            set_option, attach = sockopts.our_setters(sock)
            try:
                sockopts.set_early(options, set_option)
                if packet.ifindex:
                    sock.bind((socket.if_indextoname(packet.ifindex), packet.protocol))
                for membership in packet.memberships:
                    request = PACKET_MREQ.pack(
                        membership.ifindex,
                        membership.type,
                        len(membership.address),
                        membership.address.ljust(8, b"\0"),
                    )
                    for _ in range(membership.count):
                        sock.setsockopt(SOL_PACKET, PACKET_ADD_MEMBERSHIP, request)
                sockopts.set_late(options, set_option, attach)
                if packet.fanout:
                    sock.setsockopt(SOL_PACKET, PACKET_FANOUT, packet.fanout)
            except OSError as error:
                raise RestoreError(
                    f"cannot make the packet socket of {describe_fd(descriptor)} again"
                    f" (interface {packet.ifindex}): {error.strerror}"
                ) from None
            restore.give(sock.fileno(), descriptor)

    def describe(self, descriptor: rec.FileDescriptor, image: ImageFiles) -> str:
        packet = image.object_of(descriptor, rec.PacketSocket)
        kind = "raw" if packet.type == socket.SOCK_RAW else "dgram"
        parts = [f"{kind} protocol {packet.protocol:#06x}"]
        parts.append(f"interface {packet.ifindex}" if packet.ifindex else "every interface")
        if packet.fanout:
            parts.append(f"fanout group {packet.fanout & 0xFFFF} mode {packet.fanout >> 16:#x}")
        parts += [
            f"{MEMBERSHIP_TYPES.get(m.type, m.type)} on {m.ifindex}" for m in packet.memberships
        ]
        parts += [
            f"{name} ring"
            for name, ring in (("RX", packet.rx_ring), ("TX", packet.tx_ring))
            if ring
        ]
        return ", ".join(parts) + sockopts.describe_options(image, packet.id)
