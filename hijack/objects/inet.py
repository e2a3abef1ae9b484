"""TCP and UDP sockets that no other kind rebuilds: a listener listens again on its address
(clients waiting in its accept queue are lost); a TCP socket that is no connection (never
bound, or bound and neither listening nor connected) is made and bound again; any other is
refused, unless the process's shadow keeps it. Connections are hijack.objects.tcp's, UDP
sockets hijack.objects.udp's (when the dump reads connections)."""

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
    SETTABLE_STATUS_FLAGS,
    DumpContext,
    Kind,
    RestoreContext,
    describe_fd,
)
from hijack.sys import procfs

TCP_LISTEN, TCP_CLOSE = 10, 7  # the kernel's TCP state numbers
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
        rebuilt = found.type == socket.SOCK_STREAM and found.state_number in (TCP_LISTEN, TCP_CLOSE)
        if dump.connections and rebuilt:
            # A restore rebuilds it (a move relays it: its image holds no options).
            with socket.socket(fileno=os.dup(dump.copy_fd(entry.fd))) as sock:
                sockopts.dump_options(sock, object_id, entry.ino, dump)
        return object_id

    def refusal(self, descriptor: rec.FileDescriptor, image: ImageFiles) -> str | None:
        sock = image.object_of(descriptor, rec.InetSocket)
        if is_listener(sock) or is_unconnected(sock):
            return None
        return f"fd {descriptor.fd} (socket {describe_socket(sock)})"

    def restore(self, descriptor: rec.FileDescriptor, restore: RestoreContext) -> None:
        """A TCP socket listening or no connection, bound to the image's address again (if it
        was), with its options and status flags."""
        sock = restore.image.object_of(descriptor, rec.InetSocket)
        stub = restore.stub
        restore.place(stub.call("socket", sock.family, sock.type, sock.protocol), descriptor)
        options = sockopts.options_of(restore.image, sock.id)
        set_option, attach = sockopts.stub_setters(stub, descriptor.fd)
        sockopts.set_early(options, set_option)
        if is_listener(sock):
            # The old socket's accepted connections may linger in TIME_WAIT.
            set_option(socket.SOL_SOCKET, socket.SO_REUSEADDR, struct.pack("<i", 1))
        stub.reset_scratch()
        if endpoint(sock.local_address)[1]:
            address = sockaddr(sock.family, sock.local_address)
            bound = stub.try_call("bind", descriptor.fd, stub.put(address), len(address))
            if bound < 0:
                hint = " (does the original still run?)" if -bound == errno.EADDRINUSE else ""
                again = "listen again on" if is_listener(sock) else "bind again to"
                raise RestoreError(
                    f"cannot {again} {sock.local_address} for {describe_fd(descriptor)}:"
                    f" {os.strerror(-bound)}{hint}"
                )
        sockopts.set_late(options, set_option, attach)
        sockopts.set_reuse(options, set_option)  # as it was, now that it is bound
        if is_listener(sock):
            stub.call("listen", descriptor.fd, LISTEN_BACKLOG)
        stub.call("fcntl", descriptor.fd, F_SETFL, descriptor.flags & SETTABLE_STATUS_FLAGS)

    def describe(self, descriptor: rec.FileDescriptor, image: ImageFiles) -> str:
        sock = image.object_of(descriptor, rec.InetSocket)
        return describe_socket(sock) + sockopts.describe_options(image, sock.id)
