"""PostgreSQL 15 from Debian's package: a cluster of its own in a temporary directory, run
as the postgres user (postgres refuses root), and a write load over one session.

The cluster lives in a harness directory others may traverse (0711), not in
pytest's tmp_path (0700, root's): the postgres user must reach its data
directory and its socket directory there. Every program of the cluster runs
through `setpriv` as postgres, which execs it: the pid a Popen returns is the
postmaster's own, and it works alike inside a test node (whose spawn keeps
its preexec_fn for the namespaces).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hijack.process.tree import read_tree
from hijack.sys import sysv
from support.nodes import read_line
from support.redis import wait_until
from support.tempdirs import make_temp_dir, remove_temp_dir

BIN = Path("/usr/lib/postgresql/15/bin")
POSTGRES = BIN / "postgres" if os.access(BIN / "postgres", os.X_OK) else None
PSQL = shutil.which("psql")
MISSING = (
    None
    if POSTGRES is not None and PSQL is not None and shutil.which("setpriv")
    else "PostgreSQL 15 (Debian packages postgresql-15, postgresql-client-15) is not installed"
)
AS_POSTGRES = ("setpriv", "--reuid=postgres", "--regid=postgres", "--clear-groups", "--")
LOAD = Path(__file__).with_name("pgload.py")  # the load, a script (its docstring)
READY = "database system is ready to accept connections"
SHUT_DOWN = "database system is shut down"
# The postmaster, its checkpointer, background writer, WAL writer, autovacuum launcher
# and logical replication launcher, once it accepts connections.
MEMBERS = 6
LINE_TIMEOUT = 60.0  # one answer of the load, however long a freeze or a move holds it
RUN_TIMEOUT = 60.0


@dataclass(frozen=True)
class Cluster:
    """A cluster initialized (initdb) under `directory`: data/, sockets/, postgres.log."""

    directory: Path
    port: int

    @property
    def data(self) -> Path:
        return self.directory / "data"

    @property
    def sockets(self) -> Path:
        return self.directory / "sockets"

    @property
    def log(self) -> Path:
        return self.directory / "postgres.log"

    def postmaster(self) -> list[str]:
        """The postmaster's command line: TCP on 127.0.0.1:port, its socket in sockets/."""
        assert POSTGRES is not None
        settings = {
            "port": self.port,
            "listen_addresses": "127.0.0.1",
            "unix_socket_directories": self.sockets,
            # An autovacuum worker comes and goes on its own time: none during a test, whose
            # tree must be the same before and after (the launcher stays, a member).
            "autovacuum_naptime": "1d",
        }
        options = [f"--{name}={value}" for name, value in settings.items()]
        return [*AS_POSTGRES, str(POSTGRES), "-D", str(self.data), *options]

    def pg_ctl(self, *args: str) -> list[str]:
        return [*AS_POSTGRES, str(BIN / "pg_ctl"), "-D", str(self.data), *args]

    def psql(self, sql: str, host: str = "127.0.0.1") -> list[str]:
        """psql running `sql`, unaligned and bare (one row a line); `host` a socket
        directory or an address."""
        assert PSQL is not None
        where = ["-h", host, "-p", str(self.port), "-U", "postgres", "-d", "postgres"]
        return [PSQL, *where, "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql]

    def load(self) -> list[str]:
        return [sys.executable, str(LOAD), "127.0.0.1", str(self.port)]

    def ready(self) -> bool:
        return READY in self.log.read_text(errors="replace")

    def shut_down(self) -> bool:
        return SHUT_DOWN in self.log.read_text(errors="replace")


@contextlib.contextmanager
def initialized(port: int) -> Iterator[Cluster]:
    """initdb a cluster (trust, no fsync of its files: a test's) for 127.0.0.1:`port`;
    its directory removed at the end (every process of it ended by then)."""
    directory = make_temp_dir("hijack-pg-")
    cluster = Cluster(directory, port)
    try:
        directory.chmod(0o711)
        owner = pwd.getpwnam("postgres")
        for path in (cluster.data, cluster.sockets):
            path.mkdir(0o700)
            os.chown(path, owner.pw_uid, owner.pw_gid)
        initdb = [*AS_POSTGRES, str(BIN / "initdb"), "-D", str(cluster.data)]
        initdb += ["-A", "trust", "-U", "postgres", "--no-sync", "--no-instructions"]
        done = subprocess.run(initdb, capture_output=True, text=True, timeout=RUN_TIMEOUT)
        assert done.returncode == 0, done.stdout + done.stderr
        yield cluster
    finally:
        try:
            remove_segment(cluster)
        finally:
            remove_temp_dir(directory)


def remove_segment(cluster: Cluster) -> None:
    """Remove the System V segment a killed postmaster (a test that failed) left behind, as
    its pid file names it, once nothing attaches it: a clean shutdown removes its own."""
    with contextlib.suppress(FileNotFoundError):
        lines = (cluster.data / "postmaster.pid").read_text().splitlines()
        fields = lines[6].split() if len(lines) > 6 else []
        if len(fields) == 2:
            key, shmid = (int(field) for field in fields)
            found = sysv.shared_memory().get(shmid)
            if found is not None and found.nattch == 0 and found.owner.key & 0xFFFFFFFF == key:
                sysv.remove("shm", shmid)


def start(cluster: Cluster, spawn: Callable[..., subprocess.Popen[Any]]) -> subprocess.Popen[Any]:
    """The postmaster started by `spawn` (subprocess.Popen, a node's spawn), its output in
    the cluster's log; returned once it accepts connections with all its members."""
    with open(cluster.log, "ab") as log:
        postmaster = spawn(cluster.postmaster(), stdin=subprocess.DEVNULL, stdout=log, stderr=log)

    def ready() -> bool:
        assert postmaster.poll() is None, cluster.log.read_text()
        return cluster.ready() and len(read_tree(postmaster.pid).members) >= MEMBERS

    wait_until(ready, "the postmaster ready with its members", RUN_TIMEOUT)
    return postmaster


class Load:
    """The load (pgload.py) started by the caller with stdin and stdout pipes: its
    session's backend pid, read once it runs."""

    def __init__(self, process: subprocess.Popen[Any]) -> None:
        self.process = process
        self.session = int(self._answer("session"))

    def _answer(self, word: str) -> str:
        line = read_line(self.process, LINE_TIMEOUT)
        found, _, value = line.partition(" ")
        assert found == word, f"the load said {line!r}, not {word}"
        return value

    def _ask(self, request: str, word: str) -> str:
        assert self.process.stdin is not None
        self.process.stdin.write(f"{request}\n".encode())
        self.process.stdin.flush()
        return self._answer(word)

    def acknowledged(self) -> int:
        return int(self._ask("count", "acknowledged"))

    def backend(self) -> int:
        """pg_backend_pid(), asked through the load's session."""
        return int(self._ask("pid", "backend"))

    def stop(self) -> int:
        """End the session; the rows acknowledged (0 .. N-1). The load exits 0."""
        acknowledged = int(self._ask("stop", "acknowledged"))
        assert self.process.wait(RUN_TIMEOUT) == 0
        return acknowledged
