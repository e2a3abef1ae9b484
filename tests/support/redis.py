"""A redis-server from Debian's package on loopback, and a client speaking its protocol."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

REDIS_SERVER = shutil.which("redis-server")
POLL_TIMEOUT = 10.0
EXIT_TIMEOUT = 30.0


def wait_until(condition: Callable[[], bool], what: str, timeout: float = POLL_TIMEOUT) -> None:
    """Poll `condition` (a look at a file) until it holds; bounded."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.005)


class Resp:
    """A client connection speaking RESP (the Redis protocol), one command at a time."""

    def __init__(self, port: int) -> None:
        self.connection = socket.create_connection(("127.0.0.1", port), timeout=POLL_TIMEOUT)
        self.replies = self.connection.makefile("rb")

    def command(self, *args: str | bytes) -> bytes | int | None:
        self.send(*args)
        return self.reply()

    def send(self, *args: str | bytes) -> None:
        encoded = [arg.encode() if isinstance(arg, str) else arg for arg in args]
        request = b"".join(b"$%d\r\n%s\r\n" % (len(arg), arg) for arg in encoded)
        self.connection.sendall(b"*%d\r\n" % len(encoded) + request)

    def reply(self) -> bytes | int | None:
        line = self.replies.readline()
        assert line.endswith(b"\r\n"), f"connection closed mid-reply ({line!r})"
        kind, rest = line[:1], line[1:-2]
        if kind == b"+":
            return rest
        if kind == b":":
            return int(rest)
        if kind == b"$":
            if int(rest) < 0:
                return None
            data = self.replies.read(int(rest) + 2)
            return data[:-2]
        raise AssertionError(f"redis answered {line!r}")

    def closed_by_peer(self) -> bool:
        return self.replies.read(1) == b""

    def close(self) -> None:
        self.replies.close()
        self.connection.close()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@contextlib.contextmanager
def redis_server(directory: Path) -> Iterator[tuple[subprocess.Popen[bytes], int, Path]]:
    """redis-server on 127.0.0.1 and a free port, no persistence; yields (server, port, log)."""
    assert REDIS_SERVER is not None
    log, port = directory / "redis.log", free_port()
    argv = [REDIS_SERVER, "--bind", "127.0.0.1", "--port", str(port), "--daemonize", "no"]
    argv += ["--save", "", "--appendonly", "no", "--dir", str(directory)]
    with open(log, "wb") as output:
        server = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=output, stderr=output)
    try:
        wait_until(
            lambda: b"Ready to accept connections" in log.read_bytes() or server.poll() is not None,
            "redis-server starting",
        )
        assert server.poll() is None, log.read_text()
        yield server, port, log
    finally:
        if server.poll() is None:
            server.kill()
        server.wait(timeout=EXIT_TIMEOUT)
