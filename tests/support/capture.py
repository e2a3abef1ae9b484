"""A real packet capture on a link of a test's own namespace: AF_PACKET, no tcpdump.

`Capture(netns, link)` opens a packet socket inside network namespace
`netns` (the socket keeps the namespace it was made in; only a short-lived
thread enters it), bound to `link`, and a thread reads every frame until
stop(). streams() then puts each TCP connection's bytes, per direction, back
in sequence order: a secret split across two segments is still found whole.
"""

from __future__ import annotations

import collections
import ctypes
import os
import select
import socket
import struct
import threading
from dataclasses import dataclass, field

from support.nodes import CLONE_NEWNET, NETNS_RUN_DIR

ETH_P_ALL = 0x0003
ETH_P_IP = 0x0800
ETHERNET_HEADER = 14
SNAP = 1 << 18  # more than a GSO frame on a veth (64 KiB)
BUFFER = 64 << 20  # the socket's receive buffer (SO_RCVBUFFORCE: root)
SO_RCVBUFFORCE = 33

_libc = ctypes.CDLL(None, use_errno=True)


@dataclass
class Segments:
    """One direction of one TCP connection: payloads by sequence number."""

    pieces: dict[int, bytes] = field(default_factory=dict)

    def add(self, sequence: int, payload: bytes) -> None:
        if len(payload) > len(self.pieces.get(sequence, b"")):
            self.pieces[sequence] = payload  # a retransmission, or a longer one

    def joined(self) -> bytes:
        """The bytes in order (sequence numbers wrap at 2**32: counted from the first); a
        segment the capture missed is left as zeros."""
        if not self.pieces:
            return b""
        first = min(self.pieces)
        out = bytearray()
        for sequence, payload in self.pieces.items():
            offset = (sequence - first) % (1 << 32)
            if offset > len(out):
                out += bytes(offset - len(out))
            out[offset : offset + len(payload)] = payload
        return bytes(out)


Flow = tuple[str, int, str, int]  # source address, port, destination address, port


class Capture:
    def __init__(self, netns: str, link: str) -> None:
        self.sock = _packet_socket(netns, link)
        self.frames: list[bytes] = []
        self._stop_read, self._stop_write = os.pipe()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while True:
            ready, _, _ = select.select([self.sock, self._stop_read], [], [])
            if self.sock in ready:
                self.frames.append(self.sock.recv(SNAP))
            elif self._stop_read in ready:
                # Whatever is queued still counts.
                self.sock.setblocking(False)
                try:
                    while True:
                        self.frames.append(self.sock.recv(SNAP))
                except BlockingIOError:
                    return

    def stop(self) -> None:
        os.write(self._stop_write, b"x")
        self._thread.join()
        self.sock.close()
        os.close(self._stop_read)
        os.close(self._stop_write)

    def __enter__(self) -> Capture:
        return self

    def __exit__(self, *_: object) -> None:
        if self._thread.is_alive():
            self.stop()

    def streams(self) -> dict[Flow, bytes]:
        """Every TCP connection's payload bytes, per direction, in order."""
        flows: dict[Flow, Segments] = collections.defaultdict(Segments)
        for frame in self.frames:
            parsed = _tcp_payload(frame)
            if parsed is not None:
                flow, sequence, payload = parsed
                if payload:
                    flows[flow].add(sequence, payload)
        return {flow: segments.joined() for flow, segments in flows.items()}

    def everything(self) -> bytes:
        """Every frame as captured, headers and all, one after the other."""
        return b"".join(self.frames)


def _tcp_payload(frame: bytes) -> tuple[Flow, int, bytes] | None:
    if len(frame) < ETHERNET_HEADER + 20:
        return None
    (ethertype,) = struct.unpack_from("!H", frame, 12)
    if ethertype != ETH_P_IP:
        return None
    ip = frame[ETHERNET_HEADER:]
    header_length = (ip[0] & 0x0F) * 4
    (total_length,) = struct.unpack_from("!H", ip, 2)
    if ip[9] != socket.IPPROTO_TCP:
        return None
    source, destination = socket.inet_ntoa(ip[12:16]), socket.inet_ntoa(ip[16:20])
    tcp = ip[header_length:total_length]
    source_port, destination_port, sequence = struct.unpack_from("!HHI", tcp, 0)
    data_offset = (tcp[12] >> 4) * 4
    flow = (source, source_port, destination, destination_port)
    return flow, sequence, bytes(tcp[data_offset:])


def _packet_socket(netns: str, link: str) -> socket.socket:
    """An AF_PACKET socket made inside `netns`, bound to `link` there."""
    made: list[socket.socket | BaseException] = []

    def inside() -> None:
        # A thread of its own enters the namespace and ends: ours stays where it is.
        try:
            descriptor = os.open(NETNS_RUN_DIR / netns, os.O_RDONLY | os.O_CLOEXEC)
            try:
                if _libc.setns(descriptor, CLONE_NEWNET) != 0:
                    errno = ctypes.get_errno()
                    raise OSError(errno, f"setns({netns}): {os.strerror(errno)}")
            finally:
                os.close(descriptor)
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, BUFFER)
            sock.bind((link, ETH_P_ALL))
            made.append(sock)
        except BaseException as error:  # handed to the caller's thread
            made.append(error)

    thread = threading.Thread(target=inside)
    thread.start()
    thread.join()
    if isinstance(made[0], BaseException):
        raise made[0]
    return made[0]
