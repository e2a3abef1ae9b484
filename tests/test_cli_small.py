"""The small things a new user meets first: each one's exit code and line.

`hijack --version`; `--debug` before or after the command; ports outside
1-65535 (0-65535 to listen on) refused as bad usage; `attach` refusing
hijack's own processes by name; a restore that could not have its old pid
naming who holds it; the move's progress bar with a total in MiB; the
Makefile's apt-get waiting for apt's locks.
"""

from __future__ import annotations

import fcntl
import io
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from rich.console import Console
from support import spawn_fixture
from support.cli import CliResult, HijackCli, restored_pid
from support.nodes import read_line
from test_attach import attached

import hijack
from hijack.cli import render

REPOSITORY = Path(__file__).resolve().parent.parent
WAIT = 30.0
MiB = 1024 * 1024


@pytest.fixture
def cli(tmp_path: Path) -> HijackCli:
    return HijackCli(tmp_path / "state")


def assert_refused(result: CliResult, *phrases: str, code: int = 1) -> str:
    """Exit `code`, no traceback, and the last stderr line naming `phrases`; returns it."""
    assert result.returncode == code, result.describe()
    assert "Traceback" not in result.stderr, result.describe()
    lines = result.stderr.splitlines()
    if code == 1:
        assert len(lines) == 1 and lines[0].startswith("hijack: "), result.describe()
    for phrase in phrases:
        assert phrase in lines[-1], result.describe()
    return lines[-1]


def test_version_prints_the_package_version(cli: HijackCli) -> None:
    result = cli.ok("--version")
    assert result.stdout == f"hijack {hijack.__version__}\n", result.describe()


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_before_or_after_the_command_shows_the_traceback(cli: HijackCli, where: str) -> None:
    absent = int(Path("/proc/sys/kernel/pid_max").read_text())
    argv = ("--debug", "detach", absent) if where == "before" else ("detach", absent, "--debug")
    result = cli(*argv)
    assert result.returncode == 1, result.describe()
    assert "Traceback (most recent call last)" in result.stderr, result.describe()
    assert result.stderr.splitlines()[-1] == (
        f"hijack: process {absent} is not known to hijack (not attached)"
    ), result.describe()


def test_without_debug_a_failure_is_one_line(cli: HijackCli) -> None:
    absent = int(Path("/proc/sys/kernel/pid_max").read_text())
    assert_refused(cli("detach", absent), f"process {absent} is not known")


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (("move", "1", "--to", "127.0.0.1:70000"), "port 70000 of '127.0.0.1:70000' is not in"),
        (("move", "1", "--to", "node-b:0"), "port 0 of 'node-b:0' is not in 1-65535"),
        (("move", "1", "--to", "65536"), "port 65536 of '65536' is not in 1-65535"),
        (("node", "serve", "--listen", "127.0.0.1:65536"), "is not in 0-65535"),
        (("node", "serve", "--listen", "127.0.0.1:-1"), "port -1 of '127.0.0.1:-1'"),
    ],
)
def test_a_port_out_of_range_is_a_usage_error(
    cli: HijackCli, argv: tuple[str, ...], words: str
) -> None:
    line = assert_refused(cli(*argv), words, code=2)
    assert line.startswith(f"hijack {argv[0]}"), line  # argparse's own "hijack move: error: ..."


def test_attach_refuses_a_shadow_by_name(cli: HijackCli, tmp_path: Path) -> None:
    with spawn_fixture("counter", tmp_path / "counter.log", "2") as counter:
        with attached(cli, counter.pid) as info:
            shadow = info["shadow_pid"]
            line = assert_refused(cli("attach", shadow))
            assert line == (
                f"hijack: process {shadow} is the shadow of process {counter.pid},"
                " part of hijack: not a target"
            ), line
            assert not (cli.state_dir / "shadows" / str(shadow)).exists()
        counter.assert_intact()


@contextmanager
def node_daemon(cli: HijackCli, tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """`hijack node serve` on a free loopback port, running until the block ends."""
    certificates = tmp_path / "pki"
    cli.ok("cluster", "init", "--pki", certificates)
    cli.ok("cluster", "add-node", "solo", "--pki", certificates)
    environment = {
        **os.environ,
        "HIJACK_STATE_DIR": str(cli.state_dir),
        "HIJACK_NODE": "solo",
        "HIJACK_PKI": str(certificates),
    }
    daemon = subprocess.Popen(
        [sys.executable, "-m", "hijack", "node", "serve", "--listen", "127.0.0.1:0"],
        env=environment,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert "listening on 127.0.0.1:" in read_line(daemon, WAIT)
        yield daemon
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(WAIT)
        assert daemon.stdout is not None
        daemon.stdout.close()


def test_attach_refuses_a_hijack_daemon_by_name(cli: HijackCli, tmp_path: Path) -> None:
    with node_daemon(cli, tmp_path) as daemon:
        line = assert_refused(cli("attach", daemon.pid))
        assert line == (
            f"hijack: process {daemon.pid} is hijack itself (hijack node serve): not a target"
        ), line
        assert daemon.poll() is None  # untouched, still serving


def test_a_restore_that_could_not_have_its_old_pid_names_who_holds_it(
    cli: HijackCli, tmp_path: Path
) -> None:
    sleeper = tmp_path / "pidholder"
    shutil.copy("/usr/bin/sleep", sleeper)
    image = tmp_path / "sleeper.crf"
    original = subprocess.Popen(
        [str(sleeper), "1000"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        cli.ok("dump", original.pid, "-o", image)  # the original runs on, holding its pid
        result = cli.ok("restore", image)
        copy = restored_pid(result)
        try:
            line = result.stdout.splitlines()[0]
            assert line == (
                f"restored process {copy} (pidholder, was {original.pid}, 1 thread);"
                f" its old pid {original.pid} is held by pidholder (pid {original.pid})"
            ), result.describe()
        finally:
            os.kill(copy, signal.SIGKILL)
            os.waitpid(copy, 0)  # ours: pytest is the subreaper the restore left it to
    finally:
        original.kill()
        original.wait()


def test_the_move_progress_bar_shows_a_total_in_mib() -> None:
    output = io.StringIO()
    console = Console(file=output, force_terminal=True, width=160, color_system=None)
    with render.move_progress(console, 1234, "10.0.0.2:7450", 400 * MiB) as report:
        report("streaming", 379 * MiB + 100 * 1024)
    assert re.search(r"streaming .* 379\.1/400\.0 MiB", output.getvalue()), output.getvalue()
    # Pre-copy sends pages again: past the expected total, the total follows.
    output.truncate(0)
    with render.move_progress(console, 1234, "10.0.0.2:7450", 400 * MiB) as report:
        report("round 2", 450 * MiB)
    assert "450.0/450.0 MiB" in output.getvalue(), output.getvalue()


# -- the Makefile's apt-get waits while another apt run holds its locks -----------------------

APT_LOCKS = ("/var/lib/dpkg/lock-frontend", "/var/lib/apt/lists/lock")
LOCK_HELD = 2.0  # seconds the test holds apt's locks


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("apt-get") is None, reason="needs root and apt-get"
)
def test_make_system_deps_waits_for_apt_locks_held_by_another_install(tmp_path: Path) -> None:
    # A package no archive has: apt-get gets past both locks, then refuses it
    # by name (nothing is installed). Failing at once would name a lock.
    missing = "hijack-test-no-such-package"
    descriptors = [os.open(path, os.O_RDWR | os.O_CREAT, 0o640) for path in APT_LOCKS]
    try:
        for fd in descriptors:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as apt and dpkg lock them
        release = threading.Timer(
            LOCK_HELD, lambda: [fcntl.lockf(fd, fcntl.LOCK_UN) for fd in descriptors]
        )
        release.start()
        started = time.monotonic()
        result = subprocess.run(
            ["make", "-s", "-C", str(REPOSITORY), "system-deps", f"DEBS={missing}"],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        elapsed = time.monotonic() - started
        release.join()
    finally:
        for fd in descriptors:
            os.close(fd)
    assert result.returncode == 2, result.stderr  # make's own exit for a failed recipe
    assert "Could not get lock" not in result.stderr, result.stderr
    assert f"Unable to locate package {missing}" in result.stderr, result.stderr
    assert elapsed >= LOCK_HELD, f"make returned after {elapsed:.1f} s, with the locks held"
