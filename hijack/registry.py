"""The state registry: what hijack knows, in SQLite under the state directory.

The "table of twins": each process hijack attached, its shadow, where it runs
now. Every command opens it, does its work in short transactions, and closes
it; WAL mode lets a node daemon and the CLI use it at once.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import astuple, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from hijack.errors import RegistryError
from hijack.node import naming

if TYPE_CHECKING:
    from hijack.shadow.control import HomeEndpoint

DEFAULT_STATE_DIR = "/var/lib/hijack"
SCHEMA_VERSION = 3

SCHEMA = """
CREATE TABLE IF NOT EXISTS processes (
    pid            INTEGER PRIMARY KEY,
    start_time     INTEGER NOT NULL,  -- /proc/PID/stat starttime: tells a reused pid
    program        TEXT    NOT NULL,
    home_node      TEXT    NOT NULL,
    current_node   TEXT    NOT NULL,
    state          TEXT    NOT NULL,  -- attached, moving, moved, restored, held, gone
    shadow_pid     INTEGER,
    shadow_control TEXT,              -- the shadow's control socket path (home node only)
    attached_at    REAL    NOT NULL,
    updated_at     REAL    NOT NULL,
    relay_address  TEXT,              -- the home shadow's TCP endpoint, "ip:port"
    relay_token    TEXT,              -- the migrant's secret for that endpoint (hex)
    home_pid       INTEGER,           -- its pid at home, for a process that runs here as a migrant
    relay_cert     TEXT,              -- SHA-256 of the home shadow's certificate (hex)
    plain_relays   INTEGER            -- 1: its relays leave TLS (`hijack move --plain-relays`)
);
CREATE TABLE IF NOT EXISTS members (
    pid         INTEGER PRIMARY KEY,  -- a descendant of an attached process, covered by its shadow
    root        INTEGER NOT NULL,     -- the processes row of its tree (the pid `hijack attach` got)
    parent      INTEGER NOT NULL,     -- its parent when it was attached
    start_time  INTEGER NOT NULL,     -- /proc/PID/stat starttime: tells a reused pid
    program     TEXT    NOT NULL
);
CREATE TABLE IF NOT EXISTS moves (
    id           TEXT    PRIMARY KEY,
    pid          INTEGER NOT NULL,    -- its pid on the source node
    program      TEXT    NOT NULL,
    source       TEXT    NOT NULL,
    destination  TEXT    NOT NULL,
    phase        TEXT    NOT NULL,    -- connecting, precopying, streaming, restoring,
                                      -- switching, in-doubt, done, failed
    started_at   REAL    NOT NULL,
    finished_at  REAL,
    bytes_sent   INTEGER NOT NULL DEFAULT 0,
    freeze_ms    REAL,
    new_pid      INTEGER,
    error        TEXT
);
CREATE TABLE IF NOT EXISTS arrivals (
    move        TEXT    PRIMARY KEY,  -- a move this node received
    pid         INTEGER NOT NULL,     -- the process it restored
    outcome     TEXT    NOT NULL,     -- prepared, running, aborted: decided once (protocol.md)
    addresses   TEXT    NOT NULL,     -- JSON {listeners, datagrams}: stream id -> "ip:port" here
    updated_at  REAL    NOT NULL
);
CREATE TABLE IF NOT EXISTS nodes (
    name       TEXT PRIMARY KEY,
    address    TEXT NOT NULL,        -- "ip:port" of its daemon
    last_seen  REAL
);
CREATE TABLE IF NOT EXISTS direct (  -- TCP connections a swap joined (hijack.node.swap)
    local      TEXT NOT NULL,        -- "ip:port" of the end on this node
    remote     TEXT NOT NULL,        -- "ip:port" of its peer, a process another node manages
    recorded   REAL,
    PRIMARY KEY (local, remote)
);
CREATE TABLE IF NOT EXISTS routed (  -- TCP connections relayed by packets, held here
    local      TEXT NOT NULL,        -- "ip:port" of the end on this node (this node's address)
    remote     TEXT NOT NULL,        -- "ip:port" of its peer, on another machine
    origin     TEXT NOT NULL,        -- "ip:port" the peer knows it by, at its home node
    gateway    TEXT NOT NULL,        -- the home node's address its packets go through
    home_node  TEXT NOT NULL,        -- that node's name
    recorded   REAL,
    PRIMARY KEY (local, remote)
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
    """This node's name (hijack.node.naming): $HIJACK_NODE, kept, or from the host name."""
    return naming.node_name(state_dir(), Path(DEFAULT_STATE_DIR))


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
    relay_address: str | None = None
    relay_token: str | None = None
    home_pid: int | None = None
    relay_cert: str | None = None
    plain_relays: int | None = None

    def home_endpoint(self) -> HomeEndpoint:
        """How to reach the home shadow of this process (a migrant, or one moved from here)."""
        from hijack.shadow.control import HomeEndpoint

        try:
            token = bytes.fromhex(self.relay_token or "")
        except ValueError:
            token = b""
        return HomeEndpoint(
            self.relay_address or "", token, self.relay_cert or "", bool(self.plain_relays)
        )


@dataclass(frozen=True)
class MemberRecord:
    """A descendant of an attached process, attached with it (its tree's shadow holds its
    descriptors)."""

    pid: int
    root: int
    parent: int
    start_time: int
    program: str


@dataclass(frozen=True)
class RoutedConnection:
    """A TCP connection relayed by packets that runs on this node (docs/protocol.md,
    "Relays by packets")."""

    local: str  # "ip:port" of its end here: this node's address, its original port
    remote: str  # its peer's "ip:port"
    origin: str  # "ip:port" the peer knows it by: its home node's address
    gateway: str  # the home node's address its packets go through
    home_node: str  # that node's name


@dataclass(frozen=True)
class MoveRecord:
    id: str
    pid: int
    program: str
    source: str
    destination: str
    phase: str
    started_at: float
    finished_at: float | None
    bytes_sent: int
    freeze_ms: float | None
    new_pid: int | None
    error: str | None


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
            # A commit is on disk for every other process at once (the WAL, in the
            # page cache), so it outlives the death of any hijack process, the
            # failure the registry is there for (docs/faults.md); only an OS crash
            # or power loss may take back the last commits — and with them every
            # process the node ran, a move's copy or original included. FULL
            # syncs the disk at each commit: 4 ms each here, and a move's freeze
            # makes several (issue #17).
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(SCHEMA)
            self._migrate()
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except (OSError, sqlite3.Error) as exc:
            raise RegistryError(
                f"cannot open the state registry in {self.directory}: {exc}"
            ) from exc

    def _migrate(self) -> None:
        """Bring a registry written by an older hijack to this schema."""
        (version,) = self._db.execute("PRAGMA user_version").fetchone()
        if 0 < version < 2:
            for column in ("relay_address TEXT", "relay_token TEXT", "home_pid INTEGER"):
                self._db.execute(f"ALTER TABLE processes ADD COLUMN {column}")
        if 0 < version < 3:
            for column in ("relay_cert TEXT", "plain_relays INTEGER"):
                self._db.execute(f"ALTER TABLE processes ADD COLUMN {column}")

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
        members: tuple[MemberRecord, ...] = (),
    ) -> ProcessRecord:
        """`pid` attached, with `members` (its descendants, attached with it: one tree)."""
        with self._transaction() as db:
            db.execute("DELETE FROM members WHERE root=?", (pid,))
            db.executemany(
                "INSERT OR REPLACE INTO members VALUES (?,?,?,?,?)",
                [(m.pid, pid, m.parent, m.start_time, m.program) for m in members],
            )
            self._put_process(
                db,
                pid=pid,
                start_time=start_time,
                program=program,
                state="attached",
                shadow_pid=shadow_pid,
                shadow_control=shadow_control,
            )
            detail = f"shadow {shadow_pid}"
            if members:
                pids = " ".join(str(member.pid) for member in members)
                detail += f", with {len(members)} descendants: {pids}"
            self._log(db, pid, "attached", detail)
        return self.get(pid)

    def record_restored(
        self, pid: int, program: str, members: tuple[MemberRecord, ...] = ()
    ) -> None:
        """A process rebuilt from an image on this node: no shadow here; `members`: the
        rest of its tree, rebuilt with it (status draws them under it)."""
        with self._transaction() as db:
            db.execute("DELETE FROM members WHERE root=?", (pid,))
            db.executemany(
                "INSERT OR REPLACE INTO members VALUES (?,?,?,?,?)",
                [(m.pid, pid, m.parent, m.start_time, m.program) for m in members],
            )
            self._put_process(db, pid=pid, start_time=0, program=program, state="restored")
            detail = program
            if members:
                pids = " ".join(str(member.pid) for member in members)
                detail += f", with {len(members)} descendants: {pids}"
            self._log(db, pid, "restored", detail)

    def rehome(self, old_pid: int, new_pid: int, start_time: int) -> None:
        """A checkpointed process restored on this node, maybe under a new pid: attached again."""
        with self._transaction() as db:
            db.execute(
                "UPDATE processes SET pid=?, start_time=?, state='attached', current_node=?,"
                " updated_at=? WHERE pid=?",
                (new_pid, start_time, node_name(), time.time(), old_pid),
            )
            db.execute("UPDATE members SET root=? WHERE root=?", (new_pid, old_pid))
            db.execute("UPDATE members SET parent=? WHERE parent=?", (new_pid, old_pid))
            self._log(db, new_pid, "restored", f"from the image of {old_pid}")

    def rehome_member(self, old_pid: int, new_pid: int, start_time: int) -> None:
        """A member of a checkpointed tree restored on this node, maybe under a new pid."""
        with self._transaction() as db:
            db.execute(
                "UPDATE members SET pid=?, start_time=? WHERE pid=?", (new_pid, start_time, old_pid)
            )
            db.execute("UPDATE members SET parent=? WHERE parent=?", (new_pid, old_pid))
            self._log(db, new_pid, "restored", f"a member of a tree, from the image of {old_pid}")

    def record_migrant(
        self,
        pid: int,
        start_time: int,
        program: str,
        home_node: str,
        home_pid: int,
        relay_address: str,
        relay_token: str,
        relay_cert: str = "",
        plain_relays: bool = False,
    ) -> None:
        """A process moved here from another node: its streams are relayed from home."""
        with self._transaction() as db:
            self._put_process(
                db,
                pid=pid,
                start_time=start_time,
                program=program,
                state="running",
                home_node=home_node,
                relay_address=relay_address,
                relay_token=relay_token,
                home_pid=home_pid,
                relay_cert=relay_cert,
                plain_relays=int(plain_relays),
            )
            self._log(db, pid, "arrived", f"from the shadow of {home_node}:{home_pid}")

    def settle_arrival(
        self, pid: int, *, home_again: bool = False, members: tuple[MemberRecord, ...] = ()
    ) -> None:
        """A migrant recorded here now runs: if this is its home, its home row becomes this one.

        Found by its relay token (the migrant's own secret, the same on every
        node it goes to), the home row keeps its shadow (pid and control
        socket: status asks it, detach and forget end it) and takes the
        migrant's pid; the old pid's "moved away" would be a second, stale row.
        Called once the move is committed: a move that fails leaves the home
        row as it was. `home_again`: its shadow handed every original back
        (nothing is relayed): the row is an attached process's again, with `members`
        (a tree's, their pids here now) in place of those it was attached with.
        """
        with self._transaction() as db:
            migrant = db.execute(
                "SELECT relay_token, home_node FROM processes WHERE pid=?", (pid,)
            ).fetchone()
            if migrant is None or not migrant[0] or migrant[1] != node_name():
                return
            home = db.execute(
                "SELECT pid, shadow_pid, shadow_control, attached_at FROM processes"
                " WHERE relay_token=? AND pid!=? AND shadow_control IS NOT NULL",
                (migrant[0], pid),
            ).fetchone()
            if home is None:
                return
            old_pid, shadow_pid, shadow_control, attached_at = home
            db.execute(
                "UPDATE processes SET shadow_pid=?, shadow_control=?, attached_at=? WHERE pid=?",
                (shadow_pid, shadow_control, attached_at, pid),
            )
            if home_again:
                db.execute(
                    "UPDATE processes SET state='attached', home_pid=NULL WHERE pid=?", (pid,)
                )
            db.execute("DELETE FROM processes WHERE pid=?", (old_pid,))
            db.execute("UPDATE members SET root=? WHERE root=?", (pid, old_pid))
            if home_again and members:
                db.execute("DELETE FROM members WHERE root=?", (pid,))
                db.executemany(
                    "INSERT OR REPLACE INTO members VALUES (?,?,?,?,?)",
                    [(m.pid, pid, m.parent, m.start_time, m.program) for m in members],
                )
            self._log(db, old_pid, "returned", f"home again as {pid}, shadow {shadow_pid}")

    def moved_on(self, pid: int, location: str) -> None:
        """`pid` was moved from here to `location`: at its home the row stays, as "moved"
        (its shadow here relays it); elsewhere this node forgets it."""
        record = self.find(pid)
        if record is not None and record.home_node == node_name() and record.shadow_control:
            self.set_state(pid, "moved", current_node=location)
        else:
            self.forget(pid, f"moved to {location}")

    def running_migrants(self) -> list[ProcessRecord]:
        """The processes moved here that run here, by the registry's word."""
        rows = self._db.execute(
            "SELECT * FROM processes WHERE state='running' AND relay_token IS NOT NULL"
        ).fetchall()
        return [ProcessRecord(*row) for row in rows]

    @staticmethod
    def _put_process(db: sqlite3.Connection, **columns: object) -> None:
        """Insert (or replace) a processes row; unnamed columns get their defaults."""
        now = time.time()
        here = node_name()
        row = {
            "home_node": here,
            "current_node": here,
            "attached_at": now,
            "updated_at": now,
            **columns,
        }
        names = ", ".join(row)
        marks = ", ".join("?" for _ in row)
        db.execute(
            f"INSERT OR REPLACE INTO processes ({names}) VALUES ({marks})", tuple(row.values())
        )

    def set_relay(
        self,
        pid: int,
        relay_address: str,
        relay_token: str,
        relay_cert: str = "",
        plain_relays: bool = False,
    ) -> None:
        with self._transaction() as db:
            db.execute(
                "UPDATE processes SET relay_address=?, relay_token=?, relay_cert=?,"
                " plain_relays=?, updated_at=? WHERE pid=?",
                (relay_address, relay_token, relay_cert, int(plain_relays), time.time(), pid),
            )

    # -- moves --------------------------------------------------------------------

    def start_move(self, move_id: str, pid: int, program: str, destination: str) -> None:
        with self._transaction() as db:
            db.execute(
                "INSERT INTO moves (id, pid, program, source, destination, phase, started_at)"
                " VALUES (?,?,?,?,?,?,?)",
                (move_id, pid, program, node_name(), destination, "connecting", time.time()),
            )
            self._log(db, pid, "moving", f"to {destination} (move {move_id})")

    def record_received_move(
        self,
        move_id: str,
        pid: int,
        program: str,
        source: str,
        new_pid: int,
        bytes_received: int,
        started_at: float,
    ) -> None:
        """A move this node received and runs: listed beside the moves it made.

        Its mover has the same row (same id) on its own node; sharing one
        state directory, the mover's is kept.
        """
        with self._transaction() as db:
            db.execute(
                "INSERT OR IGNORE INTO moves (id, pid, program, source, destination, phase,"
                " started_at, finished_at, bytes_sent, new_pid) VALUES (?,?,?,?,?,?,?,?,?,?)",
                (
                    move_id,
                    pid,
                    program,
                    source,
                    node_name(),
                    "done",
                    started_at,
                    time.time(),
                    bytes_received,
                    new_pid,
                ),
            )

    def update_move(self, move_id: str, **fields: object) -> None:
        allowed = {"phase", "finished_at", "bytes_sent", "freeze_ms", "new_pid", "error"}
        if not fields or not set(fields) <= allowed:
            raise RegistryError(f"cannot update move fields {sorted(fields)}")
        assignments = ", ".join(f"{name}=?" for name in fields)
        with self._transaction() as db:
            db.execute(f"UPDATE moves SET {assignments} WHERE id=?", (*fields.values(), move_id))
            if "error" in fields or fields.get("phase") == "done":
                row = db.execute("SELECT pid FROM moves WHERE id=?", (move_id,)).fetchone()
                detail = str(fields.get("error") or f"move {move_id} done")
                self._log(db, row[0] if row else None, str(fields.get("phase", "")), detail)

    def moves(self, limit: int = 50) -> list[MoveRecord]:
        rows = self._db.execute(
            "SELECT * FROM moves ORDER BY started_at DESC LIMIT ?", (limit,)
        ).fetchall()
        return [MoveRecord(*row) for row in rows]

    # -- moves received (the destination's side) -------------------------------------

    def record_arrival(
        self, move_id: str, pid: int, outcome: str, addresses: dict[str, dict[str, str]]
    ) -> None:
        with self._transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO arrivals VALUES (?,?,?,?,?)",
                (move_id, pid, outcome, json.dumps(addresses), time.time()),
            )

    def arrival(self, move_id: str) -> tuple[int, str, dict[str, dict[str, str]]] | None:
        """(pid, outcome, addresses) of a move this node received, if it has a record.

        `addresses`: the `listeners` and `datagrams` its `prepared` answer gave.
        """
        row = self._db.execute(
            "SELECT pid, outcome, addresses FROM arrivals WHERE move=?", (move_id,)
        ).fetchone()
        if row is None:
            return None
        return int(row[0]), str(row[1]), dict(json.loads(row[2]))

    def node_address(self, name: str) -> str | None:
        row = self._db.execute("SELECT address FROM nodes WHERE name=?", (name,)).fetchone()
        return str(row[0]) if row else None

    def unfinished_moves(self) -> list[MoveRecord]:
        rows = self._db.execute(
            "SELECT * FROM moves WHERE phase NOT IN ('done', 'failed') ORDER BY started_at"
        ).fetchall()
        return [MoveRecord(*row) for row in rows]

    def record_node(self, name: str, address: str) -> None:
        with self._transaction() as db:
            db.execute("INSERT OR REPLACE INTO nodes VALUES (?,?,?)", (name, address, time.time()))

    def record_direct(self, local: str, remote: str, replaces: str = "") -> None:
        """The connection `local` -> `remote` on this node is a direct one (a later move
        of its process takes it along); `replaces`: the remote it had until now."""
        with self._transaction() as db:
            db.execute("DELETE FROM direct WHERE local=? AND remote=?", (local, replaces))
            db.execute("INSERT OR REPLACE INTO direct VALUES (?,?,?)", (local, remote, time.time()))

    def direct_connections(self) -> set[tuple[str, str]]:
        return {(str(a), str(b)) for a, b in self._db.execute("SELECT local, remote FROM direct")}

    def forget_direct(self, local: str, remote: str) -> None:
        with self._db as db:
            db.execute("DELETE FROM direct WHERE local=? AND remote=?", (local, remote))

    def record_routed(self, connection: RoutedConnection) -> None:
        """`connection` runs on this node, relayed by packets (hijack.node.packet_relay)."""
        with self._transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO routed VALUES (?,?,?,?,?,?)",
                (*astuple(connection), time.time()),
            )

    def routed_connections(self) -> dict[tuple[str, str], RoutedConnection]:
        """By their (local, remote) addresses."""
        rows = self._db.execute(
            "SELECT local, remote, origin, gateway, home_node FROM routed"
        ).fetchall()
        return {(row[0], row[1]): RoutedConnection(*map(str, row)) for row in rows}

    def forget_routed(self, local: str, remote: str) -> None:
        with self._db as db:
            db.execute("DELETE FROM routed WHERE local=? AND remote=?", (local, remote))

    def nodes(self) -> list[tuple[str, str, float | None]]:
        return [tuple(row) for row in self._db.execute("SELECT * FROM nodes ORDER BY name")]

    def set_state(self, pid: int, state: str, current_node: str | None = None) -> None:
        with self._transaction() as db:
            db.execute(
                "UPDATE processes SET state=?, current_node=COALESCE(?, current_node),"
                " updated_at=? WHERE pid=?",
                (state, current_node, time.time(), pid),
            )
            self._log(db, pid, state, current_node or "")

    def forget(self, pid: int, reason: str) -> None:
        """End the record of `pid`, and of the members of its tree."""
        with self._transaction() as db:
            db.execute("DELETE FROM processes WHERE pid=?", (pid,))
            db.execute("DELETE FROM members WHERE root=?", (pid,))
            self._log(db, pid, "forgotten", reason)

    def forget_member(self, pid: int, reason: str) -> None:
        with self._transaction() as db:
            db.execute("DELETE FROM members WHERE pid=?", (pid,))
            self._log(db, pid, "forgotten", reason)

    def members(self, root: int) -> list[MemberRecord]:
        """The members attached with `root`, by pid (their `parent` links make the tree)."""
        rows = self._db.execute(
            "SELECT pid, root, parent, start_time, program FROM members WHERE root=? ORDER BY pid",
            (root,),
        ).fetchall()
        return [MemberRecord(*row) for row in rows]

    def member(self, pid: int) -> MemberRecord | None:
        """The member record of `pid` if it was attached as a member of a tree."""
        row = self._db.execute(
            "SELECT pid, root, parent, start_time, program FROM members WHERE pid=?", (pid,)
        ).fetchone()
        return MemberRecord(*row) if row else None

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
