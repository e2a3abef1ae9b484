"""The state registry: what hijack knows, in SQLite under the state directory.

The "table of twins": each process hijack attached, its shadow, where it runs
now. Every command opens it, does its work in short transactions, and closes
it; WAL mode lets a node daemon and the CLI use it at once.
"""

from __future__ import annotations

import os
import socket
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from hijack.errors import RegistryError

DEFAULT_STATE_DIR = "/var/lib/hijack"
SCHEMA_VERSION = 1

SCHEMA = """
CREATE TABLE IF NOT EXISTS processes (
    pid            INTEGER PRIMARY KEY,
    start_time     INTEGER NOT NULL,  -- /proc/PID/stat starttime: tells a reused pid
    program        TEXT    NOT NULL,
    home_node      TEXT    NOT NULL,
    current_node   TEXT    NOT NULL,
    state          TEXT    NOT NULL,  -- attached, moving, moved, restored, gone
    shadow_pid     INTEGER,
    shadow_control TEXT,              -- the shadow's control socket path
    attached_at    REAL    NOT NULL,
    updated_at     REAL    NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    id     INTEGER PRIMARY KEY AUTOINCREMENT,
    at     REAL    NOT NULL,
    pid    INTEGER,
    kind   TEXT    NOT NULL,
    detail TEXT    NOT NULL
);
"""


def state_dir() -> Path:
    """The state directory: $HIJACK_STATE_DIR, else /var/lib/hijack."""
    return Path(os.environ.get("HIJACK_STATE_DIR") or DEFAULT_STATE_DIR)


def node_name() -> str:
    """This node's name: $HIJACK_NODE, else the host name."""
    return os.environ.get("HIJACK_NODE") or socket.gethostname()


@dataclass(frozen=True)
class ProcessRecord:
    pid: int
    start_time: int
    program: str
    home_node: str
    current_node: str
    state: str
    shadow_pid: int | None
    shadow_control: str | None
    attached_at: float
    updated_at: float


@dataclass(frozen=True)
class EventRecord:
    at: float
    pid: int | None
    kind: str
    detail: str


class Registry:
    def __init__(self, directory: Path | None = None) -> None:
        self.directory = directory or state_dir()
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self.path = self.directory / "hijack.db"
            self._db = sqlite3.connect(self.path, timeout=10.0, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.executescript(SCHEMA)
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except (OSError, sqlite3.Error) as exc:
            raise RegistryError(
                f"cannot open the state registry in {self.directory}: {exc}"
            ) from exc

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            raise RegistryError(f"state registry {self.path}: {exc}") from exc

    def record_attached(
        self,
        pid: int,
        start_time: int,
        program: str,
        shadow_pid: int,
        shadow_control: str,
    ) -> ProcessRecord:
        now = time.time()
        here = node_name()
        with self._transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO processes VALUES (?,?,?,?,?,?,?,?,?,?)",
                (
                    pid,
                    start_time,
                    program,
                    here,
                    here,
                    "attached",
                    shadow_pid,
                    shadow_control,
                    now,
                    now,
                ),
            )
            self._log(db, pid, "attached", f"shadow {shadow_pid}")
        return self.get(pid)

    def record_restored(self, pid: int, program: str) -> None:
        """A process rebuilt from an image on this node: no shadow here."""
        now = time.time()
        here = node_name()
        with self._transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO processes VALUES (?,?,?,?,?,?,?,?,?,?)",
                (pid, 0, program, here, here, "restored", None, None, now, now),
            )
            self._log(db, pid, "restored", program)

    def rehome(self, old_pid: int, new_pid: int, start_time: int) -> None:
        """A checkpointed process restored on this node, maybe under a new pid: attached again."""
        with self._transaction() as db:
            db.execute(
                "UPDATE processes SET pid=?, start_time=?, state='attached', current_node=?,"
                " updated_at=? WHERE pid=?",
                (new_pid, start_time, node_name(), time.time(), old_pid),
            )
            self._log(db, new_pid, "restored", f"from the image of {old_pid}")

    def set_state(self, pid: int, state: str, current_node: str | None = None) -> None:
        with self._transaction() as db:
            db.execute(
                "UPDATE processes SET state=?, current_node=COALESCE(?, current_node),"
                " updated_at=? WHERE pid=?",
                (state, current_node, time.time(), pid),
            )
            self._log(db, pid, state, current_node or "")

    def forget(self, pid: int, reason: str) -> None:
        with self._transaction() as db:
            db.execute("DELETE FROM processes WHERE pid=?", (pid,))
            self._log(db, pid, "forgotten", reason)

    def find(self, pid: int) -> ProcessRecord | None:
        row = self._db.execute("SELECT * FROM processes WHERE pid=?", (pid,)).fetchone()
        return ProcessRecord(*row) if row else None

    def get(self, pid: int) -> ProcessRecord:
        record = self.find(pid)
        if record is None:
            raise RegistryError(f"process {pid} is not known to hijack (not attached)", pid=pid)
        return record

    def processes(self) -> list[ProcessRecord]:
        rows = self._db.execute("SELECT * FROM processes ORDER BY pid").fetchall()
        return [ProcessRecord(*row) for row in rows]

    def recent_events(self, limit: int = 20) -> list[EventRecord]:
        rows = self._db.execute(
            "SELECT at, pid, kind, detail FROM events ORDER BY id DESC LIMIT ?", (limit,)
        ).fetchall()
        return [EventRecord(*row) for row in rows]

    @staticmethod
    def _log(db: sqlite3.Connection, pid: int | None, kind: str, detail: str) -> None:
        db.execute(
            "INSERT INTO events (at, pid, kind, detail) VALUES (?,?,?,?)",
            (time.time(), pid, kind, detail),
        )
