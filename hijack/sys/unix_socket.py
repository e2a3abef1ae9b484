"""Unix domain sockets: what the kernel says of them (sock_diag), their queues read and refilled.

`unix_sockets(pid)` asks NETLINK_SOCK_DIAG for every unix socket of the network
namespace of `pid` (Documentation of include/uapi/linux/unix_diag.h): its type,
state, bound name, the socket file it is bound to, its peer, the connections
waiting in a listener's accept queue, its queue lengths and its shutdown state.
/proc/net/unix has neither the peer nor the accept queue.

`peek_queue(fd, ...)` reads a socket's receive queue without consuming it:
MSG_PEEK with SO_PEEK_OFF moving through the queue, the process's own peek
offset put back afterwards (the process runs on after a plain dump). Peeking
also copies the descriptors in flight (SCM_RIGHTS) into this process.
"""

from __future__ import annotations

import errno as errno_codes
import os
import socket
import struct
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from hijack.errors import HijackError
from hijack.sys.errors import kernel_call
from hijack.sys.libc import raw_syscall

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST, NLM_F_ROOT, NLM_F_MATCH = 0x1, 0x100, 0x200
NLM_F_DUMP = NLM_F_ROOT | NLM_F_MATCH
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
NLATTR = struct.Struct("=HH")  # len, type
UNIX_DIAG_REQ = struct.Struct("=BBHIII8s")  # family, protocol, pad, states, ino, show, cookie
UNIX_DIAG_MSG = struct.Struct("=BBBBI8s")  # family, type, state, pad, ino, cookie
UDIAG_SHOW_NAME, UDIAG_SHOW_VFS, UDIAG_SHOW_PEER = 0x1, 0x2, 0x4
UDIAG_SHOW_ICONS, UDIAG_SHOW_RQLEN = 0x8, 0x10
UNIX_DIAG_NAME, UNIX_DIAG_VFS, UNIX_DIAG_PEER, UNIX_DIAG_ICONS = 0, 1, 2, 3
UNIX_DIAG_RQLEN, UNIX_DIAG_SHUTDOWN = 4, 6
ALL_STATES = 0xFFFFFFFF
CLONE_NEWNET = 0x40000000

# sk_state of a unix socket, as unix_diag reports it (include/net/tcp_states.h)
TCP_ESTABLISHED, TCP_CLOSE, TCP_LISTEN = 1, 7, 10
# sk_shutdown bits
RCV_SHUTDOWN, SEND_SHUTDOWN = 1, 2

SCM_MAX_FD = 253  # descriptors one SCM_RIGHTS message may carry
UCRED = struct.Struct("=iII")  # struct ucred: pid, uid, gid
STREAM_CHUNK = 1 << 20  # bytes of a stream queue peeked at once
SOL_SOCKET = socket.SOL_SOCKET
SO_PASSCRED, SO_PEEK_OFF = 16, 42
SO_SNDBUFFORCE, SO_RCVBUFFORCE = 32, 33
_INT = struct.Struct("=i")


@dataclass(frozen=True, slots=True)
class UnixDiag:
    """One unix socket as sock_diag describes it."""

    inode: int
    type: socket.SocketKind
    state: int  # TCP_ESTABLISHED (connected), TCP_CLOSE (not), TCP_LISTEN
    name: bytes  # sun_path as bound: b"" unbound, b"\\0..." abstract, else a path
    vfs: tuple[int, int] | None  # (st_dev, st_ino) of the socket file it is bound to
    peer: int  # the peer's inode; 0 for none, a peer closed, or one not yet accepted
    icons: tuple[int, ...]  # a listener's queued connections: their clients' inodes, in order
    rqueue: int  # stream: bytes queued; datagram: the first message's length; listener: count
    wqueue: int  # bytes sent and not yet read by the peer; listener: its backlog
    shutdown: int  # RCV_SHUTDOWN | SEND_SHUTDOWN bits

    @property
    def listening(self) -> bool:
        return self.state == TCP_LISTEN


def unix_sockets(pid: int) -> dict[int, UnixDiag]:
    """Every unix socket of the network namespace of process `pid`, by inode; none when
    the kernel has no unix_diag (then no unix socket is rebuilt: each is refused by name)."""
    with in_network_namespace(pid), kernel_call("sock_diag", pid):
        channel = socket.socket(
            socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC, NETLINK_SOCK_DIAG
        )
    with channel:
        show = (
            UDIAG_SHOW_NAME | UDIAG_SHOW_VFS | UDIAG_SHOW_PEER | UDIAG_SHOW_ICONS | UDIAG_SHOW_RQLEN
        )
        request = UNIX_DIAG_REQ.pack(socket.AF_UNIX, 0, 0, ALL_STATES, 0, show, b"\xff" * 8)
        header = NLMSGHDR.pack(
            NLMSGHDR.size + len(request), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, 1, 0
        )
        with kernel_call("sock_diag", pid):
            channel.sendto(header + request, (0, 0))
            return {
                diag.inode: diag for diag in map(_parse_socket, read_diag_dump(channel, "unix"))
            }


@contextmanager
def in_network_namespace(pid: int) -> Iterator[None]:
    """This thread inside the network namespace of `pid` for the block (a netlink socket
    speaks for the namespace it was made in); a no-op when it is ours already."""
    with kernel_call("open", pid, what=f"the network namespace of process {pid}"):
        theirs = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        ours = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if os.fstat(theirs).st_ino == os.fstat(ours).st_ino:
            yield
            return
        raw_syscall("setns", theirs, CLONE_NEWNET, pid=pid)
        try:
            yield
        finally:
            raw_syscall("setns", ours, CLONE_NEWNET)
    finally:
        os.close(theirs)
        os.close(ours)


def read_diag_dump(channel: socket.socket, family: str) -> Iterator[bytes]:
    """The body of each socket a sock_diag dump of `family` ("unix", "packet") tells of;
    none when the kernel has no handler for that family."""
    while True:
        data = channel.recv(1 << 16)
        offset = 0
        while offset + NLMSGHDR.size <= len(data):
            length, kind, _flags, _seq, _pid = NLMSGHDR.unpack_from(data, offset)
            if length < NLMSGHDR.size:
                raise HijackError(f"sock_diag: a malformed netlink message ({length} bytes)")
            body = data[offset + NLMSGHDR.size : offset + length]
            offset += (length + 3) & ~3
            if kind == NLMSG_DONE:
                return
            if kind == NLMSG_ERROR:
                code = -_INT.unpack_from(body)[0]
                if code == errno_codes.ENOENT:  # no handler for the family: its diag missing
                    return
                if code:
                    raise HijackError(
                        f"sock_diag for {family} sockets failed: {os.strerror(code)}",
                        errno=code,
                        syscall="sock_diag",
                    )
                continue
            if kind == SOCK_DIAG_BY_FAMILY:
                yield body


def attributes(data: bytes) -> Iterator[tuple[int, bytes]]:
    offset = 0
    while offset + NLATTR.size <= len(data):
        length, kind = NLATTR.unpack_from(data, offset)
        if length < NLATTR.size:
            break
        yield kind & 0x3FFF, data[offset + NLATTR.size : offset + length]
        offset += (length + 3) & ~3


def _parse_socket(body: bytes) -> UnixDiag:
    _family, kind, state, _pad, inode, _cookie = UNIX_DIAG_MSG.unpack_from(body)
    name, vfs, peer, icons, rqueue, wqueue, shutdown = b"", None, 0, (), 0, 0, 0
    for attribute, value in attributes(body[UNIX_DIAG_MSG.size :]):
        if attribute == UNIX_DIAG_NAME:
            # a path's length counts its terminating NUL; an abstract name is all bytes
            name = value if value.startswith(b"\0") else value.split(b"\0", 1)[0]
        elif attribute == UNIX_DIAG_VFS:
            vfs_ino, vfs_dev = struct.unpack_from("=II", value)
            # the kernel's dev_t (MAJOR << 20 | MINOR), not the one stat(2) gives
            vfs = (os.makedev(vfs_dev >> 20, vfs_dev & 0xFFFFF), vfs_ino)
        elif attribute == UNIX_DIAG_PEER:
            peer = struct.unpack_from("=I", value)[0]
        elif attribute == UNIX_DIAG_ICONS:
            icons = struct.unpack(f"={len(value) // 4}I", value[: len(value) // 4 * 4])
        elif attribute == UNIX_DIAG_RQLEN:
            rqueue, wqueue = struct.unpack_from("=II", value)
        elif attribute == UNIX_DIAG_SHUTDOWN:
            shutdown = value[0]
    return UnixDiag(
        inode,
        socket.SocketKind(kind),
        state,
        name,
        vfs,
        peer,
        tuple(icons),
        rqueue,
        wqueue,
        shutdown,
    )


# ---------------------------------------------------------------- options


@dataclass(frozen=True, slots=True)
class UnixOptions:
    """The per-socket settings a rebuilt socket takes back."""

    passcred: bool
    peek_off: int  # -1: MSG_PEEK does not use an offset
    sndbuf: int  # as getsockopt gives them: the kernel's doubled values
    rcvbuf: int


def read_options(sock: socket.socket) -> UnixOptions:
    with kernel_call("getsockopt"):
        return UnixOptions(
            passcred=bool(sock.getsockopt(SOL_SOCKET, SO_PASSCRED)),
            peek_off=sock.getsockopt(SOL_SOCKET, SO_PEEK_OFF),
            sndbuf=sock.getsockopt(SOL_SOCKET, socket.SO_SNDBUF),
            rcvbuf=sock.getsockopt(SOL_SOCKET, socket.SO_RCVBUF),
        )


def set_buffers(sock: socket.socket, sndbuf: int, rcvbuf: int) -> None:
    """Buffer sizes as getsockopt gave them; the FORCE options go past wmem_max and rmem_max
    (root), and the kernel doubles what it is given."""
    with kernel_call("setsockopt"):
        sock.setsockopt(SOL_SOCKET, SO_SNDBUFFORCE, sndbuf // 2)
        sock.setsockopt(SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf // 2)


def set_options(sock: socket.socket, options: UnixOptions) -> None:
    """SO_PASSCRED and SO_PEEK_OFF (buffer sizes go first, with set_buffers, before any data)."""
    with kernel_call("setsockopt"):
        sock.setsockopt(SOL_SOCKET, SO_PASSCRED, int(options.passcred))
        if options.peek_off >= 0:
            sock.setsockopt(SOL_SOCKET, SO_PEEK_OFF, options.peek_off)


# ---------------------------------------------------------------- queues


@dataclass(frozen=True, slots=True)
class Credentials:
    """SCM_CREDENTIALS of a queued message (struct ucred)."""

    pid: int
    uid: int
    gid: int


@dataclass(slots=True)
class QueuedMessage:
    """One message of a receive queue (a stream: a run of bytes up to a message that carries
    descriptors or other credentials, where the kernel's reads stop too)."""

    data: bytes
    fds: list[int] = field(default_factory=list)  # our copies of the descriptors in flight
    credentials: Credentials | None = None  # only when the receiver has SO_PASSCRED
    source: bytes = b""  # a datagram's sender address (sun_path), b"" if unbound


def peek_queue(
    sock: socket.socket,
    kind: socket.SocketKind,
    shut_for_reading: bool,
) -> list[QueuedMessage]:
    """Every message queued to be read from `sock`, left in place, the peek offset put back.

    The caller owns the descriptors the messages carry. `shut_for_reading`: the socket has
    RCV_SHUTDOWN, when an empty queue reads as end of file rather than EAGAIN (a
    zero-length datagram of such a socket is not told apart from the end then, and ends
    the queue).

    A zero-length datagram is returned by one peek, which marks it peeked, and passed by
    every peek at an offset after that (__skb_try_recv_from_queue: measured on 6.18). So
    each one is seen once as the walk goes, except one the process peeked itself: the
    head of the queue is peeked first without an offset, which marks it, and kept if it
    is one (a process peeking at offsets of its own may have marked others further on:
    those are not seen).
    """
    with kernel_call("getsockopt"):
        saved = sock.getsockopt(SOL_SOCKET, SO_PEEK_OFF)
    messages: list[QueuedMessage] = []
    try:
        if kind != socket.SOCK_STREAM and not shut_for_reading:
            with kernel_call("setsockopt"):
                sock.setsockopt(SOL_SOCKET, SO_PEEK_OFF, -1)
            head = _peek_one(sock, kind)
            if head is not None and not head.data:
                messages.append(head)
            elif head is not None:
                close_all(head.fds)
        with kernel_call("setsockopt"):
            sock.setsockopt(SOL_SOCKET, SO_PEEK_OFF, 0)
        while True:
            message = _peek_one(sock, kind)
            if message is None or (not message.data and shut_for_reading and not message.fds):
                break
            if kind == socket.SOCK_STREAM and message.fds and len(message.data) > 1:
                # A peek goes on to the next message that carries descriptors and stops
                # after it, and no peek tells where it began (a 1-byte peek of any byte
                # before it reports its descriptors too: measured on 6.18): the
                # descriptors are put on the last byte, so a read of the bytes before
                # never takes (and drops) them.
                before = QueuedMessage(message.data[:-1], credentials=message.credentials)
                _append(messages, before)
                message.data = message.data[-1:]
            if kind == socket.SOCK_STREAM:
                _append(messages, message)
            else:
                messages.append(message)
    except BaseException:
        for message in messages:
            close_all(message.fds)
        raise
    finally:
        with kernel_call("setsockopt"):
            sock.setsockopt(SOL_SOCKET, SO_PEEK_OFF, saved)
    return messages


def _append(stream: list[QueuedMessage], message: QueuedMessage) -> None:
    """Add a run of a stream's bytes, joined to the run before when nothing tells them apart."""
    last = stream[-1] if stream else None
    if last and not last.fds and not message.fds and last.credentials == message.credentials:
        last.data += message.data
    else:
        stream.append(message)


_ANCILLARY = socket.CMSG_SPACE(SCM_MAX_FD * 4) + socket.CMSG_SPACE(UCRED.size)
_PEEK = socket.MSG_PEEK | socket.MSG_DONTWAIT | socket.MSG_CMSG_CLOEXEC


def _peek_one(sock: socket.socket, kind: socket.SocketKind) -> QueuedMessage | None:
    try:
        with kernel_call("recvmsg"):
            if kind == socket.SOCK_STREAM:
                data, ancillary, flags, source = sock.recvmsg(STREAM_CHUNK, _ANCILLARY, _PEEK)
            else:
                data, ancillary, flags, source = _peek_datagram(sock)
    except HijackError as error:
        if error.errno == errno_codes.EAGAIN:
            return None
        raise
    message = QueuedMessage(data, source=_source_name(source))
    for level, ancillary_type, payload in ancillary:
        if level != SOL_SOCKET:
            continue
        if ancillary_type == socket.SCM_RIGHTS:
            count = len(payload) // 4
            message.fds.extend(struct.unpack(f"={count}i", payload[: count * 4]))
        elif ancillary_type == socket.SCM_CREDENTIALS:
            message.credentials = Credentials(*UCRED.unpack_from(payload))
    if flags & socket.MSG_CTRUNC:
        close_all(message.fds)
        raise HijackError("a queued message carries more descriptors than one read can take")
    if kind == socket.SOCK_STREAM and not data and not message.fds:
        return None  # end of file
    return message


def _peek_datagram(sock: socket.socket) -> tuple[bytes, list[tuple[int, int, bytes]], int, object]:
    """Peek the next datagram whole. A first peek with no room and MSG_TRUNC tells its length
    (the offset stays); a zero-length one is all there is then: a second peek would pass it."""
    length, ancillary, flags, source = sock.recvmsg_into(
        [bytearray()], _ANCILLARY, _PEEK | socket.MSG_TRUNC
    )
    if length == 0:
        return b"", ancillary, flags, source
    for level, ancillary_type, payload in ancillary:
        if level == SOL_SOCKET and ancillary_type == socket.SCM_RIGHTS:
            close_all(struct.unpack(f"={len(payload) // 4}i", payload[: len(payload) // 4 * 4]))
    return sock.recvmsg(length, _ANCILLARY, _PEEK)


def _source_name(source: object) -> bytes:
    if isinstance(source, str):
        return os.fsencode(source)
    return source if isinstance(source, bytes) else b""


def close_all(fds: Sequence[int]) -> None:
    for fd in fds:
        os.close(fd)


def send_message(sock: socket.socket, message: QueuedMessage, to: str | bytes = b"") -> None:
    """Queue `message` again from `sock` (to address `to` for an unconnected datagram socket),
    without blocking: it fitted in the queue before, it must fit again.

    Credentials are given as they were (root may name any existing process); a sender
    process that no longer exists is replaced by this one.
    """
    ancillary = []
    if message.fds:
        ancillary.append(
            (SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"={len(message.fds)}i", *message.fds))
        )
    credentials = message.credentials
    if credentials is not None and credentials.pid > 0:
        packed = UCRED.pack(credentials.pid, credentials.uid, credentials.gid)
        ancillary.append((SOL_SOCKET, socket.SCM_CREDENTIALS, packed))
    address = (to,) if to else ()
    with kernel_call("sendmsg", what="a queued message sent again"):
        try:
            sent = sock.sendmsg([message.data], ancillary, socket.MSG_DONTWAIT, *address)
        except ProcessLookupError:
            sent = sock.sendmsg([message.data], ancillary[:1], socket.MSG_DONTWAIT, *address)
    if sent != len(message.data):
        raise HijackError(f"a queued message sent again was cut: {sent} of {len(message.data)}")


def bind_address(name: bytes) -> str | bytes:
    """The address the socket module takes for sun_path `name` (abstract ones are bytes)."""
    return name if name.startswith(b"\0") else os.fsdecode(name)
