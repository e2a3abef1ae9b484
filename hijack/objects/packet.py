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

Rings (PACKET_RX_RING, PACKET_TX_RING; TPACKET_V1, V2 and V3): the record keeps each
ring's request (packet_diag), where the process maps them ("socket:[INODE]" in its
maps: address, length, offset, protections) and the kernel's position in each (a
frame; a V3 RX ring's: a block, the frames in it told from the ring's bytes again at
restore); the rings' bytes are the object's ObjectData, read through the mappings,
and those segments store no pages (memfd.held_by_objects). The restorer makes the
socket with no protocol, sets its options (PACKET_VERSION, _RESERVE, _TIMESTAMP ...
before the rings, as the kernel requires), sets the RX ring, moves the kernel's
position in it (hijack.sys.packet_ring.advance_rx_head, advance_v3) and writes its
bytes back at once (frames not yet consumed stay TP_STATUS_USER where they were),
sets the TX ring, moves the kernel's position in it (advance_tx_head) and writes its
bytes back, binds it, then attaches its filter; once the descriptors are given,
memfd.map_objects has the stub mmap the rings at their address (map_rings:
MAP_SHARED | MAP_FIXED, then each part's protection).

Refused by name: a ring whose position cannot be told (a TX ring gone round with
nothing waiting; a V3 ring whose block headers were rewritten, or whose open block
holds a frame no filler frame on lo can stand for), a ring mapped in part or not at
all (its frames, or its position, are not known), and (hijack.restore.plan) a ring
mapped after the socket's last descriptor was closed (its memory would come back
without the socket filling it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import mmap
import socket
import struct
from collections.abc import Iterator

from hijack.errors import HijackError, RestoreError
from hijack.image import records as rec
from hijack.image.files import ImageFiles
from hijack.objects import sockopts
from hijack.objects.base import DumpContext, Kind, RestoreContext, describe_fd
from hijack.objects.sockets import copy_socket, unlisted_socket_is
from hijack.sys import memory, packet_diag, packet_ring, procfs, socket_filter

SOL_PACKET = 263
PACKET_ADD_MEMBERSHIP, PACKET_FANOUT = 1, 18
SOL_SOCKET = 1
MAP_SHARED, MAP_FIXED = 0x01, 0x10
PROT_READ_WRITE = 0x1 | 0x2
PACKET_MREQ = struct.Struct("=iHH8s")  # struct packet_mreq: ifindex, type, alen, address
V3_ATTEMPTS = 3  # a TPACKET_V3 ring is set again when its timer closed the block early
MEMBERSHIP_TYPES = {0: "multicast", 1: "promiscuous", 2: "allmulti", 3: "unicast"}


def _read(mem: memory.MemoryFile, address: int, size: int) -> bytes:
    buffer = bytearray(size)
    mem.read_into(address, buffer)
    return bytes(buffer)


def _assembled(contents: list[tuple[int, bytes]], size: int) -> bytes | None:
    """The rings' bytes from the mappings' (offset, bytes); None where a part is unmapped."""
    whole = bytearray(size)
    covered = bytearray(size)
    for offset, data in contents:
        whole[offset : offset + len(data)] = data
        covered[offset : offset + len(data)] = b"\1" * len(data)
    return bytes(whole) if size and all(covered) else None


def _rx_head(diag: packet_diag.PacketDiag, rings: bytes | None, rx_size: int) -> int:
    """The frame (TPACKET_V3: the block) the kernel fills next."""
    if not diag.rx_ring:
        return 0
    if rings is None:
        return rec.PACKET_HEAD_UNKNOWN
    if diag.version == packet_ring.TPACKET_V3:
        position = packet_ring.v3_position(diag.rx_ring, rings[:rx_size])
        return rec.PACKET_HEAD_UNKNOWN if isinstance(position, str) else position.block
    return packet_ring.rx_head(diag.rx_ring, diag.version, rings[:rx_size])


def _tx_head(diag: packet_diag.PacketDiag, rings: bytes | None, rx_size: int) -> int:
    """The frame the kernel sends next (packet_ring.tx_head), else unknown."""
    if not diag.tx_ring:
        return 0
    head = (
        None if rings is None else packet_ring.tx_head(diag.tx_ring, diag.version, rings[rx_size:])
    )
    return rec.PACKET_HEAD_UNKNOWN if head is None else head


def _prot(perms: str) -> int:
    return sum(bit for flag, bit in zip(perms[:3], (1, 2, 4), strict=True) if flag != "-")


def _size(packet: rec.PacketSocket) -> int:
    return packet_ring.ring_size(packet.rx_ring) + packet_ring.ring_size(packet.tx_ring)


def _by_base(packet: rec.PacketSocket) -> dict[int, list[rec.PacketRingMapping]]:
    """The ring mappings by the address of the mmap that made them (one per mmap: the
    process may have cut one in parts of other protections)."""
    found: dict[int, list[rec.PacketRingMapping]] = {}
    for mapping in packet.ring_mappings:
        found.setdefault(mapping.start - mapping.offset, []).append(mapping)
    return found


def _whole(packet: rec.PacketSocket, mappings: list[rec.PacketRingMapping]) -> bool:
    return sum(m.size for m in mappings) == _size(packet)


def _saved_rings(packet: rec.PacketSocket, image: ImageFiles) -> bytes:
    """The rings' bytes as the image keeps them (pages of zeros left out)."""
    rings = bytearray(_size(packet))
    for chunk in image.chunks.get(packet.id, ()):
        rings[chunk.offset : chunk.offset + len(chunk.data)] = chunk.data
    return bytes(rings)


def _reserve(image: ImageFiles, packet: rec.PacketSocket) -> int:
    """The socket's PACKET_RESERVE (the room before each frame's link header)."""
    options = sockopts.options_of(image, packet.id)
    for option in options.options if options else ():
        if (option.level, option.name) == (SOL_PACKET, packet_ring.PACKET_RESERVE):
            return int.from_bytes(option.value[:4], "little")
    return 0


def ring_segments(image: ImageFiles) -> dict[int, int]:
    """Where the process maps the rings of packet sockets: start -> object id."""
    return {
        mapping.start: found.id
        for found in image.objects.values()
        if isinstance(found, rec.PacketSocket)
        for mapping in found.ring_mappings
    }


def map_rings(restore: RestoreContext) -> None:
    """mmap the rings of each restored packet socket in the stub where the process had them
    (MAP_SHARED | MAP_FIXED, whole, as the kernel maps them), with each part's protection."""
    stub = restore.stub
    for found in restore.image.objects.values():
        if not isinstance(found, rec.PacketSocket) or not found.ring_mappings:
            continue
        fd = next(
            d.fd
            for d in restore.image.descriptors
            if d.object_id == found.id and d.fd in restore.restored
        )
        for base, mappings in _by_base(found).items():
            flags = MAP_SHARED | MAP_FIXED
            stub.call("mmap", base, _size(found), PROT_READ_WRITE, flags, fd, 0)
            for mapping in mappings:
                if mapping.prot != PROT_READ_WRITE:
                    stub.call("mprotect", mapping.start, mapping.size, mapping.prot)


def _new_socket(
    packet: rec.PacketSocket, descriptor: rec.FileDescriptor, protocol: int
) -> socket.socket:
    """A packet socket of `packet`'s type receiving `protocol` (0: nothing yet)."""
    try:
        return socket.socket(socket.AF_PACKET, packet.type, socket.htons(protocol))
    except OSError as error:
        raise RestoreError(
            f"cannot make the packet socket of {describe_fd(descriptor)} again: {error.strerror}"
        ) from None


@contextlib.contextmanager
def _rebuilt(
    packet: rec.PacketSocket, descriptor: rec.FileDescriptor, restore: RestoreContext, protocol: int
) -> Iterator[socket.socket]:
    """A new socket of `packet`'s type receiving `protocol` (0: nothing yet), for the body
    to set up (its failure a RestoreError), then given to the process."""
    with _new_socket(packet, descriptor, protocol) as sock:
        try:
            yield sock
        except OSError as error:
            raise RestoreError(
                f"cannot make the packet socket of {describe_fd(descriptor)} again"
                f" (interface {packet.ifindex}): {error.strerror}"
            ) from None
        restore.give(sock.fileno(), descriptor)


def _join_fanout(sock: socket.socket, packet: rec.PacketSocket) -> None:
    """Last: a fanout group takes bound sockets only."""
    if packet.fanout:
        sock.setsockopt(SOL_PACKET, PACKET_FANOUT, packet.fanout)


def _add_memberships(sock: socket.socket, packet: rec.PacketSocket) -> None:
    for membership in packet.memberships:
        request = PACKET_MREQ.pack(
            membership.ifindex,
            membership.type,
            len(membership.address),
            membership.address.ljust(8, b"\0"),
        )
        for _ in range(membership.count):
            sock.setsockopt(SOL_PACKET, PACKET_ADD_MEMBERSHIP, request)


def _set_rx_ring(sock: socket.socket, packet: rec.PacketSocket, saved: bytes) -> None:
    """Set `sock`'s RX ring, move the kernel's position in it where it was (V1/V2: its next
    frame; V3: its block and the frames in it) and write its bytes back at once (a V3
    block's retire timer runs); set again when that timer closed the block meanwhile."""
    ring, version = packet.rx_ring, packet.version
    for _ in range(V3_ATTEMPTS):
        sock.setsockopt(SOL_PACKET, packet_ring.PACKET_RX_RING, packet_ring.request(ring, version))
        with mmap.mmap(sock.fileno(), len(saved)) as rx:
            if version == packet_ring.TPACKET_V3:
                position = packet_ring.v3_position(ring, saved)
                if isinstance(position, str):  # refused before (refusal)
                    raise RestoreError(f"a TPACKET_V3 ring's position is not known: {position}")
                placed = packet_ring.advance_v3(sock, ring, rx, position)
            else:
                packet_ring.advance_rx_head(sock, ring, version, rx, packet.rx_head)
                placed = True
            if placed:
                rx[:] = saved
                packet_ring.reset_statistics(sock)
                return
        sock.setsockopt(
            SOL_PACKET, packet_ring.PACKET_RX_RING, packet_ring.request((0,) * 7, version)
        )
    raise RestoreError(
        "cannot move a TPACKET_V3 ring's position: its retire timer closed the block"
        f" while it was filled, {V3_ATTEMPTS} times"
    )


class Packet(Kind):
    name = "packet"
    record_types = (rec.PacketSocket,)

    def claims(self, entry: procfs.FdEntry, dump: DumpContext) -> bool:
        return unlisted_socket_is(entry, dump, lambda sock: sock.family == socket.AF_PACKET)

    def dump(self, entry: procfs.FdEntry, info: procfs.FdInfo, dump: DumpContext) -> int:
        diag = packet_diag.packet_sockets(dump.pid).get(entry.ino)
        if diag is None:
            raise HijackError(f"fd {entry.fd}: packet_diag does not know socket {entry.ino}")

        mappings = [m for m in dump.maps if m.path == f"socket:[{entry.ino}]"]
        rx_size = packet_ring.ring_size(diag.rx_ring)
        with memory.MemoryFile(dump.pid) as mem:  # whatever the mappings' protections
            contents = [(m.offset, _read(mem, m.start, m.size)) for m in mappings]
        rings = _assembled(contents, rx_size + packet_ring.ring_size(diag.tx_ring))
        fresh = False

        def make(id: int) -> rec.PacketSocket:
            nonlocal fresh
            fresh = True
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
                version=diag.version,
                rx_head=_rx_head(diag, rings, rx_size),
                tx_head=_tx_head(diag, rings, rx_size),
                ring_mappings=tuple(
                    rec.PacketRingMapping(
                        start=m.start, size=m.size, offset=m.offset, prot=_prot(m.perms)
                    )
                    for m in mappings
                ),
            )

        object_id = dump.add_object(("socket", entry.ino), make)
        if fresh and rings is not None:
            # Page by page, the pages of zeros left out: a new ring holds zeros.
            for at in range(0, len(rings), rec.PAGE_SIZE):
                page = rings[at : at + rec.PAGE_SIZE]
                if any(page):
                    dump.add_data(object_id, page, at)
        with copy_socket(entry, dump) as sock:
            sockopts.dump_options(sock, object_id, entry.ino, dump)
        return object_id

    def refusal(self, descriptor: rec.FileDescriptor, image: ImageFiles) -> str | None:
        packet = image.object_of(descriptor, rec.PacketSocket)
        rings = [name for name, ring in (("RX", packet.rx_ring), ("TX", packet.tx_ring)) if ring]
        named = " and ".join(f"PACKET_{name}_RING" for name in rings)
        if any(not _whole(packet, maps) for maps in _by_base(packet).values()):
            return (
                f"{describe_fd(descriptor)} with its {named} mapped in part: the kernel maps"
                " a ring whole only"
            )
        if packet.rx_ring and packet.rx_head == rec.PACKET_HEAD_UNKNOWN:
            return (
                f"{describe_fd(descriptor)} with a PACKET_RX_RING not mapped whole: the"
                " kernel's position in it is not known"
            )
        if packet.tx_ring and packet.tx_head == rec.PACKET_HEAD_UNKNOWN:
            return (
                f"{describe_fd(descriptor)} with a PACKET_TX_RING not mapped whole, gone"
                " round or with frames waiting here and there: the kernel's position in it"
                " is not known"
            )
        if packet.rx_ring and packet.version == packet_ring.TPACKET_V3:
            rx = _saved_rings(packet, image)[: packet_ring.ring_size(packet.rx_ring)]
            why = packet_ring.v3_refusal(packet.rx_ring, rx, _reserve(image, packet))
            if why is not None:
                return (
                    f"{describe_fd(descriptor)} with a TPACKET_V3 PACKET_RX_RING whose"
                    f" position is not rebuilt: {why}"
                )
        return None

    def restore(self, descriptor: rec.FileDescriptor, restore: RestoreContext) -> None:
        packet = restore.image.object_of(descriptor, rec.PacketSocket)
        if packet.rx_ring or packet.tx_ring:
            self._restore_with_rings(packet, descriptor, restore)
            return
        options = sockopts.options_of(restore.image, packet.id)
        with _rebuilt(packet, descriptor, restore, packet.protocol) as sock:
            set_option, attach = sockopts.our_setters(sock)
            sockopts.set_early(options, set_option)
            if packet.ifindex:
                sock.bind((socket.if_indextoname(packet.ifindex), packet.protocol))
            _add_memberships(sock, packet)
            sockopts.set_late(options, set_option, attach)
            _join_fanout(sock, packet)

    def _restore_with_rings(
        self, packet: rec.PacketSocket, descriptor: rec.FileDescriptor, restore: RestoreContext
    ) -> None:
        """A socket with rings: made with no protocol (it receives nothing yet), its options
        set (PACKET_VERSION, _RESERVE, ... before the rings, as the kernel requires; the
        filter after the filler frames), the RX ring set and its head moved, the TX ring
        set, the rings' bytes written back, then bound where it was."""
        options = sockopts.options_of(restore.image, packet.id)
        unfiltered = (
            dataclasses.replace(options, filter=b"", filter_locked=False) if options else None
        )
        with _rebuilt(packet, descriptor, restore, 0) as sock:
            set_option, attach = sockopts.our_setters(sock)
            sockopts.set_early(options, set_option)
            sockopts.set_late(unfiltered, set_option, attach)
            saved = _saved_rings(packet, restore.image)
            rx_size = packet_ring.ring_size(packet.rx_ring)
            if packet.rx_ring:
                _set_rx_ring(sock, packet, saved[:rx_size])
            if packet.tx_ring:
                sock.setsockopt(
                    SOL_PACKET,
                    packet_ring.PACKET_TX_RING,
                    packet_ring.request(packet.tx_ring, packet.version),
                )
                tx = packet_ring.settled_tx(packet.tx_ring, packet.version, saved[rx_size:])
                with mmap.mmap(sock.fileno(), len(saved)) as rings, memoryview(rings) as view:
                    packet_ring.advance_tx_head(
                        sock, packet.tx_ring, packet.version, view[rx_size:], packet.tx_head
                    )
                    view[rx_size:] = tx
            packet_ring.bind(sock, packet.ifindex, packet.protocol)
            _add_memberships(sock, packet)
            if options is not None:
                if options.filter:
                    attach(options.filter)
                if options.filter_locked:
                    set_option(SOL_SOCKET, socket_filter.SO_LOCK_FILTER, struct.pack("<i", 1))
            _join_fanout(sock, packet)

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
        v3 = packet.version == packet_ring.TPACKET_V3
        if packet.rx_ring:
            ring = packet.rx_ring
            parts.append(
                f"RX ring of {ring[1]} blocks, block {packet.rx_head}"
                if v3
                else f"RX ring of {ring[3]} frames, next {packet.rx_head}"
            )
        if packet.tx_ring:
            parts.append(f"TX ring of {packet.tx_ring[3]} frames, next {packet.tx_head}")
        parts += [f"rings mapped at {m.start:#x}+{m.offset:#x}" for m in packet.ring_mappings]
        return ", ".join(parts) + sockopts.describe_options(image, packet.id)
