"""hijack.process.tree against a real tree of processes.

A Python parent forks: a child that forks a grandchild in a session of its
own, a child that exits at once (a zombie: the parent never reaps it) and a
child that stops itself; it reports every pid on a pipe once all is in place
(never a sleep), then every one blocks until the test kills the tree.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator

import pytest

from hijack.mutator.frozen_tree import frozen_tree
from hijack.process.tree import read_stopped_tree, read_tree, untakeable

TREE = r"""
import json, os, signal, sys, time
ready = int(sys.argv[1])
def park():
    os.read(0, 1)  # our stdin is the test's: it never writes
    os._exit(0)
r, w = os.pipe()
child = os.fork()
if child == 0:
    os.setsid()
    grandchild = os.fork()
    if grandchild == 0:
        os.write(w, b"x"); park()
    os.write(w, b"x"); park()
zombie = os.fork()
if zombie == 0:
    os._exit(7)
stopped = os.fork()
if stopped == 0:
    os.kill(os.getpid(), signal.SIGSTOP); park()
os.read(r, 2)
os.waitid(os.P_PID, zombie, os.WEXITED | os.WNOWAIT)
os.waitid(os.P_PID, stopped, os.WSTOPPED | os.WNOWAIT)
os.write(ready, json.dumps({"child": child, "zombie": zombie, "stopped": stopped}).encode())
park()
"""


# Seizes the pid in argv[1] (PTRACE_SEIZE: it keeps running), says so, holds it until killed.
SEIZE = r"""
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.ptrace(0x4206, int(sys.argv[1]), None, None) != 0:
    sys.exit(os.strerror(ctypes.get_errno()))
print("seized", flush=True)
os.read(0, 1)
"""


@pytest.fixture
def tree() -> Iterator[tuple[subprocess.Popen[bytes], dict[str, int]]]:
    ready_read, ready_write = os.pipe()
    parent = subprocess.Popen(
        [sys.executable, "-c", TREE, str(ready_write)],
        stdin=subprocess.PIPE,
        pass_fds=(ready_write,),
    )
    os.close(ready_write)
    try:
        pids = json.loads(os.read(ready_read, 200) or b"{}")
        assert pids, "the tree ended before it was ready"
        yield parent, pids
    finally:
        os.close(ready_read)
        members = read_tree(parent.pid).pids if parent.poll() is None else ()
        for pid in reversed(members):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        assert parent.stdin is not None
        parent.stdin.close()
        parent.wait()
        # Members killed before their parent could reap them come to us (pytest is a
        # subreaper) as zombies once it is gone: reap them.
        for pid in members:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)


def test_read_tree_finds_every_member_and_its_relations(
    tree: tuple[subprocess.Popen[bytes], dict[str, int]],
) -> None:
    parent, pids = tree
    found = read_tree(parent.pid)
    assert found.root.pid == parent.pid
    assert len(found.members) == 5
    child = found.member(pids["child"])
    (grandchild,) = found.children_of(child.pid)
    assert child.sid == child.pid != found.root.sid, "the child leads a session of its own"
    assert grandchild.sid == child.pid and grandchild.pgid == child.pid
    assert found.depth_of(grandchild.pid) == 2
    assert found.member(pids["zombie"]).zombie and found.member(pids["zombie"]).threads == ()
    assert found.member(pids["stopped"]).stopped
    assert found.pids.index(child.pid) < found.pids.index(grandchild.pid), "parents come first"
    assert untakeable(found) == []
    assert found.same_members(read_tree(parent.pid))


def test_a_stopped_tree_read_from_its_children_lists_is_the_scanned_one(
    tree: tuple[subprocess.Popen[bytes], dict[str, int]],
) -> None:
    """Once every member is stopped, its children read from the members' own lists
    (read_stopped_tree: frozen_tree's look within the freeze) are those a scan of every
    process finds: the session leader's grandchild, the zombie, the job-stopped one."""
    parent, _ = tree
    with frozen_tree(parent.pid) as frozen:
        assert frozen.tree == read_tree(parent.pid)
        assert read_stopped_tree(parent.pid) == frozen.tree
        assert len(frozen.tree.members) == 5


def test_a_member_traced_by_another_tracer_is_named(
    tree: tuple[subprocess.Popen[bytes], dict[str, int]],
) -> None:
    parent, pids = tree
    tracer = subprocess.Popen(
        [sys.executable, "-c", SEIZE, str(pids["child"])],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert tracer.stdout is not None
        assert tracer.stdout.readline() == b"seized\n"
        assert untakeable(read_tree(parent.pid)) == [
            f"process {pids['child']} (python) is traced by pid {tracer.pid} (python)"
        ]
    finally:
        tracer.kill()
        tracer.wait()
