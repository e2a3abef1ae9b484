"""The mapped rings of packet sockets (PACKET_RX_RING, PACKET_TX_RING; TPACKET_V1 and V2):
their request, the layout of their frames, and the kernel's position in them.

The kernel keeps the index of the frame it fills next (RX) or sends next (TX) and does
not tell it: packet_diag gives the request only. A ring set again starts at frame 0.
For RX it is found again from the frames: the kernel fills them in order and stamps each
(tp_sec, tp_usec/tp_nsec), so the one it fills next follows the one stamped last.
`advance_rx_head` then moves a new ring's head there by making the kernel fill that many
frames: each is a frame of ours sent on the loopback interface to the socket, bound
there for an ethertype of local experiments while it happens.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import select
import socket
import struct
import time

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
ETH_P_LOCAL_EXPERIMENT = 0x88B5  # IEEE 802 local experimental ethertype 1
FILLER = bytes(12) + ETH_P_LOCAL_EXPERIMENT.to_bytes(2, "big") + bytes(46)
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


def ever_used(data: bytes) -> bool:
    """Whether a TX ring holds anything: a frame the program wrote or the kernel sent."""
    return any(data)


def bind(sock: socket.socket, ifindex: int, protocol: int) -> None:
    """bind(2) a packet socket to interface `ifindex` (0: every one) for `protocol`."""
    address = SOCKADDR_LL.pack(socket.AF_PACKET, socket.htons(protocol), ifindex, 0, 0, 0, b"")
    if _libc.bind(sock.fileno(), address, len(address)) != 0:
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error))


def advance_rx_head(sock: socket.socket, ring: tuple[int, ...], version: int, head: int) -> None:
    """Make the kernel fill the first `head` frames of `sock`'s new RX ring (set, not yet
    mapped by anyone), so that it fills frame `head` next. `sock` is left bound to lo."""
    if head == 0:
        return
    loopback = socket.if_nametoindex("lo")
    bind(sock, loopback, ETH_P_LOCAL_EXPERIMENT)
    status = HEADER_STATUS[version]
    with (
        mmap.mmap(sock.fileno(), ring_size(ring)) as rx,
        socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0) as sender,
    ):
        for first in range(0, head, BATCH):
            last = min(first + BATCH, head) - 1
            try:
                for _ in range(first, last + 1):
                    sender.sendto(FILLER, ("lo", 0))
            except OSError as error:
                raise RestoreError(
                    "cannot move a packet ring's position: sending on the loopback"
                    f" interface fails ({error.strerror}); is lo up?"
                ) from None
            deadline = time.monotonic() + FILL_TIMEOUT
            while status.unpack_from(rx, frame_offset(ring, last))[0] == TP_STATUS_KERNEL:
                if time.monotonic() > deadline:
                    raise RestoreError(
                        "cannot move a packet ring's position: frames sent"
                        " on the loopback interface did not arrive"
                    )
                select.select([sock], [], [], 0.05)
