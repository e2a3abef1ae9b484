"""UDP sockets (IPv4 and IPv6): bound, connected, with the datagrams not yet read.

At dump, a copy of the socket tells its addresses, and its receive queue is
peeked (hijack.sys.datagrams: nothing is consumed, the process runs on after a
plain dump). The restorer makes the socket again: bound to the same address,
its datagrams sent back to it from their original senders (a raw socket writes
their headers), connected last (a connected socket takes only its peer's),
then given to the process.

Datagrams sent to the socket while the process is gone (between a `dump --kill`
and the restore) are lost, as on a real network. A move relays UDP through its
shadow instead (hijack.node.move): its images hold no UdpSocket.
"""

from __future__ import annotations

import errno
import functools
import os
import socket

from hijack.errors import HijackError, RestoreError
from hijack.image import records as rec
from hijack.image.files import ImageFiles
from hijack.objects import sockopts
from hijack.objects.base import DumpContext, Kind, RestoreContext, describe_fd
from hijack.objects.inet import endpoint
from hijack.sys import datagrams, procfs


def _is_udp(family: int, kind: int, protocol: int) -> bool:
    return (
        family in (socket.AF_INET, socket.AF_INET6)
        and kind == socket.SOCK_DGRAM
        and protocol == socket.IPPROTO_UDP
    )


def _copy(entry: procfs.FdEntry, dump: DumpContext) -> socket.socket:
    """A socket object of our own on a copy of the process's socket `entry`."""
    return socket.socket(fileno=os.dup(dump.copy_fd(entry.fd)))


def _unbound(family: int) -> str:
    return "[::]:0" if family == socket.AF_INET6 else "0.0.0.0:0"


class Udp(Kind):
    name = "udp"
    record_types = (rec.UdpSocket,)

    def claims(self, entry: procfs.FdEntry, dump: DumpContext) -> bool:
        if not dump.connections or entry.kind is not procfs.FdKind.SOCKET:
            return False
        found = dump.socket_table().get(entry.ino)
        if found is not None:
            return _is_udp(found.family, found.type, found.protocol)
        # Never bound, so in no /proc/net table: ask a copy what it is.
        try:
            with _copy(entry, dump) as sock:
                return _is_udp(sock.family, sock.type, sock.proto)
        except (OSError, HijackError):
            return False

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
        with socket.socket(udp.family, socket.SOCK_DGRAM, socket.IPPROTO_UDP) as sock:
            set_option, attach = sockopts.our_setters(sock)
            try:
                sockopts.set_early(options, set_option)
                if endpoint(udp.local_address)[1]:
                    sock.bind(endpoint(udp.local_address))
                datagrams.fill_queue(udp.local_address, queue)
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

    def describe(self, descriptor: rec.FileDescriptor, image: ImageFiles) -> str:
        udp = image.object_of(descriptor, rec.UdpSocket)
        bound = "unbound" if udp.local_address == _unbound(udp.family) else udp.local_address
        connected = f" -> {udp.remote_address}" if udp.remote_address else ""
        size = sum(d.length for d in udp.queue)
        queued = f"{len(udp.queue)} datagrams ({size} bytes) queued"
        return f"{bound}{connected}, {queued}{sockopts.describe_options(image, udp.id)}"


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
