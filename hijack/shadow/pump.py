"""The shadow's native pump: plain relays spliced by a small C program, not by Python.

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
ANSWER_WAIT = 5.0  # seconds for the pump to answer a request (it answers between two splices)

OP_ADD, OP_STOP, OP_QUERY = 1, 2, 3
EV_RETURNED, EV_COUNTS = 1, 2
STOPPED, ORIGINAL_EOF, RELAY_EOF, ORIGINAL_ERROR, RELAY_ERROR = 0, 1, 2, 3, 4
REQUEST = struct.Struct("<IIqq")
REPORT = struct.Struct("<IIiiqqqq")


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


def available() -> bool:
    """Whether the native pump can be used here."""
    return os.access(PROGRAM, os.X_OK)


def build() -> None:
    """Compile the pump beside its source if it is missing or older (at install: `make`)."""
    build_program(SOURCE, PROGRAM)


def build_program(source: Path, program: Path) -> None:
    """Compile one of hijack's native programs (the pump, the shadow holder) beside its
    source if it is missing or older; a partial file never takes its name."""
    if program.exists() and program.stat().st_mtime >= source.stat().st_mtime:
        return
    partial = program.with_name(program.name + ".partial")
    compiled = subprocess.run(
        ["gcc", *CFLAGS, "-o", str(partial), str(source)], capture_output=True, text=True
    )
    if compiled.returncode != 0:
        raise HijackError(f"cannot build {program.name}: {compiled.stderr.strip()}")
    partial.rename(program)


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
                data = self.sock.recv(REPORT.size, socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            except OSError:
                data = b""
            if not data:
                raise HijackError("the native relay pump ended")
            report = Report(*REPORT.unpack(data))
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
            data = self.sock.recv(REPORT.size)
        except OSError as exc:
            raise HijackError(f"the native relay pump did not answer: {exc}") from None
        if len(data) != REPORT.size:
            raise HijackError("the native relay pump ended")
        return Report(*REPORT.unpack(data))

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
