"""One end of a socket swap, on the node the process runs on (docs/protocol.md, "Socket swap").

The daemon serves `swap_end` with this: it freezes the process, finds the TCP
socket the swap names (by its two addresses), waits until everything the
process wrote through it has left (its send queue empty: in the peer's or the
shadow's receive queue), copies (MSG_PEEK: nothing is consumed) what waits
unread in it, and then, told to `join`, makes the direct connection in repair
mode (no handshake: the sequence numbers the coordinator chose, the bytes for
the process already in its receive queue) and puts it under the process's
descriptor number with dup3, keeping the descriptor's flags and the socket's
options. `commit` lets the process run on; `abort`, or the coordinator gone,
puts the old socket back under the number first. Nothing the process can see
changes before `join`, and `join` is undone by `abort`.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import errno
import fcntl
import json
import os
import socket
import struct
import subprocess
import sys
import termios
import time
from dataclasses import dataclass, field
from typing import Any

from hijack.errors import HijackError
from hijack.mutator.dump import scratch_page
from hijack.mutator.tracee import Tracee
from hijack.objects import sockopts
from hijack.objects.epoll import EPOLL_CTL_ADD, EPOLL_EVENT, live_targets
from hijack.process.tree import read_tree
from hijack.sys import memory, pidfd, process, procfs, tcp_repair

F_SETFL, F_SETFD, FD_CLOEXEC = 4, 2, 1
O_CLOEXEC = 0o2000000
EPOLL_CTL_DEL = 2
SETTABLE_STATUS_FLAGS = os.O_APPEND | os.O_NONBLOCK | os.O_ASYNC | os.O_DIRECT | os.O_NOATIME
# The options a joined socket takes over from the old one: not those that decide a bind
# (sockopts.EARLY), nor its buffers (the kernel tunes a new socket's), nor its mark.
KEPT_OPTIONS = frozenset(
    {
        (sockopts.SOL_SOCKET, sockopts.SO_KEEPALIVE),
        (sockopts.SOL_SOCKET, 13),  # SO_LINGER
        (sockopts.SOL_SOCKET, 18),  # SO_RCVLOWAT
        (sockopts.SOL_SOCKET, 12),  # SO_PRIORITY
        (sockopts.SOL_SOCKET, 10),  # SO_OOBINLINE
        (sockopts.IPPROTO_IP, 1),  # IP_TOS
        (sockopts.IPPROTO_IP, 2),  # IP_TTL
        *((sockopts.IPPROTO_TCP, name) for name in (1, 3, 4, 5, 6, 18)),
    }
)
MSS: dict[int, int] = {socket.AF_INET: 1460, socket.AF_INET6: 1440}  # an Ethernet path's
WINDOW = 65535


def split_endpoint(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def _copy_option_setter(target: socket.socket) -> sockopts.SetOption:
    def set_option(level: int, name: int, value: bytes) -> None:
        target.setsockopt(level, name, value)

    return set_option


@dataclass
class FrozenEnd:
    """A process held stopped, and the socket of it that a swap replaces."""

    tracee: Tracee
    fd: int  # the process's descriptor number
    old: int  # our copy of the old socket (pidfd_getfd)
    family: int
    flags: int  # the descriptor's status flags, O_CLOEXEC included
    joined: bool = False  # the direct connection may be under the number (abort puts back)
    # (epoll, events, data): the process's epolls watching the old socket under its number
    watching: list[tuple[int, int, int]] = field(default_factory=list)
    made: int = -1  # our copy of the direct connection, in repair mode until commit
    local: str = ""  # the old socket's own address
    # A repointed connection's state, whose send queue go_live() gives once it is live.
    repointed: tcp_repair.TcpState | None = None

    @classmethod
    def freeze(
        cls, pid: int, local: str, peer: str, found: tuple[int, int, int] | None = None
    ) -> FrozenEnd:
        """Stop the process holding the TCP socket from `local` to `peer` ("ip:port"):
        `pid`, or the member of its tree that holds it, and take that socket. `found`:
        (pid, descriptor, socket inode) looked up before (standby), taken if that
        descriptor is still that socket (no socket table read while frozen)."""
        if found is not None and _socket_inode(found[0], found[1]) == found[2]:
            pid, fd = found[:2]
        else:
            pid, fd = find_holder(pid, local, peer)
        tracee = Tracee.seize(pid)
        try:
            old = pidfd.copy_fd(pid, fd)
            try:
                family = socket.AF_INET6 if local.startswith("[") else socket.AF_INET
                flags = procfs.read_fdinfo(pid, fd).flags
            except BaseException:
                os.close(old)
                raise
        except BaseException:
            tracee.release()
            raise
        return cls(tracee, fd, old, family, flags, local=local)

    def queued(self) -> int:
        """Bytes the process wrote that its peer has not acknowledged yet."""
        return _queued(self.old, tcp_repair.SIOCOUTQ)

    def wait_sent(self, wait: float) -> int:
        """Until all the process wrote is out of its send queue (acknowledged by the
        peer), for at most `wait` seconds: the bytes left."""
        deadline = time.monotonic() + wait
        while self.queued() and time.monotonic() < deadline:
            time.sleep(0.001)
        return self.queued()

    def written(self) -> int | None:
        """What the process wrote to the old socket in all (its send queue empty: all
        acknowledged), None where the kernel does not tell: through an encrypted relay
        its shadow waits until that much came (docs/protocol.md, "Socket swap")."""
        return tcp_repair.data_sent(self.old)

    def unread(self) -> bytes:
        """What waits unread in the old socket (copied, not consumed)."""
        length = _queued(self.old, termios.FIONREAD)
        if not length:
            return b""
        with socket.socket(fileno=os.dup(self.old)) as sock:
            return sock.recv(length, socket.MSG_PEEK | socket.MSG_DONTWAIT)

    def join(
        self, local: tuple[str, int], remote: tuple[str, int], send_seq: int, recv_next: int,
        owed: bytes,
    ) -> None:  # fmt: skip
        """Make the direct connection and put it under the process's descriptor: it sends
        from `send_seq` on, and the peer's from `recv_next`; its receive queue holds what
        the old socket held unread, then `owed` (what the relay held for the process)."""
        made = repair_socket(self.family, local, remote, send_seq, recv_next, self.unread() + owed)
        self._put_under(made)

    def repoint(self, remote: tuple[str, int]) -> None:
        """The same connection towards `remote`, where its peer goes (a later move of the
        peer, hijack.node.repoint): made in repair mode from the old one's state now
        (sequence numbers, both queues, window), put under the process's descriptor."""
        # All of its send queue as sent (unsent 0): its old socket runs on, sending what it
        # had not yet, to the moving end, whose state is read after this one's; a byte it
        # sends meanwhile is in that end's new receive queue, and a new end here sending
        # it as never sent would be acknowledged past what it sent, which TCP drops.
        state = dataclasses.replace(read_state(self.old), unsent=0)
        local = split_endpoint(self.local)
        made, self.repointed = make_quiet(self.family, local, remote, state)
        self._put_under(made)

    def _put_under(self, made: int) -> None:
        """Our new socket `made`, with the old one's options, under the process's number."""
        try:
            self._copy_options(made)
            self.watching = watches_of(self.tracee.pid, self.fd)
            self.joined = True  # from here on abort puts the old socket back
            self._inject(made)
        except BaseException:
            os.close(made)
            raise
        self.made = made

    def _copy_options(self, made: int) -> None:
        with (
            socket.socket(fileno=os.dup(self.old)) as old,
            socket.socket(fileno=os.dup(made)) as new,
        ):
            setter = _copy_option_setter(new)
            for (level, name), value in sockopts._read(old).items():
                if (level, name) in KEPT_OPTIONS:
                    with contextlib.suppress(OSError):
                        setter(level, name, value)

    def _inject(self, ours: int) -> None:
        """dup3 our descriptor `ours` over the process's number, with its flags."""
        tracee = self.tracee
        opened = tracee.checked_syscall("pidfd_open", os.getpid(), 0)
        try:
            theirs = tracee.checked_syscall("pidfd_getfd", opened, ours, 0)
        finally:
            tracee.syscall("close", opened)
        try:
            # An epoll entry is the (file, number) pair it was added with: after dup3 it
            # would go on watching the file that was under the number. Taken off first
            # (absent: an abort before it was added), added for the new file after.
            for epoll_fd, _, _ in self.watching:
                deleted = tracee.syscall("epoll_ctl", epoll_fd, EPOLL_CTL_DEL, self.fd, 0)
                if deleted not in (0, -errno.ENOENT):
                    raise HijackError(
                        f"epoll_ctl(EPOLL_CTL_DEL) inside process {tracee.pid} failed:"
                        f" {os.strerror(-deleted)}"
                    )
            cloexec = O_CLOEXEC if self.flags & O_CLOEXEC else 0
            tracee.checked_syscall("dup3", theirs, self.fd, cloexec)
        finally:
            tracee.syscall("close", theirs)
        tracee.checked_syscall("fcntl", self.fd, F_SETFL, self.flags & SETTABLE_STATUS_FLAGS)
        if self.watching:
            self._watch_again()

    def _watch_again(self) -> None:
        """EPOLL_CTL_ADD the process's number to each of its epolls that watched it, with
        the same events and data (written in a page mapped for it in the process)."""
        tracee = self.tracee
        with scratch_page(tracee) as page:
            for epoll_fd, events, data in self.watching:
                memory.write(tracee.pid, page, EPOLL_EVENT.pack(events, data))
                tracee.checked_syscall("epoll_ctl", epoll_fd, EPOLL_CTL_ADD, self.fd, page)

    def commit(self) -> None:
        """The process runs on with the direct connection; the old socket is let go
        (what it held unread was delivered on the new one: reset, it tells nobody)."""
        if self.made >= 0:
            if self.repointed is not None:
                go_live(self.made, self.repointed)
            else:
                tcp_repair.set_repair(self.made, False)
            os.close(self.made)
            self.made = -1
        with socket.socket(fileno=self.old) as sock, contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.old = -1
        self.tracee.release()

    def abort(self) -> None:
        """Put the old socket back under the number if it was replaced; let the process run."""
        try:
            if self.joined and self.old >= 0:
                self._inject(self.old)
                self.joined = False
        finally:
            if self.made >= 0:  # still in repair mode: closed, it sends nothing
                os.close(self.made)
                self.made = -1
            if self.old >= 0:
                os.close(self.old)
                self.old = -1
            self.tracee.release()


def repair_socket(
    family: int, local: tuple[str, int], remote: tuple[str, int], send_seq: int,
    recv_next: int, received: bytes,
) -> int:  # fmt: skip
    """A direct connection from `local` to `remote`, left in repair mode (it must not speak
    before the other end exists: a segment to a port with no connection yet is answered
    with a reset): it sends from `send_seq` on, the peer's from `recv_next`, and its
    receive queue holds `received` (what the process has yet to read)."""
    recv_next &= 0xFFFFFFFF
    state = tcp_repair.TcpState(
        send_seq=send_seq & 0xFFFFFFFF,
        recv_seq=(recv_next - len(received)) & 0xFFFFFFFF,
        send_queue=b"",
        received=received,
        mss=MSS[family],
        options=tcp_repair.TCPI_OPT_WSCALE | tcp_repair.TCPI_OPT_SACK,
        snd_wscale=7,
        rcv_wscale=7,
        timestamp=0,
        # snd_wl1, snd_wnd, max_window, rcv_wnd, rcv_wup: from where the queues end.
        window=(recv_next, WINDOW, WINDOW, WINDOW, recv_next),
    )
    return tcp_repair.make_connection(family, local, remote, state, live=False)


def read_state(fd: int) -> tcp_repair.TcpState:
    """The state of connection `fd` (ours, live), read in repair mode: the old sockets
    run on while the ends are frozen (the peer's retransmits), so tcp_repair.read_state
    reads it again until nothing arrived meanwhile."""
    tcp_repair.set_repair(fd, True)
    try:
        return tcp_repair.read_state(fd)
    finally:
        tcp_repair.set_repair(fd, False)


def make_quiet(
    family: int, local: tuple[str, int], remote: tuple[str, int], state: tcp_repair.TcpState
) -> tuple[int, tcp_repair.TcpState]:
    """The connection `state` describes, from `local` to `remote`, in repair mode but for
    its send queue, which go_live() gives it (with `state`, returned): a send queue filled
    in repair mode is retransmitted when its timer fires, repair mode or not, and a
    segment that reaches the peer's node before the peer's end is made is answered with a
    reset."""
    quiet = dataclasses.replace(state, send_queue=b"", unsent=0)
    return tcp_repair.make_connection(family, local, remote, quiet, live=False), state


def go_live(fd: int, state: tcp_repair.TcpState) -> None:
    """A connection of make_quiet(`state`) gets its send queue and leaves repair mode (it
    tells the peer its window): what was sent as sent, not acknowledged (what the peer
    acknowledges from it is then valid), what never was sent now."""
    tcp_repair.go_live(fd, state.send_queue, state.unsent)


def state_fields(state: tcp_repair.TcpState) -> dict[str, Any]:
    """A connection's state but its queues, for a message (a later move's `direct`)."""
    fields = dataclasses.asdict(dataclasses.replace(state, send_queue=b"", received=b""))
    fields["send_queue"] = len(state.send_queue)  # the bytes travel apart
    del fields["received"]
    return fields


def state_from(fields: dict[str, Any], queues: bytes) -> tcp_repair.TcpState:
    """The state state_fields() described, with its queues (send queue first)."""
    try:
        sent = int(fields["send_queue"])
        state = tcp_repair.TcpState(
            **{
                **fields,
                "send_queue": queues[:sent],
                "received": queues[sent:],
                "window": tuple(int(value) for value in fields["window"]),
            }
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise HijackError(f"a malformed TCP state: {exc}") from None
    if len(state.send_queue) != sent:
        raise HijackError(f"a TCP state with {len(queues)} bytes of queues, fewer than {sent}")
    if not 0 <= state.unsent <= sent:
        raise HijackError(f"a TCP state with {state.unsent} of {sent} bytes never sent")
    return state


def holder_of(local: str, peer: str) -> tuple[int, int]:
    """(pid, descriptor) of the process this node manages (attached here, or a migrant
    running here; or a member of its tree) that holds the TCP connection from `local` to
    `peer`: a later move of its peer names only the connection (docs/protocol.md, "Later
    moves")."""
    from hijack.registry import Registry  # not at the top: the helper rarely needs it

    with Registry() as registry:
        records = [r for r in registry.processes() if r.state in ("attached", "running")]
    for record in records:
        with contextlib.suppress(HijackError, OSError):
            return find_holder(record.pid, local, peer)
    raise HijackError(f"no process this node manages holds a TCP connection {local} -> {peer}")


def _socket_inode(pid: int, fd: int) -> int:
    """The inode of the socket under `pid`'s descriptor `fd`; 0 if none is."""
    try:
        return os.stat(f"/proc/{pid}/fd/{fd}").st_ino
    except OSError:
        return 0


def _record_direct(join: dict[str, Any], old_peer: str) -> None:
    """This node's registry: the joined connection is direct (a later move takes it)."""
    from hijack.registry import Registry  # not at the top: the helper rarely needs it

    with Registry() as registry:
        registry.record_direct(str(join["local"]), str(join["remote"]), replaces=old_peer)


def watches_of(pid: int, fd: int) -> list[tuple[int, int, int]]:
    """(epoll descriptor, events, data) of every epoll of `pid` watching the file under
    its number `fd` (not an entry left by an earlier file under that number)."""
    found = []
    for entry in procfs.list_fds(pid):
        if entry.kind is not procfs.FdKind.EPOLL:
            continue
        targets = procfs.read_fdinfo(pid, entry.fd).epoll_targets
        for target in live_targets(pid, entry.fd, targets):
            if target.tfd == fd:
                found.append((entry.fd, target.events, target.data))
    return found


def _queued(fd: int, request: int) -> int:
    value: int = struct.unpack("<i", fcntl.ioctl(fd, request, b"\0" * 4))[0]
    return value


def find_holder(pid: int, local: str, peer: str) -> tuple[int, int]:
    """(pid, descriptor) of the process of `pid`'s tree (itself first, then its
    descendants: a member of a managed tree) holding the TCP connection `local` -> `peer`."""
    try:
        return pid, find_socket(pid, local, peer)
    except HijackError:
        members = read_tree(pid).pids[1:]
        for member in members:
            with contextlib.suppress(HijackError, OSError):
                return member, find_socket(member, local, peer)
        raise


def find_socket(pid: int, local: str, peer: str) -> int:
    """The descriptor of `pid` that is the TCP connection from `local` to `peer`."""
    table = procfs.read_socket_table(pid)
    for entry in procfs.list_fds(pid):
        if entry.kind is not procfs.FdKind.SOCKET:
            continue
        found = table.get(entry.ino)
        if found is None or found.type != socket.SOCK_STREAM:
            continue
        if (found.local, found.remote) == (local, peer) and found.state == "ESTABLISHED":
            return entry.fd
    raise HijackError(f"process {pid} holds no TCP connection from {local} to {peer}")


class LineChannel:
    """The helper's side of the daemon's pipe: one JSON object a line, both ways."""

    def send(self, message: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(message) + "\n")
        sys.stdout.flush()

    def receive(self) -> dict[str, Any]:
        line = sys.stdin.readline()
        if not line:
            raise HijackError("the swap's coordinator is gone")
        message: dict[str, Any] = json.loads(line)
        return message


def serve(channel: Any, request: dict[str, Any]) -> None:
    """One end of one swap, on this node (a session: frozen; `sent` as often as asked;
    `join`; `commit` or `abort`). Any other message, or the coordinator gone, aborts:
    the process gets its old socket back. With `standby` in the request, the helper
    answers `standby` and freezes only when told `freeze`."""
    pid = int(request["pid"])
    local, peer = str(request["local"]), str(request["peer"])
    try:
        found = None
        if not pid:
            pid, fd = holder_of(local, peer)
            found = (pid, fd, _socket_inode(pid, fd))
        if request.get("standby"):
            # Started before a later move's freeze (docs/protocol.md, "Later moves"): ready,
            # the holder found; the process is frozen only at `freeze`.
            channel.send({"phase": "standby", "pid": pid})
            if channel.receive().get("op") != "freeze":
                channel.send({"phase": "aborted"})
                return
        end = FrozenEnd.freeze(pid, local, peer, found)
    except (HijackError, OSError, ValueError) as exc:
        with contextlib.suppress(Exception):  # the coordinator may be gone
            channel.send({"error": f"process {pid}: {exc}"})
        return
    try:
        channel.send({"phase": "frozen", "fd": end.fd})
        owed = bytearray()
        message_of_join: dict[str, Any] = {}
        while True:
            message = channel.receive()
            op = message.get("op")
            if op == "sent":
                queued = end.wait_sent(min(float(message.get("wait", 0)), 30))
                channel.send({"queued": queued, "written": end.written()})
            elif op == "owed":
                owed += base64.b64decode(str(message["data"]))
                channel.send({"phase": "owed", "bytes": len(owed)})
            elif op == "join":
                message_of_join = message
                end.join(
                    split_endpoint(str(message["local"])),
                    split_endpoint(str(message["remote"])),
                    int(message["send_seq"]),
                    int(message["recv_next"]),
                    bytes(owed),
                )
                channel.send({"phase": "joined"})
            elif op == "repoint":
                message_of_join = {"local": end.local, "remote": message["remote"]}
                end.repoint(split_endpoint(str(message["remote"])))
                channel.send({"phase": "joined"})
            elif op == "commit":
                end.commit()
                with contextlib.suppress(HijackError):  # it runs: nothing may fail now
                    _record_direct(message_of_join, str(request["peer"]))
                channel.send({"phase": "done"})
                return
            else:
                break
    except (HijackError, OSError, ValueError, KeyError) as exc:
        end.abort()
        with contextlib.suppress(Exception):
            channel.send({"error": f"process {pid}: {exc}"})
        return
    except BaseException:
        end.abort()
        raise
    end.abort()
    with contextlib.suppress(Exception):
        channel.send({"phase": "aborted"})


HELPER_TIMEOUT = 60.0  # seconds a helper may take to answer one message
HELPER_NAME = "hijack-swap-end"  # its /proc comm (15 bytes at most)


class Helper:
    """A helper process of ours (`python -m hijack.node.swap_end`) serving one end: a
    JSON object a line each way. Closing its input makes it abort what is not committed."""

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "hijack.node.swap_end"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def ask(self, message: dict[str, Any]) -> dict[str, Any]:
        """Its answer to `message` (an `error` answer too)."""
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(json.dumps(message) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            return {"error": "the swap helper ended"}
        answer: dict[str, Any] = json.loads(line)
        return answer

    def close(self) -> None:
        if self.process.stdin is not None:
            with contextlib.suppress(OSError):
                self.process.stdin.close()  # end of input: it aborts what is not committed
        try:
            self.process.wait(HELPER_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()


# How long a frozen end waits for a coordinator whose node does not answer at all (a
# partition: neither its FIN nor a reset comes through, and the channel, idle, would hear
# nothing until the daemon's own timeout, a minute, or the FIN's retransmission, tens of
# seconds after the link is back). As long as the coordinator waits for an end's answer
# (hijack.node.channel's 10 s): past it the coordinator gives the swap up anyway.
NODE_SILENCE = 10.0
PROBE_IDLE, PROBE_INTERVAL = 2, 1  # seconds: the kernel's keep-alive probes of the channel
TCP_INFO_HEAD = struct.Struct("BBBB")  # struct tcp_info: state, ca_state, retransmits, probes
TCP_CLOSE = 7


def watch_node(sock: socket.socket) -> None:
    """The kernel probes the other end's node while `sock` is idle, and gives the connection
    up (ETIMEDOUT) NODE_SILENCE s after that node last answered, probes or data alike
    (TCP_USER_TIMEOUT). A peer that is slow but reachable answers the probes (its kernel
    does): only an unreachable node ends it."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, PROBE_IDLE)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, PROBE_INTERVAL)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(NODE_SILENCE * 1000))


def node_silent(sock: socket.socket) -> bool:
    """Whether the kernel gave connection `sock` up for its peer's node not answering (its
    keep-alive probes or data unacknowledged past TCP_USER_TIMEOUT: closed, probes or
    retransmissions pending), not for a close or a reset of the peer. (Through TLS the
    kernel's ETIMEDOUT reads as an end of stream.)"""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_HEAD.size)
    except OSError:
        return False
    state, _, retransmits, probes = TCP_INFO_HEAD.unpack_from(info)
    return state == TCP_CLOSE and bool(retransmits or probes)


def relay_to_helper(channel: Any, request: dict[str, Any]) -> None:
    """The daemon's `swap_end`: the end is served by a helper process of its own, not by
    the daemon: the daemon is the parent of the migrants it restored, and a parent's
    waitpid() takes the ptrace stops of its child when the tracer is one of its own
    threads. A coordinator gone (closed, reset, or its node silent NODE_SILENCE s: the
    process must not stay frozen through a partition) ends the helper's input: it aborts."""
    with contextlib.suppress(OSError):  # a kernel without TCP_USER_TIMEOUT: the daemon's timeout
        watch_node(channel.sock)
    helper = Helper()
    try:
        message = request
        while True:
            answer = helper.ask(message)
            over = "error" in answer or answer.get("phase") in ("done", "aborted")
            try:
                channel.send(answer)
                if over:
                    return
                message = channel.receive()
            except HijackError as exc:
                if over:
                    raise
                helper.close()  # it aborts (not committed): said once it has
                what = f"process {request['pid']}" if request.get("pid") else "its process"
                why = (
                    f"its node has not answered for {NODE_SILENCE:.0f} s"
                    if node_silent(channel.sock)
                    else str(exc)
                )
                raise HijackError(
                    f"swap end of {what}: its coordinator is gone ({why}); aborted, it runs on"
                    " with its old socket"
                ) from None
    finally:
        helper.close()


def main() -> int:
    # A move refused because the process is traced names its tracer: this, not "python".
    with contextlib.suppress(HijackError):
        process.set_name(HELPER_NAME)
    channel = LineChannel()
    try:
        request = channel.receive()
    except HijackError:
        return 1
    serve(channel, request)
    return 0


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


if __name__ == "__main__":
    sys.exit(main())
