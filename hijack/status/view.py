"""`hijack status` rendered with rich: the table view, the JSON document, the live view's frame.

Every function takes a Snapshot (hijack.status.model) and draws it; nothing
here asks anything of anyone, so views are tested in a captured Console.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable

from rich import box
from rich.console import Console, Group, RenderableType
from rich.markup import escape
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from hijack.cli.render import human_size
from hijack.status.model import (
    Health,
    MemberView,
    MoveView,
    NetworkLockView,
    NodeView,
    ProcessView,
    Snapshot,
    State,
    StreamView,
    Throughput,
    proxied_streams,
    snapshot_to_json,
)

STATE_LABELS = {
    State.ATTACHED: "[green]attached[/]",
    State.RUNNING: "[green]running here[/]",
    State.MOVED: "[cyan]moved away[/]",
    State.MOVING: "[bold yellow]moving[/]",
    State.RESTORED: "[green]restored[/]",
    State.CHECKPOINTED: "[blue]checkpointed[/]",
    State.HELD: "[bold red]held (in doubt)[/]",
    State.GONE: "[red]gone[/]",
}
HEALTH_LABELS = {
    Health.OK: "[green]ok[/]",
    Health.DEAD: "[bold red]dead[/]",
    Health.UNREACHABLE: "[yellow]unreachable[/]",
}
NONE = "[dim]—[/]"
RECENT_MOVES_SHOWN = 5
LIVE_EVENTS_SHOWN = 12
BAR_WIDTH = 30
UNBOUNDED_WIDTH = 10_000


def status(console: Console, snapshot: Snapshot) -> None:
    """The table view of `hijack status`.

    Each table takes the widest of its layouts that fits the console; if
    even its narrowest does not, that one is printed whole, never cut (the
    terminal wraps its lines). Long texts (errors, notes) go below it.
    """
    console.print(_heading(snapshot))
    if snapshot.processes:
        console.print(processes_table(snapshot.processes, console), crop=False)
        for note in _shadow_notes(snapshot.processes):
            console.print(note)
    else:
        console.print("no process known to hijack on this node")
    if proxied_streams(snapshot.processes):
        console.print(relays_table(snapshot.processes, console), crop=False)
    if snapshot.moves:
        shown = snapshot.moves[:RECENT_MOVES_SHOWN]
        console.print(moves_table(shown, console), crop=False)
        for note in _move_notes(shown):
            console.print(note)
    if snapshot.nodes:
        console.print(nodes_table(snapshot.nodes, console), crop=False)
        for note in _node_notes(snapshot.nodes):
            console.print(note)
    if snapshot.network_locks:
        console.print(locks_table(snapshot.network_locks, console), crop=False)
        for note in _lock_notes(snapshot.network_locks):
            console.print(note)
    if snapshot.routed or snapshot.packet_tables:
        console.print(routed_table(snapshot, console), crop=False)


def status_json(console: Console, snapshot: Snapshot) -> None:
    """`hijack status --json`: the document of docs/status.md, indented."""
    console.print_json(json.dumps(snapshot_to_json(snapshot)))


def live_frame(snapshot: Snapshot, rates: Throughput | None, console: Console) -> RenderableType:
    """One frame of `hijack status --watch`."""
    clock = time.strftime("%H:%M:%S", time.localtime(snapshot.taken_at))
    heading = Text.from_markup(f"{clock} [dim](q quits)[/] {_heading(snapshot)}")
    heading.no_wrap, heading.overflow = True, "ellipsis"
    parts: list[RenderableType] = [
        heading,
        _moves_in_progress(snapshot, rates),
        processes_table(snapshot.processes, console)
        if snapshot.processes
        else Text("no process known to hijack on this node"),
    ]
    parts += _shadow_notes(snapshot.processes)
    if proxied_streams(snapshot.processes):
        parts.append(relays_table(snapshot.processes, console, rates))
    if snapshot.nodes:
        parts.append(nodes_table(snapshot.nodes, console))
        parts += _node_notes(snapshot.nodes)
    if snapshot.network_locks:
        parts.append(locks_table(snapshot.network_locks, console))
        parts += _lock_notes(snapshot.network_locks)
    if snapshot.routed or snapshot.packet_tables:
        parts.append(routed_table(snapshot, console))
    parts.append(_events(snapshot))
    return Group(*parts)


# -- pieces ---------------------------------------------------------------------------


def _heading(snapshot: Snapshot) -> str:
    counts = [_count(len(snapshot.processes), "process", "processes")]
    moving = len(snapshot.moves_in_progress)
    if moving:
        counts.append(_count(moving, "move in progress", "moves in progress"))
    counts.append(_count(len(snapshot.nodes), "other node", "other nodes"))
    if snapshot.network_locks:
        counts.append(_count(len(snapshot.network_locks), "network lock", "network locks"))
    if snapshot.routed:
        counts.append(
            _count(
                len(snapshot.routed),
                "connection relayed by packets",
                "connections relayed by packets",
            )
        )
    return (
        f"[bold]hijack status[/] on node [bold]{escape(snapshot.node)}[/]: {', '.join(counts)}"
        f" [dim](state {escape(snapshot.state_dir)})[/]"
    )


def _count(number: int, one: str, many: str) -> str:
    return f"{number} {one if number == 1 else many}"


def processes_table(processes: Iterable[ProcessView], console: Console) -> Table:
    """One row per process, in the widest layout that fits `console`.

    The traffic totals are repeated per descriptor in the proxied-descriptors
    table: on a narrow terminal they go first, rather than any cell being cut.
    """
    processes = list(processes)
    return fitted(
        console,
        lambda: _processes_table(processes, with_traffic=True),
        lambda: _processes_table(processes, with_traffic=False),
        lambda: _processes_table(processes, with_traffic=False, compact=True),
        lambda: _processes_table(processes, with_traffic=False, compact=True, minimal=True),
    )


def _processes_table(
    processes: Iterable[ProcessView],
    with_traffic: bool,
    compact: bool = False,
    minimal: bool = False,
) -> Table:
    """`minimal`: no home and descriptors columns; the shadow's health, if not ok, in its cell."""
    table = _table("processes", compact)
    headings = ["pid", "program"]
    headings += (
        ["on", "state", "shadow"] if minimal else ["home", "on", "state", "shadow", "health"]
    )
    for heading in headings:
        table.add_column(heading, no_wrap=True)
    traffic = ("to process", "from process", "buffered") if with_traffic else ()
    for heading in (() if minimal else ("descriptors",)) + traffic:
        table.add_column(heading, no_wrap=True, justify="right")
    table.add_column("last move", no_wrap=True)
    for process in processes:
        shadow = process.shadow
        streams = shadow.streams if shadow else ()
        totals = (
            [
                human_size(sum(s.bytes_to_process for s in streams)) if streams else NONE,
                human_size(sum(s.bytes_from_process for s in streams)) if streams else NONE,
                human_size(sum(_buffered(s) for s in streams)) if streams else NONE,
            ]
            if with_traffic
            else []
        )
        state = STATE_LABELS.get(process.state, f"[red]? {escape(process.registry_state)}[/]")
        health = HEALTH_LABELS[shadow.health] if shadow else NONE
        if minimal:
            ok = shadow is None or shadow.health is Health.OK
            cells = [escape(process.current_node), state, _shadow_cell(process)]
            cells[-1] += "" if ok else f" {health}"
        else:
            cells = [
                escape(process.home_node),
                escape(process.current_node),
                state,
                _shadow_cell(process),
                health,
                _descriptors_cell(process),
            ]
        table.add_row(
            str(process.pid),
            escape(process.program),
            *cells,
            *totals,
            _last_move_cell(process.last_move),
        )
        for member, depth in _depth_first(process):
            table.add_row(*_member_cells(process, member, depth, len(table.columns), minimal))
    return table


def _depth_first(process: ProcessView) -> list[tuple[MemberView, int]]:
    """The members of `process`'s tree, each under its parent (depth 1: a child of the
    root); a member whose parent is not in the tree any more hangs from the root."""
    pids = {member.pid for member in process.members}
    children: dict[int, list[MemberView]] = {}
    for member in process.members:
        parent = member.parent if member.parent in pids else process.pid
        children.setdefault(parent, []).append(member)
    ordered: list[tuple[MemberView, int]] = []
    pending = [(member, 1) for member in reversed(children.get(process.pid, []))]
    while pending:
        member, depth = pending.pop()
        ordered.append((member, depth))
        pending += [(child, depth + 1) for child in reversed(children.get(member.pid, []))]
    shown = {member.pid for member, _ in ordered}
    return ordered + [(member, 1) for member in process.members if member.pid not in shown]


def _member_cells(
    process: ProcessView, member: MemberView, depth: int, columns: int, minimal: bool
) -> list[str]:
    """A member's row under its root: its pid indented by its `depth`, its state, what the
    shadow holds of it; the other cells are the root's."""
    if not member.alive:
        state = "[red]gone[/]"
    elif member.attached or process.state is State.RESTORED:
        state = "[green]member[/]"
    else:
        state = "[yellow]not attached[/] [dim](born since)[/]"
    cells = [f"{'  ' * (depth - 1)}└ {member.pid}", escape(member.program)]
    cells += ["", state, ""] if minimal else ["", "", state, "", ""]
    if not minimal:
        held = next(
            (
                m.held
                for m in (process.shadow.members if process.shadow else ())
                if m.pid == member.pid
            ),
            None,
        )
        cells.append(f"{len(held)} held" if held is not None else NONE)
    return cells + [""] * (columns - len(cells))


def _shadow_cell(process: ProcessView) -> str:
    shadow = process.shadow
    if shadow is None:
        return NONE
    pid = str(shadow.pid) if shadow.pid is not None else "?"
    return pid if shadow.where == "local" else f"{pid} on {escape(process.home_node)}"


def _descriptors_cell(process: ProcessView) -> str:
    shadow = process.shadow
    if shadow is None or shadow.health is not Health.OK:
        return NONE
    if shadow.streams:
        return f"{len(shadow.streams)} proxied"
    return f"{len(shadow.held)} held"


def _buffered(stream: StreamView) -> int:
    return stream.buffered_to_process + stream.buffered_from_process


def _last_move_cell(move: MoveView | None) -> str:
    if move is None:
        return NONE
    where = f"to {escape(move.destination)}"
    if move.in_progress:
        return f"[yellow]{move.phase}[/] {where}"
    if move.phase == "done":
        return f"{where}, frozen {move.freeze_ms or 0:.1f} ms"
    if move.phase == "failed":
        return f"[red]failed[/] {where}"
    return f"[red]{move.phase}, interrupted[/] {where}"


def _shadow_notes(processes: Iterable[ProcessView]) -> list[Text]:
    """Why a shadow is not ok, and what a row cannot vouch for: lines under the table."""
    notes = []
    for process in processes:
        shadow = process.shadow
        if shadow is not None and shadow.health is not Health.OK:
            notes.append(f"  [dim]shadow of {process.pid}:[/] {escape(shadow.error or '')}")
        if process.note:
            notes.append(f"  [dim]{process.pid}:[/] {escape(process.note)}")
    return [Text.from_markup(note) for note in notes]


def relays_table(
    processes: Iterable[ProcessView], console: Console, rates: Throughput | None = None
) -> Table:
    processes = list(processes)
    return fitted(
        console,
        lambda: _relays_table(processes, rates),
        lambda: _relays_table(processes, rates, compact=True),
        lambda: _relays_table(processes, rates, compact=True, minimal=True),
    )


def _relays_table(
    processes: Iterable[ProcessView],
    rates: Throughput | None,
    compact: bool = False,
    minimal: bool = False,
) -> Table:
    """`minimal`: no fd and kind columns (the stream id tells), one buffered column."""
    table = _table("proxied descriptors", compact)
    for heading in ("pid", "stream") if minimal else ("pid", "stream", "fd", "kind"):
        table.add_column(heading, no_wrap=True)
    table.add_column("relay", no_wrap=True)
    buffered = ("buffered",) if minimal else ("buffered to", "buffered from")
    for heading in ("to process", "from process", *buffered):
        table.add_column(heading, no_wrap=True, justify="right")
    if rates is not None:
        table.add_column("rate to", no_wrap=True, justify="right")
        table.add_column("rate from", no_wrap=True, justify="right")
    for process, stream in proxied_streams(processes):
        row = [str(process.pid), escape(stream.id)]
        if not minimal:
            row += [str(stream.fd) if stream.fd is not None else NONE, stream.kind]
        row += [
            escape(stream.relay) or NONE,
            human_size(stream.bytes_to_process),
            human_size(stream.bytes_from_process),
        ]
        if minimal:
            row.append(human_size(_buffered(stream)))
        else:
            row += [
                human_size(stream.buffered_to_process),
                human_size(stream.buffered_from_process),
            ]
        if rates is not None:
            to_rate, from_rate = rates.streams.get((process.pid, stream.id), (0.0, 0.0))
            row += [f"{human_size(int(to_rate))}/s", f"{human_size(int(from_rate))}/s"]
        table.add_row(*row)
    return table


def moves_table(moves: Iterable[MoveView], console: Console) -> Table:
    """Moves made or received here; why one failed goes below the table (_move_notes)."""
    moves = list(moves)
    return fitted(
        console,
        lambda: _moves_table(moves),
        lambda: _moves_table(moves, compact=True),
        lambda: _moves_table(moves, compact=True, minimal=True),
    )


def _moves_table(moves: Iterable[MoveView], compact: bool = False, minimal: bool = False) -> Table:
    """`minimal`: no move id column."""
    table = _table("recent moves", compact)
    headings = ("pid", "program", "from", "to", "phase", "sent", "frozen", "new pid")
    for heading in headings if minimal else ("move", *headings):
        table.add_column(heading, no_wrap=True)
    for move in moves:
        row = [] if minimal else [move.id]
        table.add_row(
            *row,
            str(move.pid),
            escape(move.program),
            escape(move.source),
            escape(move.destination),
            _phase(move),
            human_size(move.bytes_sent),
            f"{move.freeze_ms:.1f} ms" if move.freeze_ms is not None else NONE,
            str(move.new_pid) if move.new_pid is not None else NONE,
        )
    return table


def _phase(move: MoveView) -> str:
    if move.in_progress:
        return f"[yellow]{move.phase}[/]"
    if move.phase == "done":
        return "[green]done[/]"
    if move.phase == "failed":
        return "[red]failed[/]"
    # The mover ended without a word (killed), or gave up in doubt.
    return f"[red]{move.phase}, interrupted[/]"


def _move_notes(moves: Iterable[MoveView]) -> list[Text]:
    """Why each failed or interrupted move did not complete: a line each, below the table."""
    notes = []
    for move in moves:
        if move.in_progress or move.phase == "done":
            continue
        why = move.error or "" if move.phase == "failed" else "run `hijack recover`"
        notes.append(f"  [dim]move {move.id} of {move.pid}:[/] {escape(why)}")
    return [Text.from_markup(note) for note in notes]


def nodes_table(nodes: Iterable[NodeView], console: Console) -> Table:
    """The other nodes; what went wrong reaching one goes below the table (_node_notes)."""
    nodes = list(nodes)
    return fitted(console, lambda: _nodes_table(nodes), lambda: _nodes_table(nodes, compact=True))


def _nodes_table(nodes: Iterable[NodeView], compact: bool = False) -> Table:
    table = _table("nodes", compact)
    for heading in ("node", "address", "reachable", "latency", "last seen"):
        table.add_column(heading, no_wrap=True)
    for node in nodes:
        if node.reachable is None:
            reachable = "[dim]not checked[/]"
        elif node.reachable:
            reachable = "[green]yes[/]" + (" [dim](tcp only)[/]" if node.check == "connect" else "")
        else:
            reachable = "[red]no[/]"
        table.add_row(
            escape(node.name),
            escape(node.address or "") or "[dim]unknown[/]",
            reachable,
            f"{node.latency_ms:.1f} ms" if node.latency_ms is not None else NONE,
            _ago(node.last_seen),
        )
    return table


def _node_notes(nodes: Iterable[NodeView]) -> list[Text]:
    return [
        Text.from_markup(f"  [dim]node {escape(node.name)}:[/] {escape(node.error)}")
        for node in nodes
        if node.error
    ]


def locks_table(locks: Iterable[NetworkLockView], console: Console) -> Table:
    """The network locks `dump --kill` took that no restore has lifted yet."""
    locks = list(locks)
    return fitted(console, lambda: _locks_table(locks), lambda: _locks_table(locks, compact=True))


def _locks_table(locks: Iterable[NetworkLockView], compact: bool = False) -> Table:
    table = _table("network locks", compact)
    for heading in ("pid", "connection", "image", "taken", "standing"):
        table.add_column(heading, no_wrap=heading != "connection")
    for lock in locks:
        table.add_row(
            str(lock.pid),
            escape(lock.connection),
            escape(lock.image),
            _ago(lock.taken_at),
            f"[red]{escape(lock.standing)}[/]" if lock.stale else escape(lock.standing),
        )
    return table


def _lock_notes(locks: Iterable[NetworkLockView]) -> list[Text]:
    if not any(lock.stale for lock in locks):
        return []
    return [Text.from_markup("  [dim]stale network locks:[/] `hijack recover` lifts them")]


def routed_table(snapshot: Snapshot, console: Console) -> Table:
    """The connections relayed by packets running here, and this node's tables rewriting
    or holding such connections (it is their home node)."""
    return fitted(
        console, lambda: _routed_table(snapshot), lambda: _routed_table(snapshot, compact=True)
    )


def _routed_table(snapshot: Snapshot, compact: bool = False) -> Table:
    table = _table("relayed by packets", compact)
    for heading in ("here", "peer", "its home address", "through"):
        table.add_column(heading, no_wrap=True)
    for routed in snapshot.routed:
        through = f"{routed.home_node} ({routed.gateway})"
        table.add_row(*map(escape, (routed.local, routed.remote, routed.origin, through)))
    rewriting = [name for name in snapshot.packet_tables if name.startswith("hijack_route_")]
    holding = len(snapshot.packet_tables) - len(rewriting)
    if snapshot.packet_tables:
        table.caption = (
            f"this node rewrites {_count(len(rewriting), 'connection', 'connections')} for other"
            f" nodes"
            + (f", holds {holding} (a move under way, or one cut short)" if holding else "")
        )
    return table


# -- fitting tables -------------------------------------------------------------------


def _table(title: str, compact: bool) -> Table:
    """A table; `compact`: no borders, a rule under the headings, one space between cells."""
    if compact:
        return Table(
            title=title,
            title_justify="left",
            box=box.SIMPLE_HEAD,
            show_edge=False,
            pad_edge=False,
            collapse_padding=True,
        )
    return Table(title=title, title_justify="left")


def fitted(console: Console, *layouts: Callable[[], Table]) -> Table:
    """The first of `layouts` (widest first) whose whole width fits `console`.

    If none does, the last one at its whole width: printed with crop=False,
    its lines are longer than the console, but no cell is cut short.
    """
    unbounded = console.options.update_width(UNBOUNDED_WIDTH)  # its natural width, not cut
    for layout in layouts:
        table = layout()
        width = console.measure(table, options=unbounded).maximum
        if width <= console.width:
            return table
    table.width = width
    return table


def _ago(at: float | None) -> str:
    if at is None:
        return NONE
    seconds = max(0.0, time.time() - at)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit} ago"
    return f"{seconds:.0f} s ago"


def _moves_in_progress(snapshot: Snapshot, rates: Throughput | None) -> RenderableType:
    moving = snapshot.moves_in_progress
    if not moving:
        return Panel(Text("no move in progress", style="dim"), title="moves", title_align="left")
    table = Table.grid(padding=(0, 1))
    for move in moving:
        rate = rates.moves.get(move.id) if rates else None
        expected = move.expected_bytes
        table.add_row(
            f"[bold]{move.pid}[/] {escape(move.program)} → {escape(move.destination)}",
            f"[yellow]{move.phase:<10}[/]",
            ProgressBar(
                total=float(expected) if expected else None,
                completed=float(move.bytes_sent),
                width=BAR_WIDTH,
                pulse=not expected,
            ),
            f"{human_size(move.bytes_sent)}" + (f" of ≈{human_size(expected)}" if expected else ""),
            f"{human_size(int(rate))}/s" if rate else "",
            f"{snapshot.taken_at - move.started_at:.1f} s",
        )
    return Panel(table, title="moves in progress", title_align="left", border_style="yellow")


def _events(snapshot: Snapshot) -> RenderableType:
    lines = Table.grid(padding=(0, 1))
    for event in snapshot.events[:LIVE_EVENTS_SHOWN]:
        lines.add_row(
            time.strftime("%H:%M:%S", time.localtime(event.at)),
            str(event.pid) if event.pid is not None else "",
            f"[bold]{escape(event.kind)}[/]",
            escape(event.detail),
        )
    return Panel(lines, title="recent events", title_align="left")
