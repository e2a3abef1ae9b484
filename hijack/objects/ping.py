"""ICMP ping sockets (SOCK_DGRAM with IPPROTO_ICMP or IPPROTO_ICMPV6, as ping(8) uses them
unprivileged): made again bound to the same address and echo identifier, connected to
the same host, with their options.

At dump a copy of the socket tells its address and identifier (getsockname); the host
it is connected to only /proc/PID/net/icmp (icmp6) tells, since getpeername of a
socket connected to port 0 answers ENOTCONN. The restorer makes the socket (the group
it runs as must be in the network namespace's net.ipv4.ping_group_range, as the
original's was), binds and connects it, sets its options and gives it to the process.

Echo replies queued on it are kept. A ping socket has no SO_PEEK_OFF (EOPNOTSUPP), so
its queue cannot be read without consuming it: the dump takes them off (recvfrom on
its copy, the same socket) and puts them back at once, as the restore puts them on
the new socket: each an echo reply sent through a raw socket from its original
source to the socket's address (loopback when it is bound to none), carrying the
ICMP message recv gave (identifier, sequence, data; an ICMPv6 checksum summed again
for that address). A reply arriving from the network while the dump takes and puts
back lands before them.
"""

from __future__ import annotations

import socket

from hijack.errors import RestoreError
from hijack.image import records as rec
from hijack.image.files import ImageFiles
from hijack.objects import sockopts
from hijack.objects.base import DumpContext, Kind, RestoreContext, describe_fd
from hijack.objects.inet import endpoint
from hijack.objects.sockets import copy_socket, unlisted_socket_is
from hijack.sys import datagrams, procfs

IPPROTO_ICMPV6 = 58
PROTOCOLS: dict[int, int] = {socket.AF_INET: socket.IPPROTO_ICMP, socket.AF_INET6: IPPROTO_ICMPV6}


class Ping(Kind):
    name = "ping"
    record_types = (rec.PingSocket,)

    def claims(self, entry: procfs.FdEntry, dump: DumpContext) -> bool:
        return unlisted_socket_is(
            entry,
            dump,
            lambda sock: (
                sock.type == socket.SOCK_DGRAM and PROTOCOLS.get(sock.family) == sock.proto
            ),
        )

    def dump(self, entry: procfs.FdEntry, info: procfs.FdInfo, dump: DumpContext) -> int:
        found = procfs.read_ping_sockets(dump.pid).get(entry.ino)
        connected = found is not None and found.state == "ESTABLISHED"
        remote = endpoint(found.remote)[0] if found is not None and connected else ""
        with copy_socket(entry, dump) as sock:
            family, local = int(sock.family), datagrams.endpoint_text(sock.getsockname())
            replies = datagrams.take_queue(sock)
            datagrams.fill_ping_queue(local, replies)  # back where they were
            object_id = dump.add_object(
                ("socket", entry.ino),
                lambda id: rec.PingSocket(
                    id=id,
                    family=family,
                    local_address=local,
                    remote_address=remote,
                    queue=tuple(
                        rec.QueuedDatagram(length=len(d.data), source=d.source) for d in replies
                    ),
                ),
            )
            dump.add_data(object_id, b"".join(d.data for d in replies))
            sockopts.dump_options(sock, object_id, entry.ino, dump)
        return object_id

    def restore(self, descriptor: rec.FileDescriptor, restore: RestoreContext) -> None:
        ping = restore.image.object_of(descriptor, rec.PingSocket)
        options = sockopts.options_of(restore.image, ping.id)
        try:
            sock = socket.socket(ping.family, socket.SOCK_DGRAM, PROTOCOLS[ping.family])
        except OSError as error:
            raise RestoreError(
                f"cannot make the ping socket of {describe_fd(descriptor)} again:"
                f" {error.strerror} (is the restorer's group in net.ipv4.ping_group_range?)"
            ) from None
        with sock:
            set_option, attach = sockopts.our_setters(sock)
            try:
                sockopts.set_early(options, set_option)
                if endpoint(ping.local_address)[1]:
                    sock.bind(endpoint(ping.local_address))
                if ping.remote_address:
                    sock.connect((ping.remote_address, 0))
                datagrams.fill_ping_queue(ping.local_address, _queue(ping, restore.image))
                sockopts.set_late(options, set_option, attach)
            except OSError as error:
                raise RestoreError(
                    f"cannot make the ping socket {ping.local_address} of"
                    f" {describe_fd(descriptor)} again: {error.strerror}"
                ) from None
            restore.give(sock.fileno(), descriptor)

    def describe(self, descriptor: rec.FileDescriptor, image: ImageFiles) -> str:
        ping = image.object_of(descriptor, rec.PingSocket)
        family = "ipv6" if ping.family == socket.AF_INET6 else "ipv4"
        bound = f" bound to {ping.local_address}" if endpoint(ping.local_address)[1] else ""
        connected = f" connected to {ping.remote_address}" if ping.remote_address else ""
        count = len(ping.queue)
        queued = f", {count} repl{'y' if count == 1 else 'ies'} queued" if count else ""
        return f"{family}{bound}{connected}{queued}{sockopts.describe_options(image, ping.id)}"


def _queue(ping: rec.PingSocket, image: ImageFiles) -> list[datagrams.Datagram]:
    """The replies queued on `ping`, their bytes from its ObjectData."""
    data, offset, queue = image.data(ping.id), 0, []
    for queued in ping.queue:
        queue.append(datagrams.Datagram(queued.source, data[offset : offset + queued.length]))
        offset += queued.length
    return queue
