"""UDP and UDP-Lite sockets (IPv4 and IPv6): bound, connected, with the datagrams not yet
read (UDP-Lite's checksum coverage options are SocketOptions).

At dump, a copy of the socket tells its addresses, and its receive queue is
peeked (hijack.sys.datagrams: nothing is consumed, the process runs on after a
plain dump). The restorer makes the socket again: bound to the same address,
its datagrams sent back to it from their original senders (a raw socket writes
their headers), connected last (a connected socket takes only its peer's),
then given to the process.

A `dump --kill` locks every UDP socket bound to a port (hijack.sys.netlock, from
hijack.objects.tcp.NetworkLocks) until the restore has made it again: the
datagrams sent to it meanwhile are dropped, so the kernel answers none with an
ICMP port unreachable (a connected peer would get ECONNREFUSED and might give
up). They are lost, as on a lossy network: nothing holds the socket while the
process is gone (the datagrams queued at the dump are in the image). A move
relays UDP through its shadow instead (hijack.node.move): its images hold no
UdpSocket.
"""

from __future__ import annotations

import errno
import functools
import os
import socket

from hijack import lockbook
from hijack.errors import RestoreError
from hijack.image import records as rec
from hijack.image.files import ImageFiles
from hijack.objects import sockopts
from hijack.objects.base import DumpContext, Kind, RestoreContext, describe_fd
from hijack.objects.inet import endpoint
from hijack.sys import datagrams, netlock, procfs

IPPROTO_UDPLITE = 136


def _is_udp(family: int, kind: int, protocol: int) -> bool:
    return (
        family in (socket.AF_INET, socket.AF_INET6)
        and kind == socket.SOCK_DGRAM
        and protocol in (socket.IPPROTO_UDP, IPPROTO_UDPLITE)
    )


def udp_lock_ends(
    found: procfs.SocketInfo,
) -> tuple[netlock.Endpoint, netlock.Endpoint | None] | None:
    """The ends of the network lock of a UDP socket: (local, peer or None when not
    connected); None for another socket, or one bound to no port (nothing reaches it)."""
    if not _is_udp(found.family, found.type, found.protocol):
        return None
    local, remote = endpoint(found.local), endpoint(found.remote)
    if not local[1]:
        return None
    return local, remote if remote[1] else None


def _copy(entry: procfs.FdEntry, dump: DumpContext) -> socket.socket:
    """A socket object of our own on a copy of the process's socket `entry`."""
    return socket.socket(fileno=os.dup(dump.copy_fd(entry.fd)))


def _unbound(family: int) -> str:
    return "[::]:0" if family == socket.AF_INET6 else "0.0.0.0:0"


class Udp(Kind):
    name = "udp"
    record_types = (rec.UdpSocket,)

    def claims(self, entry: procfs.FdEntry, dump: DumpContext) -> bool:
        found = dump.socket_of(entry)
        return found is not None and _is_udp(found.family, found.type, found.protocol)

    def dump(self, entry: procfs.FdEntry, info: procfs.FdInfo, dump: DumpContext) -> int:
        with _copy(entry, dump) as sock:
            local = datagrams.endpoint_text(sock.getsockname())
            try:
                remote = datagrams.endpoint_text(sock.getpeername())
            except OSError as error:
                if error.errno != errno.ENOTCONN:
                    raise
                remote = ""
            queue = datagrams.read_queue(sock)
            record = functools.partial(
                rec.UdpSocket,
                family=sock.family,
                protocol=sock.proto,
                local_address=local,
                remote_address=remote,
                queue=tuple(rec.QueuedDatagram(length=len(d.data), source=d.source) for d in queue),
            )
            object_id = dump.add_object(("socket", entry.ino), lambda id: record(id=id))
            dump.add_data(object_id, b"".join(d.data for d in queue))
            sockopts.dump_options(sock, object_id, entry.ino, dump)
        return object_id

    def restore(self, descriptor: rec.FileDescriptor, restore: RestoreContext) -> None:
        udp = restore.image.object_of(descriptor, rec.UdpSocket)
        queue = _queue(udp, restore.image.data(udp.id), descriptor)
        options = sockopts.options_of(restore.image, udp.id)
        with socket.socket(udp.family, socket.SOCK_DGRAM, udp.protocol) as sock:
            set_option, attach = sockopts.our_setters(sock)
            try:
                sockopts.set_early(options, set_option)
                if endpoint(udp.local_address)[1]:
                    sock.bind(endpoint(udp.local_address))
                datagrams.fill_queue(udp.local_address, queue, udp.protocol)
                if udp.remote_address:
                    sock.connect(endpoint(udp.remote_address))
                sockopts.set_late(options, set_option, attach)
            except OSError as error:
                hint = " (does the original still run?)" if error.errno == errno.EADDRINUSE else ""
                raise RestoreError(
                    f"cannot make the UDP socket {udp.local_address} of {describe_fd(descriptor)}"
                    f" again: {error.strerror}{hint}"
                ) from None
            refilled = len(datagrams.read_queue(sock))
            if refilled < len(queue):
                raise RestoreError(
                    f"only {refilled} of the {len(queue)} datagrams queued on"
                    f" {describe_fd(descriptor)} could be queued again"
                )
            restore.give(sock.fileno(), descriptor)

    def finish(self, descriptor: rec.FileDescriptor, restore: RestoreContext) -> None:
        # The socket exists again: let datagrams reach it (none if it was not locked).
        udp = restore.image.object_of(descriptor, rec.UdpSocket)
        local = endpoint(udp.local_address)
        if local[1]:
            remote = endpoint(udp.remote_address) if udp.remote_address else None
            lockbook.unlock(restore.stub.pid, local, remote, socket.IPPROTO_UDP)

    def describe(self, descriptor: rec.FileDescriptor, image: ImageFiles) -> str:
        udp = image.object_of(descriptor, rec.UdpSocket)
        bound = "unbound" if udp.local_address == _unbound(udp.family) else udp.local_address
        connected = f" -> {udp.remote_address}" if udp.remote_address else ""
        size = sum(d.length for d in udp.queue)
        queued = f"{len(udp.queue)} datagrams ({size} bytes) queued"
        lite = "UDP-Lite " if udp.protocol == IPPROTO_UDPLITE else ""
        return f"{lite}{bound}{connected}, {queued}{sockopts.describe_options(image, udp.id)}"


def _queue(
    udp: rec.UdpSocket, data: bytes, descriptor: rec.FileDescriptor
) -> list[datagrams.Datagram]:
    if len(data) != sum(d.length for d in udp.queue):
        raise RestoreError(
            f"the queue of {describe_fd(descriptor)} holds {len(data)} bytes, not the"
            f" {sum(d.length for d in udp.queue)} its datagrams add up to"
        )
    queue, offset = [], 0
    for queued in udp.queue:
        queue.append(datagrams.Datagram(queued.source, data[offset : offset + queued.length]))
        offset += queued.length
    return queue
