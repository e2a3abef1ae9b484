"""A tree moved to a node with a pid namespace of its own keeps its pids there.

The nodes of tests/test_tree_move.py share one kernel and its pids: the
originals hold their pids while a move runs, so the tree comes back under
fresh ones, and a parent that remembers its children's pids (nginx's worker
list, a shell's jobs) no longer reaches them. Here node b has a pid
namespace of its own, as another machine would (support/nodes.py): its
daemon restores the tree under its old pids (in b's namespace; the test sees
them under others, mapped by NSpid), and the parents' pids work again:

- nginx (Debian's), a master and 2 workers, moved from a to b: the master
  reloads (SIGHUP by `nginx -s reload` run in b: new workers start, the old
  ones exit, the master reaps them), serves on its original address, and
  `nginx -s quit` ends the master and its workers;
- a bash pipeline moved mid-stream to b and home again (each time under its
  old pids): bash waits for its three children and gets each one's exit
  status (PIPESTATUS), as if it had never moved;
- a Python multiprocessing Pool moved between two rounds of tasks: it works
  on, then closes and joins its workers (multiprocessing waits for each by
  its pid, after checking its own);
- PostgreSQL 15 (Debian's: a postmaster, its 5 auxiliary processes and a
  client's backend) moved from a to b and home again under a client's
  autocommit inserts on one session: the session goes on with the same
  backend, every acknowledged row is there, new connections are served, its
  System V segment is made again under its id on each node it comes to (b
  has an IPC namespace of its own too) and removed from the one it left,
  and at home `pg_ctl stop -m fast` (by the pid in postmaster.pid) shuts it
  down;
- a single process moved there sees its own pid unchanged (getpid, and
  /proc/self in b's /proc, where it lives now).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from support import postgres
from support.nodes import Node, two_nodes
from support.redis import free_port
from support.tempdirs import make_temp_dir, remove_temp_dir
from test_move import EXIT_TIMEOUT, exit_code_on, logs, poll_until, wait_gone
from test_tree_move import MEMBER_LINE, move_tree, wait_members
from test_tree_programs import NGINX, NGINX_CONFIG

from hijack.process.tree import read_tree
from hijack.sys import procfs, sysv
from hijack.sys.process import WALL

# One GET on 127.0.0.1:argv[1] (run inside a node): prints the status and the body.
GET = """\
import http.client, sys
connection = http.client.HTTPConnection("127.0.0.1", int(sys.argv[1]), timeout=20)
connection.request("GET", "/")
response = connection.getresponse()
print(response.status, response.read().decode().strip())
"""


def get(node: Node, port: int) -> str:
    completed = node.run_python(GET, port)
    assert completed.returncode == 0, completed.stderr
    return completed.stdout.strip()


def pids_inside(node: Node, host_pid: int) -> set[int]:
    """The pids inside `node` of the tree the test sees at `host_pid`."""
    return {node.pid_inside(pid) for pid in read_tree(host_pid).pids}


def children(host_pid: int) -> set[int]:
    return set(read_tree(host_pid).pids) - {host_pid}


def reap_originals(pids: set[int]) -> None:
    """Reap the originals a move killed that came to this test (a subreaper) when their
    parent was killed, as a machine's init would: their pids are free again."""
    for pid in pids:
        wait_gone(pid, EXIT_TIMEOUT, "an original, killed by the move")
        with contextlib.suppress(ChildProcessError):  # another's: reaped by it
            os.waitpid(pid, WALL)


def assert_old_pids_kept(printed: str, count: int) -> None:
    members = MEMBER_LINE.findall(printed)
    assert len(members) == count, printed
    assert all(old == new for old, _, new, _, _ in members), printed
    assert "each under its old pid" in printed, printed


@pytest.mark.skipif(NGINX is None, reason="nginx (Debian package nginx) is not installed")
def test_nginx_moved_keeps_its_pids_reloads_and_quits(tmp_path: Path) -> None:
    with two_nodes(tmp_path, pid_namespaces="b") as (a, b):
        port = a.free_port()
        config = tmp_path / "nginx.conf"
        config.write_text(NGINX_CONFIG.format(dir=tmp_path, port=port))
        assert NGINX is not None
        command = [NGINX, "-p", str(tmp_path), "-c", str(config), "-e", str(tmp_path / "error.log")]
        master = a.spawn(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        wait_members(master.pid, 3)
        a.wait_tcp("127.0.0.1", port)
        before = set(read_tree(master.pid).pids)
        there, printed = move_tree(a, master.pid, b)
        assert there == master.pid, printed
        assert_old_pids_kept(printed, 3)
        master.wait(timeout=EXIT_TIMEOUT)  # the original, killed by the move
        moved = b.host_pid(there)
        assert pids_inside(b, moved) == before
        status = json.loads(b.hijack_ok("status", "--json").stdout)  # b's /proc, b's pids
        shown = next(p for p in status["processes"] if p["pid"] == there)
        assert shown["state"] == "running", json.dumps(shown)
        assert len(shown["members"]) == 2, "its workers, shown with it"
        assert get(a, port) == "200 hello", "served on its address at home, through its shadow"

        old_workers = children(moved)
        reload = b.run([*command, "-s", "reload"], timeout=EXIT_TIMEOUT)  # SIGHUP by the pid file
        assert reload.returncode == 0, reload.stderr
        for worker in old_workers:
            wait_gone(worker, EXIT_TIMEOUT, "an old worker, told to quit by the reloaded master")
        new_workers = poll_until(
            lambda: len(found := children(moved)) == 2 and found, "2 new workers"
        )
        assert not new_workers & old_workers
        assert get(a, port) == "200 hello", "served by the new workers"
        errors = (tmp_path / "error.log").read_text()
        assert "No such process" not in errors and "exited on signal" not in errors, errors
        assert "reconfiguring" in errors, errors

        stop = b.run([*command, "-s", "quit"], timeout=EXIT_TIMEOUT)  # SIGQUIT to the master
        assert stop.returncode == 0, stop.stderr
        for pid in {moved, *new_workers}:
            wait_gone(pid, EXIT_TIMEOUT, "nginx, quitting")
        assert exit_code_on(b, there) == 0, logs(tmp_path)


# bash runs PRODUCER | FILTER | CONSUMER > OUTPUT, then writes PIPESTATUS to STATUSES: each
# exit status, which bash learns only by waiting for its child under the pid it forked.
PRODUCER = "import sys\nfor line in sys.stdin: print(line.strip(), flush=True)\nsys.exit(3)"
FILTER = "import sys\nfor line in sys.stdin: print(line.strip().upper(), flush=True)\nsys.exit(4)"
CONSUMER = """\
import sys
count = 0
for line in sys.stdin:
    print(line.strip(), flush=True)
    count += 1
print(f"END {count}", flush=True)
sys.exit(5)
"""


def test_a_shell_moved_waits_for_its_children_and_gets_their_statuses(tmp_path: Path) -> None:
    with two_nodes(tmp_path, pid_namespaces="b") as (a, b):
        output, statuses = tmp_path / "out", tmp_path / "statuses"
        python = sys.executable
        line = (
            f"{python} -c '{PRODUCER}' | {python} -c '{FILTER}' | {python} -c '{CONSUMER}'"
            f" > {output}; echo ${{PIPESTATUS[*]}} > {statuses}; exit 6"
        )
        shell = a.spawn(
            ["bash", "-c", line],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        assert shell.stdin is not None
        wait_members(shell.pid, 4)
        before = set(read_tree(shell.pid).pids)
        shell.stdin.write(b"".join(f"line {n}\n".encode() for n in range(10)))
        shell.stdin.flush()
        # The consumer's `> out` may not be opened yet when its process is there.
        poll_until(
            lambda: output.exists() and output.read_text().count("\n") >= 10,
            "the pipeline passing 10 lines",
        )
        there, printed = move_tree(a, shell.pid, b)
        assert there == shell.pid, printed
        assert_old_pids_kept(printed, 4)
        assert shell.wait(timeout=EXIT_TIMEOUT) != 0  # the original, killed by the move
        reap_originals(before - {shell.pid})  # orphaned to us once their parent was reaped
        assert pids_inside(b, b.host_pid(there)) == before
        shell.stdin.write(b"".join(f"line {n}\n".encode() for n in range(10, 20)))
        shell.stdin.flush()
        poll_until(lambda: output.read_text().count("\n") >= 20, "20 lines, moved")
        # Home again: the originals are gone, their pids free here too.
        back, printed = move_tree(b, there, a)
        assert back == shell.pid, printed
        assert_old_pids_kept(printed, 4)
        assert set(read_tree(back).pids) == before
        shell.stdin.write(b"".join(f"line {n}\n".encode() for n in range(20, 30)))
        shell.stdin.close()  # the producer's end of input, relayed by the shadow
        poll_until(statuses.exists, "bash writing its children's statuses")
        assert exit_code_on(a, back) == 6, logs(tmp_path)
        assert statuses.read_text().split() == ["3", "4", "5"]
        got = output.read_text().splitlines()
        assert got == [f"LINE {n}" for n in range(30)] + ["END 30"], got


# A pool of 3 that works before and after the move (each stdin line: one more round of
# tasks), then closes and joins its workers: multiprocessing waits for each by the pid it
# forked, and first checks its own pid against the one that started the pool.
POOL = """\
import multiprocessing, os, sys
def square(n):
    return n * n
if __name__ == "__main__":
    multiprocessing.set_start_method("fork")
    pool = multiprocessing.Pool(3)
    workers = [worker.pid for worker in pool._pool]
    rounds = 0
    for line in sys.stdin:
        ok = pool.map(square, range(300), chunksize=1) == [n * n for n in range(300)]
        rounds += 1
        print(f"round {rounds} {'PASS' if ok else 'FAIL'}", flush=True)
    pool.close()
    pool.join()
    print("joined", *workers, flush=True)
"""


def test_a_multiprocessing_pool_moved_joins_its_workers(tmp_path: Path) -> None:
    with two_nodes(tmp_path, pid_namespaces="b") as (a, b):
        program, output = tmp_path / "pool.py", tmp_path / "pool.out"
        program.write_text(POOL)
        with open(output, "wb") as out:
            pool = a.spawn(
                [sys.executable, str(program)],
                stdin=subprocess.PIPE,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        assert pool.stdin is not None
        pool.stdin.write(b"go\n")
        pool.stdin.flush()
        poll_until(lambda: "round 1" in output.read_text(), "the pool's first round")
        wait_members(pool.pid, 4)
        before = set(read_tree(pool.pid).pids)
        there, printed = move_tree(a, pool.pid, b)
        assert_old_pids_kept(printed, 4)
        pool.wait(timeout=EXIT_TIMEOUT)  # the original, killed by the move
        assert pids_inside(b, b.host_pid(there)) == before
        pool.stdin.write(b"go\n")
        pool.stdin.close()
        wait_gone(b.host_pid(there), EXIT_TIMEOUT, "the pool, moved, ending")
        assert exit_code_on(b, there) == 0, f"{output.read_text()}\n{logs(tmp_path)}"
        lines = output.read_text().splitlines()
        assert lines[:2] == ["round 1 PASS", "round 2 PASS"], lines
        joined, *workers = lines[2].split()
        assert joined == "joined" and set(map(int, workers)) == before - {pool.pid}, lines


def sysv_attached(host_pid: int, node: Node) -> dict[int, set[int]]:
    """Each member's System V segments (their ids), by its pid inside `node`."""
    return {
        node.pid_inside(pid): {
            m.inode
            for m in procfs.read_maps(pid)
            if sysv.is_segment_mapping(m.path, m.shared, m.dev_major)
        }
        for pid in read_tree(host_pid).pids
    }


def segments_on(node: Node) -> set[int]:
    """The ids of the System V segments in `node`'s IPC namespace (b: its own)."""
    table = node.run(["cat", "/proc/sysvipc/shm"], timeout=EXIT_TIMEOUT).stdout.splitlines()
    return {int(line.split()[1]) for line in table[1:]}


@pytest.mark.skipif(postgres.MISSING is not None, reason=str(postgres.MISSING))
def test_postgresql_moved_with_a_session_open_and_home_again_keeps_it_and_stops() -> None:
    # The nodes' directory others may traverse: the home shadow runs as postgres.
    where = make_temp_dir("hijack-pgmove-")
    try:
        where.chmod(0o711)
        # Any port is free in node a (a namespace of its own). The cluster outlives the
        # nodes: its processes all ended (killed with them if the test failed) when it goes.
        with (
            postgres.initialized(free_port()) as cluster,
            two_nodes(where, pid_namespaces="b") as (a, b),
        ):
            server = postgres.start(cluster, a.spawn)
            load = postgres.Load(
                a.spawn(cluster.load(), stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            )
            before = set(read_tree(server.pid).pids)
            assert load.session in before and len(before) == postgres.MEMBERS + 1
            segments = sysv_attached(server.pid, a)
            (segment,) = set.union(*segments.values())  # one, all members attach it
            assert all(ids == {segment} for ids in segments.values()), segments
            assert segment in segments_on(a) and segment not in segments_on(b)

            def goes_on(what: str) -> None:
                acknowledged = load.acknowledged()
                poll_until(lambda: load.acknowledged() >= acknowledged + 100, what)
                assert load.backend() == load.session, "the same session, the same backend"

            goes_on("the load's first commits")
            # Its System V segment: moved frozen whole, by default (no pre-copy rounds).
            there, printed = move_tree(a, server.pid, b)
            assert there == server.pid and "pre-copy" not in printed, printed
            assert_old_pids_kept(printed, len(before))
            server.wait(timeout=EXIT_TIMEOUT)  # the original, killed by the move
            reap_originals(before - {server.pid})
            assert pids_inside(b, b.host_pid(there)) == before
            # Made again in b's IPC namespace under its id; the one left in a, removed.
            assert sysv_attached(b.host_pid(there), b) == segments
            assert segment in segments_on(b) and segment not in segments_on(a)
            goes_on("commits to the moved cluster")
            tcp = a.run(cluster.psql("select 1"), timeout=EXIT_TIMEOUT)  # through its shadow
            assert (tcp.returncode, tcp.stdout) == (0, "1\n"), tcp.stderr
            local = b.run(cluster.psql("select 1", str(cluster.sockets)), timeout=EXIT_TIMEOUT)
            assert (local.returncode, local.stdout) == (0, "1\n"), local.stderr

            back, printed = move_tree(b, there, a)
            assert back == server.pid, printed
            assert_old_pids_kept(printed, len(before))
            assert set(read_tree(back).pids) == before
            assert sysv_attached(back, a) == segments
            assert segment in segments_on(a) and segment not in segments_on(b)
            goes_on("commits at home again")
            acknowledged = load.stop()
            rows = a.run(cluster.psql("select count(*), min(n), max(n) from rows"), timeout=30)
            assert rows.stdout == f"{acknowledged}|0|{acknowledged - 1}\n", rows.stderr
            # At home, its pids its own again: pg_ctl signals the pid postmaster.pid holds.
            stop = a.run(cluster.pg_ctl("stop", "-m", "fast"), timeout=EXIT_TIMEOUT)
            assert stop.returncode == 0, stop.stdout + stop.stderr
            for pid in before:
                wait_gone(pid, EXIT_TIMEOUT, "postgres, shutting down")
            assert exit_code_on(a, back) == 0, logs(where)
            assert cluster.shut_down(), cluster.log.read_text()
    finally:
        remove_temp_dir(where)


# Each stdin line: its pid as it sees it, and whether /proc/self agrees.
WHO = """\
import os, sys
for line in sys.stdin:
    print(os.getpid(), os.readlink("/proc/self"), flush=True)
"""


def test_a_single_process_moved_keeps_its_pid_as_it_sees_it(tmp_path: Path) -> None:
    with two_nodes(tmp_path, pid_namespaces="b") as (a, b):
        output = tmp_path / "who.out"
        with open(output, "wb") as out:
            who = a.spawn(
                [sys.executable, "-c", WHO], stdin=subprocess.PIPE, stdout=out, stderr=out
            )
        assert who.stdin is not None
        who.stdin.write(b"\n")
        who.stdin.flush()
        poll_until(lambda: output.read_text().count("\n") == 1, "its pid, at home")
        assert b.daemon_endpoint is not None
        result = a.hijack("move", who.pid, "--to", b.daemon_endpoint)
        assert result.returncode == 0, f"{result.describe()}\n{logs(tmp_path)}"
        assert f"it runs there as {who.pid};" in result.stdout, result.describe()
        who.wait(timeout=EXIT_TIMEOUT)  # the original, killed by the move
        who.stdin.write(b"\n")
        who.stdin.close()
        poll_until(lambda: output.read_text().count("\n") == 2, "its pid, moved")
        # Its own /proc is b's (it lives in b's mount namespace): the same pid there.
        assert output.read_text().split() == [str(who.pid)] * 4, output.read_text()
        assert exit_code_on(b, who.pid) == 0, logs(tmp_path)
