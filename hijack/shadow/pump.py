"""The shadow's native pump: relays carried by a small C program, not by Python.

A request/response load pays the shadow's event loop per message: a wakeup,
a splice in, a splice out, the bookkeeping between, all in Python — about
100 us a message, which holds a relayed redis to a tenth of its rate. Most of
a stream's life needs none of that bookkeeping: both ends open, nothing in
front of the pipes, no move under way. For that *steady state* the hub hands
the stream to relay-pump (hijack/native/relay_pump.c, built at install: `make`
builds it beside its source), which pumps both directions in one epoll loop
(a message: one recv, one send) with the stream's own kernel pipes for what a
sink does not take at once, and gives the stream back — its pipes
holding what they held, the counts of what it moved — when the hub asks (a
move, a status, a close) or when a side ends or fails (the hub then does what
it always did: it reads the end itself; a failure's errno comes with it).

Nothing changes for the guarantees: the pipes are the hub's (their contents
are where the hub's own splicing leaves them), the sockets are the hub's too
(the pump holds copies and closes them before it reports), and everything
that is not the steady state stays in Python. Without the program (not built)
the hub splices in Python, as before; if it dies,
the hub takes every stream back, reading what the pipes hold from the kernel.

Encrypted relays (on by default; HIJACK_PUMP_ENCRYPTED=0 turns it off): once the
shadow carries a relay's records itself (hijack.shadow.tls_records), the hub
can hand it over at a record boundary with each direction's key, iv and next
record number (OP_ADD_TLS; libcrypto's AES-GCM in the pump). The pump seals
what the original sends into records for the relay and opens the relay's
records, passing the node's DATA frames to the original and keeping its last
ACK. The out pipe then holds ciphertext (records sealed, not sent yet), the
in pipe plaintext for the original; the report that gives the stream back
says the record numbers, the ACK, and carries what the pump read and did not
open or parse (a record or frame cut short, or one it does not carry: an
alert, a KeyUpdate, END), which the hub opens at once: nothing is held where
the hub cannot see it. A pump that dies takes the record numbers with it: its
encrypted streams are reset (a plain one goes on in Python).

The node's forwarder (hijack.node.forwarder) hands its ends of encrypted relays
to a pump of its own the same way (OP_ADD_FORWARD, add_forward): there the
"original" is its end of the loopback connection to the process, whose bytes
the pump sends as DATA frames with the forwarder's ACKs, and the relay's records
are the stream's bytes (the in pipe holds what the process does not read yet).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import socket
import struct
import subprocess
import sys
import termios
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hijack.errors import HijackError

SOURCE = Path(__file__).resolve().parent.parent / "native" / "relay_pump.c"
PROGRAM = SOURCE.with_name("relay-pump")
CFLAGS = ("-O2", "-Wall", "-Wextra", "-Werror")
LIBRARIES = ("-lcrypto",)  # AES-GCM of encrypted relays (libssl-dev: the Makefile's DEBS)
ANSWER_WAIT = 5.0  # seconds for the pump to answer a request (it answers between two splices)

OP_ADD, OP_STOP, OP_QUERY, OP_ADD_TLS, OP_ADD_FORWARD = 1, 2, 3, 4, 5
EV_RETURNED, EV_COUNTS = 1, 2
STOPPED, ORIGINAL_EOF, RELAY_EOF, ORIGINAL_ERROR, RELAY_ERROR, TLS_OTHER = 0, 1, 2, 3, 4, 5
REQUEST = struct.Struct("<IIqq")
REPORT = struct.Struct("<IIiiqqqq")
# OP_ADD_TLS, after REQUEST: key size, (unused), key and iv sealing what the original
# sends, key and iv opening what the relay sends, the next record's number each way.
TLS_KEYS = struct.Struct("<II32s12s32s12sQQ")
# OP_ADD_FORWARD, after TLS_KEYS: bytes written to the process's socket in all, and what
# the forwarder's last ACK said.
FORWARD_START = struct.Struct("<QQ")
# A TLS stream's EV_RETURNED, after REPORT: the next record's number each way, the last
# ACK (count, room) and how many came, the bytes of a DATA frame under way not read yet,
# then the lengths of what follows: ciphertext not opened, plaintext not parsed.
TLS_TAIL = struct.Struct("<QQQIIIII")
MESSAGE_LIMIT = 256 * 1024  # a report with its tail (the pump's buffers: about 100 KiB)
# Encrypted relays go through the pump too (TLS in C), not only plain ones, unless
# HIJACK_PUMP_ENCRYPTED=0 (or HIJACK_OWN_RECORDS=0: the pump needs the shadow's own records).
ENCRYPTED = os.environ.get("HIJACK_PUMP_ENCRYPTED", "1") != "0"


@dataclass(frozen=True)
class Report:
    """What the pump says of a stream: given back (why), or its counts so far."""

    event: int
    id: int
    reason: int  # a given-back stream's: STOPPED .. RELAY_ERROR; -1: a stream it does not hold
    err: int  # errno of a failure
    bytes_out: int  # original -> relay since it took the stream
    bytes_in: int  # relay -> original
    out_held: int  # what the pipes hold now
    in_held: int
    tls: TlsReturned | None = None  # an encrypted stream's, given back


@dataclass(frozen=True)
class TlsReturned:
    """What the pump hands back of an encrypted stream besides the counts: the out pipe
    holds ciphertext (records sealed, not sent), the in pipe plaintext for the original."""

    out_sequence: int
    in_sequence: int
    acked: int  # the last ACK's count and room, if `acks`
    room: int
    acks: int
    data_left: int  # bytes of the DATA frame under way the relay has not brought yet
    ciphertext: bytes  # from the relay, not opened: a record cut short, or one it left
    frames: bytes  # opened, not parsed: a frame cut short, or what follows one it left

    @classmethod
    def parse(cls, data: bytes) -> TlsReturned:
        out_sequence, in_sequence, acked, room, acks, data_left, cipher_len, frame_len = (
            TLS_TAIL.unpack_from(data)
        )
        start = TLS_TAIL.size
        if len(data) != start + cipher_len + frame_len:
            raise HijackError("the native relay pump sent a malformed report")
        ciphertext = data[start : start + cipher_len]
        frames = data[start + cipher_len :]
        return cls(out_sequence, in_sequence, acked, room, acks, data_left, ciphertext, frames)


@dataclass(frozen=True)
class TlsKeys:
    """An encrypted stream's record protection, each way (tls_records.Direction's)."""

    out_key: bytes
    out_iv: bytes
    out_sequence: int
    in_key: bytes
    in_iv: bytes
    in_sequence: int


def _keys(keys: TlsKeys) -> bytes:
    return TLS_KEYS.pack(
        len(keys.out_key),
        0,
        keys.out_key,
        keys.out_iv,
        keys.in_key,
        keys.in_iv,
        keys.out_sequence,
        keys.in_sequence,
    )


def parse_report(data: bytes) -> Report:
    if len(data) < REPORT.size:
        raise HijackError("the native relay pump ended")
    tail = TlsReturned.parse(data[REPORT.size :]) if len(data) > REPORT.size else None
    event, stream, reason, err, bytes_out, bytes_in, out_held, in_held = REPORT.unpack_from(data)
    return Report(event, stream, reason, err, bytes_out, bytes_in, out_held, in_held, tail)


def available() -> bool:
    """Whether the native pump can be used here."""
    return os.access(PROGRAM, os.X_OK)


def build() -> None:
    """Compile the pump beside its source if it is missing or older (at install: `make`)."""
    build_program(SOURCE, PROGRAM, LIBRARIES)


def build_program(source: Path, program: Path, libraries: tuple[str, ...] = ()) -> None:
    """Compile one of hijack's native programs (the pump, the shadow holder) beside its
    source if it is missing or older; a partial file never takes its name."""
    if program.exists() and program.stat().st_mtime >= source.stat().st_mtime:
        return
    partial = program.with_name(program.name + ".partial")
    compiled = subprocess.run(
        ["gcc", *CFLAGS, "-o", str(partial), str(source), *libraries],
        capture_output=True,
        text=True,
    )
    if compiled.returncode != 0:
        raise HijackError(f"cannot build {program.name}: {compiled.stderr.strip()}")
    partial.rename(program)


# /proc/sys/fs/pipe-max-size by default: what any process may ask a pipe to hold (more
# needs CAP_SYS_RESOURCE).
PIPE_SIZE = 1024 * 1024
SPLICE_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK


class SplicePipe:
    """A kernel pipe one direction's bytes pass through, never copied into this process:
    the shadow's relays splice through it, and a pump (the shadow's or the forwarder's)
    carries a stream with it.

    `held` counts the bytes in it. A pipe also runs out of slots (one per
    page or part of a page a splice brought), so a splice into it can find it
    full below its size: then it is `full` until some of it is drained.
    """

    def __init__(self, size: int | None = PIPE_SIZE) -> None:
        """A pipe of `size` bytes if it may be (past pipe-max-size only with
        CAP_SYS_RESOURCE), else of pipe-max-size, else (or with `size` None) as the
        kernel makes it."""
        self.read_end, self.write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        for asked in dict.fromkeys((size, PIPE_SIZE) if size else ()):
            with contextlib.suppress(OSError):  # a smaller pipe still works
                fcntl.fcntl(self.write_end, fcntl.F_SETPIPE_SZ, asked)
                break
        self.size = fcntl.fcntl(self.write_end, fcntl.F_GETPIPE_SZ)
        self.held = 0
        self.full = False
        self.drained = False  # the last fill() took less than it asked for: all there was

    def fill(self, source: int) -> int | None:
        """Splice what `source` has into the pipe: bytes moved, 0 at its end, None if none now."""
        self.drained = False
        if self.full or self.held >= self.size:
            return None
        try:
            asked = self.size - self.held
            moved = os.splice(source, self.write_end, asked, flags=SPLICE_FLAGS)
        except BlockingIOError:
            # Nothing to read, or no free slot: with bytes held, take it as
            # the latter and wait for the sink (it is watched while we hold bytes).
            self.full = self.held > 0
            return None
        self.held += moved
        self.drained = 0 < moved < asked
        return moved

    def drain(self, sink: int, limit: int = 0) -> int:
        """Splice what the pipe holds into `sink`, as much as it takes now (at most `limit`
        bytes, if given)."""
        if not self.held:
            return 0
        try:
            count = min(self.held, limit) if limit else self.held
            moved = os.splice(self.read_end, sink, count, flags=SPLICE_FLAGS)
        except BlockingIOError:
            return 0
        self.held -= moved
        if moved:
            self.full = False
        return moved

    def close(self) -> None:
        os.close(self.read_end)
        os.close(self.write_end)


def take_all(pipe: SplicePipe | None) -> bytes:
    """What `pipe` holds, read out of it (its writer is stopped or gone): a relay that
    cannot splice (TLS), or a stream a pump gave back."""
    pieces = []
    while pipe is not None:
        try:
            piece = os.read(pipe.read_end, pipe.size)
        except BlockingIOError:
            piece = b""
        if not piece:
            pipe.held, pipe.full = 0, False
            break
        pieces.append(piece)
    return b"".join(pieces)


def pipe_held(fd: int) -> int:
    """Bytes in a pipe (FIONREAD on its read end)."""
    value = fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0")
    return int(struct.unpack("i", value)[0])


class NativePump:
    """The shadow's handle on its relay-pump process."""

    def __init__(self, log: Callable[[str], None]) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            errors = sys.stderr if hasattr(sys.stderr, "fileno") else subprocess.DEVNULL
            self.process = subprocess.Popen(
                [str(PROGRAM), str(theirs.fileno())],
                pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=errors,
            )
        except OSError:
            ours.close()
            raise
        finally:
            theirs.close()
        # Blocking, without a timeout (a socket with one waits before even a
        # MSG_DONTWAIT read): answers are waited for with select, bounded.
        self.sock = ours
        self.log = log
        self.dead = False
        self.deferred: list[Report] = []  # streams given back while we waited for an answer

    def fileno(self) -> int:
        return self.sock.fileno()

    def add(self, stream: int, fds: list[int], out_held: int, in_held: int) -> None:
        """Hand it stream `stream`: [original, relay, out pipe r/w, in pipe r/w]."""
        socket.send_fds(self.sock, [REQUEST.pack(OP_ADD, stream, out_held, in_held)], fds)

    def add_tls(
        self, stream: int, fds: list[int], out_held: int, in_held: int, keys: TlsKeys
    ) -> None:
        """Hand it encrypted stream `stream` at a record boundary (add's `fds`): it seals
        what the original sends and opens what the relay sends (the node's frames)."""
        request = REQUEST.pack(OP_ADD_TLS, stream, out_held, in_held) + _keys(keys)
        socket.send_fds(self.sock, [request], fds)

    def add_forward(
        self, stream: int, fds: list[int], keys: TlsKeys, delivered: int, acked: int
    ) -> None:
        """Hand it the forwarder's end of encrypted relay `stream` at a record boundary
        (add's `fds`, the "original" being the forwarder's end of the loopback connection
        to the process, both pipes empty): it sends what the process sends as DATA frames
        and our ACKs (`delivered` and `acked`: the counts so far), delivers the shadow's
        records' bytes."""
        request = REQUEST.pack(OP_ADD_FORWARD, stream, 0, 0) + _keys(keys)
        socket.send_fds(self.sock, [request + FORWARD_START.pack(delivered, acked)], fds)

    def stop(self, streams: list[int]) -> dict[int, Report]:
        """Take `streams` back: what the pump said of each (given back by itself meanwhile,
        or now)."""
        for stream in streams:
            self._send(REQUEST.pack(OP_STOP, stream, 0, 0))
        wanted = set(streams)
        found: dict[int, Report] = {}
        for report in self._take_deferred(lambda r: r.id in wanted):
            found[report.id] = report
        while not wanted <= found.keys():
            report = self._receive()
            if report.event == EV_RETURNED and report.id in wanted:
                found[report.id] = report
            elif report.event == EV_RETURNED:
                self.deferred.append(report)
        return found

    def query(self, stream: int) -> Report | None:
        """Its counts of a stream it holds; None once it gave the stream back (the report of
        that is among `reports()` then)."""
        self._send(REQUEST.pack(OP_QUERY, stream, 0, 0))
        while True:
            report = self._receive()
            if report.event == EV_COUNTS and report.id == stream:
                return report if report.reason >= 0 else None
            if report.event == EV_RETURNED:
                self.deferred.append(report)

    def reports(self) -> list[Report]:
        """The streams it gave back by itself (a side ended or failed), without waiting."""
        found = self._take_deferred(lambda r: True)
        while True:
            try:
                data = self.sock.recv(MESSAGE_LIMIT, socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            except OSError:
                data = b""
            report = parse_report(data)
            if report.event == EV_RETURNED:
                found.append(report)
        return found

    def _take_deferred(self, chosen: Callable[[Report], bool]) -> list[Report]:
        taken = [r for r in self.deferred if chosen(r)]
        self.deferred = [r for r in self.deferred if not chosen(r)]
        return taken

    def _send(self, request: bytes) -> None:
        try:
            self.sock.send(request)
        except OSError as exc:
            raise HijackError(f"the native relay pump is gone: {exc}") from None

    def _receive(self) -> Report:
        try:
            if not select.select([self.sock], [], [], ANSWER_WAIT)[0]:
                raise TimeoutError(f"no answer within {ANSWER_WAIT:g} s")
            data = self.sock.recv(MESSAGE_LIMIT)
        except OSError as exc:
            raise HijackError(f"the native relay pump did not answer: {exc}") from None
        return parse_report(data)

    def close(self) -> None:
        """End it: it lets go of every descriptor it holds as it exits."""
        self.dead = True
        self.sock.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(ANSWER_WAIT)
            return
        self.process.kill()
        self.process.wait()


if __name__ == "__main__":  # `python -m hijack.shadow.pump`: build it (the Makefile does)
    build()
