"""A write load on PostgreSQL over ONE session: run as a script, `python pgload.py HOST PORT`.

It speaks the frontend/backend protocol (version 3.0, simple query, trust
authentication) itself, from the standard library alone: the tests need no
driver, and it runs inside a test node as a plain program. It connects as
user postgres, makes table `rows`, prints "session PID" (the backend's pid,
from BackendKeyData), then inserts rows 0, 1, 2, ... each its own
transaction (autocommit), counting those whose commit was acknowledged:
being sequential on one session, the acknowledged ones are 0 .. N-1. Between
two inserts it answers a line on stdin:

- "count": prints "acknowledged N";
- "pid": asks pg_backend_pid() through the same session, prints "backend PID";
- "stop": ends the session (Terminate), prints "acknowledged N", exits 0.

Any error, a connection closed or a wrong answer: prints "FAIL why", exits 1.
"""

from __future__ import annotations

import select
import socket
import struct
import sys

PROTOCOL_3_0 = 196608
TIMEOUT = 60.0  # one answer, however long a freeze or a move holds it


class Session:
    """One connection to a PostgreSQL backend, one simple query at a time."""

    def __init__(self, host: str, port: int, user: str, database: str) -> None:
        self.connection = socket.create_connection((host, port), timeout=TIMEOUT)
        self.backend_pid = 0
        options = b"".join(
            f"{key}\0{value}\0".encode() for key, value in (("user", user), ("database", database))
        )
        body = struct.pack("!i", PROTOCOL_3_0) + options + b"\0"
        self.connection.sendall(struct.pack("!i", len(body) + 4) + body)
        self._until_ready()

    def _read(self, size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = self.connection.recv(size - len(data))
            if not chunk:
                raise ConnectionError("the server closed the connection")
            data += chunk
        return data

    def _message(self) -> tuple[bytes, bytes]:
        kind, length = struct.unpack("!ci", self._read(5))
        return kind, self._read(length - 4)

    def _until_ready(self) -> list[list[str | None]]:
        """Read messages up to ReadyForQuery: the data rows, or raise the server's error."""
        rows: list[list[str | None]] = []
        error = None
        while True:
            kind, body = self._message()
            if kind == b"R" and struct.unpack("!i", body[:4])[0] != 0:
                raise RuntimeError(f"authentication asked: {body!r} (the test runs trust)")
            if kind == b"K":
                self.backend_pid = struct.unpack("!i", body[:4])[0]
            elif kind == b"D":
                rows.append(self._columns(body))
            elif kind == b"E":
                error = body.replace(b"\0", b" ").decode(errors="replace").strip()
            elif kind == b"Z":
                if error is not None:
                    raise RuntimeError(f"the server answered an error: {error}")
                return rows

    @staticmethod
    def _columns(body: bytes) -> list[str | None]:
        (count,), offset, columns = struct.unpack("!h", body[:2]), 2, []
        for _ in range(count):
            (size,) = struct.unpack("!i", body[offset : offset + 4])
            offset += 4
            columns.append(None if size < 0 else body[offset : offset + size].decode())
            offset += max(size, 0)
        return columns

    def query(self, sql: str) -> list[list[str | None]]:
        body = sql.encode() + b"\0"
        self.connection.sendall(b"Q" + struct.pack("!i", len(body) + 4) + body)
        return self._until_ready()

    def terminate(self) -> None:
        self.connection.sendall(b"X" + struct.pack("!i", 4))
        self.connection.close()


def load(host: str, port: int) -> None:
    session = Session(host, port, "postgres", "postgres")
    session.query("create table if not exists rows (n integer primary key)")
    print(f"session {session.backend_pid}", flush=True)
    acknowledged = 0
    while True:
        if select.select([sys.stdin], [], [], 0)[0]:
            request = sys.stdin.readline().strip()
            if request == "count":
                print(f"acknowledged {acknowledged}", flush=True)
            elif request == "pid":
                print(f"backend {session.query('select pg_backend_pid()')[0][0]}", flush=True)
            elif request == "stop":
                session.terminate()
                print(f"acknowledged {acknowledged}", flush=True)
                return
            else:
                raise RuntimeError(f"asked {request!r}")
            continue
        session.query(f"insert into rows values ({acknowledged})")
        acknowledged += 1


if __name__ == "__main__":
    try:
        load(sys.argv[1], int(sys.argv[2]))
    except Exception as error:
        print(f"FAIL {type(error).__name__}: {error}", flush=True)
        sys.exit(1)
