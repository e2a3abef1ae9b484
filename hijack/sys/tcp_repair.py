"""TCP_REPAIR: reading an established connection's state, and making it again.

A socket in repair mode sends nothing: reading its queues and sequence numbers
changes nothing the peer can see, and closing it sends neither FIN nor RST. A
socket made in repair mode and connect()ed takes the given sequence numbers
and queues as its own without a handshake; turning repair off makes it a live
connection again (the kernel then sends a window probe, and the peer
retransmits whatever it sent meanwhile).

The whole send queue is put back in repair mode, as if sent and not yet
acknowledged: what the peer has not acknowledged is retransmitted when the
retransmission timer fires, so a restore never blocks on a peer that does
not read.

A connection closing (FIN_WAIT1/2, CLOSE_WAIT, LAST_ACK, CLOSING) is read and
made the same way, as CRIU's soccr does: each FIN takes a sequence number of
its own, which the queues' ends (write_seq, rcv_nxt) count and their bytes do
not, so it is taken off at dump. The restore makes the connection ESTABLISHED,
then replays its FINs in the order the state says they came: the FIN it sent,
by shutdown(SHUT_WR) in repair mode with the send queue selected (queued as
sent and not acknowledged: nothing goes out; the peer acknowledges it again,
or the retransmission timer sends it); the FIN it received, by a FIN packet
from the peer's address written on a raw socket (the kernel takes it as the
peer's: the state moves on, and the program reads the end of the stream after
its bytes). That packet carries netlock.OWN_MARK, which every network lock lets
through (hijack.sys.netlock). A program's own shutdown(SHUT_RD) (reading shut,
no FIN received; poll tells it by POLLRDHUP) is done again as it was.
"""

from __future__ import annotations

import fcntl
import ipaddress
import os
import select
import socket
import struct
import termios
import time
from dataclasses import dataclass

from hijack.errors import HijackError
from hijack.sys import netlock, pidfd, procfs
from hijack.sys.datagrams import (
    DEFAULT_TTL,
    IP_DONT_FRAGMENT,
    IPV4_HEADER,
    IPV6_HEADER,
    checksum,
)
from hijack.sys.errors import kernel_call

TCP_REPAIR = 19
TCP_REPAIR_QUEUE = 20
TCP_QUEUE_SEQ = 21
TCP_REPAIR_OPTIONS = 22
TCP_TIMESTAMP = 24
TCP_REPAIR_WINDOW = 29
TCP_REPAIR_ON, TCP_REPAIR_OFF = 1, 0
TCP_NO_QUEUE, TCP_RECV_QUEUE, TCP_SEND_QUEUE = 0, 1, 2
TCPOPT_MAXSEG, TCPOPT_WINDOW, TCPOPT_SACK_PERM, TCPOPT_TIMESTAMP = 2, 3, 4, 8
TCP_MIN_MSS = 88  # what TCP_MAXSEG takes at least (<net/tcp.h>)
TCP_MAX_USER_MSS = 32767  # and at most (MAX_TCP_WINDOW)
TCPI_OPT_TIMESTAMPS, TCPI_OPT_SACK, TCPI_OPT_WSCALE = 1, 2, 4
SIOCOUTQ = termios.TIOCOUTQ  # bytes in the send queue (sent or not)
SIOCOUTQNSD = 0x894B  # bytes in the send queue never sent
REPAIR_WINDOW = struct.Struct("<5I")  # snd_wl1, snd_wnd, max_window, rcv_wnd, rcv_wup
REPAIR_OPTION = struct.Struct("<II")  # opt_code, opt_val
# struct tcp_info: state, ca_state, retransmits, probes, backoff, options, wscales (4+4 bits)
TCP_INFO_HEAD = struct.Struct("<7B")
TCP_INFO_SEGS = struct.Struct("<136xII")  # ... tcpi_segs_out, tcpi_segs_in
TCP_INFO_SENT = struct.Struct("<200xQQ")  # ... tcpi_bytes_sent, tcpi_bytes_retrans
CHUNK = 1 << 20  # bytes put back into a queue per call
SO_SNDBUFFORCE, SO_RCVBUFFORCE = 32, 33
SO_MARK = 36
IPV6_HDRINCL = 36
POLLRDHUP = 0x2000
# The kernel's TCP state numbers of the connections this module reads and makes.
ESTABLISHED, FIN_WAIT1, FIN_WAIT2, CLOSE_WAIT, LAST_ACK, CLOSING = 1, 4, 5, 8, 9, 11
FIN_SENT = frozenset({FIN_WAIT1, FIN_WAIT2, LAST_ACK, CLOSING})
FIN_RECEIVED = frozenset({CLOSE_WAIT, LAST_ACK, CLOSING})
CONNECTED_STATES = frozenset({ESTABLISHED}) | FIN_SENT | FIN_RECEIVED
TCP_HEADER = struct.Struct("!HHIIBBHHH")  # ports, seq, ack, offset, flags, window, csum, urg
TH_FIN, TH_ACK = 0x01, 0x10
FIN_WAIT = 1.0  # seconds a replayed FIN may take to be received (loopback: at once)
BUFFER_SLACK = 1 << 16  # the kernel counts its own overhead against the buffer too


@dataclass(frozen=True)
class TcpState:
    send_seq: int  # the sequence number of the first byte of the send queue
    recv_seq: int  # the sequence number of the first byte of the receive queue
    send_queue: bytes  # bytes written by the program the peer has not acknowledged
    received: bytes  # the receive queue: bytes the peer sent that the program has not read
    mss: int
    options: int  # TCPI_OPT_* bits
    snd_wscale: int
    rcv_wscale: int
    timestamp: int
    window: tuple[int, int, int, int, int]  # struct tcp_repair_window
    state: int = ESTABLISHED  # one of CONNECTED_STATES
    read_shut: bool = False  # the program shut reading (shutdown SHUT_RD), no FIN received
    # The bytes at the end of send_queue never sent: made again, they are sent as the
    # program's writes are, not put back as sent (which would have the peer get them only
    # by retransmission, and the congestion control count them all in flight at once).
    unsent: int = 0


STEADY_WAIT = 5.0  # seconds a live connection may keep receiving while its state is read


def _queued(sock: socket.socket, request: int) -> int:
    value: int = struct.unpack("<i", fcntl.ioctl(sock.fileno(), request, b"\0" * 4))[0]
    return value


def _peek(sock: socket.socket, queue: int, length: int) -> bytes:
    sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR_QUEUE, queue)
    data = b""
    if length:
        data = sock.recv(length, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    return data


def set_repair(fd: int, on: bool) -> None:
    with kernel_call("setsockopt(TCP_REPAIR)"), socket.socket(fileno=fd) as sock:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, TCP_REPAIR_ON if on else TCP_REPAIR_OFF)
        finally:
            sock.detach()


def silence(pid: int, fd: int) -> None:
    """Descriptor `fd` of process `pid` (a TCP socket) put in repair mode: closed, it
    vanishes without a segment (no FIN, no reset, no TIME_WAIT keeping its addresses)."""
    handle = pidfd.pidfd_open(pid)
    try:
        copy = pidfd.pidfd_getfd(handle, fd, pid)
    finally:
        os.close(handle)
    try:
        set_repair(copy, True)
    finally:
        os.close(copy)


def state_of(fd: int) -> int:
    """The kernel's TCP state number of socket `fd` (ours)."""
    with kernel_call("getsockopt(TCP_INFO)"), socket.socket(fileno=fd) as sock:
        try:
            info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_HEAD.size)
        finally:
            sock.detach()
    state: int = TCP_INFO_HEAD.unpack(info)[0]
    return state


def never_connected(fd: int) -> bool:
    """Whether TCP socket `fd` (ours) never sent nor received a segment: made, maybe bound,
    not one that was a connection (closed since, its port given back)."""
    with kernel_call("getsockopt(TCP_INFO)"), socket.socket(fileno=fd) as sock:
        try:
            info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_SEGS.size)
        finally:
            sock.detach()
    return len(info) >= TCP_INFO_SEGS.size and TCP_INFO_SEGS.unpack(info)[-2:] == (0, 0)


def data_sent(fd: int) -> int | None:
    """The bytes TCP socket `fd` (ours) has sent, each counted once (retransmissions
    left out; SYN and FIN are not data): once its send queue is empty, all that was
    written to it. None where the kernel does not tell (before Linux 4.19)."""
    with kernel_call("getsockopt(TCP_INFO)"), socket.socket(fileno=fd) as sock:
        try:
            info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_SENT.size)
        finally:
            sock.detach()
    if len(info) < TCP_INFO_SENT.size:
        return None
    sent, retransmitted = TCP_INFO_SENT.unpack(info)
    return int(sent - retransmitted)


def read_state(fd: int) -> TcpState:
    """The state of connected TCP socket `fd` (ours; in one of CONNECTED_STATES), which
    must be in repair mode.

    Repair mode does not stop the peer's segments: without a network lock (a plain
    dump, the process running on after; a swap's old sockets, which run on while the
    ends are frozen) one landing during the read would give the receive queue's bytes,
    its sequence number and the window from different moments, and the connection
    rebuilt from them would be off. A read the receive queue grew during is read again,
    for STEADY_WAIT s at most. (What the peer's acknowledgements take from the send queue
    meanwhile does not matter: its end, write_seq, stays, and what was acknowledged is
    not owed.)
    """
    deadline = time.monotonic() + STEADY_WAIT
    while True:
        before = _received_up_to(fd)
        state = _read_state_once(fd)
        if _received_up_to(fd) == before:
            return state
        if time.monotonic() > deadline:
            raise HijackError(f"a connection kept receiving for {STEADY_WAIT:g} s while read")
        time.sleep(0.005)


def _received_up_to(fd: int) -> int:
    """The sequence number connection `fd` (ours, in repair mode) expects next."""
    with kernel_call("TCP_REPAIR_QUEUE"), socket.socket(fileno=fd) as sock:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR_QUEUE, TCP_RECV_QUEUE)
            end: int = sock.getsockopt(socket.IPPROTO_TCP, TCP_QUEUE_SEQ)
            sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR_QUEUE, TCP_NO_QUEUE)
        finally:
            sock.detach()
    return end


def _read_state_once(fd: int) -> TcpState:
    with kernel_call("TCP_REPAIR"), socket.socket(fileno=fd) as sock:
        try:
            in_send_queue = _queued(sock, SIOCOUTQ)
            sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR_QUEUE, TCP_SEND_QUEUE)
            send_seq = sock.getsockopt(socket.IPPROTO_TCP, TCP_QUEUE_SEQ)
            send_queue = _peek(sock, TCP_SEND_QUEUE, in_send_queue)
            # After the peek: what goes out meanwhile counts as sent (sent again: safe).
            never_sent = min(_queued(sock, SIOCOUTQNSD), len(send_queue))
            sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR_QUEUE, TCP_RECV_QUEUE)
            recv_seq = sock.getsockopt(socket.IPPROTO_TCP, TCP_QUEUE_SEQ)
            received = _peek(sock, TCP_RECV_QUEUE, _queued(sock, termios.FIONREAD))
            sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR_QUEUE, TCP_NO_QUEUE)
            info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
            head = TCP_INFO_HEAD.unpack_from(info)
            state, options, wscales = head[0], head[5], head[6]
            if state not in CONNECTED_STATES:
                raise HijackError(f"a TCP connection in state {state} cannot be read")
            # A FIN has a sequence number of its own, but no byte in a queue.
            send_seq -= state in FIN_SENT
            recv_seq -= state in FIN_RECEIVED
            polled = select.poll()
            polled.register(sock.fileno(), POLLRDHUP)
            read_shut = state not in FIN_RECEIVED and any(
                events & POLLRDHUP for _, events in polled.poll(0)
            )
            mss = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG)
            window = REPAIR_WINDOW.unpack(
                sock.getsockopt(socket.IPPROTO_TCP, TCP_REPAIR_WINDOW, REPAIR_WINDOW.size)
            )
            # TCP_QUEUE_SEQ tells where each queue ends (write_seq, rcv_nxt); a restore
            # sets where it starts, then puts the bytes back, which moves it to the end.
            state = TcpState(
                send_seq=(send_seq - len(send_queue)) & 0xFFFFFFFF,
                recv_seq=(recv_seq - len(received)) & 0xFFFFFFFF,
                send_queue=send_queue,
                received=received,
                mss=mss,
                options=options,
                snd_wscale=wscales & 0xF,
                rcv_wscale=wscales >> 4,
                timestamp=sock.getsockopt(socket.IPPROTO_TCP, TCP_TIMESTAMP) & 0xFFFFFFFF,
                window=window,
                state=state,
                read_shut=read_shut,
                unsent=_surely_unsent(never_sent, state, mss),
            )
        finally:
            sock.detach()
    return state


def _surely_unsent(never_sent: int, state: int, mss: int) -> int:
    """Of the `never_sent` last bytes of a send queue, those its socket will not send
    either before it is silenced: a socket left live (a move's, a swap's old ends) still
    sends a tail loss probe on its own, one segment of new data, while the peer's
    acknowledgements are held (two kept for margin). Were one counted unsent and made
    again as such, the peer, which has it, would acknowledge past what the new end sent,
    and the new end would drop that segment (data and all) as acknowledging the unsent.
    A FIN of ours counts in SIOCOUTQNSD too, sent or not: then every byte counts sent."""
    if state in FIN_SENT:
        return 0
    return max(0, never_sent - 2 * mss)


def go_live(fd: int, send_queue: bytes, unsent: int) -> None:
    """Connection `fd` (ours, made with live false and no send queue) gets `send_queue` and
    leaves repair mode: its first bytes as sent and not acknowledged (the peer may have
    them: what it acknowledges is then valid; the rest it gets by retransmission), its
    last `unsent` ones sent once live, as the program's writes are."""
    with kernel_call("TCP_REPAIR_QUEUE"), socket.socket(fileno=fd) as sock:
        try:
            _fill(sock, TCP_SEND_QUEUE, send_queue[: len(send_queue) - unsent], len(send_queue))
            sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR_QUEUE, TCP_NO_QUEUE)
            sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, TCP_REPAIR_OFF)
            _send_unsent(sock, send_queue[len(send_queue) - unsent :])
        finally:
            sock.detach()


def _send_unsent(sock: socket.socket, data: bytes) -> None:
    """Send `data` on a live connection whose buffer _fill() made big enough for it: it is
    queued at once (were it not, the bytes would be lost: waited for, STEADY_WAIT s)."""
    view = memoryview(data)
    ready = select.poll()
    ready.register(sock.fileno(), select.POLLOUT)
    deadline = time.monotonic() + STEADY_WAIT
    while view:
        try:
            view = view[sock.send(view[:CHUNK], socket.MSG_DONTWAIT) :]
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise HijackError(
                    f"{len(view)} of the {len(data)} bytes never sent of a TCP connection"
                    " do not fit in its buffer"
                ) from None
            ready.poll(10)


def _fill(sock: socket.socket, queue: int, data: bytes, room: int = 0) -> None:
    """Put `data` back into a queue. Nothing drains a queue in repair mode, so a buffer
    smaller than the data would block forever: it is made big enough first (root may
    go past the sysctl limits; for `room` bytes if more), and the socket never blocks
    here."""
    room = max(room, len(data))
    if not room:
        return
    buffer = SO_SNDBUFFORCE if queue == TCP_SEND_QUEUE else SO_RCVBUFFORCE
    sock.setsockopt(socket.SOL_SOCKET, buffer, room + BUFFER_SLACK)
    sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR_QUEUE, queue)
    view = memoryview(data)
    try:
        while view:
            sent = sock.send(view[:CHUNK])
            view = view[sent:]
    except BlockingIOError:
        raise HijackError(
            f"{len(view)} of the {len(data)} bytes of a TCP queue do not fit back"
        ) from None


def make_connection(
    family: int,
    local: tuple[str, int],
    remote: tuple[str, int],
    state: TcpState,
    *,
    live: bool = True,
) -> int:
    """A socket of ours holding the connection `state` describes, live; returns its fd.
    With `live` false it is left in repair mode: it sends nothing until set_repair(fd,
    False) (a socket swap makes both ends before either speaks); its send queue is then
    all sent already (state.unsent 0: go_live() gives one with bytes never sent)."""
    if not live and state.unsent:
        raise ValueError("a connection left in repair mode cannot send its bytes never sent")
    sent = len(state.send_queue) - state.unsent
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        with kernel_call("TCP_REPAIR", what=f"the connection {local} -> {remote}"):
            # Repair mode forces the reuse of the address (a listener of the process may
            # hold the port already); SO_REUSEADDR now would take that back.
            sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, TCP_REPAIR_ON)
            sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR_QUEUE, TCP_SEND_QUEUE)
            sock.setsockopt(socket.IPPROTO_TCP, TCP_QUEUE_SEQ, _signed(state.send_seq))
            sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR_QUEUE, TCP_RECV_QUEUE)
            sock.setsockopt(socket.IPPROTO_TCP, TCP_QUEUE_SEQ, _signed(state.recv_seq))
            # The segment size is fixed at connect() (from the route's MTU and the clamp as
            # it is then): the clamp TCP_REPAIR_OPTIONS sets after it is not used for the
            # segments until the route's MTU changes, and they stay at the default 536 less
            # options (524), three times the packets. Given first, it is (the same value;
            # TCP_MAXSEG takes at most 32767: loopback's 65495 is given as that).
            if state.mss >= TCP_MIN_MSS:
                given = min(state.mss, TCP_MAX_USER_MSS)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, given)
            sock.bind(local)
            sock.connect(remote)  # in repair mode: no handshake, ESTABLISHED at once
            options = [REPAIR_OPTION.pack(TCPOPT_MAXSEG, state.mss)]
            if state.options & TCPI_OPT_WSCALE:
                scales = state.snd_wscale | state.rcv_wscale << 16
                options.append(REPAIR_OPTION.pack(TCPOPT_WINDOW, scales))
            if state.options & TCPI_OPT_SACK:
                options.append(REPAIR_OPTION.pack(TCPOPT_SACK_PERM, 0))
            if state.options & TCPI_OPT_TIMESTAMPS:
                options.append(REPAIR_OPTION.pack(TCPOPT_TIMESTAMP, 0))
            sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR_OPTIONS, b"".join(options))
            if state.options & TCPI_OPT_TIMESTAMPS:
                sock.setsockopt(socket.IPPROTO_TCP, TCP_TIMESTAMP, _signed(state.timestamp))
            _fill(sock, TCP_SEND_QUEUE, state.send_queue[:sent], len(state.send_queue))
            _fill(sock, TCP_RECV_QUEUE, state.received)
            sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR_QUEUE, TCP_NO_QUEUE)
            # Before the window: its rcv_wup may count the FIN received.
            _replay_fins(sock, local, remote, state)
            sock.setsockopt(
                socket.IPPROTO_TCP, TCP_REPAIR_WINDOW, REPAIR_WINDOW.pack(*state.window)
            )
            if live:
                sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, TCP_REPAIR_OFF)
                _send_unsent(sock, state.send_queue[sent:])
            sock.setblocking(True)
    except BaseException:
        sock.close()
        raise
    return sock.detach()


def _replay_fins(
    sock: socket.socket, local: tuple[str, int], remote: tuple[str, int], state: TcpState
) -> None:
    """Bring an ESTABLISHED connection in repair mode to `state`: its FINs, in order."""
    if state.state in (FIN_WAIT1, FIN_WAIT2, CLOSING):  # ours went first
        _shut_sending(sock)
    if state.state in FIN_RECEIVED:
        _receive_fin(sock, local, remote, state)
    if state.state == LAST_ACK:  # the peer's went first
        _shut_sending(sock)
    if state.read_shut:
        sock.shutdown(socket.SHUT_RD)


def _shut_sending(sock: socket.socket) -> None:
    """The FIN queued as sent, not transmitted (the send queue is selected)."""
    sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR_QUEUE, TCP_SEND_QUEUE)
    sock.shutdown(socket.SHUT_WR)
    sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR_QUEUE, TCP_NO_QUEUE)


def _receive_fin(
    sock: socket.socket, local: tuple[str, int], remote: tuple[str, int], state: TcpState
) -> None:
    """A FIN from `remote`, at the end of what the connection received, written on a raw
    socket; waits until the connection took it (it moves to CLOSE_WAIT or on)."""
    fin_seq = (state.recv_seq + len(state.received)) & 0xFFFFFFFF
    packet, family = fin_packet(local, remote, fin_seq, state.send_seq, state)
    with socket.socket(family, socket.SOCK_RAW, socket.IPPROTO_RAW) as raw:
        raw.setsockopt(socket.SOL_SOCKET, SO_MARK, netlock.OWN_MARK)
        if family == socket.AF_INET6:
            raw.setsockopt(socket.IPPROTO_IPV6, IPV6_HDRINCL, 1)
        raw.sendto(packet, (str(netlock.wire_address(local[0])), 0))
    expected = {CLOSE_WAIT: CLOSE_WAIT, LAST_ACK: CLOSE_WAIT, CLOSING: CLOSING}[state.state]
    deadline = time.monotonic() + FIN_WAIT
    while state_of(sock.fileno()) != expected:
        if time.monotonic() > deadline:
            raise HijackError(
                f"the FIN of {remote}, replayed, did not reach the connection from {local}"
            )
        time.sleep(0.001)


def fin_packet(
    local: tuple[str, int], remote: tuple[str, int], seq: int, ack: int, state: TcpState
) -> tuple[bytes, int]:
    """(IP packet, family) of a FIN+ACK from `remote` to `local`: sequence number `seq`,
    acknowledging `ack` (no more than the connection sent: its send queue's start)."""
    source, destination = netlock.wire_address(remote[0]), netlock.wire_address(local[0])
    window = min(state.window[1] >> state.snd_wscale, 0xFFFF)
    flags = TH_FIN | TH_ACK
    header = TCP_HEADER.pack(remote[1], local[1], seq, ack, 5 << 4, flags, window, 0, 0)
    if source.version == 4:
        pseudo = source.packed + destination.packed + struct.pack("!xBH", 6, len(header))
    else:
        pseudo = source.packed + destination.packed + struct.pack("!I3xB", len(header), 6)
    summed = checksum(pseudo + header)
    header = TCP_HEADER.pack(remote[1], local[1], seq, ack, 5 << 4, flags, window, summed, 0)
    if source.version == 4:
        head = IPV4_HEADER.pack(
            0x45, 0, IPV4_HEADER.size + len(header), 0, IP_DONT_FRAGMENT, DEFAULT_TTL,
            socket.IPPROTO_TCP, 0, source.packed, destination.packed,
        )  # fmt: skip
        return head + header, socket.AF_INET
    head = IPV6_HEADER.pack(6 << 28, len(header), socket.IPPROTO_TCP, DEFAULT_TTL,
                            source.packed, destination.packed)  # fmt: skip
    return head + header, socket.AF_INET6


def _signed(value: int) -> int:
    """setsockopt takes an int: a u32 above 2^31 as its two's complement."""
    return value - (1 << 32) if value >= 1 << 31 else value


SIOCGSKNS = 0x894C  # a socket's network namespace, as a descriptor
TCP_SYN_SENT, TCP_CLOSE, TCP_LISTEN = 2, 7, 10
# The states in which /proc/net/tcp lists a socket as getsockname and getpeername tell its
# two ends: CLOSE is in no table (unbound, or only bound), SYN_SENT has no peer to ask,
# TIME_WAIT and NEW_SYN_RECV are no descriptor's.
_LISTED_STATES = frozenset(range(1, 12)) - {TCP_SYN_SENT, TCP_CLOSE}


def listed_tcp(fd: int, inode: int, namespace: int) -> procfs.SocketInfo | None:
    """What /proc/net/tcp or tcp6 of the network namespace whose inode is `namespace` says
    of our socket `fd` (a copy), asked of the socket itself, without the table: reading it
    walks the kernel's whole connection hash (~4 ms idle, ~20 ms on a busy machine,
    even for an empty namespace). None when that cannot be told so: not TCP over IPv4
    or IPv6 (a JVM's sockets are IPv6, IPv4 peers mapped), not in that namespace, an
    address with a scope, or in a state the table shows otherwise or not at all."""
    with socket.socket(fileno=fd) as sock:
        try:
            family = sock.family
            if family not in (socket.AF_INET, socket.AF_INET6) or (sock.type, sock.proto) != (
                socket.SOCK_STREAM,
                socket.IPPROTO_TCP,
            ):
                return None
            own = fcntl.ioctl(fd, SIOCGSKNS)
            try:
                if os.fstat(own).st_ino != namespace:
                    return None
            finally:
                os.close(own)
            info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_HEAD.size)
            state = TCP_INFO_HEAD.unpack(info)[0]
            if state not in _LISTED_STATES:
                return None
            local = _listed_address(family, sock.getsockname())
            peer = _listed_address(family, None if state == TCP_LISTEN else sock.getpeername())
        except OSError:
            return None
        finally:
            sock.detach()
    if local is None or peer is None:
        return None
    return procfs.SocketInfo(
        inode,
        family,
        socket.SOCK_STREAM,
        socket.IPPROTO_TCP,
        procfs.tcp_state_name(state),
        local,
        peer,
    )


def _listed_address(family: int, address: tuple[object, ...] | None) -> str | None:
    """An address as /proc/net/tcp (IPv4) or tcp6 (IPv6, in brackets) writes it; None
    (an address not connected) is the table's zero one; None back for a scoped address."""
    if family == socket.AF_INET:
        host, port = address[:2] if address is not None else ("0.0.0.0", 0)
        return f"{host}:{port}"
    if address is None:
        return "[::]:0"
    host, port, _, scope = address[:4]
    if scope or "%" in str(host):
        return None  # the table writes no scope: left to it
    return f"[{ipaddress.ip_address(str(host))}]:{port}"


def listed_tcp_of(
    pid: int, sockets: dict[int, int], unix: set[int] | None = None
) -> dict[int, procfs.SocketInfo]:
    """listed_tcp of each socket of process `pid` (`sockets`: its descriptor -> inode) it
    can tell, by inode; a descriptor closed meanwhile (it runs) is left to the tables.
    `unix` (if given) gets the inodes of those that are unix sockets (only the unix table
    can tell them: the others' need not be read for them)."""
    found: dict[int, procfs.SocketInfo] = {}
    try:
        namespace = os.stat(f"/proc/{pid}/ns/net").st_ino
        handle = pidfd.pidfd_open(pid)
    except (OSError, HijackError):
        return found
    try:
        for fd, inode in sockets.items():
            try:
                copy = pidfd.pidfd_getfd(handle, fd, pid)
            except HijackError:
                continue
            try:
                info = listed_tcp(copy, inode, namespace)
                if info is None and unix is not None and _domain(copy) == socket.AF_UNIX:
                    unix.add(inode)
            finally:
                os.close(copy)
            if info is not None:
                found[inode] = info
    finally:
        os.close(handle)
    return found


def _domain(fd: int) -> int:
    """The address family of socket `fd` (-1 if it cannot be told)."""
    with socket.socket(fileno=fd) as sock:
        try:
            return sock.getsockopt(socket.SOL_SOCKET, socket.SO_DOMAIN)
        except OSError:
            return -1
        finally:
            sock.detach()
