"""Everything the CLI shows, rendered with rich. Tests render into a captured Console."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TransferSpeedColumn,
)
from rich.table import Table
from rich.tree import Tree as RichTree

from hijack.check import Finding
from hijack.image import records as rec
from hijack.image.summary import (
    ImageSummary,
    TreeSummary,
    summary_to_json,
    tree_summary_to_json,
)
from hijack.mutator.attach import AttachResult, Ended
from hijack.mutator.dump import DumpResult
from hijack.node.drain import Candidate, Outcome, ProgressFor
from hijack.node.move import MemberMoved, MoveResult
from hijack.objects import sysv
from hijack.process import settings as process_settings
from hijack.process import timers as process_timers
from hijack.restore.restorer import RestoreResult
from hijack.restore.tree import TreeRestoreResult
from hijack.timing import describe as describe_laps

if TYPE_CHECKING:  # lief, which hijack.core loads, is slow to import
    from hijack.core import CoreResult


def attach_result(console: Console, result: AttachResult, *, as_json: bool = False) -> None:
    record = result.record
    member_fds = result.member_fds or {}
    if as_json:
        console.print_json(
            json.dumps(
                {
                    "pid": record.pid,
                    "program": record.program,
                    "shadow_pid": record.shadow_pid,
                    "control": record.shadow_control,
                    "pause_ms": round(result.pause_ms, 3),
                    "fds": result.fds,
                    "members": [
                        {
                            "pid": member.pid,
                            "parent": member.parent,
                            "program": member.program,
                            "fds": member_fds.get(member.pid, []),
                        }
                        for member in result.members
                    ],
                }
            )
        )
        return
    held = len(result.fds) + sum(len(fds) for fds in member_fds.values())
    tree, copies = "", ""
    if result.members:
        tree = f" and {len(result.members)} descendants"
        own = {fd["own_fd"] for fds in [result.fds, *member_fds.values()] for fd in fds}
        copies = f" of the tree in {len(own)} of its own"  # a shared description is kept once
    console.print(
        f"attached process [bold]{record.pid}[/] ({escape(record.program)}){tree}: "
        f"shadow [bold]{record.shadow_pid}[/] holds {held} descriptors{copies} "
        f"(target paused {result.pause_ms:.1f} ms)"
    )
    table = Table("fd", "kind", "open file description", title="held by the shadow")
    if result.members:
        table = Table("pid", "fd", "kind", "open file description", title="held by the shadow")
    for pid, fds in [(record.pid, result.fds), *member_fds.items()]:
        for fd in fds:
            cells = [str(fd["fd"]), str(fd["kind"]), escape(str(fd["target"]))]
            table.add_row(*([str(pid)] if result.members else []), *cells)
    console.print(table)


def ended(console: Console, verb: str, result: Ended) -> None:
    """`hijack detach` and `hijack forget`: what was ended."""
    record = result.record
    if record.shadow_pid is None:
        shadow = "it had no shadow"
    elif result.shadow_ended is None:
        shadow = f"its shadow {record.shadow_pid} had ended already"
    else:
        shadow = f"shadow {result.shadow_ended} ended"
        if record.state not in ("attached", "checkpointed"):
            where = record.current_node
            shadow += f" (the connections it relayed to the process on {escape(where)} with it)"
    console.print(
        f"{verb} process [bold]{record.pid}[/] ({escape(record.program)}, {record.state});"
        f" {shadow}",
        highlight=False,
    )
    if record.state == "held":
        console.print(
            f"  process {record.pid} stays stopped as the move left it: `kill -CONT {record.pid}`"
            " only if nothing of it runs elsewhere",
            highlight=False,
        )


def human_size(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def dump_result(
    console: Console, result: DumpResult, output: str, *, killed: bool, copies: bool = False
) -> None:
    """`copies`: the tree was killed with --skip-unsupported: what its members share that its
    restore will make once for each (result.copied) is said, one line each."""
    where = "stdout" if output == "-" else output
    fate = "killed" if killed else "left running"
    what = f"process [bold]{result.pid}[/]"
    if result.members > 1:
        what = f"the tree of process [bold]{result.pid}[/] ({result.members} processes,"
        what += f" {result.threads} threads)"
    else:
        what += f" ({result.threads} thread{'s' if result.threads != 1 else ''})"
    shared = ""
    if result.pages_referenced:
        shared = (
            f" ({result.pages_referenced} more shared copy-on-write by members, stored once:"
            f" {human_size(result.pages_referenced * rec.PAGE_SIZE)} saved)"
        )
    console.print(
        f"dumped {what} to {where}: {human_size(result.image_bytes)}, "
        f"{result.pages_stored} pages stored{shared}, frozen {result.frozen_ms:.1f} ms; {fate}"
    )
    if result.rounds:
        console.print(
            f"  in {result.rounds} pre-copy round{'s' if result.rounds != 1 else ''} while it"
            " ran, then the pages written since at the freeze (stopped"
            f" {result.tracking_pause_ms:.1f} ms before the rounds, to start tracking its writes)"
        )
    if copies:
        for line in result.copied:
            console.print(f"  not shared after a restore (--skip-unsupported): {escape(line)}")


def restore_result(console: Console, result: RestoreResult) -> None:
    same = "its old pid" if result.pid == result.old_pid else f"was {result.old_pid}"
    line = (
        f"restored process [bold]{result.pid}[/] ({escape(result.program)}, {same}, "
        f"{result.threads} thread{'s' if result.threads != 1 else ''})"
    )
    if result.pid != result.old_pid:
        holder = result.old_pid_holder
        line += f"; its old pid {result.old_pid} " + (
            f"is held by {escape(holder)}" if holder else "was in use"
        )
    console.print(line)
    for dropped in result.dropped:
        console.print(f"  dropped {escape(dropped)}")


def tree_restore_result(console: Console, result: TreeRestoreResult) -> None:
    count = len(result.members) + len(result.zombies)
    console.print(f"restored the tree of process [bold]{result.root.pid}[/] ({count} processes):")
    for member in result.members:
        restore_result(console, member)
    for old, new in result.zombies:
        same = "its old pid" if new == old else f"was {old}"
        console.print(f"restored zombie [bold]{new}[/] ({same}), for its parent to reap")


def core_result(console: Console, result: CoreResult, output: str) -> None:
    console.print(
        f"core of process [bold]{result.pid}[/] ({result.threads} thread"
        f"{'s' if result.threads != 1 else ''}) written to {escape(output)}:"
        f" {human_size(result.core_bytes)} with holes, {result.loads} memory segments,"
        f" {result.mapped_files} file mappings; open it with gdb PROGRAM {escape(output)}"
    )


def tree_summary(console: Console, summary: TreeSummary, *, as_json: bool = False) -> None:
    """A tree stream: the tree drawn, each member with its one-line summary."""
    if as_json:
        console.print_json(json.dumps(tree_summary_to_json(summary)))
        return
    nodes: dict[int, RichTree] = {}
    top: RichTree | None = None
    for member in summary.tree.members:
        label = _member_line(member, summary.images.get(member.pid))
        parent = nodes.get(member.ppid)
        node = RichTree(label) if parent is None else parent.add(label)
        nodes[member.pid] = node
        top = top or node
    assert top is not None  # a Tree has members
    console.print(top)
    images = summary.images.values()
    referenced = summary.pages_referenced
    console.print(
        f"tree of {len(summary.tree.members)} processes: image {human_size(summary.image_bytes)},"
        f" {sum(image.pages.stored for image in images)} pages stored; {referenced} pages"
        f" ({human_size(referenced * rec.PAGE_SIZE)}) shared copy-on-write by members stored"
        " once"
    )
    for link in summary.tree.shared:
        console.print(
            f"  fd {link.fd} of pid {link.pid} is fd {link.holder_fd} of pid {link.holder_pid}"
            " (one open file description)"
        )
    for context in summary.tree.contexts:
        shares = " and ".join(
            what
            for flag, what in (
                (rec.CloneFlags.VM, "its memory"),
                (rec.CloneFlags.FILES, "its descriptor table"),
                (rec.CloneFlags.FS, "its root, cwd and umask"),
                (rec.CloneFlags.SIGHAND, "its signal handlers"),
            )
            if flag in context.flags
        )
        console.print(f"  pid {context.pid} shares {shares} with its parent")


def _member_line(member: rec.TreeMember, image: ImageSummary | None) -> str:
    line = f"[bold]{escape(member.comm)}[/] pid {member.pid} (pgid {member.pgid}, sid {member.sid})"
    if member.state is rec.MemberState.ZOMBIE:
        return f"{line} zombie, wait status {member.exit_code:#x}"
    if member.state is rec.MemberState.STOPPED:
        line += " stopped"
    if image is not None:
        threads = len(image.threads)
        line += (
            f": {threads} thread{'s' if threads != 1 else ''},"
            f" {len(image.descriptors)} descriptors,"
            f" {human_size(image.image_bytes)} image, {image.pages.stored} pages stored"
        )
        if image.pages.referenced:
            line += f", {image.pages.referenced} referred to (stored by a member before)"
    return line


def image_summary(console: Console, summary: ImageSummary, *, as_json: bool = False) -> None:
    if as_json:
        console.print_json(json.dumps(summary_to_json(summary)))
        return
    process = summary.process
    console.print(
        f"[bold]{escape(process.comm)}[/] pid {process.pid} (ppid {process.ppid},"
        f" pgid {process.pgid}, sid {process.sid}) uid {process.uid} gid {process.gid}"
        f" — dumped on {escape(process.node)}"
    )
    console.print(f"  exe {escape(process.exe)}")
    console.print(f"  argv {escape(' '.join(process.argv))}")
    console.print(f"  cwd {escape(process.cwd)}   root {escape(process.root)}")
    if process.options:
        console.print(f"  options {', '.join(process.options)}")

    threads = Table(title="threads")
    for heading in ("tid", "name", "rip", "rsp", "blocked", "pending"):
        threads.add_column(heading, no_wrap=True)
    own = any(thread.own_credentials for thread in summary.threads)
    if own:
        threads.add_column("credentials (where its own)", overflow="fold")
    for thread in summary.threads:
        threads.add_row(
            str(thread.tid),
            escape(thread.comm),
            f"{thread.rip:#x}",
            f"{thread.rsp:#x}",
            f"{thread.sigmask:#x}",
            str(thread.pending),
            *((thread.own_credentials,) if own else ()),
        )
    console.print(threads)

    memory = Table(title="memory")
    memory.add_column("start", no_wrap=True, min_width=14)
    for heading in ("perms", "size", "stored", "contents"):
        memory.add_column(heading, no_wrap=True)
    memory.add_column("path", overflow="fold", min_width=20)
    for row in summary.memory:
        memory.add_row(
            f"{row.start:#x}",
            row.perms,
            human_size(row.size),
            human_size(row.stored_bytes),
            row.contents.lower(),
            escape(row.path),
        )
    console.print(memory)

    files = Table("fd", "kind", "flags", title="descriptors")
    files.add_column("details", overflow="fold", min_width=20)
    first_of: dict[int, int] = {}  # description id -> its lowest descriptor
    for descriptor, details in zip(summary.descriptors, summary.details, strict=True):
        first = first_of.setdefault(descriptor.description_id, descriptor.fd)
        shared = f" (the open file of fd {first})" if first != descriptor.fd else ""
        files.add_row(
            str(descriptor.fd),
            descriptor.kind.name.lower(),
            f"{descriptor.flags:#o}",
            escape(details + shared),
        )
    console.print(files)
    held = sysv.describe_held(summary.files)
    if held:
        ipc = Table("System V IPC object", title="held by the process")
        for line in held:
            ipc.add_row(escape(line))
        console.print(ipc)

    console.print("process settings and timers")
    for line in process_settings.describe(summary.settings) + process_timers.describe(
        summary.timers
    ):
        console.print(f"  {escape(line)}", highlight=False)

    pages = summary.pages
    console.print(
        f"image {human_size(summary.image_bytes)} (CRF v{summary.version}):"
        f" {pages.stored} pages stored;"
        f" left out: {pages.zero} zero, {pages.untouched} never touched,"
        f" {pages.file} mapped from files"
    )
    if summary.rounds:
        each = ", ".join(str(totals.pages) for totals in summary.rounds)
        console.print(
            f"  after {len(summary.rounds)} pre-copy round{'s' if len(summary.rounds) != 1 else ''}"
            f" written while the process ran (pages {each}); the pages above are those"
            " written since, at the freeze, and override the rounds'"
        )


def transfer_progress(console: Console, *what: TextColumn) -> Progress:
    """The bars of a move and of a drain: `what` moves, then its phase and the bytes sent."""
    return Progress(
        *what,
        TextColumn("{task.fields[phase]:<10}"),
        BarColumn(),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )


@contextmanager
def move_progress(
    console: Console, pid: int, destination: str, expected: int | None = None
) -> Iterator[Callable[[str, int], None]]:
    """A live progress bar for a move: the phase, and the bytes sent of about `expected`.

    Pre-copy sends pages written meanwhile again: the total grows with them.
    """
    with transfer_progress(
        console, TextColumn("[bold]move {task.fields[pid]} -> {task.fields[destination]}")
    ) as progress:
        task = progress.add_task(
            "move", total=expected, pid=pid, destination=escape(destination), phase="preparing"
        )

        def report(phase: str, sent: int) -> None:
            total = max(sent, expected) if expected is not None else None
            progress.update(task, completed=sent, total=total, phase=phase)

        yield report


@contextmanager
def drain_progress(console: Console, processes: list[Candidate]) -> Iterator[ProgressFor]:
    """One live view for a whole drain: a bar per process, each try's destination and phase."""
    with transfer_progress(
        console,
        TextColumn("[bold]{task.fields[pid]:>7} {task.fields[program]:<15.15}"),
        TextColumn("-> {task.fields[destination]:<12.12}"),
    ) as progress:
        tasks = {
            candidate.pid: progress.add_task(
                "drain",
                total=candidate.size or None,
                start=False,
                pid=candidate.pid,
                program=escape(candidate.program),
                destination="",
                phase="waiting",
            )
            for candidate in processes
        }
        expected = {candidate.pid: candidate.size for candidate in processes}

        def progress_for(pid: int, destination: str) -> Callable[[str, int], None]:
            task = tasks[pid]
            progress.start_task(task)
            # reset() replaces every field: all of them again.
            progress.reset(
                task,
                pid=pid,
                program=progress.tasks[task].fields["program"],
                destination=escape(destination),
                phase="preparing",
            )

            def report(phase: str, sent: int) -> None:
                total = max(sent, expected[pid]) or None
                progress.update(task, completed=sent, total=total, phase=phase)

            return report

        yield progress_for


def drain_summary(console: Console, outcomes: list[Outcome]) -> None:
    """The table a drain ends with: where each process went, or why it stayed."""
    table = Table(
        "pid", "program", "now on", "new pid", "frozen", "sent, or why it stayed", title="drain"
    )
    for outcome in outcomes:
        result = outcome.result
        if result is None:
            table.add_row(
                str(outcome.pid),
                escape(outcome.program),
                "[bold red]stayed[/]",
                "",
                "",
                escape(outcome.error),
            )
        else:
            table.add_row(
                str(outcome.pid),
                escape(outcome.program),
                escape(result.destination),
                str(result.new_pid),
                f"{result.freeze_ms:.1f} ms",
                human_size(result.bytes_sent),
            )
    console.print(table)
    for outcome in outcomes:  # one plain line each, for scripts and logs
        if outcome.result is not None:
            console.print(
                f"drained process {outcome.pid} to {escape(outcome.result.destination)}:"
                f" it runs there as {outcome.result.new_pid}",
                highlight=False,
            )
        else:
            console.print(
                f"process {outcome.pid} stayed: {escape(outcome.error)}",
                highlight=False,
                soft_wrap=True,
            )


def _pids_kept(members: Sequence[MemberMoved]) -> str:
    """Whether a moved tree's members kept their pids there: a destination that shares
    the source's pids (one kernel) has them all taken, another machine none."""
    restored = [member for member in members if member.new_pid]  # zombies: none of their own
    kept = sum(member.new_pid == member.pid for member in restored)
    if kept == len(restored):
        return "each under its old pid"
    if not kept:
        return "under new pids (the old ones are taken there)"
    return f"{kept} of {len(restored)} under their old pids (the others are taken there)"


def move_result(console: Console, result: MoveResult, *, timing: bool = False) -> None:
    console.print(
        f"moved process [bold]{result.pid}[/] to {escape(result.destination)}: it runs there as"
        f" [bold]{result.new_pid}[/]; frozen {result.freeze_ms:.1f} ms,"
        f" {human_size(result.bytes_sent)} sent"
        + (
            f" ({result.rounds} pre-copy rounds, {human_size(result.frozen_bytes)} while frozen;"
            f" stopped {result.tracking_pause_ms:.1f} ms before, to start tracking"
            + (
                " and"
                + (" once" if result.layout_stops == 1 else f" {result.layout_stops} times")
                + " to look at a changed layout"
                if result.layout_stops
                else ""
            )
            + ")"
            if result.rounds
            else ""
        )
        + (
            f"; post-copy: {human_size(result.postcopy_bytes)} served after the start,"
            f" in {result.postcopy_ms:.0f} ms"
            if result.postcopy_bytes
            else ""
        )
        + (f"; {result.total_ms / 1000:.2f} s in all" if result.total_ms else "")
    )
    if result.packet_relays:
        count = result.packet_relays
        connections = f"{count} connection{'s' if count > 1 else ''}"
        console.print(
            f"{connections} relayed by packets through its home node"
            if result.relayed_at_home is None
            else f"{connections} relayed by packets: its own again, relayed no more",
            highlight=False,
        )
    if result.members:
        members = result.members
        console.print(
            f"the tree moved as one: {len(members)} processes frozen together"
            f" {result.freeze_ms:.1f} ms, image {human_size(sum(m.image_bytes for m in members))},"
            f" {_pids_kept(members)}",
            highlight=False,
        )
        for member in members:
            now = f"as {member.new_pid}" if member.new_pid else "(a zombie: no image)"
            console.print(
                f"  {member.pid} {escape(member.program)} {now}: image"
                f" {human_size(member.image_bytes)}, {member.image_ms:.1f} ms of the freeze",
                highlight=False,
            )
    if result.relayed_at_home == "":
        console.print("home again: it holds its own sockets and pipes, nothing is relayed")
    elif result.relayed_at_home is not None:
        console.print(
            f"home again, relayed by its shadow still: {escape(result.relayed_at_home)}",
            highlight=False,
            soft_wrap=True,
        )
    if timing and result.timing is not None:
        spent = result.timing
        # One line each, never wrapped: a bench reads them.
        console.print(f"move took {result.total_ms:.0f} ms in all", highlight=False)
        console.print(
            f"freeze here (ms): {describe_laps(spent.here)};"
            f" {spent.injected_here} system calls injected",
            soft_wrap=True,
            highlight=False,
        )
        console.print(
            f"freeze at {escape(result.destination)} (ms): {describe_laps(spent.there)};"
            f" {spent.injected_there} system calls injected",
            soft_wrap=True,
            highlight=False,
        )


def check_findings(console: Console, findings: list[Finding], *, as_json: bool = False) -> None:
    """`hijack check`: one line per feature, then what a missing one costs."""
    if as_json:
        console.print_json(json.dumps([finding.__dict__ for finding in findings]))
        return
    width = max(len(finding.name) for finding in findings)
    for finding in findings:
        if finding.ok:
            mark = "[green]ok     [/]"
        elif finding.required:
            mark = "[bold red]MISSING[/]"
        else:
            mark = "[yellow]limited[/]"
        line = f"{mark} {escape(finding.name.ljust(width))}  {escape(finding.detail)}"
        if not finding.ok:
            line += f" [dim]— without it: {escape(finding.without)}[/]"
        console.print(line, highlight=False, soft_wrap=True)
