"""The shadow: a process forked out of the target that holds its descriptors.

It is started by `hijack attach` (see hijack.mutator.shadow_fork) with every
open file description of the target at the same descriptor numbers. It serves
a control socket (JSON lines, docs/protocol.md) and, while the target is at
home, follows it: a descriptor the target has closed (or reused for another
file) is closed here too, so the shadow never keeps a connection open that the
target meant to close. When the target exits at home, the shadow exits.

Its own diagnostics go to a log file: descriptors 0-2 are the target's.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import selectors
import signal
import socket
import sys
import time
from typing import Any

from hijack.errors import HijackError
from hijack.shadow import control
from hijack.sys import pidfd, procfs

FOLLOW_INTERVAL = 1.0  # seconds between checks that the target still holds our descriptors


class Shadow:
    def __init__(self, target_pid: int, held_fds: list[int], control_path: str) -> None:
        self.target_pid = target_pid
        self.held_fds = set(held_fds)
        self.control_path = control_path
        self.started_at = time.time()
        self.running = True
        self.selector = selectors.DefaultSelector()
        self.target_handle = pidfd.pidfd_open(target_pid)
        self.listener = self._listen(control_path)

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
        self.selector.register(self.target_handle, selectors.EVENT_READ, self._target_exited)
        next_follow = time.monotonic() + FOLLOW_INTERVAL
        while self.running:
            timeout = max(0.0, next_follow - time.monotonic())
            for key, _ in self.selector.select(timeout):
                key.data(key.fileobj)
            if time.monotonic() >= next_follow:
                self.follow_target()
                next_follow = time.monotonic() + FOLLOW_INTERVAL
        self.close()

    def close(self) -> None:
        self.selector.close()
        self.listener.close()
        if os.path.exists(self.control_path):
            os.unlink(self.control_path)

    def _accept(self, _: Any) -> None:
        try:
            connection, _address = self.listener.accept()
        except BlockingIOError:
            return
        with connection:
            connection.settimeout(2.0)
            try:
                line = connection.makefile("rb").readline(control.MAX_LINE)
                answer = self.handle(control.decode(line))
            except (OSError, HijackError) as exc:
                answer = {"ok": False, "error": str(exc)}
            except Exception as exc:
                log(f"error answering a request: {exc!r}")
                answer = {"ok": False, "error": f"internal error: {exc!r}"}
            with contextlib.suppress(OSError):  # the asker left: nothing to tell
                connection.sendall(control.encode(answer))

    def handle(self, message: control.Message) -> control.Message:
        op = message.get("op")
        if op == "hello" or op == "status":
            return {"ok": True, **self.describe()}
        if op == "release":
            self.running = False
            return {"ok": True}
        return {"ok": False, "error": f"unknown op {op!r}"}

    def describe(self) -> dict[str, Any]:
        sockets = procfs.read_socket_table(os.getpid())
        fds = []
        for entry in procfs.list_fds(os.getpid()):
            if entry.fd not in self.held_fds:
                continue
            found = sockets.get(entry.ino) if entry.kind is procfs.FdKind.SOCKET else None
            target = found.describe() if found else entry.target
            fds.append({"fd": entry.fd, "kind": entry.kind.value, "target": target})
        return {
            "shadow_pid": os.getpid(),
            "target_pid": self.target_pid,
            "started_at": self.started_at,
            "fds": fds,
        }

    def _target_exited(self, _: Any) -> None:
        log(f"target {self.target_pid} exited; the shadow ends")
        self.running = False

    def follow_target(self) -> None:
        """Close our copy of every descriptor the target no longer holds."""
        for fd in sorted(self.held_fds):
            if not same_file(fd, f"/proc/{self.target_pid}/fd/{fd}"):
                log(f"target closed or replaced fd {fd}; releasing our copy")
                os.close(fd)
                self.held_fds.discard(fd)


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
    args = parser.parse_args(argv)
    # Our own output goes to the log; descriptors 0, 1 and 2 belong to the target.
    log_file = open(args.log, "a", buffering=1)  # noqa: SIM115 - lives as long as the process
    os.set_inheritable(log_file.fileno(), False)
    sys.stdout = sys.stderr = log_file
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    held = [int(fd) for fd in args.fds.split(",") if fd]
    shadow = Shadow(args.target, held, args.control)
    log(f"holding fds {held} of process {args.target}; control at {args.control}")
    try:
        shadow.serve()
    finally:
        log("shadow ends")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
