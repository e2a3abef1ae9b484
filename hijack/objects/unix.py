"""Unix domain sockets — stream, datagram, seqpacket — rebuilt with what is queued in them.

Dump: sock_diag (hijack.sys.unix_socket) tells each socket's type, state, name, peer,
accept queue and shutdown state; a copy of its descriptor gives its options and, by
peeking (the process runs on after a plain dump), its receive queue: the messages with
their boundaries, credentials and the descriptors in flight (SCM_RIGHTS), which are
dumped as descriptors of their own kinds. One UnixSocket record per socket, keyed by its
inode; peers and accept queues name sockets by inode.

Restore: the sockets are made in the restorer and given to the stub. Two connected ends
in the image become a socketpair; a listener is bound to its name again (a stale socket
file left by the dumped process is replaced), its accepted connections are connected
and accepted again, and the clients of its accept queue that are in the image connect
to it again, in order; a datagram socket connected to a name outside (/dev/log)
connects to it again. Each receive queue is sent again by the socket's peer (or, for a
bound datagram socket, by the socket of the image that sent each datagram, else a
socket of ours), then options, then shutdown. A move makes socketpairs again at the
destination the same way (pairs_inside) instead of relaying them.

Refused: a stream or seqpacket socket whose peer is outside the image (the process's
shadow keeps it when attached); bytes a client sent on a connection not yet accepted
(no descriptor reaches them); a queue of more than 8 MiB; a relative name whose socket
file is not in the process's cwd. A name relative to the cwd is bound again from that
directory (the image keeps it), so getsockname() gives the same relative name.
Zero-length datagrams are kept, in order (how a peek passes them:
hijack.sys.unix_socket.peek_queue).
"""

from __future__ import annotations

import errno
import os
import socket
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from hijack import objects
from hijack.errors import HijackError, RestoreError
from hijack.image import records as rec
from hijack.image.files import ImageFiles
from hijack.objects.base import O_NONBLOCK, DumpContext, Kind, RestoreContext, describe_fd
from hijack.restore.shared import TreeShared
from hijack.sys import procfs
from hijack.sys import unix_socket as kernel
from hijack.sys.unix_socket import TCP_ESTABLISHED, TCP_LISTEN

SHUTDOWN_HOW = {
    kernel.RCV_SHUTDOWN: socket.SHUT_RD,
    kernel.SEND_SHUTDOWN: socket.SHUT_WR,
    kernel.RCV_SHUTDOWN | kernel.SEND_SHUTDOWN: socket.SHUT_RDWR,
}
TYPE_NAMES: dict[int, str] = {
    socket.SOCK_STREAM: "stream",
    socket.SOCK_DGRAM: "datagram",
    socket.SOCK_SEQPACKET: "seqpacket",
}
# Bytes of a socket's queue an image takes: the record holding them is one section
# (at most 16 MiB of metadata, docs/crf.md §6).
MAX_QUEUED = 8 << 20
# A sender of ours for queued datagrams: their bytes count against its buffer until read.
SENDER_BUFFER = 64 << 20


class Unix(Kind):
    name = "unix"
    record_types = (rec.UnixSocket,)

    def claims(self, entry: procfs.FdEntry, dump: DumpContext) -> bool:
        return entry.kind is procfs.FdKind.SOCKET and entry.ino in dump.unix_sockets()

    def dump(self, entry: procfs.FdEntry, info: procfs.FdInfo, dump: DumpContext) -> int:
        return _dump_socket(dump.unix_sockets()[entry.ino], dump.copy_fd(entry.fd), dump)

    def refusal(self, descriptor: rec.FileDescriptor, image: ImageFiles) -> str | None:
        reason = socket_refusal(image.object_of(descriptor, rec.UnixSocket), image)
        return None if reason is None else f"{describe_fd(descriptor)}, {reason}"

    def restore(self, descriptor: rec.FileDescriptor, restore: RestoreContext) -> None:
        restore.give(
            _build(restore.image.object_of(descriptor, rec.UnixSocket), restore), descriptor
        )

    def describe(self, descriptor: rec.FileDescriptor, image: ImageFiles) -> str:
        return describe_socket(image.object_of(descriptor, rec.UnixSocket), image)


# ---------------------------------------------------------------- dump


def _dump_socket(diag: kernel.UnixDiag, fd: int, dump: DumpContext) -> int:
    """The object id of socket `diag`, read through `fd` (a copy the caller closes)."""

    def make(object_id: int) -> rec.UnixSocket:
        table = dump.unix_sockets()
        refusal = _dump_refusal(diag, table)
        messages: tuple[rec.UnixMessage, ...] = ()
        with _wrapped(fd) as sock:
            options = kernel.read_options(sock)
            if not diag.listening and not refusal:
                messages, refusal = _read_queue(diag, sock, dump)
        bound_in = _bound_in(diag, dump)
        if diag.name and not diag.name.startswith((b"/", b"\0")) and not bound_in:
            refusal = refusal or (
                f"bound to {os.fsdecode(diag.name)!r}, relative to a directory other than its cwd"
            )
        file_mode, file_uid, file_gid = _socket_file(diag, _file_path(diag.name, bound_in))
        return rec.UnixSocket(
            id=object_id,
            inode=diag.inode,
            type=diag.type,
            state=diag.state,
            shutdown=diag.shutdown,
            passcred=options.passcred,
            peek_off=options.peek_off,
            sndbuf=options.sndbuf,
            rcvbuf=options.rcvbuf,
            backlog=diag.wqueue if diag.listening else 0,
            peer=diag.peer,
            file_mode=file_mode,
            file_uid=file_uid,
            file_gid=file_gid,
            name=diag.name,
            peer_name=_peer_name(diag, table),
            queue=diag.icons,
            messages=messages,
            refusal=refusal,
            bound_in=bound_in,
        )

    return dump.add_object(("unix", diag.inode), make)


def _read_queue(
    diag: kernel.UnixDiag, sock: socket.socket, dump: DumpContext
) -> tuple[tuple[rec.UnixMessage, ...], str]:
    """The socket's receive queue, peeked, its descriptors in flight dumped; or why it
    cannot be (and no message)."""
    try:
        queued = kernel.peek_queue(sock, diag.type, bool(diag.shutdown & kernel.RCV_SHUTDOWN))
    except HijackError as error:
        return (), f"whose queue cannot be read: {error}"
    try:
        size = sum(len(message.data) for message in queued)
        if size > MAX_QUEUED:
            return (), f"whose queue of {size} bytes is more than an image holds"
        return tuple(_dump_message(message, dump) for message in queued), ""
    finally:
        for message in queued:
            kernel.close_all(message.fds)


def _bound_in(diag: kernel.UnixDiag, dump: DumpContext) -> str:
    """For a name bound relative to the cwd of the time: the process's cwd if the socket's
    file (UNIX_DIAG_VFS) is there under that name; else ""."""
    if not diag.name or diag.name.startswith((b"/", b"\0")) or diag.vfs is None:
        return ""
    cwd = procfs.read_cwd(dump.pid)
    try:
        found = os.lstat(os.path.join(os.fsencode(cwd), diag.name))
    except OSError:
        return ""
    return cwd if (found.st_dev, found.st_ino) == diag.vfs else ""


def _file_path(name: bytes, bound_in: str) -> bytes:
    """Where the socket file of sun_path `name` is: a relative name, in `bound_in`."""
    return os.path.join(os.fsencode(bound_in), name) if bound_in else name


def _socket_file(diag: kernel.UnixDiag, path: bytes) -> tuple[int, int, int]:
    """st_mode, st_uid and st_gid of the socket file at `path` a path name made, if it is
    still the socket's; zeros otherwise (gone: made again at restore)."""
    if diag.vfs is None or not path.startswith(b"/"):
        return 0, 0, 0
    try:
        found = os.lstat(path)
    except OSError:
        return 0, 0, 0
    if (found.st_dev, found.st_ino) != diag.vfs:
        return 0, 0, 0
    return found.st_mode, found.st_uid, found.st_gid


def _listener_of(inode: int, table: dict[int, kernel.UnixDiag]) -> kernel.UnixDiag | None:
    """The listener in whose accept queue the connection of client `inode` waits."""
    return next((found for found in table.values() if inode in found.icons), None)


def _peer_name(diag: kernel.UnixDiag, table: dict[int, kernel.UnixDiag]) -> bytes:
    if diag.peer:
        peer = table.get(diag.peer)
        return peer.name if peer is not None else b""
    if diag.state == TCP_ESTABLISHED and diag.type != socket.SOCK_DGRAM:
        listener = _listener_of(diag.inode, table)
        return listener.name if listener is not None else b""
    return b""


def _dump_refusal(diag: kernel.UnixDiag, table: dict[int, kernel.UnixDiag]) -> str:
    waiting = diag.peer == 0 and diag.state == TCP_ESTABLISHED and diag.type != socket.SOCK_DGRAM
    if waiting and diag.wqueue and _listener_of(diag.inode, table) is not None:
        return "whose bytes wait in a connection its listener has not accepted yet"
    return ""


def _dump_message(message: kernel.QueuedMessage, dump: DumpContext) -> rec.UnixMessage:
    rights = tuple(
        objects.dump_in_flight(fd, number, dump) for number, fd in enumerate(message.fds)
    )
    credentials = message.credentials
    return rec.UnixMessage(
        data=message.data,
        source=message.source,
        credentials=None
        if credentials is None
        else rec.UnixCredentials(pid=credentials.pid, uid=credentials.uid, gid=credentials.gid),
        rights=rights,
    )


@contextmanager
def _wrapped(fd: int) -> Iterator[socket.socket]:
    """A socket object over descriptor `fd` that leaves it open."""
    sock = socket.socket(fileno=fd)
    try:
        yield sock
    finally:
        sock.detach()


def pairs_inside(pid: int, inodes: set[int]) -> set[int]:
    """Of the sockets `inodes` of process `pid`, the unix ones that a restore makes again
    wherever it runs: unnamed pairs (socketpairs) whose two ends are both among them."""
    table = kernel.unix_sockets(pid)
    inside = set()
    for inode in inodes:
        found = table.get(inode)
        peer = table.get(found.peer) if found is not None and found.peer else None
        if (
            found is not None
            and peer is not None
            and peer.peer == inode
            and peer.inode in inodes
            and not found.name
            and not peer.name
        ):
            inside.add(inode)
    return inside


# ---------------------------------------------------------------- refusal and show


@dataclass(frozen=True)
class _Index:
    """The image's unix sockets looked up as the checks and the restore need them."""

    by_inode: dict[int, rec.UnixSocket]
    waiting_at: dict[int, rec.UnixSocket]  # a waiting client's inode -> its listener
    named: dict[tuple[bytes, int], rec.UnixSocket]  # (name, type) -> a listener, or a
    #                                                 datagram socket bound to it


def _index(image: ImageFiles) -> _Index:
    """The index of `image`'s unix sockets, made once and kept with the image: every
    descriptor asks, and a process may hold thousands of sockets."""
    kept = vars(image).get("_unix_index")
    if isinstance(kept, _Index):
        return kept
    sockets = [o for o in image.objects.values() if isinstance(o, rec.UnixSocket)]
    index = _Index(
        {sock.inode: sock for sock in sockets},
        {client: sock for sock in sockets for client in sock.queue},
        {
            (sock.name, sock.type): sock
            for sock in sockets
            if sock.name and (sock.state == TCP_LISTEN or sock.type == socket.SOCK_DGRAM)
        },
    )
    object.__setattr__(image, "_unix_index", index)  # ImageFiles is frozen, not slotted
    return index


def _sockets_by_inode(image: ImageFiles) -> dict[int, rec.UnixSocket]:
    return _index(image).by_inode


def _waiting_at(sock: rec.UnixSocket, image: ImageFiles) -> rec.UnixSocket | None:
    """The listener of the image whose accept queue holds `sock`'s connection."""
    return _index(image).waiting_at.get(sock.inode)


def socket_refusal(
    sock: rec.UnixSocket, image: ImageFiles, seen: frozenset[int] = frozenset()
) -> str | None:
    """Why `sock` cannot be rebuilt from the image alone, or None. `seen`: the sockets
    whose queues carry it in flight (a socket may carry itself)."""
    if sock.refusal:
        return f"a unix socket {sock.refusal}"
    sockets = _sockets_by_inode(image)
    connected = sock.type != socket.SOCK_DGRAM and sock.state == TCP_ESTABLISHED
    peer_outside = sock.peer != 0 and sock.peer not in sockets
    queued_outside = sock.peer == 0 and sock.peer_name and _waiting_at(sock, image) is None
    if connected and (peer_outside or queued_outside):
        return (
            f"a unix {TYPE_NAMES.get(sock.type, 'stream')} socket connected to a peer outside"
            f" the process{_named(sock.peer_name)}"
        )
    if sock.type == socket.SOCK_DGRAM and sock.peer and not sock.peer_name and peer_outside:
        return "a unix datagram socket connected to an unnamed socket outside the process"
    if (
        sock.type == socket.SOCK_DGRAM
        and sock.messages
        and not sock.name
        and sock.peer not in sockets
    ):
        return "an unnamed unix datagram socket with datagrams from outside the process queued"
    for message in sock.messages:
        for right in message.rights:
            carried = image.objects.get(right.object_id)
            if isinstance(carried, rec.UnixSocket):
                if carried.id in seen or carried.id == sock.id:
                    continue
                inner = socket_refusal(carried, image, seen | {sock.id})
                reason = None if inner is None else f"{describe_fd(right)}, {inner}"
            else:
                reason = objects.kind_of(right, image).refusal(right, image)
            if reason is not None:
                return f"a unix socket carrying in flight {reason}"
    return None


def _named(name: bytes) -> str:
    return f" ({_show_name(name)})" if name else ""


def _show_name(name: bytes) -> str:
    return "@" + os.fsdecode(name[1:]) if name.startswith(b"\0") else os.fsdecode(name)


def describe_socket(sock: rec.UnixSocket, image: ImageFiles) -> str:
    """ "stream listening on /run/x.sock, 1 connection waiting", "datagram @name, 2 queued"."""
    words = [TYPE_NAMES.get(sock.type, f"type {sock.type}")]
    if sock.state == TCP_LISTEN:
        words.append(f"listening on {_show_name(sock.name)}")
        words.append(f"{len(sock.queue)} connection(s) waiting")
    else:
        if sock.name:
            words.append(_show_name(sock.name))
        if sock.peer in _sockets_by_inode(image):
            words.append("connected inside the process")
        elif sock.peer_name:
            words.append(f"connected to {_show_name(sock.peer_name)}")
        elif sock.state == TCP_ESTABLISHED and sock.type != socket.SOCK_DGRAM:
            words.append("peer closed")
        if sock.messages:
            rights = sum(len(message.rights) for message in sock.messages)
            size = sum(len(message.data) for message in sock.messages)
            words.append(f"{len(sock.messages)} message(s) of {size} bytes queued")
            if rights:
                words.append(f"{rights} descriptor(s) in flight")
    if sock.shutdown:
        words.append(f"shutdown {sock.shutdown}")
    return ", ".join(words)


# ---------------------------------------------------------------- restore


def _build(sock: rec.UnixSocket, restore: RestoreContext) -> int:
    """Our descriptor of `sock`, made (with whatever it is connected to) once per restore."""
    made = restore.built(sock.id)
    if made is not None:
        return made
    image = restore.image
    sockets = _sockets_by_inode(image)
    peer = sockets.get(sock.peer) if sock.peer else None
    if sock.state == TCP_LISTEN:
        _build_listener(sock, restore)
    elif (listener := _waiting_at(sock, image) or _accepting(sock, image)) is not None:
        _build_listener(listener, restore)
    elif sock.type == socket.SOCK_DGRAM:
        if peer is not None and peer.peer == sock.inode and not sock.name and not peer.name:
            _build_pair(sock, peer, restore)
        else:
            _build_datagram(sock, peer, restore)
    elif peer is not None:
        _build_pair(sock, peer, restore)
    elif sock.state == TCP_ESTABLISHED:
        _build_pair(sock, None, restore)  # its peer closed: made, then closed again
    else:
        made_fd = _new_socket(sock, restore)
        _bind(sock, made_fd)
        _finish(sock, made_fd)
    made = restore.built(sock.id)
    if made is None:
        raise RestoreError(f"unix socket {sock.inode} was not made")
    return made


def _new_socket(sock: rec.UnixSocket, restore: RestoreContext) -> int:
    made = socket.socket(socket.AF_UNIX, sock.type)
    fd = made.detach()
    restore.keep(sock.id, fd)
    with _wrapped(fd) as wrapped:
        kernel.set_buffers(wrapped, sock.sndbuf, sock.rcvbuf)
    return fd


def _build_pair(one: rec.UnixSocket, other: rec.UnixSocket | None, restore: RestoreContext) -> None:
    """Two ends connected to each other (`other` None: an end whose peer closed)."""
    left, right = socket.socketpair(socket.AF_UNIX, one.type)
    one_fd = left.detach()
    restore.keep(one.id, one_fd)
    _connected(one, one_fd, other, right.detach(), restore)


def _connected(
    one: rec.UnixSocket,
    one_fd: int,
    other: rec.UnixSocket | None,
    other_fd: int,
    restore: RestoreContext,
) -> None:
    """Two connected ends made (`one` kept already): each one's queue sent again by the
    other, then their options and shutdown. `other` None: an end that stands in for a peer
    that closed, closed once it has sent."""
    if other is not None:
        restore.keep(other.id, other_fd)
    with _wrapped(one_fd) as ours, _wrapped(other_fd) as theirs:
        kernel.set_buffers(ours, one.sndbuf, one.rcvbuf)
        if other is not None:
            kernel.set_buffers(theirs, other.sndbuf, other.rcvbuf)
            _fill(other, ours, restore)
        else:
            kernel.set_buffers(theirs, SENDER_BUFFER, one.rcvbuf)
        _fill(one, theirs, restore)
    if other is not None:
        _finish(other, other_fd)
    else:
        os.close(other_fd)
    _finish(one, one_fd)


def _build_listener(listener: rec.UnixSocket, restore: RestoreContext) -> None:
    """A listener bound and listening again; then the connections it had accepted (connected
    and accepted again, so their accepted ends carry its name); then its waiting ones."""
    fd = _new_socket(listener, restore)
    _bind(listener, fd)
    with _wrapped(fd) as sock:
        sock.listen(listener.backlog)
    _finish(listener, fd)
    sockets = _sockets_by_inode(restore.image)
    for accepted in _accepted_by(listener, sockets):
        if restore.built(accepted.id) is not None:
            continue
        client = sockets.get(accepted.peer) if accepted.peer else None
        if accepted.peer and client is None:
            continue  # its client is outside: refused, or the shadow keeps it
        client_fd = _client(client, listener, restore)
        with _wrapped(fd) as sock:
            made, _ = sock.accept()
        accepted_fd = made.detach()
        restore.keep(accepted.id, accepted_fd)
        _connected(accepted, accepted_fd, client, client_fd, restore)
    for inode in listener.queue:
        client = sockets.get(inode)
        if client is None:
            continue  # a client outside the process: its connection is lost with it
        _finish(client, _client(client, listener, restore))


def _client(
    client: rec.UnixSocket | None, listener: rec.UnixSocket, restore: RestoreContext
) -> int:
    """A socket connected to `listener`: `client` made again (kept), or one of ours."""
    if client is None:
        fd = socket.socket(socket.AF_UNIX, listener.type).detach()
    else:
        fd = _new_socket(client, restore)
        _bind(client, fd)
    _connect(fd, listener.name)
    return fd


def _accepted_by(
    listener: rec.UnixSocket, sockets: dict[int, rec.UnixSocket]
) -> list[rec.UnixSocket]:
    """The accepted ends of the connections `listener` accepted: they carry its name."""
    return [
        found
        for found in sockets.values()
        if found.name == listener.name
        and found.type == listener.type
        and found.state == TCP_ESTABLISHED
    ]


def _accepting(sock: rec.UnixSocket, image: ImageFiles) -> rec.UnixSocket | None:
    """The image's listener that accepted `sock`'s connection (`sock` is either end)."""
    index = _index(image)
    for end in (sock, index.by_inode.get(sock.peer)):
        if end is None or not end.name or end.state != TCP_ESTABLISHED:
            continue
        found = index.named.get((end.name, end.type))
        if found is not None and found.state == TCP_LISTEN:
            return found
    return None


def _build_datagram(
    sock: rec.UnixSocket, peer: rec.UnixSocket | None, restore: RestoreContext
) -> None:
    fd = _new_socket(sock, restore)
    _bind(sock, fd)
    # Filled before it connects: a connected datagram socket takes datagrams from its
    # peer only (the sender is ours).
    if sock.messages:
        sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        with sender:
            kernel.set_buffers(sender, SENDER_BUFFER, SENDER_BUFFER)
            _fill(sock, sender, restore, to=_file_path(sock.name, sock.bound_in))
    if peer is not None:
        _build(peer, restore)  # bound before we connect to it
        _connect(fd, peer.name)
    elif sock.peer_name:
        _connect(fd, sock.peer_name)
    _finish(sock, fd)


def _fill(
    receiver: rec.UnixSocket,
    sender: socket.socket,
    restore: RestoreContext | None,
    to: bytes = b"",
) -> None:
    """Queue `receiver`'s messages again, sent by `sender` (to `to`, a named datagram
    socket: then from the image's socket that sent each, if there is one). Without a
    `restore`, the messages carry no descriptors (joins_members)."""
    for message in receiver.messages:
        fds: list[int] = []
        owned: list[int] = []
        try:
            for right in message.rights:
                assert restore is not None
                carried = restore.image.objects.get(right.object_id)
                if isinstance(carried, rec.UnixSocket):
                    fds.append(_build(carried, restore))
                    # one file description, whoever holds it: its status flags as in flight
                    os.set_blocking(fds[-1], not right.flags & O_NONBLOCK)
                else:
                    owned.append(objects.rebuild_in_flight(right, restore))
                    fds.append(owned[-1])
            credentials = message.credentials
            queued = kernel.QueuedMessage(
                message.data,
                fds,
                None
                if credentials is None
                else kernel.Credentials(credentials.pid, credentials.uid, credentials.gid),
            )
            source = _datagram_source(message, restore) if to and restore else None
            try:
                if source is None:
                    kernel.send_message(sender, queued, kernel.bind_address(to) if to else b"")
                else:
                    with _wrapped(source) as from_source:
                        kernel.send_message(from_source, queued, kernel.bind_address(to))
            except HijackError as error:
                raise RestoreError(
                    f"cannot queue a unix socket's message again: {error}"
                ) from error
        finally:
            kernel.close_all(owned)


def _datagram_source(message: rec.UnixMessage, restore: RestoreContext) -> int | None:
    """Our descriptor of the image's datagram socket that sent `message` (found by its
    name), so the receiver reads the same sender address; None if it is not in the image."""
    found = _index(restore.image).named.get((message.source, socket.SOCK_DGRAM))
    return None if found is None or not message.source else _build(found, restore)


def _bind(sock: rec.UnixSocket, fd: int) -> None:
    if not sock.name:
        return
    path = os.fsdecode(_file_path(sock.name, sock.bound_in))
    if path.startswith("/"):
        _clear_stale_file(sock, path)
    with _wrapped(fd) as made, _in_directory(sock.bound_in):
        try:
            made.bind(kernel.bind_address(sock.name))
        except OSError as error:
            hint = " (does the original still run?)" if error.errno == errno.EADDRINUSE else ""
            raise RestoreError(
                f"cannot bind a unix socket to {_show_name(sock.name)} again: "
                f"{os.strerror(error.errno or 0)}{hint}"
            ) from error
    if sock.file_mode:
        os.chmod(path, stat.S_IMODE(sock.file_mode))
        os.chown(path, sock.file_uid, sock.file_gid)


@contextmanager
def _in_directory(directory: str) -> Iterator[None]:
    """Our cwd is `directory` for the moment (a relative name is bound from there: the
    kernel keeps the name as given); nothing changes for ""."""
    if not directory:
        yield
        return
    here = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        try:
            os.chdir(directory)
        except OSError as error:
            raise RestoreError(
                f"cannot bind a unix socket in {directory} again: {os.strerror(error.errno or 0)}"
            ) from error
        yield
    finally:
        os.fchdir(here)
        os.close(here)


def _clear_stale_file(sock: rec.UnixSocket, path: str) -> None:
    """The dumped process's socket file stays when it ends; no one listens there any more
    (a connect is refused), so it goes and a new one is made."""
    try:
        found = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(found.st_mode):
        raise RestoreError(f"cannot bind a unix socket to {path} again: it is not a socket now")
    with socket.socket(socket.AF_UNIX, sock.type) as probe:
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            os.unlink(path)
            return
        except OSError:
            pass
    raise RestoreError(
        f"cannot bind a unix socket to {path} again: it is in use (does the original still run?)"
    )


def _connect(fd: int, name: bytes) -> None:
    """Connect without ever waiting: a listener whose queue filled up meanwhile (someone
    else connected to it first) is an error, not a restore that hangs."""
    with _wrapped(fd) as made:
        made.setblocking(False)
        try:
            made.connect(kernel.bind_address(name))
        except OSError as error:
            raise RestoreError(
                f"cannot connect a unix socket to {_show_name(name)} again: "
                f"{os.strerror(error.errno or 0)}"
            ) from error
        made.setblocking(True)


def _finish(sock: rec.UnixSocket, fd: int | None) -> None:
    """Options and shutdown state, once the queues are filled."""
    if fd is None:
        return
    with _wrapped(fd) as made:
        kernel.set_options(
            made, kernel.UnixOptions(sock.passcred, sock.peek_off, sock.sndbuf, sock.rcvbuf)
        )
        if sock.shutdown in SHUTDOWN_HOW:
            try:
                made.shutdown(SHUTDOWN_HOW[sock.shutdown])
            except OSError as error:
                if error.errno != errno.ENOTCONN:
                    raise


# ---------------------------------------------------------------- pairs joining a tree's members


def joins_members(sock: rec.UnixSocket, image: ImageFiles, tree_inodes: frozenset[int]) -> bool:
    """Whether `sock` is an end of an unnamed pair (a socketpair a fork shared out) whose
    other end is not in the image but among the sockets `tree_inodes` of the other members
    of its tree: a tree's restore makes the pair once, for both (pair_ends)."""
    return (
        sock.peer in tree_inodes
        and sock.peer not in _sockets_by_inode(image)
        and not sock.name
        and not sock.peer_name
        and not sock.refusal
        and not any(message.rights for message in sock.messages)
    )


def pair_ends(image: ImageFiles, shared: TreeShared, skip: frozenset[int]) -> dict[int, int]:
    """Our descriptor of each socket of the image that joins its member to another of its
    tree, by the image's descriptor number (those in `skip` excepted): the pair made for
    the first member holding one end is the one the member holding the other gets. What a
    member of the tree may hold, the TREE does not list: a pair whose other end no member
    claims is found when the tree is rebuilt (TreeShared.unclaimed)."""
    ends = {}
    for descriptor in image.descriptors:
        sock = image.objects.get(descriptor.object_id)
        if descriptor.fd in skip or not isinstance(sock, rec.UnixSocket):
            continue
        if joins_members(sock, image, frozenset({sock.peer})):
            ends[descriptor.fd] = _pair_end(sock, shared)
    return ends


def _pair_end(sock: rec.UnixSocket, shared: TreeShared) -> int:
    made = shared.built(("unix pair", sock.inode))
    if made is None:
        # The first end: the pair is made and this end's queue filled from the other.
        left, right = socket.socketpair(socket.AF_UNIX, sock.type)
        made, other = left.detach(), right.detach()
        shared.keep(("unix pair", sock.inode), made)
        shared.keep(("unix pair", sock.peer), other)
        shared.half_made(sock)
        with _wrapped(made) as ours, _wrapped(other) as theirs:
            kernel.set_buffers(ours, SENDER_BUFFER, sock.rcvbuf)
            kernel.set_buffers(theirs, SENDER_BUFFER, sock.rcvbuf)
            _fill(sock, theirs, None)
        return made
    first = shared.complete(sock.peer)
    if first is not None:
        # The other end, first asked: its queue filled from the first, then the options
        # and shutdown of both (a shutdown first would have stopped the filling).
        first_end = shared.built(("unix pair", sock.peer))
        assert first_end is not None
        with _wrapped(made) as ours, _wrapped(first_end) as theirs:
            kernel.set_buffers(ours, sock.sndbuf, sock.rcvbuf)
            _fill(sock, theirs, None)
        _finish(first, first_end)
        _finish(sock, made)
    return made
