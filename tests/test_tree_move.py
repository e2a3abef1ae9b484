"""`hijack move` of a process tree: PID and all its descendants move as one.

The Cluster idiom of tests/test_move.py: network namespaces on one bridge,
each with `hijack node serve`; a tree starts in node a and is moved with
`hijack move PID --to NODE` run in the node it runs on now. Every member is
frozen together and restored there with its relations (fresh pids: the nodes
share one kernel, and the originals still hold theirs while the move runs);
what joins the members (pipes) is made again from the image, every other
socket or listener is relayed by the tree's one home shadow.

- a shell pipeline `producer | filter | consumer` moved mid-stream from a to b,
  on to c and home to a: the consumer's output is complete and in order;
- a member whose parent stays (a fork of its parent) is refused by name with
  the command that would work, and moves with --leave-parent;
- a move that fails before its commit leaves every member running at home;
- nginx, a master and 2 workers sharing the master's listener, moved there and
  back under an HTTP load on its original address: no request fails;
- a Python multiprocessing Pool moved while it works: every result arrives;
- a tree whose members keep writing memory they share since a fork, moved with pre-copy
  (the default for a tree with memory): every member finds every page as it wrote it;
- a tree whose member ends between the build of its stubs there (before the freeze) and
  the freeze: restored the whole way, the zombie reaped there with its status;
- a child sharing its parent's descriptor table and fs context, moved with pre-copy into
  stubs built before the freeze (each member finished as soon as its memory is): it
  shares both again there.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support import spawn_fixture
from support.nodes import Cluster, Node, read_line, two_nodes
from test_faults import hijack_in, reap, shadow_pid_of
from test_move import (
    EXIT_TIMEOUT,
    LINE_TIMEOUT,
    Moved,
    ask,
    ask_moved,
    assert_untouched,
    daemon_log,
    exit_code_on,
    finish_moved,
    logs,
    poll_until,
    shadow_status,
    shape_loopback,
    spawn_python,
    ss_lines,
    still_running,
    wait_gone,
)
from test_move_home import links, most_acknowledged, relay_sockets
from test_nodes import ECHO_SESSION
from test_postcopy import process_state, signal_masks
from test_tree_programs import NGINX, NGINX_CONFIG
from test_tree_share import contexts_shared, pss_kib

from hijack.process.tree import read_tree
from hijack.registry import Registry
from hijack.sys import kcmp

TREE_LINE = re.compile(
    r"moved process (\d+) to (\w+): it runs there as (\d+); frozen ([\d.]+) ms, (.+) sent"
)
MEMBER_LINE = re.compile(r"^  (\d+) (\S+) as (\d+): image (.+), ([\d.]+) ms of the freeze$", re.M)

# Numbered lines, one every PACE seconds until the file argv[1] exists: a stream the
# moves catch mid-way however long they take.
PRODUCER = """\
import os, sys, time
number = 0
while not os.path.exists(sys.argv[1]):
    print(f"line {number}", flush=True)
    number += 1
    time.sleep(float(sys.argv[2]))
"""
# Keeps every line, upper-cased (a filter that changes what passes).
FILTER = """\
import sys
for line in sys.stdin:
    sys.stdout.write(line.upper())
    sys.stdout.flush()
"""
# Writes what it reads to its stdout (a regular file), then "END N".
CONSUMER = """\
import sys
count = 0
for line in sys.stdin:
    sys.stdout.write(line)
    sys.stdout.flush()
    count += 1
print(f"END {count}", flush=True)
"""
PACE = 0.005


def move_tree(source: Node, pid: int, destination: Node, *options: str) -> tuple[int, str]:
    """`hijack move PID --to DESTINATION` inside `source`: the root's pid there, and what
    the move printed (each member's line)."""
    assert destination.daemon_endpoint is not None
    result = source.hijack("move", pid, "--to", destination.daemon_endpoint, *options)
    where = source.directory.parent
    assert result.returncode == 0, f"[node {source.name}] {result.describe()}\n{logs(where)}"
    found = TREE_LINE.search(result.stdout)
    assert found is not None, result.describe()
    assert "the tree moved as one" in result.stdout, result.describe()
    print(result.stdout)
    return int(found[3]), result.stdout


def write_programs(directory: Path) -> dict[str, Path]:
    paths = {}
    for name, text in (("producer", PRODUCER), ("filter", FILTER), ("consumer", CONSUMER)):
        paths[name] = directory / f"{name}.py"
        paths[name].write_text(text)
    return paths


def start_pipeline(node: Node, directory: Path) -> tuple[subprocess.Popen[bytes], Path]:
    """`sh -c 'producer | filter | consumer > FILE'` in `node`, once the consumer writes;
    the producer ends once `directory`/stop exists."""
    programs = write_programs(directory)
    output = directory / "consumer.out"
    python = sys.executable
    line = (
        f"{python} {programs['producer']} {directory / 'stop'} {PACE}"
        f" | {python} {programs['filter']}"
        f" | {python} {programs['consumer']} > {output}"
    )
    errors = open(directory / "pipeline.err", "wb")  # noqa: SIM115 - the pipeline holds it
    shell = node.spawn(
        ["sh", "-c", line], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=errors
    )
    errors.close()
    wait_members(shell.pid, 4)
    poll_until(lambda: len(lines_in(output)) >= 20, "the consumer writing")
    return shell, output


def assert_whole_stream(output: Path) -> None:
    """The consumer's file holds every line the producer wrote, once, in order, then END."""
    got = lines_in(output)
    count = len(got) - 1
    assert count > 0 and got == [f"LINE {n}" for n in range(count)] + [f"END {count}"], got[-5:]


def lines_in(path: Path) -> list[str]:
    try:
        return path.read_text().splitlines()
    except FileNotFoundError:
        return []


def wait_members(pid: int, count: int) -> None:
    poll_until(lambda: len(read_tree(pid).members) >= count, f"{count} members under {pid}")


def spawn_tree(node: Node, script: str, members: int) -> subprocess.Popen[bytes]:
    """Python `script` run on `node`, once it said "ready" and is a tree of `members`."""
    tree = node.spawn(
        [sys.executable, "-c", script],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert tree.stdout is not None and tree.stdout.readline() == b"ready\n"
    wait_members(tree.pid, members)
    return tree


def test_a_pipeline_moved_mid_stream_onward_and_home_keeps_every_line(tmp_path: Path) -> None:
    with Cluster(tmp_path, nodes=3) as cluster:
        for node in cluster.nodes:
            node.start_daemon()
        a, b, c = cluster.nodes
        shell, output = start_pipeline(a, tmp_path)
        there, printed = move_tree(a, shell.pid, b)
        assert len(MEMBER_LINE.findall(printed)) == 4, printed
        wait_gone(shell.pid, EXIT_TIMEOUT, "the original shell, killed by the move")
        shell.wait(timeout=EXIT_TIMEOUT)
        assert len(read_tree(there).members) == 4
        onward, _ = move_tree(b, there, c)  # away to away: its relays from home follow it
        assert len(read_tree(onward).members) == 4
        back, _ = move_tree(c, onward, a)
        streamed = len(lines_in(output))
        poll_until(lambda: len(lines_in(output)) > streamed, "the stream going on at home")
        (tmp_path / "stop").touch()
        # The shell's own status is not checked: under fresh pids (the nodes share one
        # kernel, whose old pids the originals hold during the move) its job table no
        # longer names its children, so its wait ends in ECHILD (README, limits).
        wait_gone(back, EXIT_TIMEOUT * 2, "the pipeline, moved home, ending")
        assert_whole_stream(output)


# A preforked echo server: the root listens, forks a worker, and both accept on that one
# listener (as nginx's workers do), a thread per connection echoing it.
PREFORKED = """\
import os, socket, threading
listener = socket.create_server(("127.0.0.1", 0), backlog=64)
def echo(connection):
    with connection:
        while data := connection.recv(65536):
            connection.sendall(data)
def serve():
    while True:
        connection, _ = listener.accept()
        threading.Thread(target=echo, args=(connection,), daemon=True).start()
if os.fork() == 0:
    serve()
print(listener.getsockname()[1], flush=True)
serve()
"""


def sockets_of(pid: int) -> set[str]:
    """The sockets `pid` holds: "socket:[inode]"."""
    return {link for link in links(pid).values() if link.startswith("socket:")}


def test_a_forking_server_moved_away_and_home_again_holds_its_own_sockets(
    tmp_path: Path,
) -> None:
    """Home again, every member gets the originals its home shadow held: the listener the
    two share and their stdout (one description each, shared, as before), the client
    connections, one of them accepted by the shadow while the tree was away and under
    way through the move home; the shadow relays nothing more and follows the tree as an
    attached one, and ends with it."""
    with two_nodes(tmp_path) as (a, b):
        shape_loopback(a)  # the checked streams are under way through the moves
        server = spawn_python(a, PREFORKED)
        port = read_line(server, LINE_TIMEOUT)
        wait_members(server.pid, 2)
        shared = {link for pid in read_tree(server.pid).pids for link in sockets_of(pid)}
        stdout = os.readlink(f"/proc/{server.pid}/fd/1")
        session = spawn_python(a, ECHO_SESSION, "127.0.0.1", port)
        assert read_line(session, LINE_TIMEOUT) == "connected"
        assert ask(session, "at home") == "at home"
        stream = ("127.0.0.1", port, str(32 << 20))
        with spawn_fixture("stream_client", *stream, "81", netns=a.netns) as first:
            poll_until(lambda: most_acknowledged(a, port) >= 1 << 20, "the stream under way")
            there, _ = move_tree(a, server.pid, b)
            server.wait(timeout=EXIT_TIMEOUT)
            shadow_pid = int(shadow_status(a, server.pid)["shadow_pid"])
            assert ask_moved(session, "away") == "away"
            # Accepted by the shadow, relayed to b: the members' own once home.
            with spawn_fixture("stream_client", *stream, "82", netns=a.netns) as second:
                poll_until(
                    lambda: any(
                        s["id"].startswith("acc:") and s["bytes_out"]
                        for s in shadow_status(a, server.pid)["streams"]
                    ),
                    "the second client relayed",
                )
                back, printed = move_tree(b, there, a)
                assert "home again: it holds its own sockets" in printed, printed
                members = list(read_tree(back).pids)
                assert len(members) == 2, members
                status = shadow_status(a, server.pid)
                assert (status["mode"], status["streams"], status["location"]) == ("home", [], "")
                assert status["target_pid"] == back, status
                assert sorted(m["pid"] for m in status["members"]) == members[1:], status
                with Registry(a.state_dir) as registry:
                    record = registry.get(back)
                assert (record.state, record.home_pid) == ("attached", None), record
                shown = json.loads(a.hijack_ok("status", "--json").stdout)["processes"]
                row = next(p for p in shown if p["pid"] == back)
                assert row["state"] == "attached", row
                held = [(m["pid"], m["attached"], m["alive"]) for m in row["members"]]
                assert held == [(members[1], True, True)], row
                poll_until(
                    lambda: relay_sockets(shadow_pid, *members) == [], "no socket but theirs"
                )
                # Every TCP socket they hold is a real one on the server's port; the
                # listener and stdout both share are the very ones they had before.
                rows = [row for member in members for row in ss_lines(a, member)]
                assert {r[3] for r in rows} == {f"127.0.0.1:{port}"}, rows
                for member in members:
                    assert shared <= sockets_of(member), (member, shared)
                    assert os.readlink(f"/proc/{member}/fd/1") == stdout, member
                assert ask_moved(session, "home again") == "home again"
                with spawn_fixture(
                    "stream_client", *stream[:2], str(4 << 20), "83", netns=a.netns
                ) as third:
                    third.assert_intact()
                second.assert_intact()
            first.assert_intact()
        assert ask_moved(session, "still") == "still"
        assert shadow_status(a, server.pid)["streams"] == []
        for member in reversed(members):
            os.kill(member, signal.SIGKILL)
        wait_gone(back, EXIT_TIMEOUT, "the server, killed")
        wait_gone(shadow_pid, EXIT_TIMEOUT, "its home shadow, the tree ended")


# A parent echoing its stdin lines, and a child holding a UDP socket (a descriptor the
# shadow cannot hand back: its peers know the shadow's relay).
UDP_CHILD = """\
import os, socket, sys, time
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.bind(("127.0.0.1", 0))
if os.fork() == 0:
    time.sleep(600)
    os._exit(0)
udp.close()
print("ready", flush=True)
for line in sys.stdin:
    print(line.strip(), flush=True)
"""


def test_a_tree_that_cannot_all_come_home_stays_relayed_and_works(tmp_path: Path) -> None:
    """One member's UDP socket keeps the whole tree relayed home again (the designed
    fallback), and the move says why; its pipes, relayed, still carry every line."""
    with two_nodes(tmp_path) as (a, b):
        tree = spawn_python(a, UDP_CHILD)
        assert read_line(tree, LINE_TIMEOUT) == "ready"
        wait_members(tree.pid, 2)
        there, _ = move_tree(a, tree.pid, b)
        tree.wait(timeout=EXIT_TIMEOUT)
        assert ask_moved(tree, "away") == "away"
        back, printed = move_tree(b, there, a)
        assert "home again, relayed by its shadow still:" in printed, printed
        assert "(datagram)" in printed, printed
        assert ask_moved(tree, "home, relayed") == "home, relayed"
        status = shadow_status(a, tree.pid)
        assert status["mode"] == "away" and status["streams"], status
        for member in reversed(list(read_tree(back).pids)):
            os.kill(member, signal.SIGKILL)
        wait_gone(back, EXIT_TIMEOUT, "the tree, killed")


def test_a_fork_of_its_parent_is_refused_without_leave_parent(tmp_path: Path) -> None:
    with two_nodes(tmp_path) as (a, b):
        forker = a.spawn(
            [sys.executable, "-c", "import os, time\nos.fork()\ntime.sleep(60)"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_members(forker.pid, 2)
        child = read_tree(forker.pid).members[1].pid
        assert b.daemon_endpoint is not None
        refused = a.hijack("move", child, "--to", b.daemon_endpoint)
        assert refused.returncode == 1, refused.describe()
        line = refused.stderr.strip()
        assert "Traceback" not in refused.stderr and len(line.splitlines()) == 1, line
        assert f"cannot move process {child}" in line and "fork of its parent" in line, line
        assert f"hijack move {forker.pid} --to {b.daemon_endpoint}" in line, line
        assert "--leave-parent" in line, line
        assert_untouched(child)
        assert_untouched(forker.pid)
        result = a.hijack("move", child, "--to", b.daemon_endpoint, "--leave-parent")
        assert result.returncode == 0, f"{result.describe()}\n{logs(tmp_path)}"
        wait_gone(child, EXIT_TIMEOUT, "the worker moved alone")
        assert still_running(forker.pid), "its parent stays"
        forker.kill()
        forker.wait()


def test_a_tree_sharing_memory_with_a_parent_moves_frozen_whole(tmp_path: Path) -> None:
    """A child made by clone(CLONE_VM | CLONE_SIGHAND) moves with its parent, the tree
    frozen whole (pre-copy's rounds would copy their one memory per member: asked for,
    refused by name, nothing touched). At the destination the child is cloned so again
    from its parent's built stub: one memory, one table of signal actions; let go, the
    fixture checks each sees the other's counters, writes and handlers, and the parent
    reaps the child."""
    with (
        two_nodes(tmp_path) as (a, b),
        spawn_fixture("tree_vm", fifos=True, netns=a.netns) as tree,
    ):
        child = int(tree.ready["child"])
        assert b.daemon_endpoint is not None
        refused = a.hijack("move", tree.pid, "--to", b.daemon_endpoint, "--precopy")
        assert refused.returncode == 1, refused.describe()
        line = refused.stderr.strip()
        assert "Traceback" not in refused.stderr and len(line.splitlines()) == 1, line
        assert f"cannot move the tree of process {tree.pid} with pre-copy" in line, line
        assert f"process {child} (tree_vm) shares its memory (CLONE_VM)" in line, line
        assert "nothing was changed" in line, line
        assert_untouched(tree.pid)
        assert_untouched(child)

        printed = a.hijack("move", tree.pid, "--to", b.daemon_endpoint)
        assert printed.returncode == 0, f"{printed.describe()}\n{logs(tmp_path)}"
        found = TREE_LINE.search(printed.stdout)
        assert found is not None, printed.stdout
        there = int(found[3])
        (moved_child,) = (pid for pid in read_tree(there).pids if pid != there)
        kinds = (kcmp.KCMP_VM, kcmp.KCMP_SIGHAND)
        assert all(kcmp.shares_context(there, moved_child, kind) for kind in kinds)
        tree.wait_exit()
        shadow = int(shadow_status(a, tree.pid)["shadow_pid"])
        finish_moved(tree, Moved(there, b, 0.0, shadow), tmp_path)


def test_a_tree_sharing_its_table_and_fs_context_moves_with_precopy_into_its_stubs(
    tmp_path: Path,
) -> None:
    """A child made by clone(CLONE_FILES | CLONE_FS) moves with its parent by pre-copy:
    its stub is forked from its parent's before the freeze sharing the table and fs
    context, and at the freeze each member is finished as soon as its memory is (the
    parent's descriptors made into the table before the child's memory is turned into its
    image's, whose file mappings open and close descriptors in that same table). There,
    they share both again; let go, the child opens a file and enters a directory and the
    parent sees both (the fixture checks)."""
    opened, entered = tmp_path / "opened", tmp_path / "entered"
    opened.write_text("the child opens me\n")
    entered.mkdir()
    with (
        two_nodes(tmp_path) as (a, b),
        spawn_fixture("tree_contexts", "both", opened, entered, fifos=True, netns=a.netns) as tree,
    ):
        child = int(tree.ready["child"])
        assert contexts_shared(tree.pid, child) == {"files", "fs"}
        assert b.daemon_endpoint is not None
        printed = a.hijack("move", tree.pid, "--to", b.daemon_endpoint, "--precopy")
        assert printed.returncode == 0, f"{printed.describe()}\n{logs(tmp_path)}"
        found = TREE_LINE.search(printed.stdout)
        assert found is not None, printed.stdout
        assert "pre-copy round" in printed.stdout, printed.stdout
        built = daemon_log(b)
        assert "rebuilt during the freeze" not in built and "not built" not in built, built
        there = int(found[3])
        (moved_child,) = (pid for pid in read_tree(there).pids if pid != there)
        assert contexts_shared(there, moved_child) == {"files", "fs"}
        tree.wait_exit()
        shadow = int(shadow_status(a, tree.pid)["shadow_pid"])
        finish_moved(tree, Moved(there, b, 0.0, shadow), tmp_path)


def test_a_tree_whose_move_fails_before_its_commit_runs_on_at_home(tmp_path: Path) -> None:
    with two_nodes(tmp_path) as (a, b):
        shell, output = start_pipeline(a, tmp_path)
        before = read_tree(shell.pid).pids
        assert b.daemon_endpoint is not None
        # Stopped once the destination has prepared the tree, then interrupted.
        mover = hijack_in(a, "move-prepared", "move", shell.pid, "--to", b.daemon_endpoint)
        os.kill(mover.pid, signal.SIGINT)
        os.kill(mover.pid, signal.SIGCONT)
        _, errors = mover.communicate(timeout=EXIT_TIMEOUT)
        assert mover.returncode != 0, errors
        assert "Traceback" not in errors, errors
        assert read_tree(shell.pid).pids == before, "every member runs on at home"
        for pid in before:
            assert_untouched(pid)
            # Pre-copied first: its tracking ended with the move, no trace of it left.
            links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
            assert not [link for link in links if "userfaultfd" in link], links
            smaps = Path(f"/proc/{pid}/smaps").read_text()
            assert not re.search(r"^VmFlags:.* u[wm]\b", smaps, re.MULTILINE), pid
        count = len(lines_in(output))
        poll_until(lambda: len(lines_in(output)) > count + 10, "the stream going on at home")
        (tmp_path / "stop").touch()
        assert shell.wait(timeout=EXIT_TIMEOUT * 2) == 0
        assert_whole_stream(output)
        assert "runs here as" not in daemon_log(b)


POOL_TASKS = 900  # 6 s of work for 3 workers: the move comes in the middle
POOL = """\
import multiprocessing, os, sys, time
def square(n):
    time.sleep(0.02)
    return n * n
if __name__ == "__main__":
    multiprocessing.set_start_method("fork")
    pool = multiprocessing.Pool(3)
    print("ready", flush=True)
    results = pool.map(square, range(int(sys.argv[1])), chunksize=1)
    ok = results == [n * n for n in range(int(sys.argv[1]))]
    print("PASS" if ok else f"FAIL {results}", flush=True)
    # Moved between nodes of one kernel, the pool runs under new pids, and
    # multiprocessing checks its own against the one it was started with (join()
    # refuses): the workers are told to end (close), not joined.
    pool.close()
    os._exit(0 if ok else 1)
"""


def test_a_multiprocessing_pool_moved_while_it_works_gets_every_result(tmp_path: Path) -> None:
    with two_nodes(tmp_path) as (a, b):
        program = tmp_path / "pool.py"
        program.write_text(POOL)
        output = tmp_path / "pool.out"
        with open(output, "wb") as out:
            pool = a.spawn(
                [sys.executable, str(program), str(POOL_TASKS)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        poll_until(lambda: "ready" in output.read_text(), "the pool working")
        wait_members(pool.pid, 4)
        there, _ = move_tree(a, pool.pid, b)
        assert "PASS" not in output.read_text(), "the pool finished before the move"
        pool.wait(timeout=EXIT_TIMEOUT)
        wait_gone(there, EXIT_TIMEOUT * 2, "the pool, moved, ending")
        assert exit_code_on(b, there) == 0, logs(tmp_path)
        assert "PASS" in output.read_text(), output.read_text()


# An HTTP load on 127.0.0.1:argv[1] (run inside the node): KEPT keep-alive connections
# asked in turn, and a fresh connection each round. Each stdin line is answered
# "served FRESH FAILURES FIRST-FAILURE".
LOADER = """\
import http.client, select, sys, time
port = int(sys.argv[1])
def connect():
    return http.client.HTTPConnection("127.0.0.1", port, timeout=40)
kept = [connect() for _ in range(4)]
served = fresh = 0
failures = []
def ask(connection):
    global served
    try:
        connection.request("GET", "/")
        response = connection.getresponse()
        body = response.read()
        if response.status != 200 or body != b"hello\\n":
            failures.append(f"answered {response.status} {body!r}")
    except Exception as error:
        failures.append(repr(error))
    served += 1
while True:
    if select.select([sys.stdin], [], [], 0)[0]:
        if not sys.stdin.readline():
            break
        print(f"served {served} {fresh} {len(failures)} {failures[:1]}", flush=True)
    for connection in kept:
        ask(connection)
    connection = connect()
    ask(connection)
    connection.close()
    fresh += 1
"""


def load_report(loader: subprocess.Popen[bytes]) -> tuple[int, int, int, str]:
    assert loader.stdin is not None and loader.stdout is not None
    loader.stdin.write(b"report\n")
    loader.stdin.flush()
    words = loader.stdout.readline().decode().split(maxsplit=4)
    assert words and words[0] == "served", words
    return int(words[1]), int(words[2]), int(words[3]), words[4] if len(words) > 4 else ""


def served_after(loader: subprocess.Popen[bytes], served: int, fresh: int, tmp_path: Path) -> None:
    """The load gets answers on kept and on new connections, past `served` and `fresh`."""
    deadline = time.monotonic() + EXIT_TIMEOUT
    while True:
        now = load_report(loader)
        if now[0] >= served + 100 and now[1] >= fresh + 20:
            return
        assert time.monotonic() < deadline, f"the load stalled at {now}\n{logs(tmp_path)}"
        time.sleep(0.1)


@pytest.mark.skipif(NGINX is None, reason="nginx (Debian package nginx) is not installed")
@pytest.mark.parametrize("listen", ["", " reuseport"], ids=["shared listener", "reuseport"])
def test_nginx_moved_there_and_back_under_load_fails_no_request(
    tmp_path: Path, listen: str
) -> None:
    """Its workers accept on the master's one listener (one relayed stream for the
    three), or each on its own of a SO_REUSEPORT group (a stream each)."""
    with two_nodes(tmp_path) as (a, b):
        port = a.free_port()
        config = tmp_path / "nginx.conf"
        text = NGINX_CONFIG.format(dir=tmp_path, port=port)
        config.write_text(
            text.replace(f"listen 127.0.0.1:{port};", f"listen 127.0.0.1:{port}{listen};")
        )
        assert NGINX is not None
        master = a.spawn(
            [NGINX, "-p", str(tmp_path), "-c", str(config), "-e", str(tmp_path / "error.log")],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_members(master.pid, 3)
        a.wait_tcp("127.0.0.1", port)
        listening = a.run(["ss", "-Htln", f"sport = :{port}"], timeout=10).stdout.splitlines()
        assert len(listening) == (2 if listen else 1), listening
        loader = a.spawn(
            [sys.executable, "-c", LOADER, str(port)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        served_after(loader, 0, 0, tmp_path)
        listeners = {link for pid in read_tree(master.pid).pids for link in sockets_of(pid)}
        there, printed = move_tree(a, master.pid, b)
        assert len(MEMBER_LINE.findall(printed)) == 3, printed
        status = json.loads(b.hijack_ok("status", "--json").stdout)
        moved = next(p for p in status["processes"] if p["pid"] == there)
        assert moved["state"] == "running", json.dumps(moved)
        assert len(moved["members"]) == 2, "its workers, shown with it"
        master.wait(timeout=EXIT_TIMEOUT)  # the original, killed by the move
        served, fresh, failed, first = load_report(loader)
        served_after(loader, served, fresh, tmp_path)
        back, printed = move_tree(b, there, a)
        # Home again: its listening sockets are its own, the very ones (no relay). Under
        # this load a client the shadow accepted as the move began may still hold a request
        # for it: then the tree stays relayed (the designed fallback), and the move says so.
        if "home again: it holds its own sockets" in printed:
            for member in read_tree(back).pids:
                held = sockets_of(member)
                assert held & listeners, (member, listeners, held)
        else:
            assert "home again, relayed by its shadow still: " in printed, printed
        served, fresh, failed, first = load_report(loader)
        served_after(loader, served, fresh, tmp_path)
        served, fresh, failed, first = load_report(loader)
        assert failed == 0, f"{failed} requests failed, the first: {first}"
        print(f"nginx under load: {served} requests, {fresh} on new connections, none failed")
        assert len(read_tree(back).members) == 3, "the master and its 2 workers"
        errors = (tmp_path / "error.log").read_text()
        assert "exited on signal" not in errors, errors
        assert loader.stdin is not None
        loader.stdin.close()
        loader.wait(timeout=EXIT_TIMEOUT)


DIRTY_CHILDREN = 3
DIRTY_MIB = 32


def test_a_tree_dirtying_shared_memory_during_precopy_arrives_intact(tmp_path: Path) -> None:
    """Each member rewrites pages of the region it shares with the others since the fork
    (breaking that sharing) and drops some, all while the rounds run: round 0 sends the
    shared pages once, and what every member wrote since comes over it."""
    with (
        two_nodes(tmp_path) as (a, b),
        spawn_fixture(
            "tree_dirtier", str(DIRTY_CHILDREN), str(DIRTY_MIB), "2", netns=a.netns
        ) as tree,
    ):
        wait_members(tree.pid, DIRTY_CHILDREN + 1)
        there, printed = move_tree(a, tree.pid, b)
        rounds = re.search(r"\((\d+) pre-copy rounds", printed)
        assert rounds is not None and int(rounds[1]) >= 2, printed
        sent = re.search(r"frozen [\d.]+ ms, ([\d.]+) MiB sent", printed)
        assert sent is not None, printed
        # Round 0 sends the shared region once, not once per member (the later rounds what
        # was written since).
        assert float(sent[1]) < DIRTY_MIB * (DIRTY_CHILDREN + 1) / 2, printed
        # Its stubs were built from the rounds before the freeze, and used.
        assert "rebuilt during the freeze" not in daemon_log(b), daemon_log(b)
        tree.wait_exit()
        shadow = int(shadow_status(a, tree.pid)["shadow_pid"])
        finish_moved(tree, Moved(there, b, 0.0, shadow), tmp_path)


COW_CHILDREN = 4
COW_MIB = 64


def round_files_kib(daemon: int) -> list[int]:
    """What each of a daemon's pre-copy round files (memfds) holds, in KiB."""
    held = []
    for fd in os.listdir(f"/proc/{daemon}/fd"):
        path = f"/proc/{daemon}/fd/{fd}"
        try:
            if "hijack-rounds-" in os.readlink(path):
                held.append(os.stat(path).st_blocks // 2)
        except FileNotFoundError:
            continue  # closed meanwhile
    return held


def test_a_moved_tree_shares_its_copy_on_write_pages_again(tmp_path: Path) -> None:
    """A parent and children sharing a region copy-on-write since the fork arrive sharing
    it again: the destination forks each child's stub from its parent's once that is
    filled from the rounds, so the moved tree holds the region about once (the sum of
    its members' PSS), not once per member. Let go there, each child writes over pages
    all share, and the parent finds none of their writes. Once the stubs are built (the
    move stopped at move-prebuilt), the destination's round files hold none of the pages
    any more: the stubs do (the memory is not held twice until the move ends)."""
    with (
        two_nodes(tmp_path) as (a, b),
        spawn_fixture(
            "tree_cow", str(COW_CHILDREN), str(COW_MIB), fifos=True, netns=a.netns
        ) as tree,
    ):
        before = pss_kib([tree.pid, *(int(pid) for pid in tree.ready.values())])
        assert b.daemon_endpoint is not None and b.daemon is not None
        mover = hijack_in(a, "move-prebuilt", "move", tree.pid, "--to", b.daemon_endpoint)
        held = round_files_kib(b.daemon.pid)
        assert len(held) == COW_CHILDREN + 1 and sum(held) < 1024, held
        os.kill(mover.pid, signal.SIGCONT)
        printed, errors = mover.communicate(timeout=EXIT_TIMEOUT * 4)
        assert mover.returncode == 0, f"{errors}\n{logs(tmp_path)}"
        found = TREE_LINE.search(printed)
        assert found is not None, printed
        there = int(found[3])
        assert "rebuilt during the freeze" not in daemon_log(b), daemon_log(b)
        members = read_tree(there).pids
        assert len(members) == COW_CHILDREN + 1, members
        after = pss_kib(list(members))
        region = COW_MIB * 1024
        # The region once, each member's own pages, libraries and stacks; unshared it
        # would be COW_CHILDREN + 1 regions.
        assert after < region * 1.5 + 8 * 1024, (before, after)
        assert after < before * 1.5 + 4 * 1024, (before, after)
        tree.wait_exit()
        shadow = int(shadow_status(a, tree.pid)["shadow_pid"])
        finish_moved(tree, Moved(there, b, 0.0, shadow), tmp_path)


# A parent keeping a child (sleep, exec'd); told by SIGUSR1, it reaps a child and exits 0
# only if that child was killed by SIGKILL.
KEEPER = """\
import os, signal, subprocess, sys
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
subprocess.Popen(["sleep", "1000"])
print("ready", flush=True)
signal.sigwait({signal.SIGUSR1})
_, status = os.wait()  # under its new pid there: any child
sys.exit(0 if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL else 1)
"""


@pytest.mark.parametrize("stage", ["move-first-round", "move-prebuilt"])
def test_a_tree_whose_member_ends_during_the_move_arrives_with_its_zombie(
    tmp_path: Path, stage: str
) -> None:
    """A member that ends during the rounds (move-first-round) has no more rounds, and the pages
    others referred to in its memory go in their final images. The destination builds the
    tree's stubs from the rounds before the freeze; a member that ends in between
    (move-prebuilt: a zombie at the freeze, running when they were built) makes the frozen
    tree another: it is restored the whole way. Either way its zombie is reaped there."""
    with two_nodes(tmp_path) as (a, b):
        keeper = spawn_tree(a, KEEPER, 2)
        child = read_tree(keeper.pid).members[1].pid
        assert b.daemon_endpoint is not None
        mover = hijack_in(a, stage, "move", keeper.pid, "--to", b.daemon_endpoint, "--precopy")
        os.kill(child, signal.SIGKILL)
        poll_until(lambda: read_tree(keeper.pid).members[1].zombie, "the child a zombie")
        os.kill(mover.pid, signal.SIGCONT)
        printed, errors = mover.communicate(timeout=EXIT_TIMEOUT * 4)
        assert mover.returncode == 0, f"{errors}\n{logs(tmp_path)}"
        found = TREE_LINE.search(printed)
        assert found is not None, printed
        there = int(found[3])
        if stage == "move-prebuilt":
            assert "rebuilt during the freeze" in daemon_log(b), daemon_log(b)
        keeper.wait(timeout=EXIT_TIMEOUT)  # the original, killed by the move
        os.kill(there, signal.SIGUSR1)
        wait_gone(there, EXIT_TIMEOUT, "the keeper, moved, reaping its zombie")
        assert exit_code_on(b, there) == 0, logs(tmp_path)


# A parent filling REGION_PAGES pages of private memory (page n: byte n % 251 + 1), then
# forking 3 children that keep them (shared copy-on-write since the fork). Told by
# SIGUSR1, each member changes a part of it: the parent writes its own copy of pages
# 0-15 (the children keep the old ones, which round 0 referred to the parent's), child 1
# drops pages 16-31 (MADV_DONTNEED: zeros), child 2 drops pages 32-47 and reads them
# again (the zero page), child 3 writes pages 48-63; each prints "changed". Told by
# SIGUSR2, each checks every page; the parent reaps its children (any pid) and exits 0
# only if each did and its own pages hold.
REFERRED = """\
import mmap, os, signal, sys
PAGE, PAGES = 4096, 256
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1, signal.SIGUSR2})
memory = mmap.mmap(-1, PAGES * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
for page in range(PAGES):
    memory[page * PAGE : (page + 1) * PAGE] = bytes([page % 251 + 1]) * PAGE
index = 0
for child in (1, 2, 3):
    if os.fork() == 0:
        index = child
        break
else:
    print("ready", flush=True)
signal.sigwait({signal.SIGUSR1})
changed = range(16 * index, 16 * index + 16)
if index in (0, 3):
    for page in changed:
        memory[page * PAGE : (page + 1) * PAGE] = bytes([0xEE - index]) * PAGE
else:
    memory.madvise(mmap.MADV_DONTNEED, changed[0] * PAGE, 16 * PAGE)
    if index == 2:
        assert memory[changed[0] * PAGE : changed[-1] * PAGE] == bytes((16 - 1) * PAGE)
os.write(1, b"changed\\n")  # one write: the members share the pipe
signal.sigwait({signal.SIGUSR2})
intact = True
for page in range(PAGES):
    if page not in changed:
        expected = bytes([page % 251 + 1]) * PAGE
    else:
        expected = bytes([0xEE - index]) * PAGE if index in (0, 3) else bytes(PAGE)
    if memory[page * PAGE : (page + 1) * PAGE] != expected:
        print(f"member {index}: page {page} differs", file=sys.stderr, flush=True)
        intact = False
if index:
    sys.exit(0 if intact else 1)
for _ in range(3):
    _, status = os.wait()
    intact = intact and os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
sys.exit(0 if intact else 1)
"""


@pytest.mark.parametrize("stage", ["move-first-round", "move-prebuilt"])
def test_a_tree_changing_pages_it_referred_to_arrives_with_each_change(
    tmp_path: Path, stage: str
) -> None:
    """Round 0 sends the pages members share since a fork once: the children's name the
    parent's. Then (during the rounds: move-first-round; or after them, only the freeze
    sees it: move-prebuilt) the parent writes its own copy of some (the children keep
    the old), a child drops some (zeros), another drops some and reads them again (the
    zero page), another writes some: each member arrives with its own pages as it left
    them (a reference whose page changed on either side is stored in the final image)."""
    with two_nodes(tmp_path) as (a, b):
        tree = spawn_tree(a, REFERRED, 4)
        assert b.daemon_endpoint is not None
        mover = hijack_in(a, stage, "move", tree.pid, "--to", b.daemon_endpoint, "--precopy")
        for member in read_tree(tree.pid).pids:
            os.kill(member, signal.SIGUSR1)
        for _ in range(4):
            assert tree.stdout.readline() == b"changed\n"
        os.kill(mover.pid, signal.SIGCONT)
        printed, errors = mover.communicate(timeout=EXIT_TIMEOUT * 4)
        assert mover.returncode == 0, f"{errors}\n{logs(tmp_path)}"
        found = TREE_LINE.search(printed)
        assert found is not None, printed
        there = int(found[3])
        assert "rebuilt during the freeze" not in daemon_log(b), daemon_log(b)
        tree.wait(timeout=EXIT_TIMEOUT)  # the original, killed by the move
        members = read_tree(there).pids
        assert len(members) == 4, members
        for member in members:
            os.kill(member, signal.SIGUSR2)
        wait_gone(there, EXIT_TIMEOUT, "the tree, moved, checking its pages")
        assert exit_code_on(b, there) == 0, logs(tmp_path)


@pytest.mark.parametrize("stage", ["move-frozen", "move-prepared"])
def test_a_tree_mover_killed_before_its_commit_leaves_every_member_running_as_it_was(
    tmp_path: Path, stage: str
) -> None:
    """SIGKILL to the mover of a tree (pre-copied, frozen, its images out): the kernel lets
    every member go, each thread on where it stopped with its own registers and signal
    mask (every call injected in it put back), and the members' own check of their memory
    finds it whole (a thread left on our registers would go on from the syscall
    instruction the calls ran at: a write it was in the middle of cut short)."""
    with (
        two_nodes(tmp_path) as (a, b),
        spawn_fixture("tree_dirtier", "3", "32", "64", netns=a.netns) as tree,
    ):
        wait_members(tree.pid, 4)
        originals = list(read_tree(tree.pid).pids)
        masks = signal_masks(*originals)
        assert b.daemon_endpoint is not None
        mover = hijack_in(a, stage, "move", tree.pid, "--to", b.daemon_endpoint)
        mover.kill()
        mover.wait()
        for member in originals:
            poll_until(lambda m=member: process_state(m) in "RS", f"member {member} running")
        assert signal_masks(*originals) == masks
        shadow = shadow_pid_of(a, tree.pid)
        recovered = a.hijack("recover")
        assert recovered.returncode == 0, recovered.describe()
        a.hijack_ok("detach", tree.pid)
        reap([shadow])
        tree.assert_intact()
