"""`hijack dump --kill` of a process tree and `hijack restore` of its image (docs/crf.md §7b).

The tree_relations fixture is three levels deep: a group and a session led
below the root, a group whose leader has exited, a child whose exit signal is
SIGURG, two zombies (one exited, one killed by a signal), a stopped child, a
pipe carrying data in flight from root to a child, a unix socket pair joining
root and another with bytes in flight both ways, shared anonymous memory every
member increments and a file whose one offset root and a child advance. Killed
and restored, every member is back under its pid with its parent, group,
session, exit signal and state, its /proc views as they were, what members
shared shared again (the same pipe, socket, memory, open file description),
and the fixture's own checks pass: its root reaps the zombies with their
status. A pid taken is refused unless --new-pids, which renumbers only the
members whose pid is taken, relations kept. A restore interrupted kills every
stub it made; members sharing what a restore would copy are refused before the kill.
The tree_mapped fixture: a memfd and a deleted file members only map, and a pty
pair both hold whole, come back one object each, not a copy per member; what a
restore would copy per member (a forkpty split, an unlinked queue each opened)
is refused before the kill.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import pytest
from support import spawn_fixture
from support.cli import HijackCli, restored_pid
from support.objects import (
    Views,
    assert_refused,
    compare_views,
    hijack,
    proc_views,
    without_socket_inodes,
)
from support.procview import FdView, pipes_named_alike
from support.running import RunningFixture
from test_faults import assert_interrupted, deliver, finish, hijack_at
from test_tree_attach import (
    LINE_TIMEOUT,
    TREE_PROGRAM,
    Tree,
    attach_tree,
    cli,
    read_line,
    tree,
)

from hijack.process.tree import read_tree
from hijack.sys.stub import fork_with_pid

__all__ = ["cli", "hijack", "tree"]  # fixtures, used by name

REAP_TIMEOUT = 10.0  # seconds for a killed member to be ours to reap
SHARED_MEMORY = "/dev/zero (deleted)"


def relations(root: int) -> dict[int, tuple[int, int, int, int, str]]:
    """Each member's parent, group, session, exit signal and state: Z, T (stopped; t under
    a tracer), or S (running or sleeping, which a running process turns from one to the
    other)."""
    found = {}
    for m in read_tree(root).members:
        state = {"t": "T", "R": "S", "D": "S"}.get(m.state, m.state)
        found[m.pid] = (m.ppid, m.pgid, m.sid, m.exit_signal, state)
    return found


def sharing(pids: Iterable[int]) -> set[frozenset[tuple[int, int | str]]]:
    """What members share, as groups of (pid, fd) holding one pipe or socket, and of (pid,
    address) mapping one shared anonymous object; only groups spanning two members or
    more."""
    groups: dict[str, set[tuple[int, int | str]]] = {}
    for pid in pids:
        for name in os.listdir(f"/proc/{pid}/fd"):
            target = os.readlink(f"/proc/{pid}/fd/{name}")
            if re.fullmatch(r"(pipe|socket):\[\d+\]", target):
                groups.setdefault(target, set()).add((pid, int(name)))
        for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5] == SHARED_MEMORY:
                groups.setdefault(f"shmem {fields[4]}", set()).add((pid, fields[0]))
    return {frozenset(g) for g in groups.values() if len({pid for pid, _ in g}) > 1}


def same_description(pid: int, fd: int, other_pid: int, other_fd: int) -> bool:
    """Whether two descriptors are one open file description: an offset moved through one
    shows through the other."""
    return os.path.samestat(
        os.stat(f"/proc/{pid}/fd/{fd}"), os.stat(f"/proc/{other_pid}/fd/{other_fd}")
    ) and _pos(pid, fd) == _pos(other_pid, other_fd)


def _pos(pid: int, fd: int) -> int:
    return int(Path(f"/proc/{pid}/fdinfo/{fd}").read_text().split()[1])


def rebuilt_alike(view: frozenset[FdView]) -> frozenset[FdView]:
    """A pipe or socket rebuilt is a new inode: named alike (which pipes and sockets each
    member shares with another: sharing())."""
    return without_socket_inodes(pipes_named_alike(view))


def reap_killed(pids: Iterable[int]) -> None:
    """Reap the killed members, orphaned to us (pytest is a subreaper): their pids free."""
    for pid in pids:
        try:
            handle = os.pidfd_open(pid)
        except ProcessLookupError:
            continue  # reaped already, by its own parent
        try:
            readable, _, _ = select.select([handle], [], [], REAP_TIMEOUT)
            assert readable, f"killed member {pid} still runs"
        finally:
            os.close(handle)
        while True:
            try:
                reaped, _ = os.waitpid(pid, 0)
            except ChildProcessError:
                break  # reaped by its own parent, dead before it
            if reaped == pid:
                break


def dump_kill_tree(hijack: HijackCli, tree: RunningFixture, image: Path) -> None:
    dumped = hijack.ok("dump", tree.pid, "-o", image, "--kill")
    assert "the tree of process" in dumped.stdout and "killed" in dumped.stdout
    assert tree.wait_exit() == -signal.SIGKILL
    reap_killed(int(pid) for pid in tree.ready.values())


def test_a_killed_tree_comes_back_whole_under_its_pids(hijack: HijackCli, tmp_path: Path) -> None:
    image = tmp_path / "tree.crf"
    with spawn_fixture("tree_relations", tmp_path / "file", "stopped", fifos=True) as tree:
        members = {name: int(pid) for name, pid in tree.ready.items()}
        living = [tree.pid] + [pid for name, pid in members.items() if name not in ("z", "zk")]
        before_relations = relations(tree.pid)
        before_views: dict[int, Views] = {pid: proc_views(pid, rebuilt_alike) for pid in living}
        before_sharing = sharing(living)

        dump_kill_tree(hijack, tree, image)
        shown = json.loads(hijack.ok("show", "--json", image).stdout)
        links = {(link["pid"], link["holder_pid"]) for link in shown["shared"]}
        assert (members["a"], tree.pid) in links, "the file a inherited: one description"
        restored = hijack.ok("restore", image)
        assert restored_pid(restored) == tree.pid
        assert f"restored zombie {members['z']} (its old pid)" in restored.stdout
        tree.adopt(tree.pid)

        assert relations(tree.pid) == before_relations
        for pid in living:
            compare_views(before_views[pid], pid, rebuilt_alike)
        assert sharing(living) == before_sharing, "pipes, sockets, memory shared again"
        file_fds = [
            (pid, int(name))
            for pid in (tree.pid, members["a"])
            for name in os.listdir(f"/proc/{pid}/fd")
            if os.readlink(f"/proc/{pid}/fd/{name}") == str(tmp_path / "file")
        ]
        assert len(file_fds) == 2 and same_description(*file_fds[0], *file_fds[1])
        # Its own checks: the zombie reaped with status 7, s still stopped, the pipe's
        # bytes in flight, the counter, the file's offset advanced by root and a alike.
        tree.assert_intact()


def hold_pid(pid: int) -> tuple[int, int]:
    """A process of ours with pid `pid` (clone3 set_tid): cat, blocked reading a pipe
    whose write end (returned with its pid) nobody writes. End it with release_pid."""
    read_end, write_end = os.pipe()
    child = fork_with_pid(pid)
    if child == 0:
        os.dup2(read_end, 0)
        os.execv("/bin/cat", ["cat"])
    os.close(read_end)
    assert child == pid, f"pid {pid} could not be had: {child}"
    return child, write_end


def release_pid(held: tuple[int, int]) -> None:
    pid, write_end = held
    os.close(write_end)  # cat reads EOF and exits
    os.waitpid(pid, 0)


def kill_tree(pids: Iterable[int]) -> None:
    """Kill restored members that are not ours to wait for, and reap what becomes ours."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):  # ended already: its parent's gone
            os.kill(pid, signal.SIGKILL)
    reap_killed(pids)


def test_a_taken_pid_is_refused_unless_new_pids_asked(hijack: HijackCli, tmp_path: Path) -> None:
    image = tmp_path / "tree.crf"
    with spawn_fixture("tree_relations", tmp_path / "file", fifos=True) as tree:
        members = {name: int(pid) for name, pid in tree.ready.items()}
        before = relations(tree.pid)
        dump_kill_tree(hijack, tree, image)
        held = hold_pid(members["a"])
        try:
            refused = hijack("restore", image)
            assert_refused(
                refused, f"pid {members['a']} (tree_relations) is held by cat", "--new-pids"
            )
            assert not any(
                os.path.exists(f"/proc/{pid}") for pid in members.values() if pid != held[0]
            )
            assert not os.path.exists(f"/proc/{tree.pid}"), "nothing made"

            restored = hijack.ok("restore", "--new-pids", image)
            new_of = {
                int(old): int(new)
                for new, old in re.findall(
                    r"restored process (\d+) \(tree_relations, was (\d+)", restored.stdout
                )
            }
            assert list(new_of) == [members["a"]], restored.stdout  # only the taken pid changed
            new_a = new_of[members["a"]]
            assert restored_pid(restored) == tree.pid
            tree.adopt(tree.pid)
            renamed = {
                new_of.get(pid, pid): tuple(
                    new_of.get(x, x) if isinstance(x, int) else x for x in relation
                )
                for pid, relation in before.items()
            }
            assert relations(tree.pid) == renamed
            assert new_a in {pid for pid, _ in next(iter(sharing([tree.pid, new_a])))}
        finally:
            release_pid(held)
        # Its own checks would wait for a by its old pid: end the tree instead.
        tree.kill()
        kill_tree([new_a, *(pid for name, pid in members.items() if name not in ("a", "z", "zk"))])


def test_an_attached_tree_killed_and_restored_keeps_its_connections(
    tmp_path: Path, cli: HijackCli, tree: Tree
) -> None:
    """dump --kill of an attached tree hands every member's descriptors to the one shadow;
    the restore gives each member its very connections back, the pipe's line still in it."""
    attach_tree(cli, tree)
    image = tmp_path / "attached.crf"
    cli.ok("dump", tree.root, "-o", image, "--kill")
    assert tree.process.wait(REAP_TIMEOUT) == -signal.SIGKILL
    reap_killed(tree.pids[1:])
    restored = cli.ok("restore", image)
    assert restored_pid(restored) == tree.root
    try:
        for pid in tree.pids:
            assert tree.ask(pid, "ping") == f"pong {pid}", "its connection, kept by the shadow"
        assert tree.ask(tree.root, "pipe") == f"from child {tree.pids[1]}"
        assert_status_draws(cli, tree.root, tree.pids[1:])
    finally:
        cli("detach", tree.root)
        kill_tree(tree.pids)


def assert_status_draws(cli: HijackCli, root: int, children: Iterable[int]) -> None:
    """`hijack status` draws the restored tree: its root, each of its `children` under it,
    attached (the shadow holds its descriptors again) and alive."""
    status = cli("status", "--json")
    assert status.returncode == 0, status.describe()
    (row,) = json.loads(status.stdout)["processes"]
    assert row["pid"] == root and row["state"] == "attached", row
    assert {m["pid"]: m["parent"] for m in row["members"]} == dict.fromkeys(children, root)
    assert all(m["attached"] and m["alive"] for m in row["members"]), row["members"]
    table = cli("status")
    for pid in children:
        assert f"└ {pid}" in table.stdout, table.stdout


def test_an_attached_tree_restored_under_new_pids_is_drawn_by_status(
    tmp_path: Path, cli: HijackCli, tree: Tree
) -> None:
    """A member whose pid is taken comes back under a new one (--new-pids): the registry's
    members table follows it, so `hijack status` draws the tree with its new pid."""
    attach_tree(cli, tree)
    image = tmp_path / "attached.crf"
    cli.ok("dump", tree.root, "-o", image, "--kill")
    assert tree.process.wait(REAP_TIMEOUT) == -signal.SIGKILL
    reap_killed(tree.pids[1:])
    held = hold_pid(tree.pids[1])
    new_child = 0
    try:
        restored = cli.ok("restore", "--new-pids", image)
        found = re.findall(r"restored process (\d+) \(\S+, was (\d+)", restored.stdout)
        new_of = {int(old): int(new) for new, old in found}
        assert list(new_of) == [tree.pids[1]], restored.stdout
        new_child = new_of[tree.pids[1]]
        assert tree.ask(tree.pids[1], "ping") == f"pong {new_child}", "its connection, kept"
        assert_status_draws(cli, tree.root, [new_child, tree.pids[2]])
    finally:
        release_pid(held)
        cli("detach", tree.root)
        kill_tree([tree.root, tree.pids[2], *([new_child] if new_child else [])])


@pytest.mark.parametrize("stage", ["restore-tree-forked", "restore-tree-rebuilt"])
def test_a_tree_restore_interrupted_leaves_no_member(
    hijack: HijackCli, tmp_path: Path, stage: str
) -> None:
    """SIGTERM once the tree is forked, or once every member is rebuilt: every stub is
    killed, none runs; the image restores whole afterwards."""
    image = tmp_path / "tree.crf"
    with spawn_fixture("tree_relations", tmp_path / "file", fifos=True) as tree:
        members = {name: int(pid) for name, pid in tree.ready.items()}
        dump_kill_tree(hijack, tree, image)
        process = hijack_at(stage, hijack.state_dir, "restore", image)
        deliver(process, signal.SIGTERM)
        assert_interrupted(finish(process), signal.SIGTERM)
        reap_killed([tree.pid, *members.values()])
        assert not [pid for pid in [tree.pid, *members.values()] if os.path.exists(f"/proc/{pid}")]

        tree.adopt(restored_pid(hijack.ok("restore", image)))
        tree.assert_intact()


# forkpty: the parent holds the pty's master only, the child its slave (stdin, stdout,
# stderr), blocked reading it; "ready CHILD" once it runs.
FORKPTY_PROGRAM = r"""
import os, pty
child, master = pty.fork()
if child == 0:
    os.read(0, 1)
    os._exit(0)
print("ready", child, flush=True)
os.read(master, 1)
"""

# A POSIX message queue parent and child each open by its name (two descriptions), then
# unlinked; "ready CHILD" once both hold it.
MQUEUE_PROGRAM = r"""
import ctypes, os, signal, sys
libc = ctypes.CDLL(None, use_errno=True)
name = sys.argv[1].encode()
def open_queue():
    fd = libc.mq_open(name, os.O_RDWR | os.O_CREAT, 0o600, None)
    assert fd >= 0, os.strerror(ctypes.get_errno())
    return fd
queue = open_queue()
told_read, told_write = os.pipe()
child = os.fork()
if child == 0:
    os.close(queue)
    os.close(told_read)
    open_queue()
    os.close(told_write)
    signal.pause()
os.close(told_write)
os.read(told_read, 1)  # EOF: the child holds the queue
libc.mq_unlink(name)
print("ready", child, flush=True)
signal.pause()
"""


@pytest.mark.parametrize(
    ("program", "argument", "reason"),
    [
        (FORKPTY_PROGRAM, "", "holds the master of pty /dev/pts/"),
        (MQUEUE_PROGRAM, "/hijack-tree-test", "each opened the unlinked message queue"),
    ],
    ids=["forkpty", "mqueue"],
)
def test_a_tree_sharing_what_a_restore_would_not_is_not_killed(
    hijack: HijackCli, tmp_path: Path, program: str, argument: str, reason: str
) -> None:
    """Members sharing what a restore would make once for each (a pty split between a
    master holder and a slave holder; an unlinked message queue each opened) are refused
    by name before the kill: the tree runs on, no image is left. (Memory shared by
    CLONE_VM: test_tree_share.)"""
    process = subprocess.Popen(
        [sys.executable, "-c", program, *([argument] if argument else [])],
        stdout=subprocess.PIPE,
        text=True,
    )
    child = 0
    try:
        assert process.stdout is not None
        words = process.stdout.readline().split()
        assert words[0] == "ready", words
        child = int(words[1])
        refused = hijack("dump", process.pid, "-o", tmp_path / "copied.crf", "--kill")
        assert_refused(
            refused,
            f"not killing the tree of process {process.pid}",
            reason.format(child=child, root=process.pid),
        )
        assert not (tmp_path / "copied.crf").exists()
        assert process.poll() is None and os.path.exists(f"/proc/{child}")
    finally:
        process.kill()
        process.wait()
        if child:
            kill_tree([child])


def test_a_tree_killed_and_restored_keeps_each_member_s_tcp_connection(
    hijack: HijackCli, tmp_path: Path
) -> None:
    """Not attached: every member's connection is locked at the kill and rebuilt
    (TCP_REPAIR) by the restore; each answers on it, the pipe's line still in flight.
    The tree's stdout is a FIFO, which a restore opens again."""
    fifo = tmp_path / "stdout"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    with socket.socket() as listener, contextlib.ExitStack() as stack:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        listener.settimeout(LINE_TIMEOUT)
        with open(fifo, "w") as writer:
            process = subprocess.Popen(
                [sys.executable, "-c", TREE_PROGRAM, str(listener.getsockname()[1])],
                stdin=subprocess.DEVNULL,
                stdout=writer,
                stderr=subprocess.DEVNULL,
            )
        stack.callback(os.close, reader)
        clients: dict[int, socket.socket] = {}
        for _ in range(3):
            client, _address = listener.accept()
            stack.enter_context(client)
            clients[int(read_line(client).split()[1])] = client
        said = b""
        while not said.endswith(b"\n"):
            readable, _, _ = select.select([reader], [], [], LINE_TIMEOUT)
            assert readable, f"the tree did not say ready (said {said!r})"
            said += os.read(reader, 4096)
        words = said.decode().split()
        pids = [int(word) for word in words[1:4]]
        assert words[0] == "ready" and set(pids) == set(clients)
        tree = Tree(process, (pids[0], pids[1], pids[2]), clients, f"pipe:[{words[4]}]")

        hijack.ok("dump", tree.root, "-o", tmp_path / "tcp.crf", "--kill")
        assert process.wait(REAP_TIMEOUT) == -signal.SIGKILL
        reap_killed(pids[1:])
        assert restored_pid(hijack.ok("restore", tmp_path / "tcp.crf")) == tree.root
        try:
            for pid in pids:
                assert tree.ask(pid, "ping") == f"pong {pid}", "its connection, rebuilt"
            assert tree.ask(tree.root, "pipe") == f"from child {pids[1]}"
        finally:
            kill_tree(pids)


def mapped_files(pid: int) -> set[tuple[str, str]]:
    """The (device, inode) of each memfd and deleted file `pid` maps shared."""
    found = set()
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        deleted = len(fields) == 6 and fields[5].endswith("(deleted)")
        if deleted and fields[1][3] == "s" and fields[5] != SHARED_MEMORY:
            found.add((fields[3], fields[4]))
    return found


def test_a_memfd_a_deleted_file_and_a_pty_stay_one_across_members(
    hijack: HijackCli, tmp_path: Path
) -> None:
    """A memfd the child only maps (its descriptor closed) and a deleted file both only map
    are each made once and mapped by both: a write by one is seen by the other; the memfd's
    seals (F_SEAL_SEAL among them) are set once every member maps it. A pty pair both hold
    whole (the child's slave its own description) is one pty. Status draws the tree."""
    image = tmp_path / "mapped.crf"
    with spawn_fixture("tree_mapped", tmp_path / "file", fifos=True) as tree:
        child = int(tree.ready["child"])
        assert len(mapped_files(tree.pid)) == 2 and mapped_files(child) == mapped_files(tree.pid)
        dump_kill_tree(hijack, tree, image)
        assert restored_pid(hijack.ok("restore", image)) == tree.pid
        tree.adopt(tree.pid)
        assert len(mapped_files(tree.pid)) == 2, "one memfd, one deleted file"
        assert mapped_files(child) == mapped_files(tree.pid), "the very same files, not copies"
        # `hijack status` draws the restored tree: the child under its root.
        (row,) = json.loads(hijack.ok("status", "--json").stdout)["processes"]
        assert (row["pid"], row["state"]) == (tree.pid, "restored"), row
        assert [(m["pid"], m["parent"], m["alive"]) for m in row["members"]] == [
            (child, tree.pid, True)
        ]
        assert not row["members"][0]["attached"], "no shadow holds its descriptors"
        table = hijack.ok("status").stdout
        assert f"└ {child}" in table and "member" in table, table
        tree.assert_intact()
