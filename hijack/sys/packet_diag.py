"""Packet sockets (AF_PACKET) as the kernel's packet_diag tells of them (sock_diag):
the interface each is bound to, its TPACKET version, its multicast/promiscuous
memberships, its rings and its fanout group (include/uapi/linux/packet_diag.h).
getsockopt tells neither the memberships nor the rings."""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

from hijack.errors import HijackError
from hijack.sys import unix_socket
from hijack.sys.errors import kernel_call

PACKET_DIAG_REQ = struct.Struct("=BBHII8s")  # family, protocol, pad, ino, show, cookie
PACKET_DIAG_MSG = struct.Struct("=BBHI8s")  # family, type, num (protocol), ino, cookie
PACKET_SHOW_INFO, PACKET_SHOW_MCLIST, PACKET_SHOW_RING_CFG, PACKET_SHOW_FANOUT = 1, 2, 4, 8
PACKET_DIAG_INFO, PACKET_DIAG_MCLIST, PACKET_DIAG_RX_RING, PACKET_DIAG_TX_RING = 0, 1, 2, 3
PACKET_DIAG_FANOUT = 4
DIAG_INFO = struct.Struct("=6I")  # index, version, reserve, copy_thresh, tstamp, flags
DIAG_MCLIST = struct.Struct("=IIHH32s")  # index, count, type, alen, addr
DIAG_RING = struct.Struct("=7I")  # block size, block nr, frame size, frame nr, tmo, priv, features


@dataclass(frozen=True, slots=True)
class Membership:
    ifindex: int
    count: int  # how many times it was added
    type: int  # PACKET_MR_MULTICAST 0, _PROMISC 1, _ALLMULTI 2, _UNICAST 3
    address: bytes


@dataclass(frozen=True, slots=True)
class PacketDiag:
    inode: int
    type: int  # SOCK_RAW or SOCK_DGRAM
    protocol: int  # the ethertype it receives (host order); 0 for none
    ifindex: int  # the interface it is bound to; 0 for all (or none)
    version: int  # TPACKET_V1 0, V2 1, V3 2
    memberships: tuple[Membership, ...]
    rx_ring: tuple[int, ...]  # DIAG_RING's seven fields; () without a ring
    tx_ring: tuple[int, ...]
    fanout: int  # group id | (mode | flags) << 16, as getsockopt(PACKET_FANOUT); 0 for none


def packet_sockets(pid: int) -> dict[int, PacketDiag]:
    """Every packet socket of the network namespace of process `pid`, by inode."""
    with unix_socket.in_network_namespace(pid), kernel_call("sock_diag", pid):
        channel = socket.socket(
            socket.AF_NETLINK,
            socket.SOCK_DGRAM | socket.SOCK_CLOEXEC,
            unix_socket.NETLINK_SOCK_DIAG,
        )
    with channel:
        show = PACKET_SHOW_INFO | PACKET_SHOW_MCLIST | PACKET_SHOW_RING_CFG | PACKET_SHOW_FANOUT
        request = PACKET_DIAG_REQ.pack(socket.AF_PACKET, 0, 0, 0, show, b"\xff" * 8)
        header = unix_socket.NLMSGHDR.pack(
            unix_socket.NLMSGHDR.size + len(request),
            unix_socket.SOCK_DIAG_BY_FAMILY,
            unix_socket.NLM_F_REQUEST | unix_socket.NLM_F_DUMP,
            1,
            0,
        )
        with kernel_call("sock_diag", pid):
            channel.sendto(header + request, (0, 0))
            bodies = unix_socket.read_diag_dump(channel, "packet")
            return {diag.inode: diag for diag in map(_parse, bodies)}


def _parse(body: bytes) -> PacketDiag:
    _family, kind, number, inode, _cookie = PACKET_DIAG_MSG.unpack_from(body)
    ifindex = version = fanout = 0
    memberships: list[Membership] = []
    rings: dict[int, tuple[int, ...]] = {}
    for attribute, data in unix_socket.attributes(body[PACKET_DIAG_MSG.size :]):
        if attribute == PACKET_DIAG_INFO:
            ifindex, version = DIAG_INFO.unpack_from(data)[:2]
        elif attribute == PACKET_DIAG_MCLIST:
            for offset in range(0, len(data) - DIAG_MCLIST.size + 1, DIAG_MCLIST.size):
                index, count, type_, length, address = DIAG_MCLIST.unpack_from(data, offset)
                memberships.append(Membership(index, count, type_, address[:length]))
        elif attribute in (PACKET_DIAG_RX_RING, PACKET_DIAG_TX_RING):
            rings[attribute] = DIAG_RING.unpack_from(data)
        elif attribute == PACKET_DIAG_FANOUT:
            (fanout,) = struct.unpack_from("=I", data)
    if kind not in (socket.SOCK_RAW, socket.SOCK_DGRAM):
        raise HijackError(f"packet_diag: socket {inode} of type {kind}")
    return PacketDiag(
        inode=inode,
        type=kind,
        protocol=number,  # packet_diag gives it in host order already
        ifindex=ifindex,
        version=version,
        memberships=tuple(memberships),
        rx_ring=rings.get(PACKET_DIAG_RX_RING, ()),
        tx_ring=rings.get(PACKET_DIAG_TX_RING, ()),
        fanout=fanout,
    )
