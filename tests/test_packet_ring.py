"""The kernel's position in a TPACKET_V1/V2 RX ring, told from the frames' stamps
(hijack.sys.packet_ring.rx_head): the frame after the one stamped last."""

from __future__ import annotations

import struct

import pytest

from hijack.sys import packet_ring

RING = (8192, 1, 2048, 4, 0, 0, 0)  # one block of four frames
TP_STATUS_USER = 1


def ring_with(version: int, stamps: dict[int, tuple[int, int]]) -> bytes:
    """The ring's bytes, frame i filled (status user, 60 bytes) and stamped stamps[i]."""
    data = bytearray(packet_ring.ring_size(RING))
    for index, stamp in stamps.items():
        at = packet_ring.frame_offset(RING, index)
        packet_ring.HEADER_STATUS[version].pack_into(data, at, TP_STATUS_USER)
        struct.pack_into("=I", data, at + packet_ring.HEADER_LEN_AT[version], 60)
        packet_ring.STAMP.pack_into(data, at + packet_ring.HEADER_STAMP_AT[version], *stamp)
    return bytes(data)


@pytest.mark.parametrize("version", [packet_ring.TPACKET_V1, packet_ring.TPACKET_V2])
@pytest.mark.parametrize(
    ("stamps", "head"),
    [
        ({}, 0),  # never filled
        ({0: (1, 0), 1: (2, 0)}, 2),
        ({0: (9, 0), 1: (2, 0), 2: (3, 0), 3: (4, 0)}, 1),  # wrapped
        ({0: (5, 7), 1: (5, 7), 2: (3, 0)}, 2),  # one stamp for two frames in a row
        ({0: (5, 0), 1: (2, 0), 2: (3, 0), 3: (5, 0)}, 1),  # ... across the wrap
    ],
)
def test_the_kernel_fills_the_frame_after_the_one_stamped_last(
    version: int, stamps: dict[int, tuple[int, int]], head: int
) -> None:
    assert packet_ring.rx_head(RING, version, ring_with(version, stamps)) == head


def tx_ring_with(version: int, frames: dict[int, int]) -> bytes:
    """A TX ring's bytes, frame i written (tp_len 60) with status frames[i]."""
    data = bytearray(packet_ring.ring_size(RING))
    for index, status in frames.items():
        at = packet_ring.frame_offset(RING, index)
        packet_ring.TX_STATUS[version].pack_into(
            data, at + packet_ring.TX_STATUS_AT[version], status
        )
        struct.pack_into("=I", data, at + packet_ring.TX_LEN_AT[version], 60)
    return bytes(data)


SENT, WAITING, SENDING, WRONG = 0, 1, 2, 4


@pytest.mark.parametrize("version", [packet_ring.TPACKET_V2, packet_ring.TPACKET_V3])
@pytest.mark.parametrize(
    ("frames", "head"),
    [
        ({}, 0),  # never used
        ({0: SENT, 1: SENT}, 2),  # the frames sent are the first ones
        ({0: SENT, 1: WAITING, 2: WAITING}, 1),  # the first frame waiting
        ({0: WAITING, 1: SENT, 2: SENT, 3: WAITING}, 3),  # ... across the wrap
        ({0: SENT, 1: WRONG, 2: WAITING}, 1),  # the kernel stopped at a wrong frame
        ({0: SENT, 1: SENDING}, 2),  # being sent: the kernel went past it
        ({0: SENT, 1: SENT, 2: SENT, 3: SENT}, None),  # gone round: not known
        ({0: SENT, 2: SENT}, None),  # not the first ones
        ({0: WAITING, 2: WAITING}, None),  # two runs waiting
    ],
)
def test_the_kernel_sends_the_first_frame_waiting_or_the_one_after_those_sent(
    version: int, frames: dict[int, int], head: int | None
) -> None:
    assert packet_ring.tx_head(RING, version, tx_ring_with(version, frames)) == head


V3_RING = (4096, 3, 2048, 6, 60, 0, 0)  # three blocks of 4096 bytes
FIRST_FRAME = 48  # the block header, no private area


def v3_ring_with(blocks: dict[int, tuple[int, int, list[int]]]) -> bytes:
    """A V3 ring's bytes, block b opened with (sequence number, status, frame lengths)."""
    data = bytearray(packet_ring.ring_size(V3_RING))
    for index, (seq, status, frames) in blocks.items():
        start = index * V3_RING[0]
        length = FIRST_FRAME + sum(frames)
        packet_ring.BLOCK_HEADER.pack_into(
            data, start, 2, 48, status, len(frames), FIRST_FRAME, length, seq
        )
        at = start + FIRST_FRAME
        for frame in frames:
            struct.pack_into("=I", data, at, frame)
            at += frame
    return bytes(data)


@pytest.mark.parametrize(
    ("blocks", "position"),
    [
        ({0: (0, 0, [])}, packet_ring.BlockPosition(block=0, frozen=False, frames=())),
        (
            {0: (3, 1, [96, 200]), 1: (4, 0, [104, 96]), 2: (2, 0, [96])},
            packet_ring.BlockPosition(block=1, frozen=False, frames=(104, 96)),
        ),
        (  # the block opened last is closed: frozen at the next, the user's
            {0: (3, 1, [96]), 1: (4, 1, [96]), 2: (5, 1, [96])},
            packet_ring.BlockPosition(block=0, frozen=True, frames=()),
        ),
        ({0: (0, 0, [96, 0])}, "block 0 holds a frame of length 0"),
    ],
)
def test_the_kernel_fills_the_v3_block_opened_last(
    blocks: dict[int, tuple[int, int, list[int]]], position: packet_ring.BlockPosition | str
) -> None:
    assert packet_ring.v3_position(V3_RING, v3_ring_with(blocks)) == position
