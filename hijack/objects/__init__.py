"""Descriptors and the kernel objects behind them, one module per kind, in one table.

    KINDS                     every kind, most specific first: the first whose
                              claims() is true dumps a descriptor
    kind_for(entry, dump)     the kind that dumps a live descriptor
    kind_of(descriptor, image)  the kind that restores, refuses, describes an image's
                              descriptor: the owner of its object record's type, or
                              (no object) the first kind listing its FdKind in fd_kinds
    kind_named(name)
    read_files(pid, ...)      FILES and the object sections of a stopped process,
                              the locks each description holds too (hijack.objects.locks)
    read_files(pid)           FILES and the object sections of a stopped process, the
                              SysV IPC objects it uses among them (hijack.objects.sysv)
    refusals(image, held)     why a restore could not rebuild each descriptor
    describe(descriptor, image)  "kind: details", for `hijack show`
    dump_in_flight(fd, n, dump)   a descriptor in flight (copied out of a socket's queue)
    rebuild_in_flight(d, restore) ... made again, as our own descriptor to send

The base protocol and the contexts a kind is given are in hijack.objects.base.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import replace

from hijack.errors import ImageError
from hijack.image import records as rec
from hijack.image.files import ImageFiles
from hijack.objects import sysv
from hijack.objects.base import (
    DEFAULT_GHOST_LIMIT,
    O_CLOEXEC,
    DumpContext,
    Kind,
    RestoreContext,
)
from hijack.objects.device import Device
from hijack.objects.epoll import Epoll
from hijack.objects.eventfd import Eventfd
from hijack.objects.fanotify import Fanotify
from hijack.objects.fifo import Fifo
from hijack.objects.ghost import Ghost
from hijack.objects.inet import Inet
from hijack.objects.inotify import Inotify
from hijack.objects.locks import describe_held, dump_locks
from hijack.objects.memfd import Memfd
from hijack.objects.mqueue import MessageQueue
from hijack.objects.netlink import Netlink
from hijack.objects.other import Other
from hijack.objects.packet import Packet
from hijack.objects.pidfd import Pidfd
from hijack.objects.ping import Ping
from hijack.objects.pipe import Pipe
from hijack.objects.pty import PtyPairKind
from hijack.objects.raw import Raw
from hijack.objects.regular import Regular
from hijack.objects.signalfd import Signalfd
from hijack.objects.tcp import Tcp
from hijack.objects.terminal import Terminal
from hijack.objects.timerfd import Timerfd
from hijack.objects.udp import Udp
from hijack.objects.unix import Unix
from hijack.sys import kcmp, procfs

KINDS: tuple[Kind, ...] = (
    MessageQueue(),  # before Regular: a queue's descriptor looks like a regular file
    Ghost(),  # before Regular and Fifo: a deleted one cannot be reopened by path
    Memfd(),
    Regular(),
    Fifo(),
    PtyPairKind(),  # before Terminal: both ends of a pair in the process
    Pipe(),
    Terminal(),
    Device(),
    Epoll(),
    Eventfd(),
    Timerfd(),
    Signalfd(),
    Inotify(),
    Fanotify(),
    Pidfd(),
    Unix(),  # before Tcp and Inet: all three claim sockets
    Tcp(),  # before Inet: an established connection, when the dump reads connections
    Udp(),  # before Inet, likewise
    Netlink(),
    Raw(),
    Ping(),
    Packet(),
    Inet(),
    Other(),  # last: claims whatever is left, and refuses it
)
_BY_RECORD = {record_type: kind for kind in KINDS for record_type in kind.record_types}


def kind_for(entry: procfs.FdEntry, dump: DumpContext) -> Kind:
    return next(kind for kind in KINDS if kind.claims(entry, dump))


def kind_named(name: str) -> Kind:
    for kind in KINDS:
        if kind.name == name:
            return kind
    raise KeyError(name)


def kind_of(descriptor: rec.FileDescriptor, image: ImageFiles) -> Kind:
    if descriptor.object_id:
        found = image.objects.get(descriptor.object_id)
        kind = _BY_RECORD.get(type(found))
        if kind is None:
            raise ImageError(
                f"fd {descriptor.fd} refers to object {descriptor.object_id}, which is no"
                " object record"
            )
        return kind
    return next(kind for kind in KINDS if descriptor.kind in kind.fd_kinds)


def read_files(
    pid: int,
    *,
    frozen: bool = True,
    connections: bool = False,
    maps: list[procfs.MapEntry] | None = None,
    ghost_limit: int = DEFAULT_GHOST_LIMIT,
    holders_before: procfs.HolderScan | None = None,
    sockets: dict[int, procfs.SocketInfo] | None = None,
    tree: frozenset[int] = frozenset(),
    tree_bytes: dict[Hashable, int] | None = None,
) -> ImageFiles:
    """The descriptors of stopped process `pid` and the objects behind them, those it
    reaches through its mappings `maps` and its cwd too (Kind.dump_process);
    `connections`: established TCP connections with their TCP_REPAIR state;
    `holders_before`: pipe.scan_holders_before(pid), made while it still ran;
    `sockets`: procfs.read_socket_table(pid), read since it was stopped;
    `tree`: the other members of the tree dumped with it (their pipes are inside);
    `tree_bytes`: the tree stream's memory objects whose bytes an image before holds
    (DumpContext.tree_bytes)."""
    entries = procfs.list_fds(pid)
    descriptions = kcmp.description_ids(pid, [(e.fd, e.dev, e.ino) for e in entries])
    objects: dict[int, int] = {}  # description id -> object id
    descriptors = []
    with DumpContext(
        pid,
        entries,
        descriptions,
        frozen=frozen,
        connections=connections,
        maps=maps,
        ghost_limit=ghost_limit,
        holders_before=holders_before,
        sockets=sockets,
        tree=tree,
        tree_bytes=tree_bytes,
    ) as dump:
        for entry in entries:
            info = procfs.read_fdinfo(pid, entry.fd)
            description = descriptions[entry.fd]
            if description not in objects:  # a dup'ed or inherited one is dumped once
                objects[description] = kind_for(entry, dump).dump(entry, info, dump)
                dump_locks(entry.fd, info, description, dump)
            descriptors.append(_descriptor(entry, info, description, objects[description]))
        sysv.dump_held(dump)  # objects of the process that no descriptor reaches
        for kind in KINDS:
            kind.dump_process(dump)
        return ImageFiles.of(descriptors, dump.sections)


def _descriptor(
    entry: procfs.FdEntry, info: procfs.FdInfo, description: int, object_id: int
) -> rec.FileDescriptor:
    return rec.FileDescriptor(
        fd=entry.fd,
        kind=_image_fd_kind(entry.kind),
        path=entry.target,
        flags=info.flags,
        pos=info.pos,
        cloexec=bool(info.flags & O_CLOEXEC),
        mode=entry.mode,
        dev=entry.dev,
        ino=entry.ino,
        description_id=description,
        object_id=object_id,
    )


def dump_in_flight(fd: int, number: int, dump: DumpContext) -> rec.FileDescriptor:
    """Our descriptor `fd`, a copy of one in flight in a socket's queue, as an image
    descriptor numbered `number` (its place in its message), its object added to `dump`.
    It is a description of its own: one shared with a descriptor of the process is not
    told apart (its object, a pipe or a socket, is shared all the same)."""
    with dump.in_flight() as own:
        entry = procfs.fd_entry(own.pid, fd)
        info = procfs.read_fdinfo(own.pid, fd)
        object_id = kind_for(entry, own).dump(entry, info, own)
    return replace(
        _descriptor(entry, info, dump.new_description(), object_id), fd=number, cloexec=False
    )


def rebuild_in_flight(descriptor: rec.FileDescriptor, restore: RestoreContext) -> int:
    """Our own descriptor for an image descriptor in flight: its kind makes it in the stub at
    a number nothing else uses, and we take it from there."""
    spare = replace(descriptor, fd=restore.spare_number())
    kind_of(spare, restore.image).restore(spare, restore)
    return restore.take(spare.fd)


def _image_fd_kind(kind: procfs.FdKind) -> rec.FdKind:
    return rec.FdKind[kind.name] if kind.name in rec.FdKind.__members__ else rec.FdKind.ANON_INODE


def refusals(
    image: ImageFiles, held: Callable[[rec.FileDescriptor], bool] = lambda _: False
) -> list[tuple[rec.FileDescriptor, str]]:
    """Each descriptor a restore from `image` alone could not rebuild, and why;
    `held` are those it gets elsewhere (the shadow keeps them, a move relays them)."""
    found = []
    for descriptor in image.descriptors:
        if held(descriptor):
            continue
        reason = kind_of(descriptor, image).refusal(descriptor, image)
        if reason is not None:
            found.append((descriptor, reason))
    return found


def describe(descriptor: rec.FileDescriptor, image: ImageFiles) -> str:
    kind = kind_of(descriptor, image)
    held = describe_held(image, descriptor)
    return f"{kind.name}: {kind.describe(descriptor, image)}" + (f"; holds {held}" if held else "")
