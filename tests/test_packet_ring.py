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
