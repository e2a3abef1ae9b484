"""Raw IP sockets: made again with their protocol, addresses and options.

At dump a copy of the socket tells its protocol and the address it is bound
to (or, connected, the local address connect() chose); the address it is
connected to is /proc/net/raw's (getpeername() of a raw socket never answers);
its options (IP_HDRINCL, ICMP_FILTER, the common ones) are a SocketOptions
record. The restorer makes the socket (it
needs CAP_NET_RAW, as the original did), binds and connects it, sets its
options and gives it to the process. Packets queued on it are lost: a raw
socket sees copies of traffic, which goes on without it.
"""

from __future__ import annotations

import os
import socket

from hijack.errors import RestoreError
from hijack.image import records as rec
from hijack.image.files import ImageFiles
from hijack.objects import sockopts
from hijack.objects.base import DumpContext, Kind, RestoreContext, describe_fd
from hijack.sys import procfs


def _copy(entry: procfs.FdEntry, dump: DumpContext) -> socket.socket:
    return socket.socket(fileno=os.dup(dump.copy_fd(entry.fd)))


def _host(address: tuple[str, int] | tuple[str, int, int, int]) -> str:
    """The host of a raw socket's address; "" for the wildcard (not bound, not connected)."""
    return "" if address[0] in ("0.0.0.0", "::") else address[0]


class Raw(Kind):
    name = "raw"
    record_types = (rec.RawSocket,)

    def claims(self, entry: procfs.FdEntry, dump: DumpContext) -> bool:
        found = dump.socket_of(entry)
        return (
            found is not None
            and found.family in (socket.AF_INET, socket.AF_INET6)
            and found.type == socket.SOCK_RAW
        )

    def dump(self, entry: procfs.FdEntry, info: procfs.FdInfo, dump: DumpContext) -> int:
        with _copy(entry, dump) as sock:
            family, protocol = int(sock.family), sock.proto
            local = _host(sock.getsockname())
            remote = procfs.read_raw_peers(dump.pid).get(entry.ino, "")
            object_id = dump.add_object(
                ("socket", entry.ino),
                lambda id: rec.RawSocket(
                    id=id,
                    family=family,
                    protocol=protocol,
                    local_address=local,
                    remote_address=remote,
                ),
            )
            sockopts.dump_options(sock, object_id, entry.ino, dump)
        return object_id

    def restore(self, descriptor: rec.FileDescriptor, restore: RestoreContext) -> None:
        raw = restore.image.object_of(descriptor, rec.RawSocket)
        options = sockopts.options_of(restore.image, raw.id)
        try:
            sock = socket.socket(raw.family, socket.SOCK_RAW, raw.protocol)
        except OSError as error:
            raise RestoreError(
                f"cannot make the raw socket of {describe_fd(descriptor)} again: {error.strerror}"
            ) from None
        with sock:
            set_option, attach = sockopts.our_setters(sock)
            try:
                sockopts.set_early(options, set_option)
                if raw.local_address:
                    sock.bind((raw.local_address, 0))
                if raw.remote_address:
                    sock.connect((raw.remote_address, 0))
                sockopts.set_late(options, set_option, attach)
            except OSError as error:
                raise RestoreError(
                    f"cannot make the raw socket of {describe_fd(descriptor)} again: "
                    f"{error.strerror}"
                ) from None
            restore.give(sock.fileno(), descriptor)

    def describe(self, descriptor: rec.FileDescriptor, image: ImageFiles) -> str:
        raw = image.object_of(descriptor, rec.RawSocket)
        family = "ipv6" if raw.family == socket.AF_INET6 else "ipv4"
        bound = f" bound to {raw.local_address}" if raw.local_address else ""
        connected = f" connected to {raw.remote_address}" if raw.remote_address else ""
        options = sockopts.describe_options(image, raw.id)
        return f"{family} protocol {raw.protocol}{bound}{connected}{options}"
