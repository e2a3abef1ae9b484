"""`hijack attach` of a process tree: one shadow holds the descriptors of every member.

Issue 13, deliverable 4 (and the attach part of 1). The tree is a real
Python program that forks: a parent and two children, each holding a TCP
connection to a client outside (the test), the first child a pipe to its
parent with a line in flight. `hijack attach ROOT` forks one shadow, which
must hold every member's socket (its /proc/PID/fd against each member's
socket inodes); `hijack status` shows the members under their root;
`hijack detach` ends the shadow and every member runs on untouched (each
answers on its connection, the parent reads the child's line from the pipe).
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from support.cli import HijackCli

from hijack.mutator.handover import hand_descriptors_to_shadow
from hijack.registry import Registry
from hijack.restore.restorer import shadow_holdings
from hijack.sys import pidfd

LINE_TIMEOUT = 10.0
EXIT_TIMEOUT = 10.0

# The tree: argv[1] is the port of the test's listener. Each member connects
# to it, says "hello PID", and then answers each line "ping" with "pong PID".
# To the parent also: "pipe", the line child 1 wrote into their pipe at start,
# read only now (both children keep the pipe's write end: one description,
# inherited by each); "fork", a new child, which pauses; "reap", wait for a
# child. "ready P C1 C2 INODE" (the pipe's) on stdout once every member is
# connected.
TREE_PROGRAM = r"""
import os, signal, socket, sys

port = int(sys.argv[1])

def connect():
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(f"hello {os.getpid()}\n".encode())
    return sock

def serve(sock, pipe=None):
    lines = sock.makefile("rb")
    for line in lines:
        if line == b"ping\n":
            sock.sendall(f"pong {os.getpid()}\n".encode())
        elif line == b"pipe\n" and pipe is not None:
            sock.sendall(os.read(pipe, 100))
        elif line == b"fork\n":
            child = os.fork()
            if child == 0:
                signal.pause()
                os._exit(0)
            sock.sendall(f"forked {child}\n".encode())
        elif line == b"reap\n":
            sock.sendall(f"reaped {os.wait()[0]}\n".encode())
    os._exit(0)

read_end, write_end = os.pipe()
ready_read, ready_write = os.pipe()
children = []
for index in range(2):
    child = os.fork()
    if child == 0:
        os.close(ready_read)
        os.close(read_end)
        sock = connect()
        if index == 0:
            os.write(write_end, f"from child {os.getpid()}\n".encode())
        # Both children keep the write end: one description, inherited by each.
        os.write(ready_write, b"x")
        os.close(ready_write)
        serve(sock)
    children.append(child)
os.close(write_end)
os.close(ready_write)
sock = connect()
assert len(os.read(ready_read, 1)) == 1 and len(os.read(ready_read, 1)) == 1
os.close(ready_read)
print("ready", os.getpid(), *children, os.fstat(read_end).st_ino, flush=True)
serve(sock, read_end)
"""

# PTRACE_SEIZEs argv[1] and holds it until its stdin closes.
TRACER_PROGRAM = r"""
import ctypes, sys
libc = ctypes.CDLL(None, use_errno=True)
PTRACE_SEIZE = 0x4206
if libc.ptrace(PTRACE_SEIZE, int(sys.argv[1]), 0, 0) != 0:
    print("error", ctypes.get_errno(), flush=True)
    raise SystemExit(1)
print("tracing", flush=True)
sys.stdin.read()
"""


@dataclass
class Tree:
    process: subprocess.Popen[bytes]
    pids: tuple[int, int, int]  # root, child 1, child 2
    clients: dict[int, socket.socket]  # member pid -> the test's end of its connection
    pipe: str  # "pipe:[N]": the pipe between child 1 and the root

    @property
    def root(self) -> int:
        return self.pids[0]

    def ask(self, pid: int, request: str) -> str:
        client = self.clients[pid]
        client.sendall(f"{request}\n".encode())
        return read_line(client)


def read_line(sock: socket.socket) -> str:
    data = b""
    deadline = time.monotonic() + LINE_TIMEOUT
    while not data.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"no whole line in {LINE_TIMEOUT} s (have {data!r})"
        readable, _, _ = select.select([sock], [], [], remaining)
        if readable:
            chunk = sock.recv(1)
            assert chunk, f"connection closed (have {data!r})"
            data += chunk
    return data.decode().rstrip("\n")


@pytest.fixture
def cli(tmp_path: Path) -> HijackCli:
    return HijackCli(tmp_path / "s")


@pytest.fixture
def tree() -> Iterator[Tree]:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        listener.settimeout(LINE_TIMEOUT)
        process = subprocess.Popen(
            [sys.executable, "-c", TREE_PROGRAM, str(listener.getsockname()[1])],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        clients: dict[int, socket.socket] = {}
        pids: list[int] = []
        try:
            for _ in range(3):
                client, _address = listener.accept()
                hello = read_line(client)
                clients[int(hello.split()[1])] = client
            assert process.stdout is not None
            ready, _, _ = select.select([process.stdout], [], [], LINE_TIMEOUT)
            assert ready, "the tree did not say ready"
            words = process.stdout.readline().decode().split()
            assert words[0] == "ready", words
            pids = [int(word) for word in words[1:4]]
            assert set(pids) == set(clients)
            yield Tree(process, (pids[0], pids[1], pids[2]), clients, f"pipe:[{words[4]}]")
        finally:
            for pid in pids[1:]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            process.kill()
            process.wait(EXIT_TIMEOUT)
            for client in clients.values():
                client.close()
            assert process.stdout is not None
            process.stdout.close()


def socket_inodes(pid: int) -> set[str]:
    """The socket inodes `pid` holds ("socket:[N]"), read from /proc."""
    inodes = set()
    for name in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):
            target = os.readlink(f"/proc/{pid}/fd/{name}")
            if target.startswith("socket:"):
                inodes.add(target)
    return inodes


def all_inodes(pid: int) -> list[str]:
    targets = []
    for name in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):
            targets.append(os.readlink(f"/proc/{pid}/fd/{name}"))
    return targets


def wait_gone(pid: int) -> None:
    deadline = time.monotonic() + EXIT_TIMEOUT
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return
        if state in ("Z", "X"):
            return
        time.sleep(0.02)
    raise AssertionError(f"process {pid} still runs")


def assert_untouched(tree: Tree) -> None:
    for pid in tree.pids:
        status = Path(f"/proc/{pid}/status").read_text()
        fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
        assert fields["State"][0] in "RS", f"process {pid} is {fields['State']}"
        assert fields["TracerPid"].strip() == "0", f"process {pid} is traced"
        assert tree.ask(pid, "ping") == f"pong {pid}"


def attach_tree(cli: HijackCli, tree: Tree) -> dict[str, object]:
    result = cli("attach", tree.root, "--json")
    assert result.returncode == 0, result.describe()
    document: dict[str, object] = json.loads(result.stdout)
    return document


def test_attach_tree_one_shadow_holds_every_member(cli: HijackCli, tree: Tree) -> None:
    sockets = {pid: socket_inodes(pid) for pid in tree.pids}
    assert all(len(held) == 1 for held in sockets.values()), sockets
    attached = attach_tree(cli, tree)
    shadow = int(str(attached["shadow_pid"]))
    members = attached["members"]
    assert isinstance(members, list)
    assert [m["pid"] for m in members] == sorted(tree.pids[1:])

    # One shadow, which holds every member's socket; the pipe's description once.
    shadow_targets = all_inodes(shadow)
    for pid, held in sockets.items():
        assert held <= set(shadow_targets), f"the shadow does not hold {held} of {pid}"
    assert Registry(cli.state_dir).processes()[0].shadow_pid == shadow
    assert len(Registry(cli.state_dir).processes()) == 1
    # The pipe: the root's read end (inherited by the fork) and the write end
    # once, though both children hold it (one description: kcmp, not copied twice).
    assert shadow_targets.count(tree.pipe) == 2, shadow_targets
    # Every member's stdout, one description inherited by all three: held once.
    stdout = os.readlink(f"/proc/{tree.root}/fd/1")
    assert shadow_targets.count(stdout) == 1, shadow_targets

    # `hijack status` shows the members under their root.
    status = cli("status", "--json")
    assert status.returncode == 0, status.describe()
    (row,) = json.loads(status.stdout)["processes"]
    assert row["pid"] == tree.root
    assert {m["pid"]: m["parent"] for m in row["members"]} == {
        tree.pids[1]: tree.root,
        tree.pids[2]: tree.root,
    }
    assert all(m["attached"] and m["alive"] for m in row["members"]), row["members"]
    held_sockets = {
        m["pid"]: {fd["target"] for fd in m["held"] if fd["kind"] == "socket"}
        for m in row["shadow"]["members"]
    }
    assert sorted(held_sockets) == sorted(tree.pids[1:]), row["shadow"]
    assert all(len(held) == 1 for held in held_sockets.values()), held_sockets
    held_pipes = {
        m["pid"]: {fd["target"] for fd in m["held"] if fd["kind"] == "pipe"}
        for m in row["shadow"]["members"]
    }
    both = {tree.pipe, stdout}
    assert held_pipes == {tree.pids[1]: both, tree.pids[2]: both}, held_pipes
    table = cli("status")
    assert table.returncode == 0, table.describe()
    for pid in tree.pids[1:]:
        assert f"└ {pid}" in table.stdout, table.stdout

    # Attaching a member again, or the root, is refused by name.
    again = cli("attach", tree.pids[1])
    assert again.returncode == 1 and f"member of the tree of process {tree.root}" in again.stderr
    member_detach = cli("detach", tree.pids[2])
    assert member_detach.returncode == 1, member_detach.describe()
    assert f"hijack detach {tree.root}" in member_detach.stderr

    # Detach: the shadow ends, every member runs on with its connection intact.
    detached = cli("detach", tree.root)
    assert detached.returncode == 0, detached.describe()
    wait_gone(shadow)
    assert_untouched(tree)
    assert tree.ask(tree.root, "pipe") == f"from child {tree.pids[1]}"
    assert Registry(cli.state_dir).processes() == []
    assert Registry(cli.state_dir).members(tree.root) == []


def test_member_traced_by_another_tracer_is_refused_by_name(
    cli: HijackCli, tree: Tree, tmp_path: Path
) -> None:
    traced = tree.pids[2]
    tracer = subprocess.Popen(
        [sys.executable, "-c", TRACER_PROGRAM, str(traced)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert tracer.stdout is not None
        assert tracer.stdout.readline() == b"tracing\n"
        result = cli("attach", tree.root)
        assert result.returncode == 1, result.describe()
        assert f"process {traced} (python" in result.stderr, result.stderr
        assert f"traced by pid {tracer.pid}" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
        # Nothing attached: no record, no shadow directory, no shadow.
        assert Registry(cli.state_dir).processes() == []
        assert not any((cli.state_dir / "shadows").glob("*"))
        assert all(
            int(Path(f"/proc/{pid}/status").read_text().split("TracerPid:")[1].split()[0])
            in (0, tracer.pid)
            for pid in tree.pids
        )
    finally:
        assert tracer.stdin is not None
        tracer.stdin.close()
        tracer.wait(EXIT_TIMEOUT)
        assert tracer.stdout is not None
        tracer.stdout.close()
    assert_untouched(tree)


def test_forget_and_recover_handle_the_tree(cli: HijackCli, tree: Tree) -> None:
    attached = attach_tree(cli, tree)
    shadow = int(str(attached["shadow_pid"]))

    # A member ends: the shadow lets go of its descriptors, `recover` clears its record.
    ended = tree.pids[2]
    ended_socket = socket_inodes(ended)
    os.kill(ended, signal.SIGKILL)
    wait_gone(ended)
    deadline = time.monotonic() + EXIT_TIMEOUT
    while ended_socket <= socket_inodes(shadow):
        assert time.monotonic() < deadline, "the shadow still holds the ended member's socket"
        time.sleep(0.05)
    recovered = cli("recover")
    assert recovered.returncode == 0, recovered.describe()
    assert f"process {ended}" in recovered.stdout, recovered.stdout
    assert [m.pid for m in Registry(cli.state_dir).members(tree.root)] == [tree.pids[1]]

    # Forget ends the shadow and the record of the whole tree; the members run on.
    forgotten = cli("forget", tree.root)
    assert forgotten.returncode == 0, forgotten.describe()
    wait_gone(shadow)
    assert Registry(cli.state_dir).processes() == []
    assert Registry(cli.state_dir).members(tree.root) == []
    for pid in tree.pids[:2]:
        assert tree.ask(pid, "ping") == f"pong {pid}"


def test_a_checkpointed_member_is_held_for_its_restore(cli: HijackCli, tree: Tree) -> None:
    """What a restore of one member asks (restorer.shadow_holdings keyed by member pid):
    its descriptors handed over as at `dump --kill`, the member killed, the shadow keeps
    its very connection (the client sees no end) and gives it back by the member's pid."""
    attach_tree(cli, tree)
    member = tree.pids[1]
    (member_socket,) = socket_inodes(member)
    registry = Registry(cli.state_dir)
    record = registry.get(tree.root)
    assert record.shadow_control is not None and record.shadow_pid is not None
    assert shadow_holdings(registry, member) is None  # followed, not checkpointed
    assert shadow_holdings(registry, tree.root) is None  # attached, not checkpointed

    hand_descriptors_to_shadow(member, record.shadow_control, as_member=True)
    os.kill(member, signal.SIGKILL)
    wait_gone(member)
    holdings = shadow_holdings(registry, member)
    assert holdings is not None and holdings.member == member
    number = next(
        fd for fd, (_dev, ino) in holdings.identity.items() if f"socket:[{ino}]" == member_socket
    )
    taken = pidfd.copy_fd(holdings.shadow_pid, holdings.own_fd[number])
    with socket.socket(fileno=taken) as connection:
        connection.sendall(b"still here\n")
        assert read_line(tree.clients[member]) == "still here"

    # The root and the other member run on, followed; the root's own holdings are not given.
    assert shadow_holdings(registry, tree.pids[2]) is None
    for pid in (tree.root, tree.pids[2]):
        assert tree.ask(pid, "ping") == f"pong {pid}"
    # Reaped by its parent now: left a zombie, it would outlive the root's end at the
    # teardown and fall to the suite's subreaper, which counts it as a leak.
    assert tree.ask(tree.root, "reap") == f"reaped {member}"
    assert cli("detach", tree.root).returncode == 0


def test_a_child_born_after_the_attach_is_shown_not_attached(cli: HijackCli, tree: Tree) -> None:
    attached = attach_tree(cli, tree)
    shadow = int(str(attached["shadow_pid"]))
    newborn = int(tree.ask(tree.root, "fork").split()[1])
    try:
        status = cli("status", "--json")
        assert status.returncode == 0, status.describe()
        (row,) = json.loads(status.stdout)["processes"]
        members = {m["pid"]: m for m in row["members"]}
        assert members[newborn]["attached"] is False and members[newborn]["alive"], members
        assert members[newborn]["parent"] == tree.root
        assert all(members[pid]["attached"] for pid in tree.pids[1:]), members
        assert newborn not in {m["pid"] for m in row["shadow"]["members"]}
        assert "not attached" in cli("status").stdout
    finally:
        os.kill(newborn, signal.SIGKILL)
        assert tree.ask(tree.root, "reap") == f"reaped {newborn}"
    assert cli("detach", tree.root).returncode == 0
    wait_gone(shadow)


# Forks a child that stays root, then drops to nobody itself: "ready CHILD" once
# both are set; when its stdin closes, reaps the child (the test, root, kills it).
DROPPING_PROGRAM = r"""
import os, signal, sys
child = os.fork()
if child == 0:
    signal.pause()
    os._exit(0)
os.setresgid(65534, 65534, 65534)
os.setresuid(65534, 65534, 65534)
print("ready", child, flush=True)
sys.stdin.read()
os.waitpid(child, 0)
"""


def test_a_member_with_more_privilege_than_its_root_is_refused_by_name(cli: HijackCli) -> None:
    """The shadow runs as the root: it must not hold what a more privileged member holds."""
    process = subprocess.Popen(
        [sys.executable, "-c", DROPPING_PROGRAM],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert process.stdout is not None
    words = process.stdout.readline().decode().split()
    child = int(words[1]) if words[:1] == ["ready"] else 0
    try:
        assert child, words
        result = cli("attach", process.pid)
        assert result.returncode == 1, result.describe()
        assert f"process {child} (python" in result.stderr, result.stderr
        assert "other credentials" in result.stderr and "Traceback" not in result.stderr
        assert Registry(cli.state_dir).processes() == []
    finally:
        if child:
            os.kill(child, signal.SIGKILL)
        assert process.stdin is not None
        process.stdin.close()
        process.wait(EXIT_TIMEOUT)
        assert process.stdout is not None
        process.stdout.close()
