"""Faults injected into attach, dump and move: signals at each stage, dead daemons, shadows, links.

A command is stopped at a named stage by its own test point (hijack/testpoint.py:
HIJACK_STOP_AT makes it SIGSTOP itself there); the test sees it stopped
(waitpid WUNTRACED), sends the signal under test and continues it. So each
signal lands exactly at its stage, with no sleep deciding when.

Whatever happens, the target is left running and intact — its own check
passes and its TCP peer, talking to it before and after, sees no reset — or,
once a move has committed, exactly one copy of it runs: on the destination.
After a SIGKILL the next command (`hijack attach`, `hijack recover`) cleans
up what the kernel could not (docs/faults.md).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from support import spawn_fixture
from support.cli import CliResult, HijackCli
from support.nodes import Node, read_line
from test_interrupts import shadows_of, tracer_of
from test_move import (
    EXIT_TIMEOUT,
    LINE_TIMEOUT,
)
from test_nodes import ECHO_SESSION

from hijack.registry import Registry

STOP_TIMEOUT = 30.0  # for a command to reach its stage
SIGNALS = [signal.SIGINT, signal.SIGTERM, signal.SIGKILL]
SIGNAL_IDS = ["SIGINT", "SIGTERM", "SIGKILL"]


# -- stopping a command at a stage --------------------------------------------------------


def wait_stopped(process: subprocess.Popen[Any], stage: str) -> None:
    """Wait until `process` (our child) stops itself at its test point (bounded).

    waitpid(WUNTRACED) reports the stop without reaping; it is asked without
    blocking so that a command that exits instead is reported, not waited on
    for ever.
    """
    deadline = time.monotonic() + STOP_TIMEOUT
    while time.monotonic() < deadline:
        pid, status = os.waitpid(process.pid, os.WNOHANG | os.WUNTRACED)
        if pid and os.WIFSTOPPED(status):
            return
        if pid:
            process.returncode = os.waitstatus_to_exitcode(status)
            output = process.communicate() if process.stdout else ("", "")
            raise AssertionError(f"ended ({process.returncode}) before {stage}: {output}")
        time.sleep(0.005)
    raise AssertionError(f"did not reach {stage} within {STOP_TIMEOUT} s")


def deliver(process: subprocess.Popen[Any], signal_number: int) -> None:
    """`signal_number` to a command stopped at its stage, then let it go on."""
    process.send_signal(signal_number)
    if signal_number != signal.SIGKILL:
        process.send_signal(signal.SIGCONT)


def finish(process: subprocess.Popen[str], argv: tuple[str, ...] = ()) -> CliResult:
    stdout, stderr = process.communicate(timeout=EXIT_TIMEOUT * 2)
    return CliResult(argv, process.returncode, stdout, stderr)


def hijack_at(
    stage: str, state_dir: Path, *args: str | int, env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    """`hijack ARGS` in this namespace, stopped at `stage`."""
    process = subprocess.Popen(
        [sys.executable, "-m", "hijack", *map(str, args)],
        env={
            **os.environ,
            "HIJACK_STATE_DIR": str(state_dir),
            "HIJACK_STOP_AT": stage,
            **(env or {}),
        },
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_stopped(process, stage)
    return process


def assert_interrupted(result: CliResult, signal_number: int) -> None:
    """Exit 1, one line naming the signal, no traceback."""
    assert result.returncode == 1, result.describe()
    assert result.stderr.count("\n") == 1, result.describe()
    assert f"interrupted by {signal.Signals(signal_number).name}" in result.stderr


def assert_running_untraced(pid: int) -> None:
    status = Path(f"/proc/{pid}/status").read_text()
    state = re.search(r"State:\s+(\S)", status)
    assert state is not None and state[1] in "RS", status
    assert tracer_of(pid) == 0


def reap(pids: list[int]) -> None:
    """Shadows end as children of ours (pytest is a child subreaper): collect them."""
    for pid in pids:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)


@contextlib.contextmanager
def session(port: str | int, node: Node | None = None) -> Iterator[Callable[[str], None]]:
    """A TCP client of the echo server at 127.0.0.1:port: each call sends a line and demands
    it back, over the one connection (a reset or a hang fails it)."""
    argv = [sys.executable, "-c", ECHO_SESSION, "127.0.0.1", str(port)]
    pipes: dict[str, Any] = {
        "stdin": subprocess.PIPE,
        "stdout": subprocess.PIPE,
        "stderr": subprocess.DEVNULL,
        "bufsize": 0,
    }
    client = node.spawn(argv, **pipes) if node else subprocess.Popen(argv, **pipes)
    try:
        assert read_line(client, LINE_TIMEOUT) == "connected"

        def talk(line: str) -> None:
            assert client.stdin is not None
            client.stdin.write(f"{line}\n".encode())
            assert read_line(client, LINE_TIMEOUT) == line

        yield talk
        assert client.stdin is not None
        client.stdin.close()
        assert client.wait(EXIT_TIMEOUT) == 0
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
        for stream in (client.stdin, client.stdout):
            if stream is not None:
                stream.close()


# -- attach ---------------------------------------------------------------------------------


@pytest.mark.parametrize("signal_number", SIGNALS, ids=SIGNAL_IDS)
@pytest.mark.parametrize("stage", ["attach-seized", "attach-forked", "attach-shadow-ready"])
def test_attach_stopped_by_a_signal_at_each_stage(
    tmp_path: Path, stage: str, signal_number: int
) -> None:
    state = tmp_path / "state"
    cli = HijackCli(state)
    with spawn_fixture("echo_server") as server:
        with session(server.ready["port"]) as talk:
            talk("before")
            command = hijack_at(stage, state, "attach", server.pid)
            deliver(command, signal_number)
            result = finish(command, ("attach",))
            assert_running_untraced(server.pid)
            talk("after")
            left = shadows_of(server.pid)
            if signal_number == signal.SIGKILL:
                assert result.returncode == -signal.SIGKILL
                # A shadow forked before the kill runs on, unrecorded: the next
                # attach ends it and makes the one shadow.
                assert len(left) == (0 if stage == "attach-seized" else 1), left
                cli.ok("attach", server.pid)
                (shadow,) = shadows_of(server.pid)
                assert shadow not in left
                cli.ok("detach", server.pid)
                reap([*left, shadow])
            else:
                assert_interrupted(result, signal_number)
                assert left == [], f"an interrupted attach left shadows {left}"
                assert not (state / "shadows" / str(server.pid)).exists()
                with Registry(state) as registry:
                    assert registry.find(server.pid) is None
            talk("after the clean-up")
            assert_running_untraced(server.pid)
        server.assert_intact()


# -- dump -----------------------------------------------------------------------------------


@pytest.mark.parametrize("signal_number", SIGNALS, ids=SIGNAL_IDS)
@pytest.mark.parametrize("stage", ["dump-seized", "dump-written"])
def test_dump_to_a_file_stopped_by_a_signal_leaves_the_process_running(
    tmp_path: Path, stage: str, signal_number: int
) -> None:
    state = tmp_path / "state"
    image = tmp_path / "server.crf"
    with spawn_fixture("echo_server") as server:
        with session(server.ready["port"]) as talk:
            talk("before")
            command = hijack_at(stage, state, "dump", server.pid, "-o", image)
            deliver(command, signal_number)
            result = finish(command, ("dump",))
            assert_running_untraced(server.pid)
            talk("after")
            assert not image.exists()  # never an image under its name unless complete
            partial = tmp_path / ".server.crf.partial"
            if signal_number == signal.SIGKILL:
                assert result.returncode == -signal.SIGKILL
                # Left by the kill; the next dump writes over it and puts its image in place.
                HijackCli(state).ok("dump", server.pid, "-o", image)
                assert image.exists()
            else:
                assert_interrupted(result, signal_number)
            assert not partial.exists()
            talk("after the clean-up")
        server.assert_intact()


@pytest.mark.parametrize("signal_number", SIGNALS, ids=SIGNAL_IDS)
def test_dump_kill_stopped_between_the_hand_over_and_the_kill_leaves_the_process_running(
    tmp_path: Path, signal_number: int
) -> None:
    state = tmp_path / "state"
    cli = HijackCli(state)
    image = tmp_path / "server.crf"
    with spawn_fixture("echo_server") as server:
        with session(server.ready["port"]) as talk:
            cli.ok("attach", server.pid)
            control_path = str(state / "shadows" / str(server.pid) / "control.sock")
            talk("attached")
            command = hijack_at(
                "dump-handed-over", state, "dump", server.pid, "-o", image, "--kill"
            )
            deliver(command, signal_number)
            result = finish(command, ("dump",))
            assert_running_untraced(server.pid)
            talk("after")
            if signal_number == signal.SIGKILL:
                assert result.returncode == -signal.SIGKILL
                assert image.exists()  # complete, put in place just before the hand-over
                # Its shadow holds, as for a killed process; `hijack recover` makes it follow again.
                recovered = cli.ok("recover")
                assert f"the shadow of process {server.pid} follows it again" in recovered.stdout
            else:
                assert_interrupted(result, signal_number)
                assert not image.exists()  # an image of a process that runs on is no good
            from hijack.shadow import control

            shadow = control.request(control_path, {"op": "status"})
            assert shadow["mode"] == "home", shadow
            with Registry(state) as registry:
                assert registry.get(server.pid).state == "attached"
            cli.ok("detach", server.pid)
            reap([shadow["shadow_pid"]])
            talk("detached")
        server.assert_intact()
