"""Real programs that fork, killed by `hijack dump --kill` mid-work and restored on the same node.

- a shell pipeline (`producer | filter | consumer`, the filter forking a sleep
  per line): the consumer's output is complete and in order;
- a Python multiprocessing Pool, started by fork (pipes, POSIX semaphores in
  deleted /dev/shm files every member maps, a parent with threads) and by
  forkserver (a resource tracker, a fork server whose children the workers
  are, semaphores under names glibc linked them to): every task's result
  arrives, the semaphores are shared again, and the parent exits 0;
- nginx from Debian's package, a master and two workers sharing the master's
  listening socket, under a keep-alive HTTP load: no request fails (those in
  flight during the freeze wait), the load's connections are the same ones
  after the restore, new connections are served, every process is back under
  its pid with its parent, and the master still commands its workers (a
  graceful stop ends them all with status 0); dumped plainly (a snapshot of
  the tree) three times while serving, it loses no request either;
- redis-server killed while its BGSAVE child writes the RDB: the child
  finishes it, the server reaps it and reports success;
- PostgreSQL 15 from Debian's package (a postmaster, its 5 auxiliary processes
  and the backend of a client's session) killed under a write load: the same
  session goes on with the same backend, every commit it was told of is
  there, new connections are served over TCP and the unix socket, every
  process is back under its pid with its parent, and `pg_ctl stop -m fast`
  shuts it down cleanly.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import postgres
from support.cli import HijackCli, restored_pid
from support.objects import hijack
from support.redis import REDIS_SERVER, Resp, free_port, redis_server, wait_until
from test_tree_restore import kill_tree, reap_killed, relations

from hijack.errors import ProcessGone
from hijack.process.tree import Member, read_tree

__all__ = ["hijack"]  # a fixture, used by name

NGINX = shutil.which("nginx") or next(
    (p for p in ("/usr/sbin/nginx",) if os.access(p, os.X_OK)), None
)
POLL_TIMEOUT = 20.0  # seconds for a program to reach a point of its work
EXIT_TIMEOUT = 30.0


def lines_in(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def wait_exit(pid: int, timeout: float = EXIT_TIMEOUT) -> int:
    """The wait status of our child `pid` (a restored root: orphaned to pytest, a subreaper)."""
    handle = os.pidfd_open(pid)
    try:
        readable, _, _ = select.select([handle], [], [], timeout)
        assert readable, f"process {pid} still runs after {timeout} s"
    finally:
        os.close(handle)
    _, status = os.waitpid(pid, 0)
    return status


def dump_and_kill(
    hijack: HijackCli, process: subprocess.Popen[bytes], image: Path
) -> tuple[str, list[int]]:
    """`dump --kill` the tree of `process` (ours); reap it and its members, orphaned to us.
    Returns what the dump said and the members' pids but the root's."""
    dumped = hijack.ok("dump", process.pid, "-o", image, "--kill")
    assert "the tree of process" in dumped.stdout and "killed" in dumped.stdout
    assert process.wait(EXIT_TIMEOUT) == -signal.SIGKILL
    # The image's members, not a reading before the dump: a short-lived child (a shell's
    # sleep) born since is in the image too, and its pid must be free for the restore.
    shown = json.loads(hijack.ok("show", "--json", image).stdout)
    members = [int(member["pid"]) for member in shown["tree"][1:]]
    reap_killed(members)
    return dumped.stdout, members


def _members(root: int) -> list[Member]:
    return list(read_tree(root).members)


def end_tree(root: int) -> None:
    """Kill whatever of the tree under `root` still runs (a test that failed midway)."""
    try:
        pids = [m.pid for m in read_tree(root).members]
    except ProcessGone:
        return
    kill_tree(pids)


def test_a_shell_pipeline_killed_mid_stream_finishes_its_output_in_order(
    hijack: HijackCli, tmp_path: Path
) -> None:
    count = 1500
    output = tmp_path / "out"
    pipeline = (
        f"i=0; while [ $i -lt {count} ]; do echo $i; i=$((i+1)); done"
        " | while read x; do sleep 0.001; echo $x; done"
        f" | cat > {output}"
    )
    errors = tmp_path / "errors"
    with errors.open("w") as stderr:
        process = subprocess.Popen(
            ["sh", "-c", pipeline], stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr
        )
    try:
        wait_until(lambda: lines_in(output) >= 100, "the pipeline's first lines")
        dump_and_kill(hijack, process, tmp_path / "pipeline.crf")  # its members reap theirs
        written = lines_in(output)
        assert written < count, "the pipeline ended before the kill"
        root = restored_pid(hijack.ok("restore", tmp_path / "pipeline.crf"))
        assert root == process.pid
        assert wait_exit(root) == 0, errors.read_text()
        assert output.read_text().split() == [str(n) for n in range(count)]
        assert errors.read_text() == ""
    finally:
        end_tree(process.pid)


POOL_PROGRAM = r"""
import multiprocessing, os, sys, time

def square(n):
    time.sleep(0.01)
    return n * n

if __name__ == "__main__":
    count, go, start_method = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    with multiprocessing.get_context(start_method).Pool(4) as pool:
        for n, result in enumerate(pool.imap(square, range(count))):
            print(n, result, flush=True)
            if result != n * n:
                sys.exit(1)
        while not os.path.exists(go):  # the pool kept for the test to look at, until told
            time.sleep(0.01)
"""


def semaphores_shared(root: int) -> set[frozenset[int]]:
    """Which members map each POSIX semaphore (a /dev/shm/sem.* file; unlinked at once under
    fork), as sets of pids: one file for all of them, as fork left it, not a copy each."""
    mapping: dict[str, set[int]] = {}
    for member in _members(root):
        for line in Path(f"/proc/{member.pid}/maps").read_text().splitlines():
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].startswith("/dev/shm/sem."):
                mapping.setdefault(f"{fields[3]} {fields[4]}", set()).add(member.pid)
    return {frozenset(pids) for pids in mapping.values()}


@pytest.mark.parametrize(
    "start_method",
    [
        # fork unlinks each semaphore at once: a deleted file all members map, made once.
        "fork",
        # Python 3.14's default: a resource tracker and a fork server beside the parent, the
        # workers the fork server's children, the semaphores named files while in use.
        "forkserver",
    ],
)
def test_a_multiprocessing_pool_killed_mid_work_delivers_every_result(
    hijack: HijackCli, tmp_path: Path, start_method: str
) -> None:
    count = 1200
    output = tmp_path / "results"
    program = tmp_path / "pool.py"  # a file: the fork server imports its __main__
    program.write_text(POOL_PROGRAM)
    with output.open("w") as stdout:
        process = subprocess.Popen(
            [sys.executable, program, str(count), tmp_path / "go", start_method],
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_until(lambda: lines_in(output) >= 50, "the pool's first results")
        assert len(_members(process.pid)) >= 5, "a parent and its 4 workers"
        semaphores = semaphores_shared(process.pid)
        assert any(len(pids) >= 2 for pids in semaphores), "semaphores the members share"
        _, members = dump_and_kill(hijack, process, tmp_path / "pool.crf")
        assert lines_in(output) < count, "the pool ended before the kill"
        root = restored_pid(hijack.ok("restore", tmp_path / "pool.crf"))
        assert semaphores_shared(root) == semaphores, "each semaphore one file for all"
        (tmp_path / "go").touch()
        assert wait_exit(root) == 0, output.read_text()[-2000:]
        reap_killed(members)  # the fork server and resource tracker, orphaned to us as they end
        assert output.read_text().splitlines() == [f"{n} {n * n}" for n in range(count)]
    finally:
        end_tree(process.pid)


NGINX_CONFIG = """
master_process on;
worker_processes 2;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log info;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    keepalive_requests 1000000;
    keepalive_timeout 120s;
    server {{
        listen 127.0.0.1:{port};
        location / {{ return 200 "hello\\n"; }}
    }}
}}
"""
BODY = b"hello\n"


class Load:
    """An HTTP load generator in a thread: KEPT keep-alive connections, each asked in turn,
    and one fresh connection per round; every failure counted with its reason."""

    KEPT = 4

    def __init__(self, port: int) -> None:
        self.port = port
        self.kept = [self._connect() for _ in range(self.KEPT)]
        self.served = 0
        self.fresh = 0
        self.failures: list[str] = []
        # A dump --kill resets the clients waiting in a listener's accept queue (README,
        # "Not kept"): a test of one sets this, and a fresh connection reset goes here.
        self.fresh_may_reset = False
        self.fresh_resets: list[str] = []
        self.slowest = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _connect(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=POLL_TIMEOUT * 2)

    def _ask(self, connection: http.client.HTTPConnection, fresh: bool = False) -> None:
        began = time.monotonic()
        try:
            connection.request("GET", "/")
            response = connection.getresponse()
            body = response.read()
            if response.status != 200 or body != BODY:
                self.failures.append(f"answered {response.status} {body!r}")
        except ConnectionResetError as error:
            (self.fresh_resets if fresh and self.fresh_may_reset else self.failures).append(
                repr(error)
            )
        except (OSError, http.client.HTTPException) as error:
            self.failures.append(repr(error))
        self.slowest = max(self.slowest, time.monotonic() - began)

    def _run(self) -> None:
        while not self._stop.is_set():
            for connection in self.kept:
                self._ask(connection)
                self.served += 1
            fresh = self._connect()
            self._ask(fresh, fresh=True)
            fresh.close()
            self.fresh += 1

    def ports(self) -> list[int]:
        """The local port of each kept connection: the same ones unless one reconnected."""
        return [c.sock.getsockname()[1] if c.sock else 0 for c in self.kept]

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(POLL_TIMEOUT * 3)
        for connection in self.kept:
            connection.close()


@contextlib.contextmanager
def nginx(directory: Path) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """nginx, a master and 2 workers on a free loopback port, serving once both workers
    run; stopped (and its members killed) when the block ends."""
    assert NGINX is not None
    port = free_port()
    config = directory / "nginx.conf"
    config.write_text(NGINX_CONFIG.format(dir=directory, port=port))
    master = subprocess.Popen(
        [NGINX, "-p", str(directory), "-c", str(config), "-e", str(directory / "error.log")],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:

        def serving() -> bool:
            if len(_members(master.pid)) < 3:
                return False
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return True
            return False

        wait_until(serving, "nginx serving with 2 workers")
        yield master, port
    finally:
        end_tree(master.pid)
        with contextlib.suppress(ChildProcessError):
            master.wait(EXIT_TIMEOUT)


@pytest.mark.skipif(NGINX is None, reason="nginx (Debian package nginx) is not installed")
def test_nginx_killed_under_load_and_restored_loses_no_request(
    hijack: HijackCli, tmp_path: Path
) -> None:
    with nginx(tmp_path) as (master, port), Load(port) as load:
        load.fresh_may_reset = True  # the one client caught in the accept queue at the dump
        wait_until(lambda: load.served >= 100, "the load's first answers")
        before = relations(master.pid)
        ports = load.ports()
        dump_and_kill(hijack, master, tmp_path / "nginx.crf")
        killed_at = load.served
        root = restored_pid(hijack.ok("restore", tmp_path / "nginx.crf"))
        assert root == master.pid
        fresh = load.fresh
        wait_until(
            lambda: load.served >= killed_at + 100 and load.fresh >= fresh + 20,
            "answers after the restore",
        )
        assert load.failures == [], load.failures[:5]
        # One fresh connection a round: at most the one waiting at the dump.
        assert len(load.fresh_resets) <= 1, load.fresh_resets
        print(f"fresh connections reset (waiting in the accept queue): {load.fresh_resets}")
        assert load.ports() == ports, "the load's connections are the same ones"
        assert relations(root) == before, "the master and its workers under their pids"
        workers = [pid for pid in before if pid != root]
        # The master still commands its workers: a graceful stop (SIGQUIT) ends them, then it.
        os.kill(root, signal.SIGQUIT)
        assert wait_exit(root) == 0
        assert not [pid for pid in workers if os.path.exists(f"/proc/{pid}")]
    assert "exited with code 0" in (tmp_path / "error.log").read_text()


@pytest.mark.skipif(NGINX is None, reason="nginx (Debian package nginx) is not installed")
def test_nginx_dumped_under_load_runs_on_and_loses_no_request(
    hijack: HijackCli, tmp_path: Path
) -> None:
    """Plain dumps of a serving nginx (a snapshot of the tree: every member frozen only to
    fork its copy): no request fails, the load's connections stay the same ones, each
    image holds the master and both workers, and the master still commands its workers
    after (no copy holds its connections or its children)."""
    with nginx(tmp_path) as (master, port), Load(port) as load:
        wait_until(lambda: load.served >= 100, "the load's first answers")
        before = relations(master.pid)
        ports = load.ports()
        for round_number in range(3):
            image = tmp_path / f"nginx-{round_number}.crf"
            dumped = hijack.ok("dump", master.pid, "-o", image)
            said = " ".join(dumped.stdout.split())
            assert "(3 processes, 3 threads)" in said and "left running" in said, said
            wanted = load.served + 50
            wait_until(lambda wanted=wanted: load.served >= wanted, "answers after the dump")
        assert load.failures == [], load.failures[:5]
        assert load.ports() == ports, "the load's connections are the same ones"
        assert relations(master.pid) == before, "no member gained a child (a copy)"
        workers = [pid for pid in before if pid != master.pid]
        os.kill(master.pid, signal.SIGQUIT)
        assert master.wait(EXIT_TIMEOUT) == 0
        assert not [pid for pid in workers if os.path.exists(f"/proc/{pid}")]


@pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server (Debian package) is not installed")
def test_redis_killed_during_bgsave_finishes_the_save(hijack: HijackCli, tmp_path: Path) -> None:
    """The BGSAVE child (a fork of the server) killed mid-save with its parent and restored:
    it finishes the file, its parent reaps it and reports success; the client's connection
    is the same one."""
    with redis_server(tmp_path) as (server, port, log):
        try:
            client = Resp(port)
            script = "for i=1,2000 do redis.call('set','k'..i,i) end return 1"
            assert client.command("EVAL", script, "0") == 1
            assert client.command("CONFIG", "SET", "rdb-key-save-delay", "1000") == b"OK"
            assert client.command("BGSAVE") == b"Background saving started"
            wait_until(lambda: len(_members(server.pid)) == 2, "the BGSAVE child")
            dumped, _ = dump_and_kill(hijack, server, tmp_path / "redis.crf")
            assert "2 processes" in dumped
            assert not (tmp_path / "dump.rdb").exists(), "the save ended before the kill"
            assert restored_pid(hijack.ok("restore", tmp_path / "redis.crf")) == server.pid

            def saved() -> bool:
                info = client.command("INFO", "persistence")
                return isinstance(info, bytes) and b"rdb_bgsave_in_progress:0" in info

            wait_until(saved, "the restored BGSAVE's end")
            info = client.command("INFO", "persistence")
            assert isinstance(info, bytes) and b"rdb_last_bgsave_status:ok" in info, info
            assert (tmp_path / "dump.rdb").exists()
            assert b"Background saving terminated with success" in log.read_bytes()
            assert client.command("DBSIZE") == 2000
            client.close()
        finally:
            end_tree(server.pid)


@contextlib.contextmanager
def postmaster(cluster: postgres.Cluster) -> Iterator[subprocess.Popen[bytes]]:
    """The cluster's postmaster, ready; its tree killed when the block ends."""
    process = postgres.start(cluster, subprocess.Popen)
    try:
        yield process
    finally:
        end_tree(process.pid)
        with contextlib.suppress(ChildProcessError):
            process.wait(EXIT_TIMEOUT)


@contextlib.contextmanager
def load_on(cluster: postgres.Cluster) -> Iterator[postgres.Load]:
    """The write load (support/pgload.py) on one session to the cluster; killed at the end."""
    process = subprocess.Popen(cluster.load(), stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        yield postgres.Load(process)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(EXIT_TIMEOUT)
        for stream in (process.stdin, process.stdout):
            if stream is not None:
                stream.close()


def psql(cluster: postgres.Cluster, sql: str, host: str = "127.0.0.1") -> str:
    """`sql` through a new connection (psql); its rows, one a line."""
    done = subprocess.run(
        cluster.psql(sql, host), capture_output=True, text=True, timeout=EXIT_TIMEOUT
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.mark.skipif(postgres.MISSING is not None, reason=str(postgres.MISSING))
def test_postgresql_killed_under_writes_and_restored_keeps_its_session_and_rows(
    hijack: HijackCli, tmp_path: Path
) -> None:
    with postgres.initialized(free_port()) as cluster, postmaster(cluster) as server:
        with load_on(cluster) as load:
            wait_until(lambda: load.acknowledged() >= 100, "the load's first commits")
            before = relations(server.pid)
            assert load.session in before, "the session's backend, a member"
            # Asked before the dump: the load answers between two commits, and one waits
            # for its answer from the killed backend until the restore.
            acknowledged = load.acknowledged()
            dumped, _ = dump_and_kill(hijack, server, tmp_path / "postgres.crf")
            assert f"{len(before)} processes" in dumped
            print(dumped.strip())
            root = restored_pid(hijack.ok("restore", tmp_path / "postgres.crf"))
            assert root == server.pid
            wait_until(lambda: load.acknowledged() >= acknowledged + 100, "commits after it")
            assert load.backend() == load.session, "the same session, the same backend"
            assert relations(root) == before, "every process under its pid, with its parent"
            acknowledged = load.stop()
        # New connections, over TCP and the unix socket: every acknowledged row, no other.
        rows = f"{acknowledged}|0|{acknowledged - 1}"
        assert psql(cluster, "select count(*), min(n), max(n) from rows") == rows
        assert psql(cluster, "select count(*) from rows", str(cluster.sockets)) == str(acknowledged)
        stopping = cluster.pg_ctl("stop", "-m", "fast")
        stop = subprocess.run(stopping, capture_output=True, text=True, timeout=EXIT_TIMEOUT)
        assert stop.returncode == 0, stop.stdout + stop.stderr
        assert wait_exit(root) == 0
        assert not [pid for pid in before if os.path.exists(f"/proc/{pid}")]
        assert cluster.shut_down(), cluster.log.read_text()
