"""`hijack attach` and `hijack detach`: fork a shadow out of a live process tree, end it.

The unit is the tree: PID and all its descendants (hijack.process.tree). One
shadow stands for it, forked from the root (which is stopped for the fork, as
a single process is); every other member's descriptors are then handed to the
shadow while the members run on (pidfd_getfd and SCM_RIGHTS,
hijack.mutator.handover), keyed by member pid. The registry records the root
and its members; detach, forget and recover end them as one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import stat
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hijack
from hijack.errors import HijackError, ProcessGone, ShadowError
from hijack.mutator.handover import hand_over
from hijack.mutator.shadow_fork import become_shadow, discard_copy, fork_shadow_copy
from hijack.mutator.tracee import Tracee
from hijack.process.tree import ProcessTree, read_tree, untakeable, vfork_wait
from hijack.registry import MemberRecord, ProcessRecord, Registry, node_name
from hijack.shadow import control, holder
from hijack.shadow.program import ended_path
from hijack.sys import pidfd, procfs
from hijack.testpoint import reached

SHADOW_START_TIMEOUT = 15.0  # a cold Python start on a loaded machine
SHADOW_STOP_TIMEOUT = 5.0
SYSTEM_PYTHON = "/usr/bin/python3"


@dataclass(frozen=True)
class AttachResult:
    record: ProcessRecord
    pause_ms: float  # how long the root was stopped
    fds: list[dict[str, Any]]  # the root's, as the shadow holds them
    members: tuple[MemberRecord, ...] = ()  # its descendants, attached with it
    member_fds: dict[int, list[dict[str, Any]]] | None = None  # member pid -> as `fds`


def attach(pid: int, registry: Registry) -> AttachResult:
    """Seize `pid`, fork the shadow of its tree, let it run on; record the tree and shadow."""
    _refuse_attached(pid, registry)
    refuse_hijack_itself(pid)
    tree = read_tree(pid)
    refuse_untakeable_tree(tree, registry)
    status = procfs.read_status(pid)
    start_time = procfs.read_stat(pid).starttime
    shadow_dir = registry.directory / "shadows" / str(pid)
    interpreter = shadow_interpreter(status.uid[1])
    control_path = str(shadow_dir / "control.sock")
    end_stale_shadows(control_path)
    _make_shadow_dir(shadow_dir, status.uid[1], status.gid[1])
    log_path = str(shadow_dir / "shadow.log")

    def command(inherited_fds: list[int]) -> list[str]:
        return shadow_command(interpreter, pid, inherited_fds, control_path, log_path)

    copy = 0  # the pid of the target's copy, forked, not yet the shadow
    shadow_pid = 0
    try:
        # The target is stopped only while its copy is forked; the copy becomes
        # the shadow (setsid, descriptor flags, execve) while the target runs.
        with Tracee.seize(pid) as tracee:
            reached("attach-seized")
            copy = fork_shadow_copy(tracee)
            reached("attach-forked")
        forked, copy = copy, 0  # become_shadow ends it itself if it fails
        shadow_pid = become_shadow(
            forked, tracee.syscall_address, command, shadow_environment(registry.directory)
        )
    except BaseException:
        if copy:  # the target's release failed after the fork
            discard_copy(copy)
        # Refused or failed before any shadow ran: leave no empty directory behind.
        # (A shadow that dies later keeps it: its shadow.log says why.) A shadow
        # forked just before a signal came is ended: no one would know of it.
        if shadow_pid:
            _kill(shadow_pid)
        shutil.rmtree(shadow_dir, ignore_errors=True)
        raise
    pause_ms = tracee.pause_ms

    try:
        hello = wait_for_shadow(shadow_pid, control_path)
        reached("attach-shadow-ready")
        members = _hand_members_over(tree, control_path)
        if members:
            hello = control.request(control_path, {"op": "status"})
        record = registry.record_attached(
            pid, start_time, status.name, shadow_pid, control_path, members
        )
    except BaseException as exc:
        _kill(shadow_pid)
        if not isinstance(exc, ShadowError):  # ended by us, not by its own failure: no log to keep
            shutil.rmtree(shadow_dir, ignore_errors=True)
        raise
    member_fds = {int(m["pid"]): list(m["fds"]) for m in hello.get("members", [])}
    return AttachResult(record, pause_ms, list(hello.get("fds", [])), members, member_fds)


def _refuse_attached(pid: int, registry: Registry) -> None:
    """Refuse `pid` if it is attached already, on its own or as a member of a tree."""
    known = registry.find(pid)
    if known is not None and known.state != "gone":
        if known.shadow_pid and _alive(known.shadow_pid):
            raise HijackError(
                f"process {pid} is already attached (shadow {known.shadow_pid})", pid=pid
            )
        registry.forget(pid, "stale record: its shadow is gone")
    root = _tree_root(pid, registry)
    if root is not None:
        raise HijackError(
            f"process {pid} is already attached as a member of the tree of process"
            f" {root.pid} (shadow {root.shadow_pid})",
            pid=pid,
        )


def _tree_root(pid: int, registry: Registry) -> ProcessRecord | None:
    """The record of the tree `pid` was attached in as a member, while its shadow runs."""
    member = registry.member(pid)
    if member is None:
        return None
    root = registry.find(member.root)
    if root is None or not root.shadow_pid or not _alive(root.shadow_pid):
        return None
    if not _runs(pid, member.start_time):
        return None  # that member ended: the pid is another process now
    return root


def refuse_untakeable_tree(tree: ProcessTree, registry: Registry) -> None:
    """Refuse, naming every such member, a tree with a member that cannot be taken (traced
    by another tracer, in a pid namespace of its own, a kernel thread, hijack itself) or
    that is attached on its own already. Nothing is touched before."""
    # The root's own refusals are the seize's (check_attachable), in their own words.
    descendants = tree.members[1:]
    reasons = untakeable(ProcessTree(descendants)) if descendants else []
    if descendants and (waiting := vfork_wait(tree.root.pid, tree.root.comm)):
        reasons.append(waiting)  # (only a process with a child can be waiting for one)
    root_status = procfs.read_status(tree.root.pid)  # the shadow runs with its credentials
    for member in descendants:
        try:
            refuse_hijack_itself(member.pid)
        except HijackError as exc:
            reasons.append(str(exc))
        if root_status.uid[1] and not member.zombie:
            # Its descriptors would be held by a shadow of less privilege, which the
            # root's user may take them from (pidfd_getfd): a setuid child's, say.
            with contextlib.suppress(ProcessGone):
                status = procfs.read_status(member.pid)
                if (status.uid, status.gid) != (root_status.uid, root_status.gid):
                    reasons.append(
                        f"process {member.pid} ({member.comm}) runs with other credentials"
                        f" (uids {'/'.join(map(str, status.uid))}) than its tree's shadow"
                        f" would (uids {'/'.join(map(str, root_status.uid))})"
                    )
        known = registry.find(member.pid)
        if known is not None and known.shadow_pid and _alive(known.shadow_pid):
            reasons.append(
                f"process {member.pid} ({member.comm}) is attached on its own"
                f" (shadow {known.shadow_pid}; `hijack detach {member.pid}` first)"
            )
    if reasons:
        root = tree.root
        raise HijackError(
            f"cannot attach process {root.pid} ({root.comm}) and its descendants: "
            + "; ".join(reasons),
            pid=root.pid,
        )


def _hand_members_over(tree: ProcessTree, control_path: str) -> tuple[MemberRecord, ...]:
    """Give the shadow the descriptors of every member but the root; their records.

    The members run meanwhile: a member that has ended since the tree was read is
    left out (a zombie has no descriptors: recorded, nothing handed over).
    """
    members = []
    for member in tree.members[1:]:
        try:
            start_time = procfs.read_stat(member.pid).starttime
            if not member.zombie:
                hand_over(member.pid, control_path, member=member.pid, hold=False)
        except ProcessGone:
            continue
        except ShadowError:
            if _runs(member.pid, start_time):
                raise
            continue  # it ended while the shadow took it in: the shadow lets it go
        members.append(
            MemberRecord(member.pid, tree.root.pid, member.ppid, start_time, member.comm)
        )
    return tuple(members)


def refuse_hijack_itself(pid: int) -> None:
    """A shadow, a node daemon or a hijack command is never a target: refused by name."""
    try:
        argv = procfs.read_cmdline(pid)
    except HijackError:
        return  # gone, or not ours to read: the seize says so
    role = hijack_role(argv)
    if role is None and pid == os.getpid():
        role = argv[0]  # run some other way (a test's own interpreter)
    if role is None:
        return
    if role == "hijack.shadow":
        target = argv[argv.index("--target") + 1] if "--target" in argv[:-1] else "?"
        raise HijackError(
            f"process {pid} is the shadow of process {target}, part of hijack: not a target",
            pid=pid,
        )
    words = [word for word in argv[argv.index(role) + 1 :] if not word.startswith("-")]
    command = " ".join(["hijack", *words[:2]])
    raise HijackError(f"process {pid} is hijack itself ({command}): not a target", pid=pid)


def hijack_role(argv: list[str]) -> str | None:
    """ "hijack.shadow" for a shadow, the argument that runs hijack for a hijack command.

    Seen on a command line: `python -m hijack.shadow ...`, `python -m hijack ...`,
    and the console script, run directly or by its interpreter.
    """
    run_by_python = bool(argv) and os.path.basename(argv[0]).startswith("python")
    resting = len(argv) > 1 and os.path.basename(argv[0]) == holder.PROGRAM.name
    if resting and argv[1] == holder.ROLE:
        return holder.ROLE  # a shadow at rest (hijack.shadow.holder)
    for index, argument in enumerate(argv[:3]):
        if index and argv[index - 1] == "-m" and argument in ("hijack", "hijack.shadow"):
            return argument
        if os.path.basename(argument) == "hijack" and (index == 0 or run_by_python):
            return argument
    return None


@dataclass(frozen=True)
class Ended:
    """What `detach` or `forget` ended."""

    record: ProcessRecord
    shadow_ended: int | None  # the shadow it ended, if one still ran


def detach(pid: int, registry: Registry) -> Ended:
    """End the shadow of `pid` and forget the process (and the members of its tree);
    refused while something depends on it."""
    record = _root_record(pid, registry, "detach")
    if record.state == "held":
        raise HijackError(
            f"process {pid} is held after a move whose outcome is unknown: its copy may run"
            " elsewhere through this shadow; run `hijack recover` first",
            pid=pid,
        )
    if record.state in ("moved", "moving") and record.shadow_pid and _alive(record.shadow_pid):
        raise HijackError(
            f"process {pid} runs on {record.current_node}: its shadow {record.shadow_pid} relays"
            f" its connections (`hijack forget {pid}` ends both the record and the shadow)",
            pid=pid,
        )
    return _end(record, registry, "detached")


def forget(pid: int, registry: Registry) -> Ended:
    """End the record of `pid` whatever its state, and its shadow if it still runs.

    For a record that cannot be settled otherwise: a moved process whose node
    is gone, a shadow left behind. A migrant's connections through the shadow
    end with it.
    """
    return _end(_root_record(pid, registry, "forget"), registry, "forgotten on request")


def _root_record(pid: int, registry: Registry, verb: str) -> ProcessRecord:
    """The record of `pid`; a member of a tree is refused with the command for its root
    (the tree is detached or forgotten as one)."""
    record = registry.find(pid)
    member = registry.member(pid) if record is None else None
    if member is not None and registry.find(member.root) is not None:
        raise HijackError(
            f"process {pid} was attached as a member of the tree of process {member.root}:"
            f" `hijack {verb} {member.root}` {verb}s the whole tree",
            pid=pid,
        )
    return registry.get(pid)


def clear_ended(registry: Registry) -> list[str]:
    """Remove the records whose process has ended here or whose shadow ended with it
    (`hijack recover`); a line each.

    A shadow still running for a process that ended here is ended too.
    Records a move, a restore or `recover` itself still needs (held,
    moving, checkpointed) are left alone.
    """
    lines = []
    for record in registry.processes():
        if record.state in ("held", "moving", "checkpointed"):
            continue
        if record.state == "attached":
            for member in registry.members(record.pid):
                if not _runs(member.pid, member.start_time):
                    registry.forget_member(member.pid, "it has ended")
                    lines.append(
                        f"process {member.pid} ({member.program}), a member of the tree of"
                        f" {record.pid}: it has ended; record removed"
                    )
        if record.home_node != node_name() and record.state == "running":
            continue  # a migrant: the daemon here releases its home shadow when it ends
        shadow_runs = record.shadow_pid is not None and _alive(record.shadow_pid)
        runs_here = record.state != "moved" and record.current_node == node_name()
        if record.state == "moved" and record.shadow_pid and not shadow_runs:
            why = f"moved to {record.current_node}, its shadow {record.shadow_pid} has ended"
            if record.shadow_control:
                with contextlib.suppress(OSError):
                    why += f" ({ended_path(record.shadow_control).read_text().strip()})"
        elif record.state == "exited" or (runs_here and not _runs(record.pid, record.start_time)):
            why = "it has ended"
            if shadow_runs:
                why += f"; its shadow {record.shadow_pid}, still running, was ended"
        else:
            continue
        _end(record, registry, why)
        lines.append(f"process {record.pid} ({record.program}): {why}; record removed")
    return lines


def _runs(pid: int, start_time: int) -> bool:
    """`pid` runs (not a zombie), and is the process started at `start_time` if known."""
    try:
        stat = procfs.read_stat(pid)
    except HijackError:
        return False
    return stat.state not in ("Z", "X") and (not start_time or stat.starttime == start_time)


def _end(record: ProcessRecord, registry: Registry, reason: str) -> Ended:
    ended = None
    if record.shadow_pid and _alive(record.shadow_pid):
        # Relaying for a process elsewhere, a shadow never drains on its own:
        # no "release", it is ended at once.
        relaying = record.state != "attached"
        stop_shadow(record.shadow_pid, None if relaying else record.shadow_control)
        ended = record.shadow_pid
    shadow_dir = Path(record.shadow_control or "").parent
    if shadow_dir.parent == registry.directory / "shadows":  # never a directory of anyone else
        shutil.rmtree(shadow_dir, ignore_errors=True)
    registry.forget(record.pid, reason)
    return Ended(record, ended)


def end_stale_shadows(control_path: str) -> list[int]:
    """End the shadows an attach killed mid-way (SIGKILL) left with no record; return them.

    Such a shadow follows its target like any other, but nothing knows of it,
    and a new one would take its control socket: it is found by that socket's
    path on its command line.
    """
    ended = []
    for candidate in procfs.list_pids():
        try:
            argv = procfs.read_cmdline(candidate)
        except HijackError:
            continue
        if "hijack.shadow" in argv and control_path in argv and candidate != os.getpid():
            with contextlib.suppress(HijackError, ProcessLookupError):
                stop_shadow(candidate, None)
                ended.append(candidate)
    return ended


def shadow_interpreter(uid: int) -> str:
    """A Python the target's user can execute: ours, or the system's.

    The shadow runs with the target's credentials, and our interpreter may
    live where only root can reach it (a pyenv under /root). The shadow needs
    nothing but the standard library and this package.
    """
    if uid == 0:
        return sys.executable
    for candidate in (sys.executable, SYSTEM_PYTHON):
        if anyone_can_execute(candidate):
            return candidate
    raise ShadowError(
        f"no Python that user {uid} can execute for the shadow ({sys.executable} and"
        f" {SYSTEM_PYTHON} are out of its reach)"
    )


def anyone_can_execute(path: str) -> bool:
    """Whether every directory on the way to `path`, and `path`, is executable by others."""
    real = Path(os.path.realpath(path))
    try:
        if not real.stat().st_mode & stat.S_IXOTH:
            return False
        return all(parent.stat().st_mode & stat.S_IXOTH for parent in real.parents)
    except OSError:
        return False


def shadow_command(
    interpreter: str, pid: int, fds: list[int], control_path: str, log_path: str
) -> list[str]:
    return [
        interpreter,
        "-m",
        "hijack.shadow",
        "--target",
        str(pid),
        "--fds",
        ",".join(map(str, fds)),
        "--control",
        control_path,
        "--log",
        log_path,
    ]


def shadow_environment(state_directory: Path) -> dict[str, str]:
    # The shadow runs our Python on our package, whatever the target's environment.
    package_root = str(Path(hijack.__file__).resolve().parent.parent)
    environment = {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "PYTHONPATH": package_root,
        "PYTHONDONTWRITEBYTECODE": "1",
        "HIJACK_STATE_DIR": str(state_directory),
        "HIJACK_NODE": node_name(),  # it watches its process itself when it is back here
    }
    # HIJACK_SHADOW_REST: when an idle shadow rests as its holder (hijack.shadow.holder);
    # the relays' switches: HIJACK_PUMP_ENCRYPTED (hijack.shadow.pump), HIJACK_OWN_RECORDS
    # (hijack.shadow.tls_records), HIJACK_BUSY_POLL_US (its native pump reads it).
    switches = ("HIJACK_PUMP_ENCRYPTED", "HIJACK_OWN_RECORDS", "HIJACK_BUSY_POLL_US")
    for name in ("HIJACK_SHADOW_REST", *switches):
        value = os.environ.get(name)
        if value is not None:
            environment[name] = value
    return environment


def wait_for_shadow(shadow_pid: int, control_path: str) -> control.Message:
    """Wait until the new shadow answers on its control socket (or dies)."""
    handle = pidfd.pidfd_open(shadow_pid)
    try:
        deadline = time.monotonic() + SHADOW_START_TIMEOUT
        while time.monotonic() < deadline:
            if os.path.exists(control_path):
                try:
                    return control.request(control_path, {"op": "hello"})
                except ShadowError:
                    pass  # bound but not yet listening
            # Sleep on the shadow's pidfd: wakes at once if it dies.
            if pidfd.wait_exit(handle, 0.01):
                raise ShadowError(
                    f"the shadow {shadow_pid} exited during start-up;"
                    f" see {Path(control_path).parent / 'shadow.log'}",
                    pid=shadow_pid,
                )
        raise ShadowError(f"the shadow {shadow_pid} did not start in time", pid=shadow_pid)
    finally:
        os.close(handle)


def stop_shadow(shadow_pid: int, control_path: str | None) -> None:
    """Ask the shadow to end (`release`) over `control_path`, or, if None or unanswered,
    SIGTERM it; SIGKILL it if it has not ended within SHADOW_STOP_TIMEOUT."""
    handle = pidfd.pidfd_open(shadow_pid)
    try:
        released = False
        if control_path:
            with contextlib.suppress(ShadowError):
                control.request(control_path, {"op": "release"})
                released = True
        if not released:
            with contextlib.suppress(ProcessLookupError):  # ended meanwhile
                os.kill(shadow_pid, signal.SIGTERM)
        if not pidfd.wait_exit(handle, SHADOW_STOP_TIMEOUT):
            os.kill(shadow_pid, signal.SIGKILL)
            pidfd.wait_exit(handle, SHADOW_STOP_TIMEOUT)
    finally:
        os.close(handle)


def _make_shadow_dir(path: Path, uid: int, gid: int) -> None:
    # The shadow runs as the target's user and binds its socket here.
    path.mkdir(parents=True, exist_ok=True)
    os.chown(path, uid, gid)
    os.chmod(path, 0o700)


def _alive(pid: int) -> bool:
    try:
        return not procfs.read_status(pid).state.startswith(("Z", "X"))
    except HijackError:
        return False


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
