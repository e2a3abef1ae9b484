"""Packets the kernel holds for us: an nfnetlink queue (NFQUEUE), bound by number.

A netfilter rule sends packets to the queue (the xtables NFQUEUE target, through
nftables' compat expression: hijack.sys.packet_route); the kernel keeps each one until
this side gives its verdict. We take only their ids (copy mode META: no payload crosses)
and accept them all at once when asked (a batch verdict: every id up to the last one
seen), in the order they came; they then go on through the rules after the one that
queued them. Closing the socket drops what is still held, as does a queue nobody binds:
a packet is never let through unasked.

The protocol is the kernel's (include/uapi/linux/netfilter/nfnetlink_queue.h), spoken
over a raw netlink socket: pyroute2 has no client for it.
"""

from __future__ import annotations

import errno
import os
import socket
import struct

from hijack.errors import HijackError

NETLINK_NETFILTER = 12
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET, NFQNL_MSG_VERDICT, NFQNL_MSG_CONFIG, NFQNL_MSG_VERDICT_BATCH = 0, 1, 2, 3
NFQA_CFG_CMD, NFQA_CFG_PARAMS, NFQA_CFG_QUEUE_MAXLEN = 1, 2, 3
NFQNL_CFG_CMD_BIND = 1
NFQNL_COPY_META = 1
NFQA_PACKET_HDR, NFQA_VERDICT_HDR = 1, 2
NF_ACCEPT = 1
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_ACK = 1, 4
NFNETLINK_V0 = 0
SOL_NETLINK = 270
NETLINK_NO_ENOBUFS = 5
SO_RCVBUFFORCE = 33

HEADER = struct.Struct("=IHHII")  # struct nlmsghdr
GENERAL = struct.Struct("=BBH")  # struct nfgenmsg: family, version, res_id (big-endian)
ATTRIBUTE = struct.Struct("=HH")  # struct nlattr
MAX_HELD = 65536  # packets the kernel holds for one queue before it drops more
RECEIVE_BUFFER = 8 << 20  # their messages, ~150 bytes each with META


def _attribute(kind: int, payload: bytes) -> bytes:
    padded = payload + b"\0" * (-len(payload) % 4)
    return ATTRIBUTE.pack(ATTRIBUTE.size + len(payload), kind) + padded


class PacketQueue:
    """Queue `number` of this network namespace, bound: what its rules send to it waits
    until accept_all() or close()."""

    def __init__(self, number: int) -> None:
        self.number = number
        self.last_id: int | None = None  # the id of the last packet seen, not yet accepted
        self._sequence = 0
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RECEIVE_BUFFER)
            # A full buffer must not cost us an error on every read: the packets whose
            # messages did not fit are dropped by the kernel (the peer sends them again).
            self.sock.setsockopt(SOL_NETLINK, NETLINK_NO_ENOBUFS, 1)
            self.sock.bind((0, 0))
            self._configure(_attribute(NFQA_CFG_CMD, struct.pack("!BxH", NFQNL_CFG_CMD_BIND, 0)))
            params = struct.pack("!IB", 0, NFQNL_COPY_META)
            maxlen = struct.pack("!I", MAX_HELD)
            self._configure(
                _attribute(NFQA_CFG_PARAMS, params) + _attribute(NFQA_CFG_QUEUE_MAXLEN, maxlen)
            )
        except OSError as exc:
            self.sock.close()
            raise HijackError(f"cannot bind packet queue {number}: {exc.strerror or exc}") from None
        except BaseException:
            self.sock.close()
            raise

    def _message(self, kind: int, attributes: bytes, flags: int) -> bytes:
        self._sequence += 1
        body = GENERAL.pack(socket.AF_UNSPEC, NFNETLINK_V0, socket.htons(self.number))
        body += attributes
        kind = NFNL_SUBSYS_QUEUE << 8 | kind
        return HEADER.pack(HEADER.size + len(body), kind, flags, self._sequence, 0) + body

    def _configure(self, attributes: bytes) -> None:
        """A config request, its acknowledgement awaited (packets read meanwhile kept)."""
        self.sock.send(self._message(NFQNL_MSG_CONFIG, attributes, NLM_F_REQUEST | NLM_F_ACK))
        while True:
            if self._read(block=True, until_ack=self._sequence):
                return

    def _read(self, *, block: bool, until_ack: int = 0) -> bool:
        """Read what is there (blocking for one datagram if `block`); note packet ids.
        True once the acknowledgement of request `until_ack` came (an error raised)."""
        try:
            data = self.sock.recv(1 << 16, 0 if block else socket.MSG_DONTWAIT)
        except BlockingIOError:
            return False
        acked = False
        offset = 0
        while offset + HEADER.size <= len(data):
            length, kind, _, sequence, _ = HEADER.unpack_from(data, offset)
            if length < HEADER.size:
                break
            payload = data[offset + HEADER.size : offset + length]
            if kind == NLMSG_ERROR:
                (code,) = struct.unpack_from("=i", payload)
                if code != 0:
                    raise OSError(-code, os.strerror(-code))
                acked = acked or sequence == until_ack
            elif kind == NFNL_SUBSYS_QUEUE << 8 | NFQNL_MSG_PACKET:
                self._note_packet(payload[GENERAL.size :])
            offset += (length + 3) & ~3
        return acked

    def _note_packet(self, attributes: bytes) -> None:
        offset = 0
        while offset + ATTRIBUTE.size <= len(attributes):
            length, kind = ATTRIBUTE.unpack_from(attributes, offset)
            if length < ATTRIBUTE.size:
                return
            if kind & 0x7FFF == NFQA_PACKET_HDR:
                (packet_id,) = struct.unpack_from("!I", attributes, offset + ATTRIBUTE.size)
                self.last_id = packet_id
                return
            offset += (length + 3) & ~3

    def accept_all(self) -> int:
        """Every packet held now goes on (one batch verdict, in their order); the number
        of the last one's id, or -1 if none was held."""
        while self._read(block=False) or self._pending():
            pass
        if self.last_id is None:
            return -1
        last, self.last_id = self.last_id, None
        verdict = _attribute(NFQA_VERDICT_HDR, struct.pack("!II", NF_ACCEPT, last))
        try:
            self.sock.send(self._message(NFQNL_MSG_VERDICT_BATCH, verdict, NLM_F_REQUEST))
        except OSError as exc:
            raise HijackError(f"packet queue {self.number}: {exc.strerror or exc}") from None
        return last

    def _pending(self) -> bool:
        """Whether more messages wait in our socket."""
        try:
            return bool(self.sock.recv(1, socket.MSG_DONTWAIT | socket.MSG_PEEK))
        except BlockingIOError:
            return False
        except OSError as exc:
            if exc.errno == errno.ENOBUFS:
                return True
            raise

    def close(self) -> None:
        """Unbind: what is still held is dropped (its senders send it again)."""
        self.sock.close()


def bind_free(first: int, count: int = 256) -> PacketQueue:
    """A PacketQueue on the first number from `first` (of `count`) nobody has bound."""
    failure: HijackError | None = None
    for number in range(first, first + count):
        try:
            return PacketQueue(number % 65536)
        except HijackError as exc:  # EBUSY: another process holds that number
            failure = exc
    raise failure or HijackError("no free packet queue")
