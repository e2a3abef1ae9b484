"""The mapped rings of packet sockets (PACKET_RX_RING, PACKET_TX_RING; TPACKET_V1, V2 and
V3): their request, the layout of their frames, and the kernel's position in them.

The kernel keeps the index of the frame it fills next (RX) or sends next (TX) and does
not tell it: packet_diag gives the request only. A ring set again starts at frame 0.
For RX it is found again from the frames: the kernel fills them in order and stamps each
(tp_sec, tp_usec/tp_nsec), so the one it fills next follows the one stamped last.
`advance_rx_head` then moves a new ring's head there by making the kernel fill that many
frames: each is a frame of ours sent on the loopback interface to the socket, bound
there for an ethertype of local experiments while it happens.

A TPACKET_V3 RX ring is filled block by block: the kernel opens a block (writing its
header: version, sequence number, no frames yet), appends frames to it (each frame's
tp_next_offset its aligned length; the header's num_pkts and blk_len grow, read from
the ring and written back by the kernel), and closes it (TP_STATUS_USER) when a frame
does not fit or its retire timer fires; if the next block is still the user's the
queue freezes there until the user gives it back. Its position is then the block it
fills (the one opened last: the highest sequence number, or the one after it when
that one is closed, the queue frozen), where in it it appends the next frame, and the
last frame it appended (it writes that frame's tp_next_offset 0 at the close).
`advance_v3` rebuilds that position in a new ring: filler frames close as many blocks
(the target block marked the user's before the last close, so the queue freezes there
whatever the timer does), then the target block is given back and gets filler frames of
the lengths of its frames, so that the kernel appends the next frame where it would
have, after a frame where one was; then the caller writes the ring's bytes back.
"""

from __future__ import annotations

import ctypes
import dataclasses
import mmap
import os
import select
import socket
import struct
import time
from collections.abc import Callable

from hijack.errors import RestoreError

SOL_PACKET = 263
PACKET_RX_RING, PACKET_TX_RING = 5, 13
TPACKET_V1, TPACKET_V2, TPACKET_V3 = 0, 1, 2
TP_STATUS_KERNEL = 0
TPACKET_REQ = struct.Struct("=4I")  # block size, block nr, frame size, frame nr
TPACKET_REQ3 = struct.Struct("=7I")  # ... then retire tmo, sizeof_priv, feature req word
# struct tpacket_hdr (V1: an unsigned long status) and struct tpacket2_hdr (V2): the
# status, then tp_len, and the stamp (seconds, then micro- or nanoseconds).
HEADER_STATUS = {TPACKET_V1: struct.Struct("=Q"), TPACKET_V2: struct.Struct("=I")}
HEADER_LEN_AT = {TPACKET_V1: 8, TPACKET_V2: 4}
HEADER_STAMP_AT = {TPACKET_V1: 20, TPACKET_V2: 16}
STAMP = struct.Struct("=II")
# struct tpacket_block_desc: version, offset_to_priv, then struct tpacket_hdr_v1:
# block_status, num_pkts, offset_to_first_pkt, blk_len, seq_num (then two stamps).
BLOCK_HEADER = struct.Struct("=IIIIIIQ")
BLOCK_STATUS_AT = 8
TP_STATUS_USER = 1
# struct tpacket3_hdr: tp_next_offset, tp_sec, tp_nsec, tp_snaplen, tp_len, tp_status,
# tp_mac, tp_net, ...
FRAME3_HEADER = struct.Struct("=IIIIIIHH")
FRAME3_LEN_AT = 16
# A V3 frame's length in the ring is ALIGN(tp_mac + captured bytes, 8); for a frame of N
# bytes received on lo it is ALIGN(N + FRAME3_OVERHEAD + PACKET_RESERVE, 8) (tp_mac of a
# raw socket: the 68-byte header and address, aligned with the link header to 96, less
# the 14 of the link header; a datagram socket: 96, its captured bytes 14 fewer).
FRAME3_OVERHEAD = 82
ETH_HEADER = 14
LO_MAX_FRAME = 65536 + ETH_HEADER
PACKET_RESERVE, PACKET_STATISTICS = 12, 6
# A TX frame's status, tp_len and where its data starts (tp_hdrlen less the address):
# struct tpacket_hdr (V1), tpacket2_hdr (V2), tpacket3_hdr (V3).
TP_STATUS_AVAILABLE, TP_STATUS_SEND_REQUEST, TP_STATUS_SENDING = 0, 1, 2
TP_STATUS_WRONG_FORMAT = 4
TX_STATUS = {TPACKET_V1: struct.Struct("=Q"), TPACKET_V2: struct.Struct("=I")}
TX_STATUS[TPACKET_V3] = TX_STATUS[TPACKET_V2]
TX_STATUS_AT = {TPACKET_V1: 0, TPACKET_V2: 0, TPACKET_V3: 20}
TX_LEN_AT = {TPACKET_V1: 8, TPACKET_V2: 4, TPACKET_V3: 16}
TX_DATA_AT = {TPACKET_V1: 32, TPACKET_V2: 32, TPACKET_V3: 48}
ETH_P_LOCAL_EXPERIMENT = 0x88B5  # IEEE 802 local experimental ethertype 1
FILLER = bytes(12) + ETH_P_LOCAL_EXPERIMENT.to_bytes(2, "big") + bytes(46)
# What a TX ring sends: another ethertype, that the socket's own RX ring (bound on lo
# for the one above; a bind for protocol 0 keeps it) does not receive it back.
ETH_P_LOCAL_EXPERIMENT_2 = 0x88B6
TX_FILLER = bytes(12) + ETH_P_LOCAL_EXPERIMENT_2.to_bytes(2, "big") + bytes(46)
SOCKADDR_LL = struct.Struct("=HHiHBB8s")  # family, protocol (network order), ifindex, ...
BATCH = 32  # filler frames sent before waiting for them (the backlog holds 1000)
FILL_TIMEOUT = 5.0

_libc = ctypes.CDLL(None, use_errno=True)


def ring_size(ring: tuple[int, ...]) -> int:
    """The bytes of a ring (packet_diag's seven numbers), as mmap maps it."""
    return ring[0] * ring[1] if ring else 0


def request(ring: tuple[int, ...], version: int) -> bytes:
    """The setsockopt value that makes the same ring again."""
    if version == TPACKET_V3:
        return TPACKET_REQ3.pack(*ring)
    return TPACKET_REQ.pack(*ring[:4])


def frame_offset(ring: tuple[int, ...], index: int) -> int:
    """Where frame `index` starts in the ring (frames never straddle blocks)."""
    block_size, _blocks, frame_size, _frames = ring[:4]
    per_block = block_size // frame_size
    return index // per_block * block_size + index % per_block * frame_size


def rx_head(ring: tuple[int, ...], version: int, data: bytes) -> int:
    """The frame the kernel fills next in RX ring `ring` holding `data`: the one after the
    frame stamped last, 0 when none was ever filled. Frames stamped alike (V1 stamps in
    microseconds) were filled in a row: the one after the last of that run."""
    frames = ring[3]
    stamps: dict[int, tuple[int, int]] = {}
    for index in range(frames):
        at = frame_offset(ring, index)
        (length,) = struct.unpack_from("=I", data, at + HEADER_LEN_AT[version])
        (status,) = HEADER_STATUS[version].unpack_from(data, at)
        if length or status != TP_STATUS_KERNEL:  # else never filled
            stamps[index] = STAMP.unpack_from(data, at + HEADER_STAMP_AT[version])
    if not stamps:
        return 0
    latest = max(stamps.values())
    run = {index for index, stamp in stamps.items() if stamp == latest}
    ends = [index for index in sorted(run) if (index + 1) % frames not in run]
    return (ends[0] + 1) % frames if ends else 0


def _tx_frame(
    ring: tuple[int, ...], version: int, data: bytes | mmap.mmap, index: int
) -> tuple[int, int]:
    """The status and tp_len of TX frame `index`."""
    at = frame_offset(ring, index)
    (status,) = TX_STATUS[version].unpack_from(data, at + TX_STATUS_AT[version])
    (length,) = struct.unpack_from("=I", data, at + TX_LEN_AT[version])
    return status, length


def tx_head(ring: tuple[int, ...], version: int, data: bytes) -> int | None:
    """The frame the kernel sends next from TX ring `ring` holding `data`, or None when it
    cannot be told. The kernel sends frames in order from its position, each
    TP_STATUS_SEND_REQUEST until sent (TP_STATUS_WRONG_FORMAT stops it there), and leaves
    no other trace: so it is the first of the one run of frames waiting to be sent, else
    the frame after those ever written (tp_len) when they are the first ones of the ring
    (it never went round)."""
    frames = ring[3]
    seen = [_tx_frame(ring, version, data, index) for index in range(frames)]
    waiting = [
        status & (TP_STATUS_SEND_REQUEST | TP_STATUS_WRONG_FORMAT) != 0 for status, _ in seen
    ]
    if any(waiting):
        starts = [index for index in range(frames) if waiting[index] and not waiting[index - 1]]
        return starts[0] if len(starts) == 1 else None
    written = [status != TP_STATUS_AVAILABLE or length != 0 for status, length in seen]
    used = written.index(False) if False in written else frames
    return used if used < frames and not any(written[used:]) else None


def settled_tx(ring: tuple[int, ...], version: int, data: bytes) -> bytes:
    """`data` with the frames the kernel was sending (TP_STATUS_SENDING: gone with the
    original socket) given back to the program, as the kernel does once they are sent."""
    settled = bytearray(data)
    for index in range(ring[3]):
        if _tx_frame(ring, version, data, index)[0] == TP_STATUS_SENDING:
            at = frame_offset(ring, index) + TX_STATUS_AT[version]
            TX_STATUS[version].pack_into(settled, at, TP_STATUS_AVAILABLE)
    return bytes(settled)


def advance_tx_head(
    sock: socket.socket, ring: tuple[int, ...], version: int, tx: memoryview, head: int
) -> None:
    """Make the kernel send the first `head` frames of `sock`'s new TX ring (its bytes
    `tx`, nobody else's), so that it sends frame `head` next: filler frames sent on lo
    (`sock` is left bound there, for what it received before)."""
    if head == 0:
        return
    bind(sock, socket.if_nametoindex("lo"), 0)
    status, length_at, data_at = TX_STATUS[version], TX_LEN_AT[version], TX_DATA_AT[version]
    for index in range(head):
        at = frame_offset(ring, index)
        tx[at + data_at : at + data_at + len(TX_FILLER)] = TX_FILLER
        struct.pack_into("=I", tx, at + length_at, len(TX_FILLER))
        status.pack_into(tx, at + TX_STATUS_AT[version], TP_STATUS_SEND_REQUEST)
    try:
        sock.send(b"")
    except OSError as error:
        raise RestoreError(
            "cannot move a packet ring's position: sending on the loopback"
            f" interface fails ({error.strerror}); is lo up?"
        ) from None
    _wait(
        lambda: all(
            status.unpack_from(tx, frame_offset(ring, index) + TX_STATUS_AT[version])[0]
            == TP_STATUS_AVAILABLE
            for index in range(head)
        ),
        sock,
        "filler frames given to the TX ring were not sent",
    )


def bind(sock: socket.socket, ifindex: int, protocol: int) -> None:
    """bind(2) a packet socket to interface `ifindex` (0: every one) for `protocol`."""
    address = SOCKADDR_LL.pack(socket.AF_PACKET, socket.htons(protocol), ifindex, 0, 0, 0, b"")
    if _libc.bind(sock.fileno(), address, len(address)) != 0:
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error))


def advance_rx_head(
    sock: socket.socket, ring: tuple[int, ...], version: int, rx: mmap.mmap, head: int
) -> None:
    """Make the kernel fill the first `head` frames of `sock`'s new RX ring (mapped as
    `rx`, nobody else's), so that it fills frame `head` next. `sock` is left bound to lo."""
    if head == 0:
        return
    loopback = socket.if_nametoindex("lo")
    bind(sock, loopback, ETH_P_LOCAL_EXPERIMENT)
    status = HEADER_STATUS[version]
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0) as sender:
        for first in range(0, head, BATCH):
            last = min(first + BATCH, head) - 1
            for _ in range(first, last + 1):
                _send_filler(sender, len(FILLER))
            _wait(
                lambda: status.unpack_from(rx, frame_offset(ring, last))[0] != TP_STATUS_KERNEL,  # noqa: B023 (waited for at once)
                sock,
                "frames sent on the loopback interface did not arrive",
            )


def reset_statistics(sock: socket.socket) -> None:
    """Read (and so zero) the socket's PACKET_STATISTICS: the filler frames a frozen queue
    dropped would mark the next block TP_STATUS_LOSING."""
    sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 12)


@dataclasses.dataclass(frozen=True)
class BlockPosition:
    """Where the kernel is in a TPACKET_V3 RX ring: the block it fills (or waits for, the
    queue frozen), and the lengths of the frames it appended there so far."""

    block: int
    frozen: bool
    frames: tuple[int, ...]


def _block_header(
    ring: tuple[int, ...], data: bytes | bytearray | mmap.mmap, block: int
) -> tuple[int, ...]:
    return BLOCK_HEADER.unpack_from(data, block * ring[0])


def v3_position(ring: tuple[int, ...], data: bytes) -> BlockPosition | str:
    """The kernel's position in TPACKET_V3 RX ring `ring` holding `data`, or why it
    cannot be told (a block header the program rewrote)."""
    block_size, blocks = ring[0], ring[1]
    opened = {}
    for block in range(blocks):
        version, _priv, status, count, first, length, seq = _block_header(ring, data, block)
        if version == TPACKET_V3:
            opened[block] = (seq, status, count, first, length)
    if not opened:
        return "no block of the ring was ever opened"
    latest = max(opened, key=lambda block: opened[block][0])
    seq, status, count, first, length = opened[latest]
    if status != TP_STATUS_KERNEL:
        return BlockPosition(block=(latest + 1) % blocks, frozen=True, frames=())
    frames = []
    at = first
    for _ in range(count):
        if at + FRAME3_HEADER.size > block_size:
            return f"block {latest} lists frames past its end"
        (next_offset,) = struct.unpack_from("=I", data, latest * block_size + at)
        if next_offset == 0 or next_offset % 8:
            return f"block {latest} holds a frame of length {next_offset}"
        frames.append(next_offset)
        at += next_offset
    if at != length:
        return f"block {latest}'s frames end at {at}, its length says {length}"
    return BlockPosition(block=latest, frozen=False, frames=tuple(frames))


def v3_refusal(ring: tuple[int, ...], data: bytes, reserve: int) -> str | None:
    """Why advance_v3 cannot rebuild the position of `ring` holding `data`, or None."""
    position = v3_position(ring, data)
    if isinstance(position, str):
        return position
    shortest = _aligned(FRAME3_OVERHEAD + reserve + ETH_HEADER)
    longest = FRAME3_OVERHEAD + reserve + LO_MAX_FRAME
    for length in position.frames:
        if not shortest <= length <= longest:
            return (
                f"its open block holds a frame of {length} bytes (a filler frame on lo"
                f" takes {shortest} to {longest})"
            )
    return None


def _aligned(length: int) -> int:
    return (length + 7) & ~7


def _wait(condition: Callable[[], bool], sock: socket.socket, what: str) -> None:
    deadline = time.monotonic() + FILL_TIMEOUT
    while not condition():
        if time.monotonic() > deadline:
            raise RestoreError(f"cannot move a packet ring's position: {what}")
        select.select([sock], [], [], 0.001)


def _send_filler(sender: socket.socket, length: int) -> None:
    try:
        sender.sendto(FILLER[:ETH_HEADER] + bytes(length - ETH_HEADER), ("lo", 0))
    except OSError as error:
        raise RestoreError(
            "cannot move a packet ring's position: sending on the loopback"
            f" interface fails ({error.strerror}); is lo up?"
        ) from None


def advance_v3(
    sock: socket.socket, ring: tuple[int, ...], rx: mmap.mmap, position: BlockPosition
) -> bool:
    """Make the kernel of `sock`'s new TPACKET_V3 RX ring (mapped as `rx`, nobody else's)
    fill block `position.block` with frames of `position.frames`' lengths, or wait for it
    frozen. `sock` is left bound to lo. False when its retire timer closed the block
    before the end (the caller sets the ring again and retries)."""
    block_size, blocks = ring[0], ring[1]
    reserve = int.from_bytes(sock.getsockopt(SOL_PACKET, PACKET_RESERVE, 4), "little")
    overhead = FRAME3_OVERHEAD + reserve
    target = position.block
    closes = target if target else (blocks if position.frozen else 0)
    filler = min(block_size // 4, overhead + LO_MAX_FRAME) & ~7  # a few to a block
    bind(sock, socket.if_nametoindex("lo"), ETH_P_LOCAL_EXPERIMENT)

    def status(block: int) -> int:
        return int(_block_header(ring, rx, block)[2])

    def count(block: int) -> int:
        return _block_header(ring, rx, block)[3]

    def fill(sender: socket.socket, block: int, wire: int) -> None:
        """Send a filler frame of `wire` bytes; back once it is in `block` or closed it."""
        before = count(block)
        _send_filler(sender, wire)
        _wait(
            lambda: status(block) != TP_STATUS_KERNEL or count(block) != before,
            sock,
            "frames sent on the loopback interface did not arrive",
        )

    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0) as sender:
        current = 0
        for closed in range(closes):
            if closed == closes - 1:  # the queue freezes at the target, the user's
                struct.pack_into("=I", rx, target * block_size + BLOCK_STATUS_AT, TP_STATUS_USER)
            while status(current) == TP_STATUS_KERNEL:
                fill(sender, current, filler - overhead)
            current = (current + 1) % blocks
        if not position.frames:
            return True
        start = target * block_size
        rx[start : start + block_size] = bytes(block_size)  # given back, as new
        for length in position.frames:
            fill(sender, target, length - overhead)
            if status(target) != TP_STATUS_KERNEL:
                return False
        first, filled = _block_header(ring, rx, target)[4:6]
        last = start + filled - position.frames[-1]
        _wait(
            lambda: struct.unpack_from("=I", rx, last + FRAME3_LEN_AT)[0] != 0,
            sock,
            "frames sent on the loopback interface were not written",
        )
        return (
            status(target) == TP_STATUS_KERNEL
            and count(target) == len(position.frames)
            and filled == first + sum(position.frames)
        )
