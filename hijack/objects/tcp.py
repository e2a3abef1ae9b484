"""TCP connections, established or closing, checkpointed with TCP_REPAIR and rebuilt the
same way.

At dump, a copy of the socket is put in repair mode and its sequence numbers,
queues, options, window and state are read (the process is stopped; repair mode
is turned off again). A closing connection (FIN_WAIT1/2, CLOSE_WAIT, LAST_ACK,
CLOSING, or half-closed by the program's shutdown) is rebuilt established and
its FINs replayed (hijack.sys.tcp_repair). A `dump --kill` first locks every such connection
(hijack.sys.netlock: packets from the peer are dropped, so no reset answers
them while the socket is gone), and puts the sockets in repair mode just before
the kill, so closing them sends the peer nothing. The restorer makes the
connection again in repair mode, gives it to the process, and lifts the lock
once every descriptor exists; the peer's retransmissions then reach it.

A plain dump (the process runs on) neither locks nor silences anything: its
image can be restored only once the original's connections are gone. After a
move, connections stay relayed through the home shadow (hijack.node.move).
"""

from __future__ import annotations

import contextlib
import os
import socket
from types import TracebackType
from typing import TypeGuard

from hijack import lockbook
from hijack.errors import HijackError, RestoreError
from hijack.image import records as rec
from hijack.image.files import ImageFiles
from hijack.objects import sockopts
from hijack.objects.base import DumpContext, Kind, RestoreContext, describe_fd
from hijack.objects.inet import endpoint
from hijack.objects.udp import udp_lock_ends
from hijack.sys import netlock, pidfd, procfs, tcp_repair


def is_connection(found: procfs.SocketInfo | None) -> TypeGuard[procfs.SocketInfo]:
    """A TCP connection (IPv4 or IPv6), established or closing: what this kind rebuilds
    and a `dump --kill` locks."""
    return (
        found is not None
        and found.family in (socket.AF_INET, socket.AF_INET6)
        and found.type == socket.SOCK_STREAM
        and found.state_number in tcp_repair.CONNECTED_STATES
    )


class Tcp(Kind):
    name = "tcp"
    record_types = (rec.TcpConnection,)

    def claims(self, entry: procfs.FdEntry, dump: DumpContext) -> bool:
        return is_connection(dump.socket_of(entry))

    def dump(self, entry: procfs.FdEntry, info: procfs.FdInfo, dump: DumpContext) -> int:
        found = dump.socket_table()[entry.ino]
        copy = dump.copy_fd(entry.fd)
        tcp_repair.set_repair(copy, True)
        try:
            state = tcp_repair.read_state(copy)
        finally:
            tcp_repair.set_repair(copy, False)
        snd_wl1, snd_wnd, max_window, rcv_wnd, rcv_wup = state.window

        def make(id: int) -> rec.TcpConnection:
            return rec.TcpConnection(
                id=id,
                family=found.family,
                local_address=found.local,
                remote_address=found.remote,
                send_seq=state.send_seq,
                recv_seq=state.recv_seq,
                mss=state.mss,
                options=state.options,
                snd_wscale=state.snd_wscale,
                rcv_wscale=state.rcv_wscale,
                timestamp=state.timestamp,
                snd_wl1=snd_wl1,
                snd_wnd=snd_wnd,
                max_window=max_window,
                rcv_wnd=rcv_wnd,
                rcv_wup=rcv_wup,
                send_queue_bytes=len(state.send_queue),
                recv_queue_bytes=len(state.received),
                state=state.state,
                read_shut=state.read_shut,
                unsent_bytes=state.unsent,
            )

        object_id = dump.add_object(("socket", entry.ino), make)
        dump.add_data(object_id, state.send_queue + state.received)
        with socket.socket(fileno=os.dup(copy)) as sock:
            sockopts.dump_options(sock, object_id, entry.ino, dump)
        return object_id

    def restore(self, descriptor: rec.FileDescriptor, restore: RestoreContext) -> None:
        connection = restore.image.object_of(descriptor, rec.TcpConnection)
        queues = restore.image.data(connection.id)
        if len(queues) != connection.send_queue_bytes + connection.recv_queue_bytes:
            raise RestoreError(
                f"the queues of {describe_fd(descriptor)} hold {len(queues)} bytes, not"
                f" {connection.send_queue_bytes} + {connection.recv_queue_bytes}"
            )
        made = tcp_repair.make_connection(
            connection.family,
            endpoint(connection.local_address),
            endpoint(connection.remote_address),
            tcp_repair.TcpState(
                send_seq=connection.send_seq,
                recv_seq=connection.recv_seq,
                send_queue=queues[: connection.send_queue_bytes],
                received=queues[connection.send_queue_bytes :],
                mss=connection.mss,
                options=connection.options,
                snd_wscale=connection.snd_wscale,
                rcv_wscale=connection.rcv_wscale,
                timestamp=connection.timestamp,
                window=(
                    connection.snd_wl1,
                    connection.snd_wnd,
                    connection.max_window,
                    connection.rcv_wnd,
                    connection.rcv_wup,
                ),
                state=connection.state,
                read_shut=connection.read_shut,
                unsent=connection.unsent_bytes,
            ),
        )
        try:
            with socket.socket(fileno=os.dup(made)) as sock:
                set_option, attach = sockopts.our_setters(sock)
                options = sockopts.options_of(restore.image, connection.id)
                sockopts.set_late(options, set_option, attach, early_too=True)
        except BaseException:
            os.close(made)
            raise
        restore.give_made(made, descriptor)

    def finish(self, descriptor: rec.FileDescriptor, restore: RestoreContext) -> None:
        # The connection exists again: let the peer's packets reach it.
        connection = restore.image.object_of(descriptor, rec.TcpConnection)
        lockbook.unlock(
            restore.stub.pid,
            endpoint(connection.local_address),
            endpoint(connection.remote_address),
        )

    def refusal(self, descriptor: rec.FileDescriptor, image: ImageFiles) -> str | None:
        connection = image.object_of(descriptor, rec.TcpConnection)
        if connection.state in tcp_repair.CONNECTED_STATES:
            return None
        return f"{describe_fd(descriptor)}: a TCP connection in state {connection.state}"

    def describe(self, descriptor: rec.FileDescriptor, image: ImageFiles) -> str:
        connection = image.object_of(descriptor, rec.TcpConnection)
        shut = ", reading shut" if connection.read_shut else ""
        return (
            f"{connection.local_address} -> {connection.remote_address}"
            f" {procfs.tcp_state_name(connection.state)}{shut},"
            f" {connection.send_queue_bytes} bytes to send,"
            f" {connection.recv_queue_bytes} to read"
            f"{sockopts.describe_options(image, connection.id)}"
        )


class NetworkLocks:
    """The locks of a `dump --kill`: every TCP connection of the process, and every UDP
    socket bound to a port, is locked before it is read (hijack.sys.netlock);
    silence() puts the connections in repair mode just before the kill; keep() leaves
    the locks for the restore. Left any other way (the dump failed or was refused),
    every socket is as it was: in normal mode, unlocked."""

    def __init__(
        self, pid: int, image: str = lockbook.STDOUT, locked: set[int] | None = None
    ) -> None:
        self.pid = pid
        self.image = image  # where the image goes, written down with each lock (lockbook)
        # The inodes of the sockets locked already: by another member of a tree, which
        # shares them (an inherited connection is locked once). Those it locks are added.
        self.locked_inodes = locked if locked is not None else set()
        self.connections: list[tuple[int, netlock.Endpoint, netlock.Endpoint]] = []
        self.locked: list[tuple[netlock.Endpoint, netlock.Endpoint | None, int]] = []
        self.silenced: list[int] = []
        self.kept = False

    def __enter__(self) -> NetworkLocks:
        sockets = procfs.read_socket_table(self.pid)
        try:
            for entry in procfs.list_fds(self.pid):
                if entry.ino in self.locked_inodes:
                    continue
                found = sockets.get(entry.ino) if entry.kind is procfs.FdKind.SOCKET else None
                udp_ends = udp_lock_ends(found) if found is not None else None
                if is_connection(found):
                    ends = endpoint(found.local), endpoint(found.remote)
                    self._lock(entry.fd, *ends, socket.IPPROTO_TCP)
                    self.connections.append((entry.fd, *ends))
                    self.locked_inodes.add(entry.ino)
                elif udp_ends is not None:
                    self._lock(entry.fd, *udp_ends, socket.IPPROTO_UDP)
                    self.locked_inodes.add(entry.ino)
        except BaseException:
            self._undo()
            raise
        return self

    def _lock(
        self, fd: int, local: netlock.Endpoint, remote: netlock.Endpoint | None, protocol: int
    ) -> None:
        lockbook.lock(self.pid, fd, self.image, local, remote, protocol)
        self.locked.append((local, remote, protocol))

    def silence(self) -> None:
        """Repair mode on for each locked connection: the kill closes them silently."""
        handle = pidfd.pidfd_open(self.pid)
        try:
            for fd, _, _ in self.connections:
                copy = pidfd.pidfd_getfd(handle, fd, self.pid)
                try:
                    tcp_repair.set_repair(copy, True)
                    self.silenced.append(fd)
                finally:
                    os.close(copy)
        finally:
            os.close(handle)

    def keep(self) -> None:
        self.kept = True

    def _undo(self) -> None:
        with contextlib.suppress(OSError, HijackError):
            handle = pidfd.pidfd_open(self.pid)
            for fd in self.silenced:
                copy = pidfd.pidfd_getfd(handle, fd, self.pid)
                tcp_repair.set_repair(copy, False)
                os.close(copy)
            os.close(handle)
        for local, remote, protocol in self.locked:
            with contextlib.suppress(HijackError):
                lockbook.unlock(self.pid, local, remote, protocol)

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        if not self.kept:
            self._undo()
