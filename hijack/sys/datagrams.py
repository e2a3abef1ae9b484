"""A UDP socket's receive queue: read without consuming it, and filled again.

Reading peeks (MSG_PEEK) with a peek offset (SO_PEEK_OFF): each peek returns the
next datagram, whole, with its source address, and leaves the queue as it was;
the socket's own peek offset is put back afterwards.

Filling puts each datagram back as a UDP packet sent through a raw socket, its
IP and UDP headers written here: the packet carries the datagram's original
source address and port, whoever holds that port now (or no one: a peer on
another host), so the receiver's recvfrom() sees the sender it saw before.
Loopback delivers such a packet within the sendto() call. A UDP-Lite datagram
(RFC 3828) goes back covered whole by its checksum (coverage 0), which any
UDPLITE_RECV_CSCOV minimum accepts.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from dataclasses import dataclass

from hijack.sys import netlock
from hijack.sys.errors import kernel_call

SO_PEEK_OFF = 42
SO_MARK = 36
PEEK_DISABLED = -1  # the peek offset of a socket that never asked for one
MAX_DATAGRAM = 65535
IPPROTO_UDP = socket.IPPROTO_UDP
IPPROTO_UDPLITE = 136
DEFAULT_TTL = 64
IP_DONT_FRAGMENT = 0x4000
IPV4_HEADER = struct.Struct("!BBHHHBBH4s4s")  # version+ihl, tos, length, id, frag, ttl, proto, csum
IPV6_HEADER = struct.Struct("!IHBB16s16s")  # version+class+flow, payload length, next, hops
UDP_HEADER = struct.Struct("!HHHH")  # source port, destination port, length, checksum


@dataclass(frozen=True)
class Datagram:
    source: str  # "1.2.3.4:53", "[::1]:53" (an IPv4 sender of an IPv6 socket: "[::ffff:...]")
    data: bytes


def endpoint_text(address: tuple[str, int] | tuple[str, int, int, int]) -> str:
    """The text of a Python socket address: "1.2.3.4:53", "[::1]:53"."""
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def read_queue(sock: socket.socket) -> list[Datagram]:
    """Every datagram queued on `sock`, in order, left queued."""
    found: list[Datagram] = []
    with kernel_call("setsockopt", what="SO_PEEK_OFF"):
        saved = sock.getsockopt(socket.SOL_SOCKET, SO_PEEK_OFF)
        sock.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, 0)
    try:
        while True:
            try:
                data, source = sock.recvfrom(MAX_DATAGRAM, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            except BlockingIOError:
                return found
            found.append(Datagram(endpoint_text(source), data))
    finally:
        with kernel_call("setsockopt", what="SO_PEEK_OFF"):
            sock.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, saved)


def _split(text: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
    host, _, port = text.rpartition(":")
    address = ipaddress.ip_address(host.strip("[]"))
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped, int(port)
    return address, int(port)


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _destination(local: str, version: int) -> str:
    """Where a datagram for a socket bound to `local` is sent: a wildcard is loopback."""
    address, _ = _split(local)
    if version == 4 and address.version == 6:
        address = ipaddress.IPv4Address("127.0.0.1")  # an IPv6 socket taking IPv4 too
    if address.is_unspecified:
        return "127.0.0.1" if version == 4 else "::1"
    return str(address)


def _packet(
    source: str, local: str, data: bytes, protocol: int = IPPROTO_UDP
) -> tuple[int, bytes, str]:
    """(family, packet with its IP header, destination host) of one datagram to `local`."""
    sender, sender_port = _split(source)
    destination = ipaddress.ip_address(_destination(local, sender.version))
    _, port = _split(local)
    length = UDP_HEADER.size + len(data)
    if sender.version == 4:
        pseudo = sender.packed + destination.packed + struct.pack("!xBH", protocol, length)
    else:
        pseudo = sender.packed + destination.packed + struct.pack("!I3xB", length, protocol)
    # UDP-Lite's length field is its checksum coverage: 0, the whole datagram.
    field = 0 if protocol == IPPROTO_UDPLITE else length
    summed = checksum(pseudo + UDP_HEADER.pack(sender_port, port, field, 0) + data)
    udp = UDP_HEADER.pack(sender_port, port, field, summed or 0xFFFF) + data
    if sender.version == 4:
        head = IPV4_HEADER.pack(
            0x45, 0, IPV4_HEADER.size + length, 0, IP_DONT_FRAGMENT, DEFAULT_TTL,
            protocol, 0, sender.packed, destination.packed,
        )  # fmt: skip
        return socket.AF_INET, head + udp, str(destination)
    head = IPV6_HEADER.pack(6 << 28, length, protocol, DEFAULT_TTL, sender.packed,
                            destination.packed)  # fmt: skip
    return socket.AF_INET6, head + udp, str(destination)


def fill_queue(local: str, datagrams: list[Datagram], protocol: int = IPPROTO_UDP) -> None:
    """Send each datagram, from its source, to the socket bound to `local`, in order, as
    `protocol` (IPPROTO_UDP or IPPROTO_UDPLITE)."""
    _send_raw(f"a raw socket re-queuing to {local}", [
        _packet(datagram.source, local, datagram.data, protocol) for datagram in datagrams
    ])  # fmt: skip


def _send_raw(what: str, packets: list[tuple[int, bytes, str]]) -> None:
    """Send each (family, packet with its IP header, destination host) through a raw
    socket, in order."""
    raws: dict[int, socket.socket] = {}
    try:
        for family, packet, host in packets:
            with kernel_call("sendto", what=what):
                if family not in raws:
                    raws[family] = socket.socket(family, socket.SOCK_RAW, socket.IPPROTO_RAW)
                    # Let through by the socket's network lock, if it has one.
                    raws[family].setsockopt(socket.SOL_SOCKET, SO_MARK, netlock.OWN_MARK)
                raws[family].sendto(packet, (host, 0))
    finally:
        for raw in raws.values():
            raw.close()


def take_queue(sock: socket.socket) -> list[Datagram]:
    """Every datagram queued on `sock`, in order, taken off it (a socket without
    SO_PEEK_OFF: an ICMP ping socket)."""
    found: list[Datagram] = []
    while True:
        try:
            data, source = sock.recvfrom(MAX_DATAGRAM, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return found
        found.append(Datagram(endpoint_text(source), data))


def _ping_reply(source: str, local: str, message: bytes) -> tuple[int, bytes, str]:
    """(family, packet with its IP header, destination host) of the ICMP message of an
    echo reply `message` from `source` to the ping socket bound to `local`."""
    sender, _ = _split(source)
    destination = ipaddress.ip_address(_destination(local, sender.version))
    if sender.version == 4:
        head = IPV4_HEADER.pack(
            0x45, 0, IPV4_HEADER.size + len(message), 0, IP_DONT_FRAGMENT, DEFAULT_TTL,
            socket.IPPROTO_ICMP, 0, sender.packed, destination.packed,
        )  # fmt: skip
        return socket.AF_INET, head + message, str(destination)
    # ICMPv6's checksum covers the addresses: summed again for the destination here.
    bare = message[:2] + b"\0\0" + message[4:]
    pseudo = sender.packed + destination.packed + struct.pack("!I3xB", len(message), 58)
    summed = struct.pack("!H", checksum(pseudo + bare))
    head = IPV6_HEADER.pack(6 << 28, len(message), 58, DEFAULT_TTL, sender.packed,
                            destination.packed)  # fmt: skip
    return socket.AF_INET6, head + bare[:2] + summed + bare[4:], str(destination)


def fill_ping_queue(local: str, replies: list[Datagram]) -> None:
    """Send each echo reply (the ICMP message a ping socket's recv gave), from its
    source, to the ping socket bound to `local` (its echo identifier), in order."""
    _send_raw(f"a raw socket re-queuing echo replies to {local}", [
        _ping_reply(reply.source, local, reply.data) for reply in replies
    ])  # fmt: skip
