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
import json
import os
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import pytest
from support import RunningFixture, spawn_fixture
from support.cli import CliResult, HijackCli
from support.nodes import HIJACK_PROGRAM, Cluster, Node, link_down, link_up, read_line
from test_interrupts import shadows_of, tracer_of
from test_move import (
    EXIT_TIMEOUT,
    LINE_TIMEOUT,
    Moved,
    assert_ended_well,
    assert_not_attached,
    daemon_log,
    finish_moved,
    logs,
    move,
    pids_inside,
    poll_until,
    runs_in,
    shadow_status,
    through_cat,
    wait_gone,
    wait_released,
)

from hijack.registry import Registry

STOP_TIMEOUT = 30.0  # for a command to reach its stage
SETTLE_TIMEOUT = "2"  # seconds a mover in doubt asks again (HIJACK_SETTLE_TIMEOUT)

# A client of an echo server: each stdin line is sent and its echo printed,
# or "EOF" / "RESET name" if the connection ends instead (then exit 3).
SESSION = """\
import socket, sys
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30) as connection:
    print("connected", flush=True)
    for line in sys.stdin:
        echoed = b""
        try:
            connection.sendall(line.encode())
            while not echoed.endswith(b"\\n"):
                chunk = connection.recv(65536)
                if not chunk:
                    print("EOF", flush=True)
                    sys.exit(3)
                echoed += chunk
        except OSError as error:
            print(f"RESET {type(error).__name__}", flush=True)
            sys.exit(3)
        print(echoed.decode(), end="", flush=True)
"""
SIGNALS = [signal.SIGINT, signal.SIGTERM, signal.SIGKILL]
SIGNAL_IDS = ["SIGINT", "SIGTERM", "SIGKILL"]


# -- stopping a command at a stage --------------------------------------------------------


def wait_stopped(process: subprocess.Popen[Any], stage: str, timeout: float = STOP_TIMEOUT) -> None:
    """Wait until `process` (our child) stops itself at its test point (within `timeout`).

    waitpid(WUNTRACED) reports the stop without reaping; it is asked without
    blocking so that a command that exits instead is reported, not waited on
    for ever.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pid, status = os.waitpid(process.pid, os.WNOHANG | os.WUNTRACED)
        if pid and os.WIFSTOPPED(status):
            return
        if pid:
            process.returncode = os.waitstatus_to_exitcode(status)
            output = process.communicate() if process.stdout else ("", "")
            raise AssertionError(f"ended ({process.returncode}) before {stage}: {output}")
        time.sleep(0.005)
    raise AssertionError(f"did not reach {stage} within {timeout} s")


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


class Talk(Protocol):
    def __call__(self, line: str, *, echoed: bool = True, timeout: float = LINE_TIMEOUT) -> str: ...


@contextlib.contextmanager
def session(port: str | int, node: Node | None = None) -> Iterator[Talk]:
    """A TCP client of the echo server at 127.0.0.1:port. Each call sends a line over the one
    connection and returns the answer, which must be the line itself unless `echoed=False`
    (then "EOF" or "RESET ..." tell how the connection ended). Bounded: a hang fails."""
    argv = [sys.executable, "-c", SESSION, "127.0.0.1", str(port)]
    pipes: dict[str, Any] = {
        "stdin": subprocess.PIPE,
        "stdout": subprocess.PIPE,
        "stderr": subprocess.DEVNULL,
        "bufsize": 0,
    }
    client = node.spawn(argv, **pipes) if node else subprocess.Popen(argv, **pipes)
    try:
        assert read_line(client, LINE_TIMEOUT) == "connected"

        def talk(line: str, *, echoed: bool = True, timeout: float = LINE_TIMEOUT) -> str:
            assert client.stdin is not None
            client.stdin.write(f"{line}\n".encode())
            answer = read_line(client, timeout)
            assert answer == line or not echoed, f"sent {line!r}, got {answer!r}"
            if answer != line:
                ended.append(answer)
            return answer

        ended: list[str] = []
        yield talk
        assert client.stdin is not None
        client.stdin.close()
        assert client.wait(EXIT_TIMEOUT) == (3 if ended else 0)
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
                # A copy not yet the shadow dies with its tracer (EXITKILL); a
                # shadow made before the kill runs on, unrecorded: the next
                # attach ends it and makes the one shadow.
                assert len(left) == (1 if stage == "attach-shadow-ready" else 0), left
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
def test_dump_kill_stopped_while_splicing_pages_leaves_the_process_running_intact(
    tmp_path: Path, signal_number: int
) -> None:
    """Zero-copy: the target injected (vmsplice) between two sections; killed there, even
    by SIGKILL, the hijack leaves it running as it was (its own check of its memory)."""
    state = tmp_path / "state"
    image = tmp_path / "counter.crf"
    # FIFOs for its ready and control descriptors: a restore could reopen them (--kill).
    with spawn_fixture("counter", tmp_path / "counter.log", fifos=True) as counter:
        command = hijack_at("dump-splicing", state, "dump", counter.pid, "-o", image, "--kill")
        deliver(command, signal_number)
        result = finish(command, ("dump",))
        assert_running_untraced(counter.pid)
        assert not image.exists()
        if signal_number == signal.SIGKILL:
            assert result.returncode == -signal.SIGKILL
        else:
            assert_interrupted(result, signal_number)
        counter.assert_intact()


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


# -- move -----------------------------------------------------------------------------------


def hijack_in(
    node: Node,
    stage: str,
    *args: str | int,
    env: dict[str, str] | None = None,
    timeout: float = STOP_TIMEOUT,
) -> subprocess.Popen[str]:
    """`hijack ARGS` inside `node`, stopped at `stage` (reached within `timeout`)."""
    process: subprocess.Popen[str] = node.spawn(
        [*HIJACK_PROGRAM, *map(str, args)],
        env={"HIJACK_STOP_AT": stage, **(env or {})},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_stopped(process, stage, timeout)
    return process


def only_the_daemon_in(node: Node) -> None:
    """Nothing of a failed move stays in `node`: what its daemon built died with the move."""
    assert node.daemon is not None
    daemon = node.daemon.pid
    poll_until(lambda: pids_inside(node) == {daemon}, f"only the daemon left in {node.name}")


def shadow_pid_of(node: Node, pid: int) -> int:
    with Registry(node.state_dir) as registry:
        shadow = registry.get(pid).shadow_pid
    assert shadow is not None
    return shadow


@pytest.mark.parametrize("signal_number", SIGNALS, ids=SIGNAL_IDS)
@pytest.mark.parametrize(
    "stage", ["move-attached", "move-connected", "move-frozen", "move-streaming", "move-prepared"]
)
def test_a_move_stopped_by_a_signal_before_its_commit_leaves_the_original_running(
    tmp_path: Path, stage: str, signal_number: int
) -> None:
    with Cluster(tmp_path, nodes=2) as cluster:
        a, b = cluster.nodes
        b.start_daemon()
        assert b.daemon_endpoint is not None
        with spawn_fixture("echo_server", netns=a.netns) as server:
            with session(server.ready["port"], a) as talk:
                talk("before")
                mover = hijack_in(a, stage, "move", server.pid, "--to", b.daemon_endpoint)
                deliver(mover, signal_number)
                result = finish(mover, ("move",))
                assert_running_untraced(server.pid)
                assert runs_in(server.pid, a)
                talk("after")
                only_the_daemon_in(b)
                if signal_number == signal.SIGKILL:
                    assert result.returncode == -signal.SIGKILL
                    # Left: the shadow the move made (and a move row not finished,
                    # its shadow maybe holding): `hijack recover` puts it back home.
                    shadow = shadow_pid_of(a, server.pid)
                    recovered = a.hijack("recover")
                    assert recovered.returncode == 0, recovered.describe()
                    if stage not in ("move-attached", "move-connected"):
                        assert "not completed; process" in recovered.stdout, recovered.describe()
                    status = shadow_status(a, server.pid)
                    assert (status["mode"], status["streams"]) == ("home", []), status
                    talk("recovered")
                    a.hijack_ok("detach", server.pid)
                    reap([shadow])
                else:
                    assert_interrupted(result, signal_number)
                    assert_not_attached(a, server.pid)
                with Registry(a.state_dir) as registry:
                    assert {row.phase for row in registry.moves()} <= {"failed"}
                talk("last")
            server.assert_intact()


def assert_one_copy_on(node: Node, home: Node, original: RunningFixture) -> int:
    """The original has ended; one copy runs in `node`: its pid."""
    assert original.wait_exit() == -signal.SIGKILL
    assert node.daemon is not None
    (copy,) = pids_inside(node) - {node.daemon.pid}
    assert home.daemon is None or pids_inside(home) >= {home.daemon.pid}
    return copy


@pytest.mark.parametrize("signal_number", SIGNALS, ids=SIGNAL_IDS)
def test_a_move_stopped_by_a_signal_after_its_commit_ends_with_one_copy_on_the_destination(
    tmp_path: Path, signal_number: int
) -> None:
    with Cluster(tmp_path, nodes=2) as cluster:
        a, b = cluster.nodes
        b.start_daemon()
        assert b.daemon_endpoint is not None
        with spawn_fixture("echo_server", netns=a.netns) as server:
            with session(server.ready["port"], a) as talk:
                talk("before")
                mover = hijack_in(
                    a, "move-committed", "move", server.pid, "--to", b.daemon_endpoint
                )
                shadow = shadow_pid_of(a, server.pid)
                deliver(mover, signal_number)
                result = finish(mover, ("move",))
                if signal_number == signal.SIGKILL:
                    assert result.returncode == -signal.SIGKILL
                    # The copy runs on b; the original waits stopped (its pending
                    # SIGSTOP): never two running. `hijack recover` asks b and ends it.
                    poll_until(
                        lambda: (
                            Path(f"/proc/{server.pid}/stat").read_text().split(") ")[1][0] == "T"
                        ),
                        "the original held stopped",
                    )
                    recovered = a.hijack("recover")
                    assert recovered.returncode == 0, recovered.describe()
                    assert "the original here was ended" in recovered.stdout, recovered.describe()
                else:
                    # A switch, once begun, is finished: the signal is dropped.
                    assert result.returncode == 0, result.describe()
                    assert "moved process" in result.stdout, result.describe()
                copy = assert_one_copy_on(b, a, server)
                talk("after")  # through the home shadow, to the copy on b
            moved = Moved(copy, b, 0.0, shadow)
            finish_moved(server, moved, tmp_path)


# -- the network and the other processes of a move -------------------------------------------


def start_daemon_stopping_at(node: Node, stage: str) -> None:
    """Start `node`'s daemon so that it stops itself at test point `stage` (docs/faults.md).

    Only the daemon: commands run on the node later do not stop there.
    """
    node.env["HIJACK_STOP_AT"] = stage
    try:
        node.start_daemon()
    finally:
        del node.env["HIJACK_STOP_AT"]


def spawn_move(node: Node, pid: int, destination: str) -> subprocess.Popen[str]:
    """`hijack move PID --to DESTINATION` started on `node`, asking again briefly when in doubt."""
    return node.spawn(
        [*HIJACK_PROGRAM, "move", str(pid), "--to", destination],
        env={"HIJACK_SETTLE_TIMEOUT": SETTLE_TIMEOUT},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def state_of(pid: int) -> str:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2]


def test_the_link_down_mid_stream_leaves_the_original_running(tmp_path: Path) -> None:
    with Cluster(tmp_path, nodes=2) as cluster:
        a, b = cluster.nodes
        b.start_daemon()
        assert b.daemon_endpoint is not None
        with spawn_fixture("echo_server", netns=a.netns) as server:
            with session(server.ready["port"], a) as talk:
                talk("before")
                mover = hijack_in(
                    a, "move-streaming", "move", server.pid, "--to", b.daemon_endpoint
                )
                link_down(b)
                try:
                    mover.send_signal(signal.SIGCONT)
                    # The stream stalls; the mover gives up and the original resumes.
                    result = finish(mover, ("move",))
                finally:
                    link_up(b)
                assert result.returncode == 1, result.describe()
                assert result.stderr.count("\n") == 1, result.describe()
                assert_running_untraced(server.pid)
                assert_not_attached(a, server.pid)
                talk("after")
                # Once b hears of it again, what it built is killed (never run).
                only_the_daemon_in(b)
                assert "runs here as" not in daemon_log(b)
                talk("last")
            server.assert_intact()


OUTAGE = 8.0  # seconds a link stays down: TCP would back off to a retry 6.4 s apart
AFTER_OUTAGE_TIMEOUT = 3.0  # seconds for bytes held back by an outage, once the link is back


def test_bytes_sent_on_a_relay_while_its_link_was_down_arrive_soon_after_it_is_back(
    tmp_path: Path,
) -> None:
    with Cluster(tmp_path, nodes=2) as cluster:
        a, b = cluster.nodes
        b.start_daemon()
        cat = a.spawn(
            ["cat"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
        )
        assert cat.stdin is not None and cat.stdout is not None
        moved = move(a, cat.pid, b, precopy=False)
        assert cat.wait(EXIT_TIMEOUT) == -signal.SIGKILL  # the original
        assert through_cat(cat, b"before\n") == b"before\n"
        link_down(b)
        try:
            # The shadow sends them on the relay; they are lost, and sent again
            # ever later while the link is down (an outage, so a sleep).
            os.write(cat.stdin.fileno(), b"during\n")
            time.sleep(OUTAGE)
        finally:
            link_up(b)
        started = time.monotonic()
        readable, _, _ = select.select([cat.stdout], [], [], AFTER_OUTAGE_TIMEOUT)
        waited = time.monotonic() - started
        assert readable, f"nothing {AFTER_OUTAGE_TIMEOUT} s after the link came back"
        assert os.read(cat.stdout.fileno(), 100) == b"during\n"
        print(f"the bytes of the outage came {waited:.2f} s after the link")
        cat.stdin.close()
        assert_ended_well(moved, "the moved cat", tmp_path)
        wait_released(moved)


def test_the_answer_to_the_commit_lost_leaves_the_original_held_until_recover(
    tmp_path: Path,
) -> None:
    """The link goes down after b has run the copy and before its `running` reaches a.

    a cannot ask b what became of the commit (still down): the original stays
    stopped, never resumed blindly, and the move exits 1 saying so. With the
    link back, `hijack recover` learns from b that the copy runs, and ends it.
    """
    with Cluster(tmp_path, nodes=2) as cluster:
        a, b = cluster.nodes
        start_daemon_stopping_at(b, "daemon-committed")
        assert b.daemon is not None and b.daemon_endpoint is not None
        with spawn_fixture("echo_server", netns=a.netns) as server:
            with session(server.ready["port"], a) as talk:
                talk("before")
                mover = spawn_move(a, server.pid, b.daemon_endpoint)
                wait_stopped(b.daemon, "daemon-committed")  # the copy runs; no answer sent yet
                link_down(b)
                try:
                    b.daemon.send_signal(signal.SIGCONT)
                    result = finish(mover, ("move",))
                    assert result.returncode == 1, result.describe()
                    assert "held stopped" in result.stderr, result.describe()
                    assert "hijack recover" in result.stderr, result.describe()
                    # One copy runs, on b; the original is stopped, not traced.
                    assert state_of(server.pid) == "T"
                    assert tracer_of(server.pid) == 0
                    (copy,) = pids_inside(b) - {b.daemon.pid}
                    assert state_of(copy) in "RS"
                    with Registry(a.state_dir) as registry:
                        assert registry.get(server.pid).state == "held"
                        assert registry.moves()[0].phase == "in-doubt"
                    status = json.loads(a.hijack_ok("status", "--json").stdout)
                    (shown,) = [p for p in status["processes"] if p["pid"] == server.pid]
                    assert shown["state"] == "held", shown
                    refused = a.hijack("detach", server.pid)  # its shadow may relay for the copy
                    assert refused.returncode == 1, refused.describe()
                    assert "hijack recover" in refused.stderr, refused.describe()
                    # Still unreachable: recover says so and changes nothing.
                    completed = a.run(
                        [*HIJACK_PROGRAM, "recover"],
                        timeout=EXIT_TIMEOUT,
                        env={"HIJACK_SETTLE_TIMEOUT": SETTLE_TIMEOUT},
                    )
                    still = CliResult(
                        ("recover",), completed.returncode, completed.stdout, completed.stderr
                    )
                    assert still.returncode == 1, still.describe()
                    assert "stays held stopped" in still.stdout, still.describe()
                    assert state_of(server.pid) == "T"
                finally:
                    link_up(b)
                recovered = a.hijack("recover")
                assert recovered.returncode == 0, recovered.describe()
                assert f"runs on b as {copy}" in recovered.stdout, recovered.describe()
                assert assert_one_copy_on(b, a, server) == copy
                # At once: the relays retry at most a second apart (control.bound_backoff).
                talk("after", timeout=AFTER_OUTAGE_TIMEOUT)
            with Registry(a.state_dir) as registry:
                assert registry.moves()[0].phase == "done"
            finish_moved(server, Moved(copy, b, 0.0, shadow_pid_of(a, server.pid)), tmp_path)


def test_a_commit_lost_on_the_way_is_settled_once_by_the_destination(tmp_path: Path) -> None:
    """The link goes down just before the commit: it may reach b late, or never.

    Either way b decides once — `running` if the commit came first, `aborted`
    if a's question did — and recover acts on that answer: one copy runs.
    """
    with Cluster(tmp_path, nodes=2) as cluster:
        a, b = cluster.nodes
        b.start_daemon()
        assert b.daemon is not None and b.daemon_endpoint is not None
        with spawn_fixture("echo_server", netns=a.netns) as server:
            shadow = 0
            with session(server.ready["port"], a) as talk:
                talk("before")
                mover = hijack_in(
                    a,
                    "move-prepared",
                    "move",
                    server.pid,
                    "--to",
                    b.daemon_endpoint,
                    env={"HIJACK_SETTLE_TIMEOUT": SETTLE_TIMEOUT},
                )
                shadow = shadow_pid_of(a, server.pid)
                link_down(b)
                try:
                    mover.send_signal(signal.SIGCONT)
                    result = finish(mover, ("move",))
                    assert result.returncode == 1, result.describe()
                    assert "held stopped" in result.stderr, result.describe()
                    assert state_of(server.pid) == "T"
                finally:
                    link_up(b)
                recovered = a.hijack("recover")
                assert recovered.returncode == 0, recovered.describe()
                pids = pids_inside(b) - {b.daemon.pid}
                if "the original here was ended" in recovered.stdout:
                    (copy,) = pids
                    assert assert_one_copy_on(b, a, server) == copy
                else:
                    assert "not completed" in recovered.stdout, recovered.describe()
                    copy = 0
                    only_the_daemon_in(b)
                    assert_running_untraced(server.pid)
                talk("after", timeout=AFTER_OUTAGE_TIMEOUT)
            if copy:
                finish_moved(server, Moved(copy, b, 0.0, shadow), tmp_path)
            else:
                a.hijack_ok("detach", server.pid)
                reap([shadow])
                server.assert_intact()


def test_the_home_shadow_killed_after_a_move_ends_the_moved_process_s_connections(
    tmp_path: Path,
) -> None:
    with Cluster(tmp_path, nodes=2) as cluster:
        a, b = cluster.nodes
        b.start_daemon()
        assert b.daemon_endpoint is not None
        with spawn_fixture("echo_server", netns=a.netns) as server:
            with session(server.ready["port"], a) as talk:
                talk("before")
                result = a.hijack("move", server.pid, "--to", b.daemon_endpoint)
                assert result.returncode == 0, f"{result.describe()}\n{logs(tmp_path)}"
                copy = assert_one_copy_on(b, a, server)
                talk("moved")
                shadow = shadow_pid_of(a, server.pid)
                os.kill(shadow, signal.SIGKILL)
                reap([shadow])
                # Its client here sees the connection end, not a hang...
                assert talk("after", echoed=False) in ("EOF", "RESET ConnectionResetError")
            # ...and so does the moved process: its relays end (its control pipe
            # too), so it finishes on its own instead of waiting for ever.
            wait_gone(copy, EXIT_TIMEOUT, "the moved echo_server, its shadow gone")
            assert re.search(rf"process {copy} ended", daemon_log(b)), daemon_log(b)


# Asks the daemon at argv[1]:argv[2] what became of move argv[3]; prints the outcome.
OUTCOME_ASKER = """\
import sys
from hijack.node import pki
from hijack.node.channel import Channel
channel = Channel.connect((sys.argv[1], int(sys.argv[2])), pki.load_identity())
channel.send({"op": "outcome", "move": sys.argv[3]})
print(channel.expect("outcome")["outcome"])
"""


def test_a_commit_that_comes_after_the_move_was_settled_aborted_is_refused(
    tmp_path: Path,
) -> None:
    """Asked before the commit arrives, the destination settles the move as aborted, once:
    the late commit runs nothing, and the mover resumes the original."""
    with Cluster(tmp_path, nodes=2) as cluster:
        a, b = cluster.nodes
        b.start_daemon()
        assert b.daemon is not None and b.daemon_endpoint is not None
        with spawn_fixture("echo_server", netns=a.netns) as server:
            with session(server.ready["port"], a) as talk:
                talk("before")
                mover = hijack_in(a, "move-prepared", "move", server.pid, "--to", b.daemon_endpoint)
                with Registry(a.state_dir) as registry:
                    (row,) = registry.moves()
                asked = a.run_python(OUTCOME_ASKER, b.address, 7450, row.id)
                assert asked.stdout.strip() == "aborted", asked.stderr
                only_the_daemon_in(b)  # what it held for the commit is gone
                mover.send_signal(signal.SIGCONT)
                result = finish(mover, ("move",))
                assert result.returncode == 1, result.describe()
                assert "did not run the process" in result.stderr, result.describe()
                assert "settled the move as aborted" in result.stderr, result.describe()
                assert_running_untraced(server.pid)
                assert_not_attached(a, server.pid)
                only_the_daemon_in(b)
                assert "runs here as" not in daemon_log(b)
                talk("after")
            server.assert_intact()


def test_the_destination_daemon_killed_after_the_commit_keeps_its_word(tmp_path: Path) -> None:
    """b's daemon dies after running the copy, before answering: the mover holds the original.

    The daemon wrote the outcome before acting on it, so its next run still
    knows: `hijack recover` learns from it that the copy runs, and ends the
    original. Exactly one copy of the process ran at every instant.
    """
    with Cluster(tmp_path, nodes=2) as cluster:
        a, b = cluster.nodes
        start_daemon_stopping_at(b, "daemon-committed")
        assert b.daemon is not None and b.daemon_endpoint is not None
        with spawn_fixture("echo_server", netns=a.netns) as server:
            with session(server.ready["port"], a) as talk:
                talk("before")
                mover = spawn_move(a, server.pid, b.daemon_endpoint)
                wait_stopped(b.daemon, "daemon-committed")
                (copy,) = pids_inside(b) - {b.daemon.pid}
                b.daemon.kill()  # SIGKILL: no answer, no clean end
                b.daemon.wait()
                b.daemon = b.daemon_endpoint = None
                result = finish(mover, ("move",))
                assert result.returncode == 1, result.describe()
                assert "held stopped" in result.stderr, result.describe()
                assert state_of(server.pid) == "T"
                assert state_of(copy) in "RS"  # the copy outlives its daemon

                b.start_daemon()
                recovered = a.hijack("recover")
                assert recovered.returncode == 0, recovered.describe()
                assert f"runs on b as {copy}" in recovered.stdout, recovered.describe()
                assert server.wait_exit() == -signal.SIGKILL
                talk("after")  # the copy answers, through the home shadow
            # The copy is an orphan now (ours: pytest is a child subreaper).
            server.close_control()
            _, status = os.waitpid(copy, 0)
            assert os.waitstatus_to_exitcode(status) == 0, logs(tmp_path)
            assert "PASS echo_server" in server.stdout, server.stdout
