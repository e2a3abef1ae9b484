"""Real programs that fork, killed by `hijack dump --kill` mid-work and restored on the same node.

- a shell pipeline (`producer | filter | consumer`, the filter forking a sleep
  per line): the consumer's output is complete and in order;
- a Python multiprocessing Pool (pipes, POSIX semaphores in deleted /dev/shm
  files every member maps, a parent with threads): every task's result
  arrives and the parent exits 0;
- nginx from Debian's package, a master and two workers sharing the master's
  listening socket, under a keep-alive HTTP load: no request fails (those in
  flight during the freeze wait), the load's connections are the same ones
  after the restore, new connections are served, every process is back under
  its pid with its parent, and the master still commands its workers (a
  graceful stop ends them all with status 0).
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
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from support.cli import HijackCli, restored_pid
from support.objects import hijack
from test_tree_restore import kill_tree, reap_killed, relations

from hijack.errors import ProcessGone
from hijack.process.tree import Member, read_tree

__all__ = ["hijack"]  # a fixture, used by name

NGINX = shutil.which("nginx") or next(
    (p for p in ("/usr/sbin/nginx",) if os.access(p, os.X_OK)), None
)
POLL_TIMEOUT = 20.0  # seconds for a program to reach a point of its work
EXIT_TIMEOUT = 30.0


def wait_until(condition: Callable[[], bool], what: str, timeout: float = POLL_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.01)


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


def dump_and_kill(hijack: HijackCli, process: subprocess.Popen[bytes], image: Path) -> str:
    """`dump --kill` the tree of `process` (ours); reap it and its members, orphaned to us."""
    dumped = hijack.ok("dump", process.pid, "-o", image, "--kill")
    assert "the tree of process" in dumped.stdout and "killed" in dumped.stdout
    assert process.wait(EXIT_TIMEOUT) == -signal.SIGKILL
    # The image's members, not a reading before the dump: a short-lived child (a shell's
    # sleep) born since is in the image too, and its pid must be free for the restore.
    shown = json.loads(hijack.ok("show", "--json", image).stdout)
    reap_killed(member["pid"] for member in shown["tree"][1:])
    return dumped.stdout


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
        dump_and_kill(hijack, process, tmp_path / "pipeline.crf")
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
    count, go = int(sys.argv[1]), sys.argv[2]
    with multiprocessing.Pool(4) as pool:
        for n, result in enumerate(pool.imap(square, range(count))):
            print(n, result, flush=True)
            if result != n * n:
                sys.exit(1)
        while not os.path.exists(go):  # the pool kept for the test to look at, until told
            time.sleep(0.01)
"""


def semaphores_shared(root: int) -> set[frozenset[int]]:
    """Which members map each POSIX semaphore (a deleted /dev/shm/sem.* file), as sets of
    pids: one file for all of them, as fork left it, not a copy each."""
    mapping: dict[str, set[int]] = {}
    for member in _members(root):
        for line in Path(f"/proc/{member.pid}/maps").read_text().splitlines():
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].startswith("/dev/shm/sem."):
                mapping.setdefault(f"{fields[3]} {fields[4]}", set()).add(member.pid)
    return {frozenset(pids) for pids in mapping.values()}


def test_a_multiprocessing_pool_killed_mid_work_delivers_every_result(
    hijack: HijackCli, tmp_path: Path
) -> None:
    count = 1200
    output = tmp_path / "results"
    with output.open("w") as stdout:
        process = subprocess.Popen(
            [sys.executable, "-c", POOL_PROGRAM, str(count), tmp_path / "go"],
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_until(lambda: lines_in(output) >= 50, "the pool's first results")
        assert len(_members(process.pid)) >= 5, "a parent and its 4 workers"
        semaphores = semaphores_shared(process.pid)
        assert semaphores and all(len(pids) >= 5 for pids in semaphores)
        dump_and_kill(hijack, process, tmp_path / "pool.crf")
        assert lines_in(output) < count, "the pool ended before the kill"
        root = restored_pid(hijack.ok("restore", tmp_path / "pool.crf"))
        assert semaphores_shared(root) == semaphores, "each semaphore one file for all"
        (tmp_path / "go").touch()
        assert wait_exit(root) == 0, output.read_text()[-2000:]
        assert output.read_text().splitlines() == [f"{n} {n * n}" for n in range(count)]
    finally:
        end_tree(process.pid)
