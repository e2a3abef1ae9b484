"""What every kind of descriptor and kernel object provides, and what it is given.

A kind (one module of hijack.objects) reads its descriptors at dump time into
object records (DumpContext), says why an image's descriptor could not be
rebuilt (refusal), rebuilds it in the stub (RestoreContext) and describes it
for `hijack show`. The framework (hijack.objects: the table and its glue)
calls each kind once per open file description: descriptors sharing one
(dup'ed, inherited) are dumped and restored once and duplicated again by it.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Hashable
from types import TracebackType

from hijack.errors import HijackError, RestoreError
from hijack.image import records as rec
from hijack.image.files import ImageFiles
from hijack.mutator.parasite import Call
from hijack.restore.remote import Stub
from hijack.restore.shared import TreeShared
from hijack.sys import pidfd, procfs, tcp_repair, unix_socket

O_CLOEXEC = 0o2000000
O_NONBLOCK = 0o4000
F_DUPFD, F_SETFD, F_SETFL = 0, 2, 4
FD_CLOEXEC = 1
# The status flags F_SETFL can change: O_APPEND, O_ASYNC, O_DIRECT, O_NOATIME, O_NONBLOCK.
SETTABLE_STATUS_FLAGS = 0o2000 | 0o20000 | 0o40000 | 0o1000000 | O_NONBLOCK
DEFAULT_GHOST_LIMIT = 64 * 1024 * 1024  # `hijack dump --ghost-limit`'s default


def describe_fd(descriptor: rec.FileDescriptor) -> str:
    """How a descriptor is named in messages: "fd 3 (regular /var/log/x.log)"."""
    return f"fd {descriptor.fd} ({descriptor.kind.name.lower()} {descriptor.path})"


class DumpContext:
    """What a kind's dump() is given: the stopped process, and where its records go."""

    def __init__(
        self,
        pid: int,
        entries: list[procfs.FdEntry],
        descriptions: dict[int, int],
        *,
        frozen: bool = True,
        maps: list[procfs.MapEntry] | None = None,
        ghost_limit: int = DEFAULT_GHOST_LIMIT,
        connections: bool = False,
        holders_before: procfs.HolderScan | None = None,
        sockets: dict[int, procfs.SocketInfo] | None = None,
        tree: frozenset[int] = frozenset(),
        tree_bytes: dict[Hashable, int] | None = None,
    ) -> None:
        self.pid = pid
        self.tree = tree  # the other members of the tree dumped with the process
        # A tree stream's (the same dict for every member's dump, in the order of their
        # images): the memory objects whose bytes an image before holds, by key, with the
        # member holding them (hijack.objects.ghost.add_with_contents).
        self.tree_bytes = tree_bytes
        self.frozen = frozen  # every thread of the process is stopped
        self.entries = entries  # every descriptor of the process (a pipe's other end ...)
        # Established TCP connections are read with TCP_REPAIR, so that a restore can
        # rebuild them (a plain dump; a move relays them through the shadow instead).
        self.connections = connections
        self.descriptions = descriptions  # fd -> description id (kcmp)
        self.maps = maps if maps is not None else []  # its mappings, for Kind.dump_process
        self.ghost_limit = ghost_limit  # bytes of data one deleted file may put in the image
        # Who held the process's pipes, scanned before it was stopped (hijack.objects.pipe).
        self.holders_before = holders_before
        self.sections: list[rec.ObjectRecord] = []  # object records and their data, in order
        self._ids: dict[Hashable, int] = {}
        self._data_end: dict[int, int] = {}  # object id -> where its data ends so far
        self._handle = -1
        self._copies: list[int] = []
        # Its network namespace's socket tables, if the caller read them since the stop.
        self._sockets: dict[int, procfs.SocketInfo] | None = sockets
        self._unlisted: dict[int, procfs.SocketInfo | None] = {}  # socket_of(), by inode
        self._unix_sockets: dict[int, unix_socket.UnixDiag] | None = None
        self._network_of = self  # whose network namespace socket tables are read in
        self._last_description = max(descriptions.values(), default=0)

    def copy_fd(self, fd: int) -> int:
        """Our own copy of the process's descriptor `fd`, closed when the dump ends."""
        if self._handle < 0:
            self._handle = pidfd.pidfd_open(self.pid)
        copy = pidfd.pidfd_getfd(self._handle, fd, self.pid)
        self._copies.append(copy)
        return copy

    def socket_table(self) -> dict[int, procfs.SocketInfo]:
        """The sockets of the process's network namespace by inode (read once, when asked)."""
        owner = self._network_of
        if owner._sockets is None:
            owner._sockets = procfs.read_socket_table(owner.pid)
        return owner._sockets

    def socket_of(self, entry: procfs.FdEntry) -> procfs.SocketInfo | None:
        """The socket behind descriptor `entry`, when the dump reads connections (else
        None: a move relays sockets): as its network namespace's tables list it, or,
        listed nowhere (an inet socket never bound, or bound and neither listening nor
        connected; raw, packet, netlink), as a copy of it tells: family, type, protocol,
        local address, state CLOSE (a TCP socket closed after it was a connection: state
        ""). The kinds of sockets ask this in their claims()."""
        if not self.connections or entry.kind is not procfs.FdKind.SOCKET:
            return None
        found = self.socket_table().get(entry.ino)
        if found is None:
            if entry.ino not in self._unlisted:
                self._unlisted[entry.ino] = self._ask_copy(entry)
            found = self._unlisted[entry.ino]
        return found

    def _ask_copy(self, entry: procfs.FdEntry) -> procfs.SocketInfo | None:
        try:
            with socket.socket(fileno=os.dup(self.copy_fd(entry.fd))) as sock:
                local, state = "", "CLOSE"
                if sock.family in (socket.AF_INET, socket.AF_INET6):
                    host, port = sock.getsockname()[:2]
                    local = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
                    if sock.type == socket.SOCK_STREAM and not tcp_repair.never_connected(
                        sock.fileno()
                    ):
                        state = ""
                return procfs.SocketInfo(
                    inode=entry.ino,
                    family=sock.family,
                    type=sock.type,
                    protocol=sock.proto,
                    state=state,
                    local=local,
                    remote="",
                )
        except (OSError, HijackError):
            return None

    def unix_sockets(self) -> dict[int, unix_socket.UnixDiag]:
        """The unix sockets of the process's network namespace by inode, as sock_diag tells
        of them: peers, accept queues (read once, when asked)."""
        owner = self._network_of
        if owner._unix_sockets is None:
            owner._unix_sockets = unix_socket.unix_sockets(owner.pid)
        return owner._unix_sockets

    def new_description(self) -> int:
        """A description id no descriptor of the process has (for one in flight)."""
        self._network_of._last_description += 1
        return self._network_of._last_description

    def in_flight(self) -> DumpContext:
        """A context for descriptors of THIS process that are copies of ones in flight (read
        out of a socket's queue): its objects join this dump's, its socket tables are the
        process's, and so are its `entries` (whoever holds what the process holds: a pipe
        the process holds too counts as held outside, and is refused); it reads no TCP
        connection (one in flight is refused). Close it (with) when its descriptors are
        dumped."""
        own = DumpContext(
            os.getpid(), self.entries, {}, frozen=self.frozen, ghost_limit=self.ghost_limit
        )
        own.sections, own._ids, own._data_end = self.sections, self._ids, self._data_end
        own._network_of = self._network_of
        return own

    def add_object(self, key: Hashable, make: Callable[[int], rec.ObjectRecord]) -> int:
        """The id of kernel object `key` (e.g. ("pipe", ino)); its record is made once."""
        found = self._ids.get(key)
        if found is None:
            found = self._ids[key] = len(self._ids) + 1
            self.sections.append(make(found))
        return found

    def add_data(self, object_id: int, data: bytes, offset: int | None = None) -> None:
        """Bulk bytes of an object as ObjectData sections of at most 8 MiB, from `offset`
        (ascending: a gap is a hole) or, by default, where its data added so far ends."""
        at = self._data_end.get(object_id, 0) if offset is None else offset
        for start in range(0, len(data), rec.MAX_OBJECT_DATA):
            chunk = data[start : start + rec.MAX_OBJECT_DATA]
            self.sections.append(rec.ObjectData(id=object_id, offset=at + start, data=chunk))
        self._data_end[object_id] = at + len(data)

    def __enter__(self) -> DumpContext:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        for copy in self._copies:
            os.close(copy)
        if self._handle >= 0:
            os.close(self._handle)


class RestoreContext:
    """What a kind's restore() is given: the stub, the image's files, and helpers."""

    def __init__(
        self,
        stub: Stub,
        image: ImageFiles,
        parking: int,
        restored: frozenset[int],
        shared: TreeShared | None = None,
    ) -> None:
        self.stub = stub
        self.image = image
        # A member of a tree: objects other members share are made once for all.
        self.shared = shared
        self.restored = restored  # the numbers the process gets back (not those dropped)
        self._parking = parking  # above every descriptor number the image uses
        self._restorer = -1  # the stub's pidfd of this process, for give()
        self._restorer_call: Call | None = None  # its making, queued in an open batch
        self._kept: dict[Hashable, int] = {}
        # Ours given to the stub by calls queued in an open batch: closed once it ran (at
        # the end of the restore, when every batch has).
        self._given_later: list[int] = []

    def place(self, stub_fd: int, descriptor: rec.FileDescriptor) -> None:
        """Move the stub's descriptor `stub_fd` to the image's number, with its close-on-exec."""
        if stub_fd != descriptor.fd:
            self.stub.call("dup3", stub_fd, descriptor.fd, O_CLOEXEC if descriptor.cloexec else 0)
            self.stub.call("close", stub_fd)
        else:
            self.stub.call("fcntl", descriptor.fd, F_SETFD, FD_CLOEXEC if descriptor.cloexec else 0)

    def give(self, our_fd: int, descriptor: rec.FileDescriptor) -> None:
        """Put our descriptor `our_fd` into the stub at the image's number, with its
        close-on-exec and status flags (the stub takes it with pidfd_getfd).

        One batch of chained calls, one stop (three or four single calls were six to
        eight: a tree's member gets its shared pipes so, frozen), or queued in the batch
        open (then `our_fd` must stay open until it ran: give_made sees to that). The copy
        pidfd_getfd makes may land on the image's number itself (the lowest free one): it
        is parked above the image's numbers first, so that the dup3 to its place never
        meets it (F_DUPFD: the lowest free number from there)."""
        stub = self.stub
        restorer = self._restorer_arg()
        cloexec = O_CLOEXEC if descriptor.cloexec else 0
        with stub.batched():
            got = stub.queue("pidfd_getfd", restorer, our_fd, 0)
            # Above its number too: a number given may lie above `parking` (met: a
            # unix socket's, tests/test_obj_unix.py; dup3 onto itself is EINVAL).
            above = max(self._parking, descriptor.fd + 1)
            parked = stub.queue("fcntl", got, F_DUPFD, above)
            stub.queue("close", got)
            stub.queue("dup3", parked, descriptor.fd, cloexec)
            stub.queue("close", parked)
            stub.queue("fcntl", descriptor.fd, F_SETFL, descriptor.flags & SETTABLE_STATUS_FLAGS)

    def lend(self, our_fd: int) -> int:
        """The stub's own copy of our descriptor `our_fd`, at a free number of its choosing
        (pidfd_getfd): for what the stub uses once and closes (a file it maps). Not within
        a batch of calls (its result is needed now)."""
        if self.stub.batch_room() is not None:
            raise RestoreError("a descriptor lent to the stub inside a batch of calls")
        restorer = self._restorer_arg()
        assert isinstance(restorer, int)  # (no batch open: made now)
        return self.stub.call("pidfd_getfd", restorer, our_fd, 0)

    def _restorer_arg(self) -> int | Call:
        """The stub's pidfd of this process, parked above the image's numbers, so no
        restored descriptor lands on it: made once, in one batch of calls (one stop), or
        queued in the batch open (its Call, for the calls chained to it there)."""
        if self._restorer < 0 and self._restorer_call is not None:
            made = self._restorer_call.result
            if made is None:  # its batch has not run yet
                return self._restorer_call
            if made < 0:
                raise RestoreError(f"cannot open the restorer's pidfd: {os.strerror(-made)}")
            self._restorer, self._restorer_call = made, None
        if self._restorer >= 0:
            return self._restorer
        stub = self.stub
        now = stub.batch_room() is None
        with stub.batched():
            opened = stub.queue("pidfd_open", os.getpid(), 0)
            self._restorer_call = stub.queue("fcntl", opened, F_DUPFD, self._parking)
            stub.queue("close", opened)
        if now:
            return self._restorer_arg()
        return self._restorer_call

    def spare_number(self) -> int:
        """A descriptor number free in the stub, above every one the image uses."""
        return max((entry.fd for entry in procfs.list_fds(self.stub.pid)), default=2) + 1

    def take(self, stub_fd: int) -> int:
        """Our own copy of the stub's descriptor `stub_fd`, which the stub closes."""
        copy = pidfd.copy_fd(self.stub.pid, stub_fd)
        self.stub.call("close", stub_fd)
        return copy

    def give_made(self, made: int, descriptor: rec.FileDescriptor) -> None:
        """give() a descriptor the restorer made for this one alone, then close ours (once
        the batch open, if any, has run: at the end of the restore)."""
        if self.stub.batch_room() is None:
            try:
                self.give(made, descriptor)
            finally:
                os.close(made)
            return
        self._given_later.append(made)
        self.give(made, descriptor)

    def built(self, key: Hashable) -> int | None:
        """Our descriptor an earlier restore() kept under `key`: an object's id, or
        (id, part) for an object that is several of ours (a pipe's two ends); or one made
        for another member of the tree that shares the object."""
        tree_key = self.shared.tree_key(key) if self.shared is not None else None
        if tree_key is not None and self.shared is not None:
            return self.shared.built(tree_key)
        return self._kept.get(key)

    def keep(self, key: Hashable, our_fd: int) -> None:
        """Keep our descriptor of an object for later descriptors, until the restore ends
        (the whole tree's, for an object members share)."""
        tree_key = self.shared.tree_key(key) if self.shared is not None else None
        if tree_key is not None and self.shared is not None:
            self.shared.keep(tree_key, our_fd)
        else:
            self._kept[key] = our_fd

    def __enter__(self) -> RestoreContext:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        for fd in self._kept.values():
            os.close(fd)
        for fd in self._given_later:
            os.close(fd)
        if error is None:
            if self._restorer_call is not None:
                self._restorer_arg()  # its batch ran (every batch has): its number
            if self._restorer >= 0:
                self.stub.call("close", self._restorer)


class Kind:
    """One kind of descriptor: subclass it in a module of hijack.objects and add an
    instance to hijack.objects.KINDS. Defaults: no object records, nothing refused,
    nothing to finish, the descriptor's path for `hijack show`."""

    name: str = ""  # as `hijack show` prints it
    record_types: tuple[type, ...] = ()  # the object records it owns
    # The FdKinds it restores when a descriptor has no object record (object_id 0);
    # a descriptor with one goes to the kind owning the record's type.
    fd_kinds: tuple[rec.FdKind, ...] = ()

    def claims(self, entry: procfs.FdEntry, dump: DumpContext) -> bool:
        """Whether this kind dumps `entry` (the first kind of the table that claims it does)."""
        raise NotImplementedError

    def dump(self, entry: procfs.FdEntry, info: procfs.FdInfo, dump: DumpContext) -> int:
        """Read what the kind needs, add its record(s); the object id, 0 for none."""
        return 0

    def refusal(self, descriptor: rec.FileDescriptor, image: ImageFiles) -> str | None:
        """Why a restore from the image alone cannot rebuild `descriptor`, naming it
        (describe_fd), or None. Asked by a restore's plan and by `dump --kill`."""
        return None

    def restore(self, descriptor: rec.FileDescriptor, restore: RestoreContext) -> None:
        """Make descriptor.fd exist in the stub: flags, close-on-exec, offset, ..."""
        raise NotImplementedError

    def queues_only(self, descriptor: rec.FileDescriptor) -> bool:
        """Whether restore() of `descriptor` only queues calls whose results it never reads
        (Stub.queue): it then runs in one batch with the descriptors restored around it,
        one stop for them all (hijack.restore.files)."""
        return False

    def finish(self, descriptor: rec.FileDescriptor, restore: RestoreContext) -> None:
        """Once every descriptor exists (an epoll's interest list)."""

    def dump_process(self, dump: DumpContext) -> None:
        """Objects the process reaches other than by a descriptor (a memfd it only maps,
        its deleted cwd), added as dump() adds them; once per dump, after the descriptors."""

    def describe(self, descriptor: rec.FileDescriptor, image: ImageFiles) -> str:
        """One line of details for `hijack show`."""
        return descriptor.path
