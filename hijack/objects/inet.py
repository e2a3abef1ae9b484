"""TCP and UDP sockets that no other kind rebuilds: a listener listens again on its address
(clients waiting in its accept queue are lost); a TCP socket that is no connection (never
bound, or bound and neither listening nor connected) is made and bound again; a TCP socket
in the middle of its connect() (SYN_SENT) is made, bound to its local address and port and
connects again; any other is refused, unless the process's shadow keeps it. Connections
are hijack.objects.tcp's, UDP sockets hijack.objects.udp's (when the dump reads
connections).

Why SYN_SENT is connected again rather than repaired: the kernel lets TCP_REPAIR on only
in CLOSE and ESTABLISHED (tcp_can_repair_sock), so nothing of a socket in SYN_SENT can be
read in repair mode, its initial sequence number included; and nothing of it needs to be:
no byte has been sent or received yet. (CRIU dumps it with the connections and, at
restore, sets the old sequence number in repair mode before a plain connect(), so that a
SYN-ACK already on its way still matches; it can read that number because it stops the
SYN first.) Here the restore's connect() sends a fresh SYN from the same address and port
to the same peer: the process, which polls for POLLOUT and reads SO_ERROR, or is blocked
in a connect() that the kernel restarts (SS_CONNECTING waits on), sees the handshake end
as it would have: 0 once the peer accepts, ECONNREFUSED if it refuses. The killed socket
closed in SYN_SENT sends nothing (no FIN, no reset), so no lock is needed: a SYN-ACK for
the old SYN meets no socket and is reset, and the peer forgets it; a peer still holding
that half-open request when the new SYN arrives lets the new handshake through (tried by
hand on Linux 6.18, loopback: connected within 20 ms, no wait for a retransmission).

SYN_RECV never has a descriptor of its own: a connection being accepted lives in its
listener's queue (lost with it, as accept-queue clients are), except a TCP Fast Open
server's, which accept() returns before the handshake ends: that one is refused."""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct

from hijack.errors import RestoreError
from hijack.image import records as rec
from hijack.image.files import ImageFiles
from hijack.objects import sockopts
from hijack.objects.base import (
    F_SETFL,
    O_NONBLOCK,
    SETTABLE_STATUS_FLAGS,
    DumpContext,
    Kind,
    RestoreContext,
    describe_fd,
)
from hijack.sys import procfs

TCP_SYN_SENT, TCP_CLOSE, TCP_LISTEN = 2, 7, 10  # the kernel's TCP state numbers
LISTEN_BACKLOG = socket.SOMAXCONN  # the kernel caps it at net.core.somaxconn
SOCKADDR_IN = struct.Struct("<H2s4s8x")  # family, port (network order), address
SOCKADDR_IN6 = struct.Struct("<H2sI16sI")  # family, port, flow info, address, scope id


def endpoint(address: str) -> tuple[str, int]:
    """("1.2.3.4", 80) of "1.2.3.4:80", ("::1", 80) of "[::1]:80"."""
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def sockaddr(family: int, address: str) -> bytes:
    """struct sockaddr_in / sockaddr_in6 of "1.2.3.4:80" or "[::1]:80"."""
    host, _, port = address.rpartition(":")
    packed_port = struct.pack("!H", int(port))
    ip = ipaddress.ip_address(host.strip("[]"))
    if family == socket.AF_INET:
        return SOCKADDR_IN.pack(family, packed_port, ip.packed)
    return SOCKADDR_IN6.pack(family, packed_port, 0, ip.packed, 0)


def is_listener(sock: rec.InetSocket) -> bool:
    return sock.type == socket.SOCK_STREAM and sock.state == TCP_LISTEN


def is_unconnected(sock: rec.InetSocket) -> bool:
    """A TCP socket never bound, or bound and neither listening nor connected."""
    return sock.type == socket.SOCK_STREAM and sock.state == TCP_CLOSE


def is_connecting(sock: rec.InetSocket) -> bool:
    """A TCP socket in the middle of its connect(): its SYN sent, not yet answered."""
    return sock.type == socket.SOCK_STREAM and sock.state == TCP_SYN_SENT


def describe_socket(sock: rec.InetSocket) -> str:
    """ "tcp 127.0.0.1:8000 LISTEN", as hijack.sys.procfs.SocketInfo says it."""
    return procfs.SocketInfo(
        inode=0,
        family=socket.AddressFamily(sock.family),
        type=socket.SocketKind(sock.type),
        protocol=sock.protocol,
        state=procfs.tcp_state_name(sock.state),
        local=sock.local_address,
        remote=sock.remote_address,
    ).describe()


class Inet(Kind):
    name = "inet"
    record_types = (rec.InetSocket,)

    def claims(self, entry: procfs.FdEntry, dump: DumpContext) -> bool:
        if entry.kind is not procfs.FdKind.SOCKET:
            return False
        found = dump.socket_table().get(entry.ino)
        if found is None:  # listed nowhere: a TCP socket that is no connection, if any
            found = dump.socket_of(entry)
            if found is None or found.type != socket.SOCK_STREAM or found.state != "CLOSE":
                return False  # not TCP, or closed after a connection: refused (Other)
        return found.family in (socket.AF_INET, socket.AF_INET6)

    def dump(self, entry: procfs.FdEntry, info: procfs.FdInfo, dump: DumpContext) -> int:
        found = dump.socket_table().get(entry.ino) or dump.socket_of(entry)
        assert found is not None  # claims() found it

        def make(id: int) -> rec.InetSocket:
            return rec.InetSocket(
                id=id,
                family=found.family,
                type=found.type,
                protocol=found.protocol,
                state=found.state_number,
                local_address=found.local,
                remote_address=found.remote,
            )

        object_id = dump.add_object(("socket", entry.ino), make)
        rebuilt = found.type == socket.SOCK_STREAM and found.state_number in (
            TCP_LISTEN,
            TCP_CLOSE,
            TCP_SYN_SENT,
        )
        if dump.connections and rebuilt:
            # A restore rebuilds it (a move relays it: its image holds no options).
            with socket.socket(fileno=os.dup(dump.copy_fd(entry.fd))) as sock:
                sockopts.dump_options(sock, object_id, entry.ino, dump)
        return object_id

    def refusal(self, descriptor: rec.FileDescriptor, image: ImageFiles) -> str | None:
        sock = image.object_of(descriptor, rec.InetSocket)
        if is_listener(sock) or is_unconnected(sock) or is_connecting(sock):
            return None
        return f"fd {descriptor.fd} (socket {describe_socket(sock)})"

    def restore(self, descriptor: rec.FileDescriptor, restore: RestoreContext) -> None:
        """A TCP socket listening, no connection or connecting, bound to the image's address
        again (if it was), with its options and status flags; a connecting one connects
        again (non-blocking: the process's own connect() or poll() sees it end)."""
        sock = restore.image.object_of(descriptor, rec.InetSocket)
        stub = restore.stub
        restore.place(stub.call("socket", sock.family, sock.type, sock.protocol), descriptor)
        options = sockopts.options_of(restore.image, sock.id)
        set_option, attach = sockopts.stub_setters(stub, descriptor.fd)
        sockopts.set_early(options, set_option)
        if is_listener(sock) or is_connecting(sock):
            # The old socket's accepted connections may linger in TIME_WAIT; a connecting
            # socket's port, picked by connect(), may be another connection's too.
            set_option(socket.SOL_SOCKET, socket.SO_REUSEADDR, struct.pack("<i", 1))
        stub.reset_scratch()
        if endpoint(sock.local_address)[1]:
            address = sockaddr(sock.family, sock.local_address)
            bound = stub.try_call("bind", descriptor.fd, stub.put(address), len(address))
            if bound < 0:
                hint = " (does the original still run?)" if -bound == errno.EADDRINUSE else ""
                again = "listen again on" if is_listener(sock) else "bind again to"
                again = "connect again from" if is_connecting(sock) else again
                raise RestoreError(
                    f"cannot {again} {sock.local_address} for {describe_fd(descriptor)}:"
                    f" {os.strerror(-bound)}{hint}"
                )
        sockopts.set_late(options, set_option, attach)
        sockopts.set_reuse(options, set_option)  # as it was, now that it is bound
        if is_listener(sock):
            stub.call("listen", descriptor.fd, LISTEN_BACKLOG)
        if is_connecting(sock):
            self._connect_again(sock, descriptor, restore)
        stub.call("fcntl", descriptor.fd, F_SETFL, descriptor.flags & SETTABLE_STATUS_FLAGS)

    def _connect_again(
        self, sock: rec.InetSocket, descriptor: rec.FileDescriptor, restore: RestoreContext
    ) -> None:
        """connect() to the image's peer, the socket non-blocking for the stub's sake: the
        SYN goes out, the handshake ends later, as the process waits for it."""
        stub = restore.stub
        stub.call("fcntl", descriptor.fd, F_SETFL, O_NONBLOCK)
        stub.reset_scratch()
        peer = sockaddr(sock.family, sock.remote_address)
        started = stub.try_call("connect", descriptor.fd, stub.put(peer), len(peer))
        if started != -errno.EINPROGRESS:
            # A refusal shows in SO_ERROR after EINPROGRESS, never here: anything else
            # (EADDRNOTAVAIL, ENETUNREACH...) means the socket could not start again.
            said = os.strerror(-started) if started < 0 else "it connected at once"
            raise RestoreError(
                f"cannot connect {describe_fd(descriptor)} again from {sock.local_address}"
                f" to {sock.remote_address}: {said}"
            )

    def describe(self, descriptor: rec.FileDescriptor, image: ImageFiles) -> str:
        sock = image.object_of(descriptor, rec.InetSocket)
        return describe_socket(sock) + sockopts.describe_options(image, sock.id)
