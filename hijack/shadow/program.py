"""The shadow: a process forked out of the target that holds its descriptors.

It is started by `hijack attach` (see hijack.mutator.shadow_fork) holding every
open file description of the target at the same descriptor numbers, and serves
a control socket (JSON lines, docs/protocol.md). It keeps a map from the
target's descriptor numbers to its own, since descriptors it is handed later
(`adopt`) land wherever its own table has room.

The target is the root of a tree: its descendants attached with it (members)
hand their descriptors over with `adopt` and a "member" pid, and the shadow
keeps a map of each member's numbers to its own descriptors too. A description
the shadow holds already (a member's inherited socket, the pipe a child shares
with its parent) is not copied again: several keys name one own descriptor,
which is closed once no key names it.

Its modes:
- HOME: the target runs on this node. The shadow follows it: a descriptor the
  target has closed (or reused for another file) is closed here too, so the
  shadow never keeps open a connection the target meant to close. When the
  target exits, the shadow exits.
- HOLDING: the target was checkpointed and killed (`dump --kill` of an
  attached process): its descriptors were handed over, and the shadow keeps
  them — sockets stay connected, peers see nothing — until a restore takes
  them back (`home` with the restored pid) or the process is detached.

Idle in HOME or HOLDING mode with nothing relayed, it rests: it execve's the
small native holder (hijack.shadow.holder), which holds and follows the same
way, and which execve's this program again, state and request handed over, at
the next control request.

Its own diagnostics go to a log file: descriptors 0-2 may be the target's.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import enum
import os
import selectors
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

from hijack.errors import HijackError
from hijack.registry import node_name
from hijack.shadow import control, holder, relay_link, tls_records
from hijack.shadow.door import Door
from hijack.shadow.relay import ACK_WAIT, RelayHub, decode_unread, decode_unread_datagrams
from hijack.sys import libc, pidfd, procfs
from hijack.sys.process import close_keeping_standard, fill_standard_descriptors

SWAP_PIECE = 512 * 1024  # owed bytes in one answer to a swap's `collect` (base64: 683 KiB)

FOLLOW_INTERVAL = 1.0  # seconds between checks that the target still holds our descriptors
WINDOW_INTERVAL = 0.2  # seconds between looks at the size of a relayed home terminal
RELEASE_DRAIN = 60.0  # seconds a released shadow keeps passing on what its migrant wrote


class Mode(enum.Enum):
    HOME = "home"
    HOLDING = "holding"
    AWAY = "away"  # the process runs on another node: its streams are relayed


class Shadow:
    def __init__(
        self,
        target_pid: int,
        held_fds: list[int],
        control_path: str,
        listener: socket.socket | None = None,
        mode: Mode = Mode.HOME,
    ) -> None:
        self.target_pid = target_pid
        # target's descriptor number -> our own descriptor holding the same description
        self.held: dict[int, int] = {fd: fd for fd in held_fds}
        # member pid -> (its descriptor number -> our own descriptor), as `held`
        self.members: dict[int, dict[int, int]] = {}
        self.member_handles: dict[int, int] = {}  # member pid -> its pidfd, watched at home
        self.control_path = control_path
        self.started_at = time.time()
        self.mode = mode
        self.running = True
        self.release_deadline: float | None = None  # released, ending once drained
        self.selector = selectors.DefaultSelector()
        # Holding, the target is gone (or going): its end is no concern of ours.
        self.target_handle = pidfd.pidfd_open(target_pid) if mode is Mode.HOME else -1
        # Resumed from the holder: the same socket, by its number.
        self.listener = listener if listener is not None else self._listen(control_path)
        self.log_path = ""  # where our log goes (given to the holder when we rest)
        self.pending: socket.socket | None = None  # a request the holder left for us
        self.rest_after = holder.rest_after()
        self.last_request = time.monotonic()
        self.hub = RelayHub(self.selector, log)
        self.door: Door | None = None  # our TCP endpoint, for relays and remote control
        self.identity: relay_link.ShadowIdentity | None = None  # its TLS certificate
        self.token = b""
        self.node = node_name()  # where we are (the attach gave us its HIJACK_NODE)
        self.migrant_here = 0  # the pid of the process, away from home but on this node
        self.migrant_pid = 0  # its pid where it runs, away from home (a socket swap asks)
        self.end_reason = ""  # why we ended: left beside the control socket for `status`
        # Our descriptors given to the hub to relay (each closed by it when its stream
        # ends): what `held` may still name once the process is home again.
        self.relayed: set[int] = set()

    @staticmethod
    def _listen(path: str) -> socket.socket:
        if os.path.exists(path):
            os.unlink(path)  # a stale socket of a shadow that died
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        with control.unix_address(path) as address:
            listener.bind(address)
        os.chmod(path, 0o600)
        listener.listen(16)
        listener.setblocking(False)
        return listener

    def serve(self) -> None:
        self.selector.register(self.listener, selectors.EVENT_READ, self._accept)
        if self.target_handle >= 0:
            self.selector.register(self.target_handle, selectors.EVENT_READ, self._target_exited)
        if self.pending is not None:
            pending, self.pending = self.pending, None
            self._serve_connection(pending)
        next_follow = time.monotonic() + FOLLOW_INTERVAL
        while self.running:
            timeout = max(0.0, next_follow - time.monotonic())
            admitting = self.door.next_deadline() if self.door else None
            if admitting is not None:  # a peer's exchange ends then, done or not
                timeout = min(timeout, max(0.0, admitting - time.monotonic()))
            terminals = self.hub.has_terminals()
            if terminals:
                # No SIGWINCH reaches us (we are in no terminal's foreground group): look.
                timeout = min(timeout, WINDOW_INTERVAL)
            for key, events in self.selector.select(timeout):
                key.data(key.fileobj, events)
            if terminals:
                self.hub.check_window_sizes()
            if self.door is not None:
                self.door.expire()
            if time.monotonic() >= next_follow:
                if self.mode is Mode.HOME:
                    self.follow_target()
                self.follow_members()
                self.hub.expire()
                next_follow = time.monotonic() + FOLLOW_INTERVAL
                if self.may_rest():
                    self.rest()
            if self.release_deadline is not None and (
                self.hub.drained() or time.monotonic() >= self.release_deadline
            ):
                self.running = False
        self.close()

    def close(self) -> None:
        self.hub.close_pump()
        self.hub.release_terminals()
        if self.door is not None:
            self.door.close()
        self.selector.close()
        self.listener.close()
        if os.path.exists(self.control_path):
            os.unlink(self.control_path)
        if self.end_reason:
            with contextlib.suppress(OSError):
                ended_path(self.control_path).write_text(self.end_reason + "\n")

    def may_rest(self) -> bool:
        """Whether we only hold (and follow) descriptors, unasked for `rest_after` seconds."""
        hub = self.hub
        watched = 1 + (self.target_handle >= 0) + len(self.member_handles)
        return (
            self.rest_after is not None
            and time.monotonic() - self.last_request >= self.rest_after
            and self.running
            and self.mode in (Mode.HOME, Mode.HOLDING)
            and self.release_deadline is None
            and self.door is None
            and not (hub.streams or hub.datagrams or hub.listeners or hub.swapped)
            and not (hub.listener_links or hub.pending_listener_links or hub.location)
            and hub.pump is None
            and not (self.relayed or self.migrant_here)
            # Nothing else waits on our loop (a swap's lease, a relay being admitted).
            and len(self.selector.get_map()) == watched
            and len(self.members) <= holder.MAX_MEMBERS
            and len(self.held) + sum(map(len, self.members.values())) <= holder.MAX_KEYS
            and bool(self.log_path)
            and holder.available()
        )

    def rest(self) -> None:
        """Become the holder (hijack.shadow.holder): this process, a fraction of the memory."""
        argv = holder.command(
            python=sys.executable,
            target=self.target_pid,
            control=self.control_path,
            log=self.log_path,
            listener=self.listener.fileno(),
            home=self.mode is Mode.HOME,
            started_at=self.started_at,
            held=self.held,
            members={
                pid: (pid in self.member_handles, table) for pid, table in self.members.items()
            },
        )
        # Our answer to `status` as we rest: the holder gives it while it holds the same.
        status = os.memfd_create("shadow-status", 0)  # inherited by the holder, who closes it
        os.write(status, control.encode({"ok": True, **self.describe()}))
        argv += ["--status-fd", str(status)]
        for fd in {self.listener.fileno(), *self._own_fds()}:
            os.set_inheritable(fd, True)
        log(f"idle: resting as {holder.PROGRAM.name} until the next request")
        try:
            os.execv(holder.PROGRAM, argv)
        except OSError as exc:
            log(f"cannot rest: {exc}; staying as we are")
            self.rest_after = None
            os.close(status)

    def _accept(self, _: Any, __: int) -> None:
        try:
            connection, _address = self.listener.accept()
        except BlockingIOError:
            return
        self._serve_connection(connection)

    def _serve_connection(self, connection: socket.socket) -> None:
        self.last_request = time.monotonic()
        with connection:
            connection.settimeout(2.0)
            peer_uid = control.peer_uid(connection)
            if peer_uid not in (0, os.getuid()):
                # The socket's mode already keeps others out; this holds even
                # if a directory on its path is opened up by mistake.
                log(f"refused a control connection from uid {peer_uid}")
                return
            try:
                message, fds = control.receive(connection)
            except (OSError, HijackError) as exc:
                answer = {"ok": False, "error": str(exc)}
            else:
                answer = self.answer(message, fds)
            with contextlib.suppress(OSError):  # the asker left: nothing to tell
                connection.sendall(control.encode(answer))
                if (
                    answer.get("ok")
                    and message.get("op") == "swap"
                    and message.get("step") == "write"
                ):
                    self._watch_swap(connection.dup(), str(message["swap"]), str(message["stream"]))

    def _watch_swap(self, lease: socket.socket, swap: str, stream: str) -> None:
        """The coordinator of swap `swap` keeps this connection open while it works: when
        it closes (or speaks) the swap is over; if the stream was neither retired nor given
        back by then (the coordinator died), it is relayed on as before."""

        def over(_: Any, __: int) -> None:
            self.selector.unregister(lease)
            lease.close()
            taken = self.hub.streams.get(stream)
            if taken is not None and taken.swapping == swap:
                log(f"swap {swap}: its coordinator is gone; {stream} is relayed on")
                self.hub.swap_resume(stream, swap)

        lease.setblocking(False)
        self.selector.register(lease, selectors.EVENT_READ, over)

    def answer(self, message: control.Message, fds: list[int]) -> control.Message:
        """handle(), with a failure as the answer that says why."""
        try:
            return self.handle(message, fds)
        except (OSError, HijackError) as exc:
            return {"ok": False, "error": str(exc)}
        except Exception as exc:
            log(f"error answering a request: {exc!r}")
            return {"ok": False, "error": f"internal error: {exc!r}"}

    def handle(self, message: control.Message, fds: list[int]) -> control.Message:
        op = message.get("op")
        if op != "adopt":
            for fd in fds:
                os.close(fd)  # descriptors nobody asked us to keep
        if op in ("hello", "status"):
            return {
                "ok": True,
                **self.describe(brief=op == "status" and bool(message.get("brief"))),
            }
        if op == "adopt":
            return self.adopt(message, fds)
        if op == "home":
            return self.come_home(int(message["pid"]), int(message.get("member") or 0))
        if op == "relay_listen":
            return self.open_endpoint(str(message["token"]), str(message.get("trust", "")))
        if op == "migrating":
            return self.migrating(message)
        if op == "hand_back":
            return self.hand_back(message)
        if op == "originals":
            return self.originals(str(message["move"]))
        if op == "migrated":
            handed = self.hub.forget_handed(str(message["move"]))
            self._let_direct_go(message.get("direct") or {})
            self.watch_migrant(str(message["location"]), int(message.get("pid", 0)))
            self.hub.migrated(
                str(message["move"]),
                str(message["location"]),
                decode_unread(message.get("unread", {})),
                {str(k): str(v) for k, v in message.get("listeners", {}).items()},
                set(message.get("present", [])),
            )
            self.hub.datagrams_migrated(
                dict(message.get("datagrams", {})),
                decode_unread_datagrams(message.get("unread_datagrams", {})),
                str(message["move"]),
            )
            self.mode = Mode.AWAY
            if handed or message.get("home_again"):
                return self.home_again(message, handed)
            log(f"the process runs on {self.hub.location} now (move {message['move']})")
            return {"ok": True, **self.describe(brief=bool(message.get("brief")))}
        if op == "swap":
            return self.swap(message)
        if op == "aborted":
            self.hub.aborted(str(message["move"]))
            if not self.hub.location:  # a first move that failed: it is at home again
                self.hub.abandon()
                self.mode = Mode.HOME
                self.follow_members_again()
            return {"ok": True, **self.describe()}
        if op == "release":
            self.end_when_drained(str(message.get("reason") or "released"))
            return {"ok": True}
        return {"ok": False, "error": f"unknown op {op!r}"}

    def adopt(self, message: control.Message, fds: list[int]) -> control.Message:
        """Keep `fds` as the target's descriptors `message["fds"]`; with "hold", stop following.

        With "member": they are that member's; "shared" maps more of its numbers to
        descriptors we hold already (our own numbers), sent once.
        """
        numbers = [int(number) for number in message.get("fds", [])]
        member = int(message.get("member") or 0)
        shared = {int(k): int(v) for k, v in dict(message.get("shared") or {}).items()}
        error = ""
        if len(numbers) != len(fds):
            error = f"{len(numbers)} numbers for {len(fds)} descriptors"
        elif any(own not in self._own_fds() for own in shared.values()):
            error = "a shared descriptor names none of ours"
        elif member and member != self.target_pid and member not in self.members:
            try:
                self._watch_member(member)
            except HijackError as exc:
                error = str(exc)
        if error:
            for fd in fds:
                os.close(fd)
            return {"ok": False, "error": error}
        table = self.members[member] if member and member != self.target_pid else self.held
        for number, fd in [*zip(numbers, fds, strict=True), *shared.items()]:
            previous = table.get(number)
            table[number] = fd
            if previous is not None and previous != fd:
                self._close_unless_named(previous)
        if message.get("hold") and member and member != self.target_pid:
            self._unwatch_member(member)  # checkpointed: kept for its restore
            log(f"holding {len(self.members[member])} descriptors of member {member}")
        elif message.get("hold"):
            self.mode = Mode.HOLDING
            log(f"holding {len(self.held)} descriptors of checkpointed process {self.target_pid}")
        return {"ok": True, **self.describe(brief=bool(message.get("brief")))}

    def open_endpoint(self, token: str, trust: str) -> control.Message:
        """Listen on TCP for the relays and remote requests of the nodes the process goes to.

        `trust`: the cluster's CA certificate and revocation list (PEM), which
        the nodes' certificates must pass; our own certificate is made once.
        """
        if self.identity is None:
            self.identity = relay_link.ShadowIdentity()
        self.identity.trust(trust)
        if self.door is None:
            self.token = bytes.fromhex(token)
            endpoint = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            endpoint.bind(("0.0.0.0", 0))
            endpoint.listen(64)
            self.door = Door(endpoint, self.selector, self._admitted, log)
            self.door.token = self.token
        self.door.identity = self.identity
        port = self.door.listener.getsockname()[1]
        return {"ok": True, "port": port, "certificate": self.identity.fingerprint}

    def _admitted(
        self, header: dict[str, Any], link: relay_link.TlsLink, address: tuple[str, int]
    ) -> None:
        """A connection whose node proved the token (hijack.shadow.door): what it asks."""
        connection = link.sock
        try:
            # A node of the cluster holding the token: our few answers may wait on it.
            connection.settimeout(3.0)
            kind = header.get("kind")
            if kind == "relay":
                control.bound_backoff(connection)
                link.write_all(control.RELAY_ACCEPTED)
                ends = header.get("ends")
                plain = header.get("mode") == relay_link.PLAIN
                if not plain and tls_records.OWN_RECORDS and self.identity is not None:
                    # Past the exchange its records are ours (tls_records): OpenSSL stays
                    # for a suite we do not carry.
                    link.own_records(self.identity.keylog)
                # Small writes at once: a TLS record per write (ACKs, pongs), and a
                # request the process's client sent behind one still unanswered (a
                # pipelining client) is not held back for the first one's ACK.
                connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self.hub.attach_relay(
                    str(header["stream"]),
                    str(header["move"]),
                    connection if plain else link,  # plain: TLS ends after RELAY_ACCEPTED
                    pty=str(header.get("terminal", "")),
                    ends=(str(ends[0]), str(ends[1])) if isinstance(ends, list) else None,
                )
                return
            if kind == "datagrams":  # a UDP socket's datagrams, framed (datagram_link)
                link.write_all(control.RELAY_ACCEPTED)
                connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self.hub.attach_datagram_link(str(header["stream"]), str(header["move"]), link)
                return
            if kind == "listener":
                link.write_all(control.RELAY_ACCEPTED)
                self.hub.attach_listener_link(str(header["stream"]), str(header["move"]), link)
                return
            request = dict(header.get("request", {}))
            if request.get("op") == "relay_listen":  # who we trust is for the local mover only
                answer: control.Message = {"ok": False, "error": "relay_listen is local only"}
            else:
                answer = self.answer(request, [])
            relay_link.send_answer(link, answer)
        except (OSError, HijackError, KeyError, ValueError, IndexError, TypeError) as exc:
            log(f"refused a connection from {address}: {exc}")
        connection.close()

    def migrating(self, message: control.Message) -> control.Message:
        for entry in message.get("proxy", []):
            number = int(entry["fd"])
            # A tree's member other than the root: its own numbers, its streams named.
            member = int(entry.get("member") or 0)
            stream = str(entry.get("stream") or "")
            table = self.members.get(member, {}) if member else self.held
            if number not in table:
                whose = f" of member {member}" if member else ""
                return {"ok": False, "error": f"the shadow holds no fd {number}{whose}"}
            own = table[number]
            if entry.get("datagram"):
                self.hub.adopt_datagram(number, own, stream)
            elif entry.get("terminal"):
                self.hub.adopt_terminal(number, own, stream)
            elif entry.get("master"):
                self.hub.adopt_master(number, own)
            else:
                self.hub.adopt(number, own, bool(entry.get("listener")), stream)
            self.relayed.add(own)
        if self.mode is Mode.HOME:
            self.mode = Mode.HOLDING
        self.hub.migrating(
            str(message.get("move", "")),
            float(message.get("ack_wait", ACK_WAIT)),
            flush=bool(message.get("flush")),
        )
        return {"ok": True, **self.describe(brief=bool(message.get("brief")))}

    def hand_back(self, message: control.Message) -> control.Message:
        """Move `move` brings the process home: stop relaying `streams`, whose originals its
        copy there gets (`originals`); answered once all it wrote is written through."""
        move = str(message["move"])
        streams = [str(stream) for stream in message.get("streams", [])]
        written = {str(k): int(v) for k, v in dict(message.get("written") or {}).items()}
        wait = float(message.get("wait", ACK_WAIT))
        originals = self.hub.hand_back(move, streams, wait, written)
        log(f"move {move}: {len(originals)} originals go back to the process at home")
        return {"ok": True, "shadow_pid": os.getpid(), "originals": originals}

    def swap(self, message: control.Message) -> control.Message:
        """One step of socket swap `swap` of stream `stream` (docs/protocol.md, "Socket
        swap"): `write`, `state`, `collect` (answers `owed`: base64), `resume`, `retire`."""
        swap, stream = str(message["swap"]), str(message["stream"])
        step = message.get("step")
        if step == "write":
            self.hub.swap_write(stream, swap)
            return {"ok": True}
        if step == "state":
            written = message.get("written")
            count = None if written is None else int(written)
            return {"ok": True, **self.hub.swap_state(stream, swap, count)}
        if step == "collect":  # a piece at a time: an answer is at most 1 MiB
            offset = int(message.get("offset", 0))
            owed = self.hub.swap_collect(stream, swap, read=offset == 0)
            piece = bytes(owed[offset : offset + SWAP_PIECE])
            return {"ok": True, "owed": base64.b64encode(piece).decode(), "total": len(owed)}
        if step == "resume":
            self.hub.swap_resume(stream, swap)
            return {"ok": True}
        if step == "retire":
            original = self.hub.swap_retire(stream, swap)
            self.held = {number: own for number, own in self.held.items() if own != original}
            self.relayed.discard(original)
            log(f"swap {swap}: {stream} is direct now; its relay retired")
            return {"ok": True}
        return {"ok": False, "error": f"unknown swap step {step!r:.40}"}

    def originals(self, move: str) -> control.Message:
        """Our descriptors of the originals `move` hands back (the home daemon copies them)."""
        originals = {s.id: s.original for s in self.hub.streams.values() if s.handed == move}
        return {"ok": True, "shadow_pid": os.getpid(), "originals": originals}

    def home_again(self, message: control.Message, handed: dict[str, int]) -> control.Message:
        """The process runs at home with the originals `handed` (stream id -> ours).

        Once no stream is relayed any more we follow it, as when it was
        attached: `held` names the originals under its numbers now
        (`numbers`: its descriptor -> stream id), and no longer what the
        relaying closed.
        """
        numbers = {int(fd): str(stream) for fd, stream in message.get("numbers", {}).items()}
        kept = set(handed.values())
        everything = not self.hub.streams and not self.hub.datagrams
        self.held = {
            number: own
            for number, own in self.held.items()
            # Relayed and not handed back: closed by the hub (its stream ended).
            if own not in kept and not (everything and own in self.relayed)
        }
        self.held.update({fd: handed[stream] for fd, stream in numbers.items() if stream in handed})
        if message.get("members"):
            self._members_home_again(message["members"], handed)
        for own in kept - set(self._own_fds()):
            self._close_unless_named(own)  # an original the process no longer holds
        if not everything:
            log(f"{len(handed)} streams are the process's own again (move {message['move']})")
            return {"ok": True, **self.describe()}
        self.relayed = set()
        self.migrant_here = 0
        self.hub.location, self.hub.pumping, self.hub.listeners = "", False, {}
        self.hub.close_pump()  # nothing relayed: no socket of ours but what the process holds
        log(f"the process is home again with its own descriptors (move {message['move']})")
        return self.come_home(int(message.get("pid", 0)))

    def _members_home_again(
        self, members: dict[str, dict[str, str]], handed: dict[str, int]
    ) -> None:
        """A tree home again: its members' tables anew, under their pids here now, naming
        the originals `handed` (stream id -> ours) by their numbers; each member followed.
        What the old tables named is let go: a copy of what its members held when they
        left (not what they hold now), or a relay the hub closed already."""
        old = self.members
        for pid in list(self.member_handles):
            self._unwatch_member(pid)
        self.members = {
            int(pid): {
                int(fd): handed[stream] for fd, stream in numbers.items() if stream in handed
            }
            for pid, numbers in members.items()
        }
        for pid in self.members:
            with contextlib.suppress(HijackError):  # ended already: let go next time
                self._watch_member(pid)
        kept = set(handed.values())
        for own in {fd for table in old.values() for fd in table.values()}:
            if own not in kept and own not in self.relayed:
                self._close_unless_named(own)
        log(f"{len(self.members)} members of the tree hold their own descriptors again")

    def come_home(self, pid: int, member: int = 0) -> control.Message:
        """The target runs on this node again (restored, maybe under a new pid): follow it.

        With `member` (its pid before): a member of the tree, back as `pid`.
        """
        if member and member != self.target_pid:
            if member not in self.members:
                return {"ok": False, "error": f"process {member} is no member of this tree"}
            self._unwatch_member(member)
            self.members[pid] = self.members.pop(member)
            self._watch_member(pid)
            log(f"member {member} runs at home again as process {pid}")
            return {"ok": True, **self.describe()}
        handle = pidfd.pidfd_open(pid)
        self._unwatch_target()
        self.target_handle = handle
        self.selector.register(handle, selectors.EVENT_READ, self._target_exited)
        self.target_pid = pid
        self.mode = Mode.HOME
        log(f"the target runs at home again as process {pid}")
        return {"ok": True, **self.describe()}

    def describe(self, *, brief: bool = False) -> dict[str, Any]:
        """The status fields (docs/protocol.md). `brief` (a request's "brief": a mover
        frozen, which reads none of them but `streams`): without `fds` and `members`, whose
        socket tables take milliseconds to read (every TCP and unix socket of the host's
        hashes walked), three times in a move's freeze."""
        if brief:
            return {**self._state(), "streams": self.hub.describe()}
        own = {entry.fd: entry for entry in procfs.list_fds(os.getpid())}
        # Read only when needed: with many sockets on the host the tables take
        # tens of milliseconds, and a move waits for this answer frozen.
        holds_sockets = any(
            own[fd].kind is procfs.FdKind.SOCKET for fd in self._own_fds() if fd in own
        )
        sockets = procfs.read_socket_table(os.getpid()) if holds_sockets else {}

        def described(table: dict[int, int]) -> list[dict[str, Any]]:
            fds = []
            for number, fd in sorted(table.items()):
                entry = own.get(fd)
                if entry is None:
                    continue
                found = sockets.get(entry.ino) if entry.kind is procfs.FdKind.SOCKET else None
                fds.append(
                    {
                        "fd": number,
                        "own_fd": fd,
                        "kind": entry.kind.value,
                        "target": found.describe() if found else entry.target,
                        "dev": entry.dev,
                        "ino": entry.ino,
                    }
                )
            return fds

        fds = described(self.held)
        return {
            **self._state(),
            "fds": fds,
            "members": [
                {
                    "pid": member,
                    "following": member in self.member_handles,
                    "fds": described(table),
                }
                for member, table in sorted(self.members.items())
            ],
            "streams": self.hub.describe(),
        }

    def _state(self) -> dict[str, Any]:
        return {
            "shadow_pid": os.getpid(),
            "target_pid": self.target_pid,
            "mode": self.mode.value,
            "started_at": self.started_at,
            "location": self.hub.location,
            "location_pid": self.migrant_pid,
            "endpoint_port": self.door.listener.getsockname()[1] if self.door else 0,
            "swapped": self.hub.swapped,
        }

    def end_when_drained(self, reason: str) -> None:
        """End once what the process wrote has reached its peers (bounded: RELEASE_DRAIN)."""
        if self.release_deadline is None:
            log(f"{reason}; the shadow ends once its streams are drained")
            self.end_reason = reason
            self.release_deadline = time.monotonic() + RELEASE_DRAIN
            # Its ports are free at once: a server started again can listen there.
            for number in self.hub.stop_serving():
                fd = self.held.pop(number, None)
                if fd is not None:
                    self._close_unless_named(fd)

    def watch_migrant(self, location: str, pid: int) -> None:
        """Back on this node (as `pid`), the process is watched as at home: when it ends, we
        end, whether or not a node daemon here tells us. Elsewhere its node's daemon does."""
        self._unwatch_target()
        self.migrant_here = 0
        self.migrant_pid = pid
        if location != self.node or not pid:
            return
        with contextlib.suppress(HijackError):  # ended already: its daemon releases us
            self.target_handle = pidfd.pidfd_open(pid)
            self.selector.register(self.target_handle, selectors.EVENT_READ, self._target_exited)
            self.migrant_here = pid

    def _unwatch_target(self) -> None:
        if self.target_handle >= 0:
            with contextlib.suppress(KeyError):
                self.selector.unregister(self.target_handle)
            os.close(self.target_handle)
            self.target_handle = -1

    def _target_exited(self, _: Any, __: int) -> None:
        self._unwatch_target()
        if self.mode is Mode.AWAY and self.migrant_here:
            self.end_when_drained(f"process {self.migrant_here} ended on this node")
            return
        if self.mode is not Mode.HOME:
            return  # its image is the process now; we keep what it held for the restore
        log(f"target {self.target_pid} exited; the shadow ends")
        self.end_reason = f"process {self.target_pid} exited"
        self.running = False

    def follow_target(self) -> None:
        """Close our copy of every descriptor the target no longer holds."""
        self._follow(self.target_pid, self.held)

    def follow_members(self) -> None:
        """The same for each member running at home, whatever the root's mode (a member
        not followed is held for its restore: checkpointed, not yet back)."""
        for pid in list(self.member_handles):
            self._follow(pid, self.members[pid])

    def _follow(self, pid: int, table: dict[int, int]) -> None:
        for number, fd in sorted(table.items()):
            if not same_file(fd, f"/proc/{pid}/fd/{number}"):
                log(f"process {pid} closed or replaced fd {number}; releasing our copy")
                del table[number]
                self._close_unless_named(fd)

    def follow_members_again(self) -> None:
        """After a tree's move that failed: its members, held for it, run on here."""
        for pid in self.members:
            if pid not in self.member_handles:
                with contextlib.suppress(HijackError):  # ended meanwhile: let go next time
                    self._watch_member(pid)

    def _own_fds(self) -> set[int]:
        """Our descriptors that some key (the target's or a member's) names."""
        return {*self.held.values(), *(fd for t in self.members.values() for fd in t.values())}

    def _let_direct_go(self, direct: dict[str, list[int]]) -> None:
        """The copies we hold of the direct connections a move made again elsewhere
        (`direct`: by member pid, "0" the root, their numbers). The old socket must go:
        held, it keeps the connection's addresses here, and a later move home could not
        make the connection again under them (hijack.node.repoint)."""
        for member, numbers in direct.items():
            pid = int(member)
            table = self.members.get(pid, {}) if pid and pid != self.target_pid else self.held
            for number in numbers:
                own = table.get(int(number))
                if own is None or own in self.relayed:
                    continue  # a relay's original is the hub's to close
                del table[int(number)]
                with contextlib.suppress(OSError):  # never a reason to refuse `migrated`
                    self._close_unless_named(own)

    def _close_unless_named(self, fd: int) -> None:
        """Close `fd` once no key names it any more (a description shared in the tree)."""
        if fd not in self._own_fds():
            close_keeping_standard(fd)

    def _watch_member(self, pid: int) -> None:
        """Follow member `pid` (it runs here): when it ends, what it held is let go. A member
        checkpointed (`adopt` with `hold`) is not watched: we keep what it held."""
        handle = pidfd.pidfd_open(pid)  # first: a member gone already is not taken in
        self.members.setdefault(pid, {})
        self.member_handles[pid] = handle
        self.selector.register(handle, selectors.EVENT_READ, self._member_exited)

    def _unwatch_member(self, pid: int) -> None:
        handle = self.member_handles.pop(pid, -1)
        if handle >= 0:
            with contextlib.suppress(KeyError):
                self.selector.unregister(handle)
            os.close(handle)

    def _member_exited(self, handle: Any, _: int) -> None:
        pid = next((p for p, h in self.member_handles.items() if h == handle), 0)
        self._unwatch_member(pid)
        if pid not in self.members:
            return
        log(f"member {pid} exited; releasing its {len(self.members[pid])} descriptors")
        for fd in self.members.pop(pid).values():
            self._close_unless_named(fd)


def resumed(args: argparse.Namespace) -> Shadow:
    """The shadow the holder hands back (hijack.shadow.holder), as it was when it rested."""
    listener = socket.socket(fileno=args.listener)
    listener.setblocking(False)
    os.set_inheritable(args.listener, False)
    mode = Mode(args.mode)
    shadow = Shadow(args.target, [], args.control, listener, Mode.HOLDING)
    shadow.held = holder.parse_keys(args.held)
    shadow.started_at = args.started_at or shadow.started_at
    if mode is Mode.HOME:
        try:
            shadow.target_handle = pidfd.pidfd_open(args.target)
            shadow.mode = Mode.HOME
        except HijackError:  # it ended while we changed form: answer, then end
            shadow.mode = Mode.HOME
            shadow.end_reason = f"process {args.target} exited"
            shadow.running = False
            log(f"target {args.target} exited; the shadow ends")
    for text in args.member:
        pid, followed, table = holder.parse_member(text)
        shadow.members[pid] = table
        if followed:
            try:
                shadow._watch_member(pid)
            except HijackError:  # it ended while we changed form
                log(f"member {pid} exited; releasing its {len(table)} descriptors")
                for fd in shadow.members.pop(pid).values():
                    shadow._close_unless_named(fd)
    if args.pending is not None:
        shadow.pending = socket.socket(fileno=args.pending)
        os.set_inheritable(args.pending, False)
    for fd in shadow._own_fds():
        os.set_inheritable(fd, False)  # until we rest again: the pump and helpers get none
    log(f"awake: a request came for process {args.target}")
    return shadow


def ended_path(control_path: str) -> Path:
    """Where a shadow that ended by itself says why (`hijack status` shows it)."""
    return Path(control_path).parent / "ended"


def same_file(fd: int, path: str) -> bool:
    try:
        ours = os.fstat(fd)
        theirs = os.stat(path)
    except OSError:
        return False
    return (ours.st_dev, ours.st_ino) == (theirs.st_dev, theirs.st_ino)


def log(text: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} shadow[{os.getpid()}]: {text}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hijack-shadow")
    parser.add_argument("--target", type=int, required=True)
    parser.add_argument("--fds", default="")
    parser.add_argument("--control", required=True)
    parser.add_argument("--log", required=True)
    # From the holder (hijack.shadow.holder), resuming: our state and a request to answer.
    parser.add_argument("--listener", type=int)
    parser.add_argument("--pending", type=int)
    parser.add_argument("--mode", choices=["home", "holding"], default="home")
    parser.add_argument("--started-at", type=float)
    parser.add_argument("--held", default="")
    parser.add_argument("--member", action="append", default=[])
    args = parser.parse_args(argv)
    # Our own output goes to the log; descriptors 0, 1 and 2 belong to the target, and
    # those it has not are /dev/null, so that nothing of ours takes them.
    fill_standard_descriptors()
    log_file = open(args.log, "a", buffering=1)  # noqa: SIM115 - lives as long as the process
    os.set_inheritable(log_file.fileno(), False)
    sys.stdout = sys.stderr = log_file
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    libc.keep_freed_memory(relay_link.RELAY_HEAP)
    if args.listener is None:
        held = [int(fd) for fd in args.fds.split(",") if fd]
        shadow = Shadow(args.target, held, args.control)
        log(f"holding fds {held} of process {args.target}; control at {args.control}")
    else:
        shadow = resumed(args)
    shadow.log_path = args.log
    try:
        shadow.serve()
    finally:
        log("shadow ends")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
