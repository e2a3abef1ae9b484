"""`hijack status`: the table view, `--json` against its documented schema, the live view.

Real processes throughout: fixtures attached through the API, a fixture moved
over loopback to a node daemon started for the test, a shadow killed, a
python3 holding 500 MB moved while `hijack status --watch` runs in a tmux
pane. Views are rendered into a captured Console and read back as tables.
Every wait is bounded; everything started is ended and reaped.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import pytest
from rich.console import Console
from support import spawn_fixture
from support.cli import HijackCli
from support.nodes import read_line

from hijack.errors import HijackError
from hijack.mutator import attach as attaching
from hijack.node import pki
from hijack.registry import Registry
from hijack.status import view
from hijack.status.model import (
    Health,
    MoveView,
    NodeView,
    ProcessView,
    ShadowView,
    Snapshot,
    State,
    StreamView,
    gather,
    snapshot_to_json,
    throughput,
)
from hijack.sys import pidfd

DOCS = Path(__file__).resolve().parent.parent / "docs"
SCHEMA: dict[str, Any] = json.loads((DOCS / "status.schema.json").read_text())
HOME, DEST = "home", "dest"
WIDTH = 250  # wide enough that no cell is cut
PAYLOAD = "relayed-by-the-home-shadow"
WAIT = 10.0  # seconds for anything a test waits for, unless said otherwise
HIJACK_SERVE = (sys.executable, "-m", "hijack", "node", "serve")
DAEMON_LINE = re.compile(rf"hijack node {DEST} listening on (127\.0\.0\.1:\d+)")

T = TypeVar("T")


# -- reading views back ---------------------------------------------------------------


def render(snapshot: Snapshot) -> str:
    output = io.StringIO()
    view.status(Console(file=output, width=WIDTH), snapshot)
    return output.getvalue()


def tables(text: str) -> dict[str, list[dict[str, str]]]:
    """The tables rich drew in `text`, by title: each row as {heading: cell}."""
    found: dict[str, list[dict[str, str]]] = {}
    title, headings = "", list[str]()
    for line in text.splitlines():
        if line.startswith("┃"):
            headings = _cells(line, "┃")
        elif line.startswith("│"):
            found[title].append(dict(zip(headings, _cells(line, "│"), strict=True)))
        elif line and line[0] not in "┏┡└ ":
            title, headings = line.strip(), []
            found[title] = []
    return found


def _cells(line: str, separator: str) -> list[str]:
    return [cell.strip() for cell in line.strip()[1:-1].split(separator)]


def row(text: str, table: str, first_cell: str | int) -> dict[str, str]:
    rows = [r for r in tables(text).get(table, []) if r[next(iter(r))] == str(first_cell)]
    assert len(rows) == 1, f"no single row {first_cell} in table {table!r}:\n{text}"
    return rows[0]


# -- the documented schema, checked (jsonschema is not a dependency of this project) ------


def schema_errors(value: Any, schema: dict[str, Any], path: str = "$") -> list[str]:
    """What in `value` breaks `schema`: the JSON Schema keywords docs/status.schema.json uses."""
    if "$ref" in schema:
        name = schema["$ref"].removeprefix("#/$defs/")
        return schema_errors(value, SCHEMA["$defs"][name], path)
    if "oneOf" in schema:
        matching = [option for option in schema["oneOf"] if not schema_errors(value, option, path)]
        return [] if len(matching) == 1 else [f"{path}: matches {len(matching)} of oneOf"]
    if "const" in schema and value != schema["const"]:
        return [f"{path}: {value!r} is not {schema['const']!r}"]
    if "enum" in schema and value not in schema["enum"]:
        return [f"{path}: {value!r} is not one of {schema['enum']}"]
    if "type" in schema:
        types = [schema["type"]] if isinstance(schema["type"], str) else schema["type"]
        if not any(_is_type(value, name) for name in types):
            return [f"{path}: {value!r} is not of type {types}"]
    errors = []
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        errors += [
            f"{path}: no {name!r}" for name in schema.get("required", []) if name not in value
        ]
        if schema.get("additionalProperties") is False:
            errors += [f"{path}: undocumented {name!r}" for name in value if name not in properties]
        for name, item in value.items():
            if name in properties:
                errors += schema_errors(item, properties[name], f"{path}.{name}")
    if isinstance(value, list) and "items" in schema:
        for index, item in enumerate(value):
            errors += schema_errors(item, schema["items"], f"{path}[{index}]")
    if "minimum" in schema and _is_type(value, "number") and value < schema["minimum"]:
        errors.append(f"{path}: {value} < {schema['minimum']}")
    return errors


def _is_type(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return name == "boolean"
    python_types = {
        "integer": int,
        "number": (int, float),
        "string": str,
        "null": type(None),
        "object": dict,
        "array": list,
        "boolean": bool,
    }
    return isinstance(value, python_types[name])


def assert_valid(document: Any) -> None:
    errors = schema_errors(document, SCHEMA)
    assert not errors, "\n".join(errors) + "\n" + json.dumps(document, indent=1)


# -- helpers --------------------------------------------------------------------------


def wait_until(produce: Callable[[], T], done: Callable[[T], bool], what: str) -> T:
    """`produce()` again every 0.1 s until `done` says so (at most WAIT seconds)."""
    deadline = time.monotonic() + WAIT
    while True:
        value = produce()
        if done(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {WAIT} s; last:\n{value}")
        time.sleep(0.1)


def wait_gone(pid: int, timeout: float = WAIT) -> None:
    """Wait for process `pid` (a child of ours or not) to end."""
    try:
        handle = pidfd.pidfd_open(pid)
    except HijackError:
        return  # gone already
    try:
        assert pidfd.wait_exit(handle, timeout), f"process {pid} still runs after {timeout} s"
    finally:
        os.close(handle)


def kill_by_pid(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    wait_gone(pid)


def fd_numbers(pid: int) -> set[int]:
    return {int(fd) for fd in os.listdir(f"/proc/{pid}/fd")}


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """This node ("home") and its state directory, for the API and the CLI alike."""
    state = tmp_path / "home"
    monkeypatch.setenv("HIJACK_STATE_DIR", str(state))
    monkeypatch.setenv("HIJACK_NODE", HOME)
    return state


@dataclass(frozen=True)
class LoopbackNode:
    address: str  # its daemon, "127.0.0.1:PORT"
    state_dir: Path


@pytest.fixture
def dest(tmp_path: Path, home: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[LoopbackNode]:
    """A node daemon ("dest") on loopback with its own state, with home in one cluster."""
    certificates = tmp_path / "pki"
    monkeypatch.setenv("HIJACK_PKI", str(certificates))
    HijackCli(home).ok("cluster", "init")
    for node in (HOME, DEST):
        HijackCli(home).ok("cluster", "add-node", node, "--address", "127.0.0.1")
    state = tmp_path / "dest"
    env = {**os.environ, "HIJACK_STATE_DIR": str(state), "HIJACK_NODE": DEST}
    with open(tmp_path / "dest.log", "wb") as log:
        daemon = subprocess.Popen(
            # The test's fixtures run as root.
            [*HIJACK_SERVE, "--listen", "127.0.0.1:0", "--allow-root"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log,
        )
    try:
        line = read_line(daemon, WAIT)
        match = DAEMON_LINE.fullmatch(line)
        assert match, f"unexpected first line of the daemon: {line!r}"
        yield LoopbackNode(match[1], state)
    finally:
        daemon.terminate()  # SIGTERM: it stops serving and exits
        try:
            daemon.wait(WAIT)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
        assert daemon.stdout is not None
        daemon.stdout.close()


def release_home_shadow(home: Path, pid: int) -> None:
    """End the shadow a moved process left at home (release; it exits), if still there."""
    with Registry(home) as registry:
        record = registry.find(pid)
    if record is None or record.shadow_pid is None:
        return
    with contextlib.suppress(HijackError):  # gone already: its migrant's node released it
        attaching.stop_shadow(record.shadow_pid, record.shadow_control)
    wait_gone(record.shadow_pid)


# -- the table view and --json on this node ---------------------------------------------


def test_an_attached_fixture_is_one_row_attached_with_its_shadow_healthy(
    home: Path, fixture_bin: Callable[[str], Path]
) -> None:
    with spawn_fixture("blocked", "read", PAYLOAD) as blocked, Registry(home) as registry:
        result = attaching.attach(blocked.pid, registry)
        try:
            fixture_fds = fd_numbers(blocked.pid)
            snapshot = gather(registry)
            text = render(snapshot)
            document = snapshot_to_json(snapshot)
        finally:
            attaching.detach(blocked.pid, registry)
        blocked.send(PAYLOAD.encode())
        blocked.assert_intact()

    (process,) = document["processes"]
    held = {fd["fd"] for fd in process["shadow"]["held"]}
    assert held == fixture_fds, "the shadow holds a copy of each descriptor of the fixture"
    assert row(text, "processes", blocked.pid) == {
        "pid": str(blocked.pid),
        "program": "blocked",
        "home": HOME,
        "on": HOME,
        "state": "attached",
        "shadow": str(result.record.shadow_pid),
        "health": "ok",
        "descriptors": f"{len(held)} held",
        "to process": "—",
        "from process": "—",
        "buffered": "—",
        "last move": "—",
    }
    assert_valid(document)
    assert process["state"] == "attached" and process["alive"] is True
    assert process["shadow"]["mode"] == "home" and process["shadow"]["streams"] == []
    assert document["node"] == HOME and document["state_dir"] == str(home)
    assert [event["kind"] for event in document["events"]] == ["attached"]


def test_a_dead_shadow_is_shown_dead_then_the_vanished_process_gone(
    home: Path, fixture_bin: Callable[[str], Path]
) -> None:
    with spawn_fixture("blocked", "read", PAYLOAD) as blocked, Registry(home) as registry:
        shadow_pid = attaching.attach(blocked.pid, registry).record.shadow_pid
        assert shadow_pid is not None
        kill_by_pid(shadow_pid)

        started = time.monotonic()
        snapshot = gather(registry)
        assert time.monotonic() - started < 1.0
        text = render(snapshot)
        cells = row(text, "processes", blocked.pid)
        assert (cells["state"], cells["shadow"], cells["health"]) == (
            "attached",
            str(shadow_pid),
            "dead",
        )
        assert cells["descriptors"] == "—"
        assert f"shadow of {blocked.pid}: process {shadow_pid} is gone" in text
        document = snapshot_to_json(snapshot)
        assert_valid(document)
        assert document["processes"][0]["shadow"]["health"] == "dead"

        blocked.kill()
        snapshot = gather(registry)
        cells = row(render(snapshot), "processes", blocked.pid)
        assert (cells["state"], cells["health"]) == ("gone", "dead")
        document = snapshot_to_json(snapshot)
        assert_valid(document)
        assert document["processes"][0]["alive"] is False


def test_silent_shadows_and_unreachable_nodes_cost_one_time_out_not_one_each(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A "shadow" that accepts (its backlog does) and never answers, standing for
    # eight processes; a node that refuses; a node that accepts and never speaks.
    certificates = tmp_path / "pki"
    pki.init_ca(certificates)
    pki.add_node(certificates, HOME)
    monkeypatch.setenv("HIJACK_PKI", str(certificates))
    silent_path = tmp_path / "silent.sock"
    with (
        socket.socket(socket.AF_UNIX) as silent_shadow,
        socket.create_server(("127.0.0.1", 0)) as silent_node,
        Registry(home) as registry,
    ):
        silent_shadow.bind(str(silent_path))
        silent_shadow.listen(64)
        with socket.create_server(("127.0.0.1", 0)) as closed:
            refusing_port = closed.getsockname()[1]
        pids = [4_000_001 + n for n in range(8)]  # above any pid this machine has used
        for pid in pids:
            registry.record_attached(pid, 1, "silent", os.getpid(), str(silent_path))
        registry.record_node("refusing", f"127.0.0.1:{refusing_port}")
        registry.record_node("silent", f"127.0.0.1:{silent_node.getsockname()[1]}")

        started = time.monotonic()
        snapshot = gather(registry, timeout=0.5)
        elapsed = time.monotonic() - started

    assert elapsed < 1.5, f"status took {elapsed:.2f} s"
    text = render(snapshot)
    for pid in pids:
        cells = row(text, "processes", pid)
        assert (cells["state"], cells["health"]) == ("gone", "unreachable")
    assert "within 0.5 s" in (snapshot.processes[0].shadow.error or "")  # type: ignore[union-attr]
    assert row(text, "nodes", "refusing")["reachable"] == "no"
    assert row(text, "nodes", "silent")["reachable"] == "no"
    # Why, below the table.
    assert "refused" in text.split("node refusing:")[1].splitlines()[0].lower(), text
    assert_valid(snapshot_to_json(snapshot))


def test_the_schema_check_rejects_what_the_schema_forbids(home: Path) -> None:
    with Registry(home) as registry:
        document = snapshot_to_json(gather(registry))
    assert_valid(document)
    assert document["processes"] == [] and document["nodes"] == []
    broken = {**document, "extra": 1, "schema_version": 2}
    del broken["events"]
    assert sorted(schema_errors(broken, SCHEMA)) == [
        "$.schema_version: 2 is not 1",
        "$: no 'events'",
        "$: undocumented 'extra'",
    ]


def test_every_field_of_the_schema_is_documented_in_status_md() -> None:
    text = (DOCS / "status.md").read_text()
    names = set(SCHEMA["properties"])
    for definition in SCHEMA["$defs"].values():
        names |= set(definition["properties"])
    missing = sorted(name for name in names if f"`{name}`" not in text)
    assert not missing, f"docs/status.md does not name {missing}"


def test_a_process_back_home_under_a_new_pid_is_one_row(home: Path) -> None:
    with Registry(home) as registry:
        registry.record_attached(100, 1, "server", shadow_pid=101, shadow_control="ctl")
        registry.set_relay(100, "10.0.0.1:7451", "00")
        registry.set_state(100, "moved", current_node=DEST)
        registry.record_migrant(200, 7, "server", HOME, 100, "10.0.0.1:7451", "00")
        # Until the move is committed the home row stays as it was.
        assert [p.pid for p in registry.processes()] == [100, 200]
        registry.settle_arrival(200)
        # Then one row, under the new pid, with the home shadow (status asks it, detach ends it).
        assert [
            (p.pid, p.state, p.home_pid, p.shadow_pid, p.shadow_control)
            for p in registry.processes()
        ] == [(200, "running", 100, 101, "ctl")]
        registry.moved_on(200, DEST)  # and moved on from home: listed there still
        assert [(p.pid, p.state, p.current_node) for p in registry.processes()] == [
            (200, "moved", DEST)
        ]
        assert [(e.pid, e.kind) for e in registry.recent_events(3)] == [
            (200, "moved"),
            (100, "returned"),
            (200, "arrived"),
        ]


def moved_snapshot(at: float, to_process: int, from_process: int, sent: int) -> Snapshot:
    """A process moved from HOME to DEST, one stream relayed, its move still streaming."""
    stream = StreamView("fd:0", 0, "stream", "10.0.0.2:5000", to_process, from_process, 0, 0)
    shadow = ShadowView(7, "local", Health.OK, None, "away", DEST, (), (stream,))
    move = MoveView(
        "m1", 5, "program", HOME, DEST, "streaming", 0.0, None, sent, None, None, None, True, 10
    )
    process = ProcessView(
        123456, "program", HOME, DEST, State.MOVED, "moved", None, None, shadow, None
    )
    return Snapshot(1, HOME, "/state", at, (process,), (move,), (), (), ())


def test_on_a_narrow_terminal_the_traffic_columns_go_and_no_cell_is_cut() -> None:
    snapshot = moved_snapshot(100.0, 5000, 300, 4096)
    wide = tables(render(snapshot))["processes"]
    output = io.StringIO()
    view.status(Console(file=output, width=100), snapshot)
    narrow = tables(output.getvalue())["processes"]
    assert narrow == [
        {k: v for k, v in wide[0].items() if k not in ("to process", "from process", "buffered")}
    ]
    assert "…" not in output.getvalue().split("proxied descriptors")[0]


LONG_ERROR = (
    "cannot move process 4194301: fd 251 (socket tcp 10.77.0.1:6379 -> 10.77.0.9:51234"
    " CLOSE_WAIT), fd 252 (socket tcp 10.77.0.1:6379 -> 10.77.0.9:51236 CLOSE_WAIT)"
    " cannot be proxied; nothing was changed"
)


def crowded_snapshot() -> Snapshot:
    """Pids as long as pid_max allows, a migrant, a dead shadow, a failed move with a long
    error and a node that cannot be reached: everything that makes a table wide."""
    stream = StreamView("acc:12", None, "stream", "10.77.0.2:51234", 5 << 30, 3 << 20, 7, 9)
    away = ShadowView(4194302, "local", Health.OK, None, "away", DEST, (), (stream,))
    dead = ShadowView(
        4194304, "local", Health.DEAD, "ended: process 4194303 exited", None, None, (), ()
    )
    done = MoveView(
        "9c1f2e3d4b5a6978", 4194301, "redis-server", HOME, DEST, "done", 1.0, 2.0,
        379 << 20, 7.1, 4194299, None, False, None,
    )  # fmt: skip
    failed = replace(done, id="0123456789abcdef", phase="failed", error=LONG_ERROR, new_pid=None)
    returned = replace(done, id="fedcba9876543210", pid=4194299, source=DEST, destination=HOME)
    moved = ProcessView(
        4194301, "redis-server", HOME, DEST, State.MOVED, "moved", None, None, away, done
    )
    gone = ProcessView(
        4194303, "postgres", HOME, HOME, State.GONE, "attached", False, None, dead, None
    )
    migrant = ProcessView(
        4194300, "worker", DEST, HOME, State.RUNNING, "running", True, 1, None, None
    )
    processes = (moved, gone, migrant)
    unreachable = NodeView(DEST, "10.77.0.2:7450", 1.0, False, "ping", None, LONG_ERROR)
    return Snapshot(
        1, HOME, "/var/lib/hijack", 3.0, processes, (returned, failed, done), (unreachable,), (), ()
    )


PIDS = ("4194299", "4194300", "4194301", "4194302", "4194303", "4194304")
SIZES = ("379.0 MiB", "5.0 GiB", "3.0 MiB")


def assert_whole(text: str) -> None:
    """Every pid, node name and size complete, the long errors whole (wrapped, not cut)."""
    assert "…" not in text, text
    words = set(re.findall(r"[\w.:-]+", text))
    assert set(PIDS) <= words, sorted(set(PIDS) - words)
    assert {HOME, DEST} <= words
    flowing = " ".join(text.split())
    for size in SIZES:
        assert size in flowing, size
    assert flowing.count(" ".join(LONG_ERROR.split())) == 2, text  # the move's and the node's


@pytest.mark.parametrize("width", [80, 100, 120])
def test_status_at_80_columns_cuts_no_pid_node_or_size_and_keeps_errors_whole(width: int) -> None:
    output = io.StringIO()
    view.status(Console(file=output, width=width), crowded_snapshot())
    text = output.getvalue()
    print(text)
    assert_whole(text)
    # Each table found a layout that fits: nothing wider than the terminal.
    assert max(len(line) for line in text.splitlines()) <= width, text
    moves = text.split("recent moves")[1]
    assert moves.count("done") == 2 and moves.count("failed") == 1, moves
    if width >= 120:  # the move ids too, when there is room
        assert "9c1f2e3d4b5a6978" in moves, moves


def test_status_piped_is_plain_and_complete(home: Path) -> None:
    with Registry(home) as registry:
        registry.record_attached(4194301, 1, "redis-server", 4194302, str(home / "gone.sock"))
        registry.start_move("0123456789abcdef", 4194301, "redis-server", DEST)
        registry.update_move("0123456789abcdef", phase="failed", finished_at=2.0, error=LONG_ERROR)
    env = {key: value for key, value in os.environ.items() if key != "COLUMNS"}
    completed = subprocess.run(
        [sys.executable, "-m", "hijack", "status"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    text = completed.stdout
    print(text)
    assert "\x1b" not in text  # no colours, no cursor movement
    assert "…" not in text and "4194301" in text and "4194302" in text
    assert " ".join(LONG_ERROR.split()) in " ".join(text.split())


def test_relay_rates_come_from_two_snapshots_a_second_apart() -> None:
    snapshot = moved_snapshot
    before, after = snapshot(100.0, 1000, 0, 0), snapshot(102.0, 5000, 300, 4096)
    rates = throughput(before, after)
    assert rates.streams == {(123456, "fd:0"): (2000.0, 150.0)}
    assert rates.moves == {"m1": 2048.0}
    assert throughput(after, replace(after, taken_at=after.taken_at)).moves == {}


# -- a move on loopback ---------------------------------------------------------------


def test_a_moved_fixture_is_moved_away_at_home_and_runs_at_its_node(
    home: Path,
    dest: LoopbackNode,
    fixture_bin: Callable[[str], Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cli = HijackCli(home)
    with spawn_fixture("blocked", "read", PAYLOAD) as blocked:
        moved = cli.ok("move", blocked.pid, "--to", dest.address)
        found = re.search(r"runs there as (\d+)", moved.stdout)
        assert found, moved.describe()
        new_pid = int(found[1])
        blocked.wait_exit()  # the original, killed by the mover once the copy ran
        try:
            # Into the pipe the home shadow holds, relayed to the process at dest.
            blocked.send(PAYLOAD.encode())
            with Registry(home) as registry:
                snapshot = wait_until(
                    lambda: gather(registry),
                    lambda s: relayed_to(s, blocked.pid) == len(PAYLOAD),
                    "the payload relayed",
                )
            text = render(snapshot)
            at_home = row(text, "processes", blocked.pid)
            shadow = snapshot.processes[0].shadow
            assert shadow is not None and shadow.mode == "away"
            assert re.fullmatch(r"to dest, frozen \d+\.\d ms", at_home.pop("last move"))
            assert at_home == {
                "pid": str(blocked.pid),
                "program": "blocked",
                "home": HOME,
                "on": DEST,
                "state": "moved away",
                "shadow": str(shadow.pid),
                "health": "ok",
                "descriptors": "1 proxied",
                "to process": f"{len(PAYLOAD)} B",
                "from process": "0 B",
                "buffered": "0 B",
            }
            (stream,) = shadow.streams
            relay = row(text, "proxied descriptors", blocked.pid)
            assert (relay["stream"], relay["to process"]) == (stream.id, f"{len(PAYLOAD)} B")
            node = row(text, "nodes", DEST)
            assert (node["address"], node["reachable"]) == (dest.address, "yes")
            assert row(text, "recent moves", snapshot.moves[0].id)["new pid"] == str(new_pid)
            assert_valid(json.loads(cli.ok("status", "--json").stdout))

            # The same process as its node sees it: running there, its shadow at home.
            monkeypatch.setenv("HIJACK_NODE", DEST)
            with Registry(dest.state_dir) as registry:
                there = gather(registry)
            there_row = row(render(there), "processes", new_pid)
            assert (there_row["home"], there_row["on"], there_row["state"]) == (
                HOME,
                DEST,
                "running here",
            )
            assert (there_row["shadow"], there_row["health"]) == (f"{shadow.pid} on {HOME}", "ok")
            assert there_row["to process"] == f"{len(PAYLOAD)} B"
            assert_valid(snapshot_to_json(there))

            # EOF through the relay: the moved fixture checks what it read, passes and
            # ends; its node's daemon reaps it, and its status says gone.
            blocked.close_control()
            wait_gone(new_pid)
            assert f"PASS {blocked.name}" in blocked.stdout, blocked.describe()
            with Registry(dest.state_dir) as registry:
                ended = wait_until(
                    lambda: gather(registry),
                    lambda s: s.processes[0].state is State.GONE,
                    "the moved process shown gone at its node",
                )
            assert row(render(ended), "processes", new_pid)["state"] == "gone"

            # Its node released the home shadow: at home, no shadow means no process.
            monkeypatch.setenv("HIJACK_NODE", HOME)
            with Registry(home) as registry:
                wait_until(
                    lambda: gather(registry),
                    lambda s: s.processes[0].state is State.GONE,
                    "the home row gone once its migrant ended away",
                )
        finally:
            monkeypatch.setenv("HIJACK_NODE", HOME)
            kill_by_pid(new_pid)
            release_home_shadow(home, blocked.pid)


def relayed_to(snapshot: Snapshot, pid: int) -> int:
    process = next(p for p in snapshot.processes if p.pid == pid)
    streams = process.shadow.streams if process.shadow else ()
    return sum(stream.bytes_to_process for stream in streams)


# -- the live view, driven in tmux -----------------------------------------------------

# Holds 500 MB of incompressible memory: its move streams long enough to be watched.
BIG_PROCESS = """\
import os, time
data = os.urandom(500 << 20)
print("ready", flush=True)
time.sleep(600)
"""
PANE = "status"
BAR = "━"


class Tmux:
    """A tmux server of our own (its own socket), one detached session of a fixed size."""

    def __init__(self, socket_path: Path, env: dict[str, str]) -> None:
        self.socket_path = socket_path
        self.env = env
        self("new-session", "-d", "-s", PANE, "-x", "160", "-y", "60", "bash --norc --noprofile")
        self.server_pid = int(self("display-message", "-p", "-t", PANE, "#{pid}"))
        self.shell_pid = int(self("display-message", "-p", "-t", PANE, "#{pane_pid}"))

    def __call__(self, *args: str) -> str:
        completed = subprocess.run(
            ["tmux", "-u", "-f", "/dev/null", "-S", str(self.socket_path), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=WAIT,
            check=False,
        )
        assert completed.returncode == 0, f"tmux {args}: {completed.stderr}"
        return completed.stdout

    def type(self, text: str) -> None:
        self("send-keys", "-t", PANE, "-l", text)
        self("send-keys", "-t", PANE, "Enter")

    def foreground(self) -> str:
        """The command the pane's terminal belongs to now."""
        return self("display-message", "-p", "-t", PANE, "#{pane_current_command}").strip()

    def screen(self) -> str:
        return self("capture-pane", "-p", "-t", PANE)

    def wait_for(self, done: Callable[[str], bool], what: str, timeout: float = WAIT) -> str:
        deadline = time.monotonic() + timeout
        while True:
            screen = self.screen()
            if done(screen):
                return screen
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: not on screen within {timeout} s:\n{screen}")
            time.sleep(0.1)

    def kill(self) -> None:
        with contextlib.suppress(AssertionError):
            self("kill-server")
        for pid in (self.shell_pid, self.server_pid):
            kill_by_pid(pid)


def progress_lines(screen: str) -> list[str]:
    return [
        line
        for line in screen.splitlines()
        if ("streaming" in line or "precopying" in line) and BAR in line
    ]


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
def test_the_live_view_shows_a_move_in_progress_and_quits_on_q(
    home: Path, dest: LoopbackNode, tmp_path: Path
) -> None:
    big = subprocess.Popen(
        [sys.executable, "-c", BIG_PROCESS],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    tmux: Tmux | None = None
    new_pid = 0
    try:
        assert read_line(big, 30.0) == "ready"
        env = {**os.environ, "LC_ALL": "C.UTF-8", "TERM": "xterm-256color"}
        tmux = Tmux(tmp_path / "tmux.sock", env)
        tmux.type(f"{sys.executable} -m hijack status --watch")
        tmux.wait_for(lambda s: f"hijack status on node {HOME}" in s, "the live view", 20.0)

        mover = subprocess.Popen(
            [sys.executable, "-m", "hijack", "move", str(big.pid), "--to", dest.address],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        seen = tmux.wait_for(
            lambda s: bool(progress_lines(s)) or mover.poll() is not None,
            "a progress bar of the move",
            60.0,
        )
        bars = progress_lines(seen)
        assert len(bars) == 1, f"the move ended before a bar was seen:\n{seen}"
        bar_line = bars[0]
        assert str(big.pid) in bar_line and DEST in bar_line, seen
        # Seen at its start as often as not: "0 B of ≈510.5 MiB" is a bar too.
        assert re.search(r"\d (B|KiB|MiB) of ≈\d+\.\d MiB", bar_line), seen
        stdout, stderr = mover.communicate(timeout=60.0)
        assert mover.returncode == 0, stderr
        new_pid = int(re.findall(r"runs there as (\d+)", stdout)[0])
        assert big.wait(WAIT) == -signal.SIGKILL

        # It goes on updating: the move ends, the process is shown moved away.
        moved_row = re.compile(rf"│ {big.pid} .*│ moved away ")
        done = tmux.wait_for(
            lambda s: bool(moved_row.search(s)) and "no move in progress" in s, "the move's end"
        )
        assert not progress_lines(done)

        tmux("send-keys", "-t", PANE, "q")
        tmux.wait_for(lambda s: f"hijack status on node {HOME}" not in s, "the view gone")
        wait_until(tmux.foreground, lambda command: command == "bash", "the shell's turn again")
        tmux.type("echo ok-$RANDOM")
        after = tmux.wait_for(
            lambda s: bool(re.search(r"^ok-\d+$", s, re.MULTILINE)), "the shell answering"
        )
        typed = re.search(r"[#$] echo ok-\$RANDOM$", after, re.MULTILINE)
        assert typed, f"what is typed is not echoed:\n{after}"
    finally:
        if tmux is not None:
            tmux.kill()
        if big.poll() is None:
            big.kill()
        big.wait(WAIT)
        assert big.stdout is not None
        big.stdout.close()
        if new_pid:
            kill_by_pid(new_pid)
        release_home_shadow(home, big.pid)


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
def test_the_live_view_ends_on_ctrl_c_with_exit_0_and_the_terminal_as_it_was(
    home: Path, tmp_path: Path
) -> None:
    tmux = Tmux(tmp_path / "tmux.sock", {**os.environ, "LC_ALL": "C.UTF-8"})
    try:
        tmux.type(f"{sys.executable} -m hijack status --watch")
        tmux.wait_for(lambda s: "no process known to hijack" in s, "the live view", 20.0)
        tmux("send-keys", "-t", PANE, "C-c")
        wait_until(tmux.foreground, lambda command: command == "bash", "the shell's turn again")
        # What the terminal is set to now is what the next command gets (bash
        # keeps a normally ending program's settings): line mode, with echo.
        tmux.type("echo status-exit-$?; stty -a")
        after = tmux.wait_for(lambda s: "status-exit-" in s and "icanon" in s, "the shell")
        assert re.search(r"^status-exit-0$", after, re.MULTILINE), after
        assert re.search(r"(?<![-\w])icanon\b", after) and re.search(r"(?<![-\w])echo\b", after)
        assert "Traceback" not in after, after
    finally:
        tmux.kill()
