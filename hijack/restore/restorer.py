"""`hijack restore`: rebuild a process from a CRF image stream and let it run.

The image is consumed strictly front to back, as it arrives (a file, stdin, or
a socket from another node). Everything that can refuse the image — a file
that changed, a descriptor that cannot be reopened — is checked before the
stub exists. The stub is built while the image streams in and is killed if
anything fails before the END record has been checked: a process is started
only from a complete, intact image.

Steps (hijack.restore.* each own one):
    header, credentials, limits, mm, segments, files   -> checks; spawn the stub
    address space (empty, kernel mappings, scratch, segments); pages as they come
    threads (clone3 with their old tids when free), signal state, cwd, END
    then: descriptors, mm map, signal actions, limits, cwd, ids; per thread
    robust list, clear-child-tid, altstack, credentials, rseq; pending signals;
    masks, xstate, registers last; detach: it runs.
"""

from __future__ import annotations

import errno
import functools
import itertools
import os
import stat
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, BinaryIO, TypeVar

from hijack.errors import HijackError, ImageError, RestoreError, ShadowError, Unsupported
from hijack.image import records as rec
from hijack.image.codec import next_is_round, read_stream
from hijack.image.files import ImageFiles
from hijack.mutator.tracee import (
    ThreadState,
    TracedThread,
    find_syscall_instruction,
    resume_registers,
)
from hijack.objects import sysv, unix
from hijack.objects.base import RestoreContext, describe_fd
from hijack.objects.ghost import deleted_cwd, enter_deleted_cwd
from hijack.objects.locks import restore_locks
from hijack.objects.memfd import map_objects, mapped_objects, seal_memfds
from hijack.objects.pty import controlling_slave
from hijack.objects.terminal import set_up_terminals
from hijack.process import aio, credentials, seccomp, settings, timers
from hijack.registry import Registry
from hijack.restore.address_space import AddressSpace, Inherited
from hijack.restore.files import restore_files
from hijack.restore.plan import FilePlan, ShadowHoldings, plan_files
from hijack.restore.precopy import PR_SET_MM, PR_SET_MM_MAP, PRCTL_MM_MAP, Prebuilt
from hijack.restore.remote import Stub
from hijack.restore.shared import TreeShared
from hijack.restore.tree_rounds import MemberPages, refuse_without
from hijack.shadow import control
from hijack.sys import memory, pidfd, procfs
from hijack.sys import ptrace as pt
from hijack.sys.process import mount_namespace_of, open_mount_namespace
from hijack.sys.stub import kill_stub, spawn_stub
from hijack.timing import Laps

if TYPE_CHECKING:  # (imported for its type only: it imports the dump, which imports us)
    from hijack.restore.postcopy import LazyPages

R = TypeVar("R")
# A daemon's policy: the image's header, the process's credentials then each of its
# threads' own (THREAD_CREDENTIALS), its segments; refuses by raising.
Admit = Callable[[rec.ImageHeader, tuple[rec.Credentials, ...], rec.Segments], None]

SIGKILL, SIGSTOP = 9, 19
SIG_DFL, SIG_IGN = 0, 1
PR_SET_NAME = 15
TIOCSCTTY = 0x540E
CLONE_THREAD_FLAGS = (
    0x100  # CLONE_VM
    | 0x200  # CLONE_FS
    | 0x400  # CLONE_FILES
    | 0x800  # CLONE_SIGHAND
    | 0x10000  # CLONE_THREAD
    | 0x40000  # CLONE_SYSVSEM
)
CLONE_ARGS = struct.Struct("<11Q")
# glibc 2.36 keeps the thread id in struct pthread at fs_base + 0x2d0
# (KERNEL-NOTES); robust and PI mutexes compare it with the kernel's tid.
GLIBC_TID_OFFSET = 0x2D0
EEXIST = 17
O_RDONLY, O_CLOEXEC = 0, 0o2000000
AT_FDCWD = -100


@dataclass(frozen=True)
class RestoreResult:
    pid: int
    old_pid: int
    program: str
    threads: int
    dropped: tuple[str, ...]  # descriptors left out with --skip-unsupported
    # Who held old_pid when it could not be had again, or "" (had, or nobody by now).
    old_pid_holder: str = ""


@dataclass
class _Image:
    """What the image said before the stub could be finished."""

    header: rec.ImageHeader
    credentials: rec.Credentials
    thread_credentials: dict[int, rec.Credentials]  # the threads with their own, by tid
    rlimits: rec.Rlimits
    mm: rec.MemoryStructure
    segments: rec.Segments
    files: ImageFiles
    threads: list[rec.Thread] = field(default_factory=list)
    signals: rec.SignalState | None = None
    cwd: rec.Cwd | None = None
    settings: rec.ProcessSettings | None = None
    timers: rec.Timers | None = None

    def all_credentials(self) -> tuple[rec.Credentials, ...]:
        """The process's credentials, then each of its threads' own: what admit judges."""
        return (self.credentials, *self.thread_credentials.values())

    def credentials_of(self, tid: int) -> rec.Credentials:
        """Thread `tid`'s credentials (the image's tid)."""
        return self.thread_credentials.get(tid, self.credentials)

    def mapped(self) -> dict[int, int]:
        """The segments an object holds: start -> object id (made after the descriptors)."""
        return mapped_objects(self.segments.segments, self.files)


def restore(
    stream: BinaryIO,
    *,
    skip_unsupported: bool = False,
    registry: Registry | None = None,
    provided: dict[int, int] | None = None,
    before_start: Callable[[int], None] | None = None,
    admit: Admit | None = None,
    prebuilt: Prebuilt | None = None,
    mount_namespace: int | None = None,
    take_locks: bool = True,
    laps: Laps | None = None,
    records: Iterator[rec.Record] | None = None,
    lazy: Callable[[], LazyPages | None] | None = None,
    snapshot: bool = False,
) -> RestoreResult:
    """Rebuild the process of the image in `stream` and let it run.

    With a `registry`, a process whose shadow on this node holds its
    descriptors (it was attached, then dumped with --kill) gets those very
    descriptors back — sockets included — and the shadow follows it again.
    `provided` maps descriptor numbers of the image to descriptors of ours the
    process gets instead (a move's relays; they stay ours to close).
    `before_start(pid)` runs once the process is complete but still stopped
    (a move's two phases); if it raises, the process is killed, never started.
    `admit(header, credentials, segments)` runs once the image has described
    the process and before anything is made for it (a node daemon's policy);
    it refuses by raising. `credentials`: the process's, then those of each
    thread that has its own.
    `prebuilt` is the stub a move's pre-copy rounds built: the image is its
    final one (docs/crf.md §7a) and is restored into that stub.
    `mount_namespace`: a descriptor of the mount namespace to build the
    process in (hijack.node.mounts), else the restorer's own.
    `take_locks` False (a move) leaves the image's file locks and leases untaken:
    the home shadow keeps the open files, and with them their flock, OFD locks
    and leases, and the original holds its POSIX locks until the commit.
    `laps` (a move's, hijack.timing) gets a lap at the end of each step, and
    the count of system calls injected.
    `records`: the image's records, read from `stream` by a caller that looked at
    the first already (a tree's image is restored by hijack.restore.tree).
    `lazy` (a post-copy move, with `prebuilt`) is asked once the image is in for
    the pages left out of it; they are made to arrive on first touch
    (hijack.restore.postcopy) before anything else is done in the process.
    `snapshot` (with `prebuilt`): the rounds came from a snapshot's file (restore_rounds),
    not a move: its SysV objects are made, the process is recorded in `registry`.
    """
    laps = laps or Laps()
    records = read_stream(stream, scattered=True) if records is None else records
    first = next(records)
    if isinstance(first, rec.Tree):
        raise Unsupported(
            f"the image is of a tree of {len(first.members)} processes (process"
            f" {first.members[0].pid} and its descendants): only `hijack restore` restores a"
            " tree; moving one is not implemented yet"
        )
    records = itertools.chain([first], records)
    image = read_head(records)
    if admit is not None:
        admit(image.header, image.all_credentials(), image.segments)
    for segment in image.segments.segments:
        if segment.contents is rec.ContentsKind.PRECOPIED and prebuilt is None:
            raise ImageError(
                f"segment {segment.start:#x}-{segment.end:#x} is PRECOPIED: the image is the"
                " last part of a move with pre-copy and cannot be restored alone"
            )
    holdings = shadow_holdings(registry, image.header.pid) if registry and not provided else None
    plan = plan_files(
        image.segments.segments,
        image.files,
        skip_unsupported=skip_unsupported,
        holdings=holdings,
        provided=frozenset(provided or {}),
    )
    if prebuilt is not None and snapshot:
        # A snapshot's file with rounds (restore_rounds): what a move's stub is never given.
        if holdings is not None:
            raise Unsupported(
                f"process {image.header.pid}'s shadow holds its descriptors (dumped with"
                " --kill since): restore that image, not this snapshot"
            )
        ipc = sysv.prepare(image.files, image.segments.segments)
        try:
            result = _restore_prebuilt(
                records, image, plan, prebuilt, {}, before_start, take_locks, laps, lazy
            )
        except BaseException:
            ipc.undo()
            raise
        if registry is not None:
            _record(registry, image.header, result.pid, None)
        return result
    if prebuilt is not None:
        return _restore_prebuilt(
            records, image, plan, prebuilt, provided or {}, before_start, take_locks, laps, lazy
        )
    # SysV objects first: a refusal (an id taken by another object) comes before the stub.
    ipc = sysv.prepare(image.files, image.segments.segments)
    try:
        inherited = _take_from_shadow(holdings, plan) if holdings else {}
        for number, fd in (provided or {}).items():
            inherited[number] = os.dup(fd)
            os.set_inheritable(inherited[number], True)
        # A process in a mount namespace of its own: its shadow, forked from it, lives there.
        entered = _shadow_namespace(holdings) if holdings and mount_namespace is None else None
        try:
            pid = spawn_stub(image.header.pid, mount_namespace if entered is None else entered)
        finally:
            for fd in inherited.values():
                os.close(fd)  # the stub has its own copies now
            if entered is not None:
                os.close(entered)
    except BaseException:
        ipc.undo()
        raise
    space: AddressSpace | None = None
    try:
        stub = Stub(pid, find_syscall_instruction(pid))
        space = AddressSpace(stub, image.segments.segments, ipc.segments, frozenset(ipc.kept))
        space.build(later=frozenset(image.mapped()))
        ipc.after_attach()
        laps.lap("layout")
        _consume_rest(records, image, space)
        laps.lap("pages")
        _finish(stub, space, image, plan, inherited, frozenset(provided or {}), take_locks)
        laps.lap("finish")
        laps.injected = stub.tracee.injected
        if before_start is not None:
            before_start(pid)
        start(stub)
        laps.lap("start")
    except BaseException:
        kill_stub(pid)
        ipc.undo()
        raise
    finally:
        if space is not None:
            space.close()
    if registry is not None:
        _record(registry, image.header, pid, holdings)
    return _result(pid, image, plan)


def restore_rounds(
    stream: BinaryIO, *, skip_unsupported: bool = False, registry: Registry | None = None
) -> RestoreResult:
    """`hijack restore` of a snapshot's file made of rounds (docs/crf.md §7a, "In a file"):
    each round built into a stub as a move's destination builds it, later pages over
    earlier ones, then the final IMAGE restored into that stub."""
    prebuilt = Prebuilt()
    try:
        stream, is_round = next_is_round(stream)
        while is_round:
            prebuilt.receive_round(stream)
            stream, is_round = next_is_round(stream)
        return restore(
            stream,
            skip_unsupported=skip_unsupported,
            registry=registry,
            prebuilt=prebuilt,
            snapshot=True,
        )
    finally:
        prebuilt.discard()


def read_head(records: Iterator[rec.Record]) -> _Image:
    """The image's records up to its objects: what a restore checks before it builds."""
    header = _expect(records, rec.ImageHeader)
    credentials = _expect(records, rec.Credentials)
    thread_credentials: dict[int, rec.Credentials] = {}
    following = next(records, None)
    while isinstance(following, rec.ThreadCredentials):
        thread_credentials[following.tid] = following.credentials
        following = next(records, None)
    if following is None:
        raise ImageError("image ends before its Rlimits record")
    if not isinstance(following, rec.Rlimits):
        raise ImageError(f"expected Rlimits, found {type(following).__name__}")
    return _Image(
        header=header,
        credentials=credentials,
        thread_credentials=thread_credentials,
        rlimits=following,
        mm=_expect(records, rec.MemoryStructure),
        segments=_expect(records, rec.Segments),
        files=_expect_files(records),
    )


@dataclass(frozen=True)
class Rebuilt:
    """A member of a tree rebuilt into its stub, still stopped (hijack.restore.tree)."""

    result: RestoreResult
    header: rec.ImageHeader
    holdings: ShadowHoldings | None
    pending: frozenset[int]  # the signals the image has pending, process-wide or in a thread


@dataclass
class MemberMemory:
    """A tree's member whose memory is rebuilt into its stub (build_member_memory), its
    image read to its END; the rest (descriptors, threads, the process's state) is
    finish_member's, once the tree's stubs are all forked (they must not inherit it)."""

    stub: Stub
    image: _Image
    space: AddressSpace
    ipc: sysv.Prepared
    parents_memory: bool = False  # shares its parent's (CLONE_VM): nothing of the mm is its

    def abandon(self) -> None:
        """The restore failed before finish_member: undo what is ours (the stub is killed)."""
        self.space.close()
        self.ipc.undo()


def build_member_memory(
    stub: Stub,
    records: Iterator[rec.Record],
    shared: TreeShared,
    *,
    admit: Admit | None = None,
    rounds: MemberPages | None = None,
    space: AddressSpace | None = None,
    inherited: Inherited | None = None,
    laps: Laps | None = None,
    parents_memory: bool = False,
) -> MemberMemory:
    """Read the image `records` (up to its END) of a tree's member and rebuild its address
    space into `stub`: layout and pages; finish_member does the rest.

    `admit` is restore()'s, for this member (a tree's move). `rounds`: the member's pages
    a tree's pre-copy sent (hijack.restore.tree_rounds), written where the image's
    segments are PRECOPIED. `space`: the stub's address space as the rounds built it
    before the freeze (hijack.restore.tree.prebuild_tree, which wrote `rounds` in
    already): turned into the image's layout, PRECOPIED segments kept, as a single
    process's pre-copied stub. `inherited`: the stub was forked from its parent's, whose
    memory was built: what the parent's private segments hold is kept, copy-on-write
    (hijack.restore.address_space). `laps` (a move's) gets the steps' laps, added up
    over the members. `parents_memory`: the stub shares its parent's memory (CLONE_VM),
    built already: nothing is built, the image's records are only read (it has no pages).
    """
    laps = laps or Laps()
    image = read_head(records)
    if parents_memory:
        shared.begin(image.header.pid, stub.pid, image.files)
        # The mm's objects (layout, SysV attachments, pages) are the parent's: its stub
        # keeps the scratch area _fork_children gave it, apart from its parent's.
        space = AddressSpace(stub, image.segments.segments)
        try:
            _consume_rest(records, image, space, shared.stub_of, pages=False)
        except BaseException:
            space.close()
            raise
        return MemberMemory(stub, image, space, sysv.Prepared(), parents_memory=True)
    if admit is not None:
        admit(image.header, image.all_credentials(), image.segments)
    if rounds is None and space is None:
        refuse_without(image.segments.segments, image.header.pid)
    shared.begin(image.header.pid, stub.pid, image.files)
    ipc = sysv.prepare(image.files, image.segments.segments)
    try:
        prebuilt = space is not None
        if space is None:
            space = AddressSpace(stub, image.segments.segments, ipc.segments, frozenset(ipc.kept))
        try:
            later = frozenset(image.mapped())
            if prebuilt:
                space.adopt_final(image.segments.segments, later=later)
            else:
                space.build(later=later, inherited=inherited)
                if rounds is not None:
                    rounds.apply(space, image.segments.segments)
            ipc.after_attach()
            laps.lap("layout")
            _consume_rest(records, image, space, shared.stub_of)
            space.forget_unwritten()
            laps.lap("pages")
        except BaseException:
            space.close()
            raise
    except BaseException:
        ipc.undo()
        raise
    return MemberMemory(stub, image, space, ipc)


def finish_member(
    memory: MemberMemory,
    shared: TreeShared,
    *,
    skip_unsupported: bool = False,
    registry: Registry | None = None,
    own_parent: bool = False,
    parents_table: bool = False,
    parents_handlers: bool = False,
    provided: Callable[[], dict[int, int]] | None = None,
    take_locks: bool = True,
    laps: Laps | None = None,
    lazy: Callable[[tuple[rec.Segment, ...]], LazyPages | None] | None = None,
    exe_set: str = "",
    later_writes: list[Callable[[], None]] | None = None,
) -> Rebuilt:
    """Finish the tree's member whose memory build_member_memory rebuilt, its relations
    (parent, session, group) made already; leave it stopped.

    Objects other members share come from `shared`. `own_parent`: its parent is its own
    (a member below the root), whose death its parent-death signal, if any, is for. A
    shadow's descriptors (an attached tree dumped with --kill) are lent to the stub: it
    was forked from its parent's stub, not ours. `parents_table`: the stub shares its
    parent's descriptor table (CLONE_FILES), rebuilt already: its descriptors are there.
    `parents_handlers`: it shares its parent's signal actions (CLONE_SIGHAND), set already.
    A stub sharing its parent's memory (build_member_memory's `parents_memory`) leaves
    what is the mm's to its parent's finish: mappings of objects, PR_SET_MM_MAP, locked
    memory, AIO rings, guard pages.
    `take_locks` is restore()'s, for this member (a tree's move); `provided()`, asked
    once it is admitted, gives restore()'s `provided` (admitting the first member makes
    them). `laps` (a move's) gets the steps' laps, added up over the members.
    `lazy` (a tree's post-copy move): given the image's segments, the member's pages left
    on the source (hijack.restore.postcopy), made missing in the stub (every member's
    pages are in, every stub forked: none inherits the holes), while it still has root's
    powers (as restore()'s `lazy`). `exe_set`: the file the stub's exe link names
    already (a tree's stub built before the freeze, hijack.restore.tree.prebuild_tree).
    `later_writes`: what the finish would write into the stub's memory (a thread's cached
    tid, where it changed) is put there instead, for the caller to write once every
    member's pages are in (a later member's image may copy pages from this one's).
    """
    laps = laps or Laps()
    stub, image, space, ipc = memory.stub, memory.image, memory.space, memory.ipc
    try:
        try:
            holdings = shadow_holdings(registry, image.header.pid) if registry else None
            shared.begin(image.header.pid, stub.pid, image.files)
            kept = frozenset(holdings.own_fd) if holdings else frozenset()
            # A table shared with the parent has the relays from the parent's.
            given = provided() if provided is not None and not parents_table else {}
            # The tree's pairs: not ours to close (nor are a move's relays, given to it).
            skip = kept | frozenset(given)
            pairs = {} if parents_table else unix.pair_ends(image.files, shared, skip=skip)
            plan = plan_files(
                image.segments.segments,
                image.files,
                skip_unsupported=skip_unsupported,
                holdings=holdings,
                provided=frozenset(pairs) | frozenset(given),
            )
            # A table shared with the parent has the shadow's descriptors from the parent's.
            taken = _take_from_shadow(holdings, plan) if holdings and not parents_table else {}
            try:
                inherited = lend(stub, {**taken, **pairs, **given}, batched=True)
            finally:
                for fd in taken.values():
                    os.close(fd)
            missing = lazy(image.segments.segments) if lazy is not None else None
            if missing is not None:
                # What the rest touches (each thread's TCB and stack top) is never lazy.
                missing.prepare(stub, image.segments.segments)
                laps.lap("post-copy: pages missing")
            _finish(
                stub,
                space,
                image,
                plan,
                inherited,
                frozenset(given),
                # The table's locks are taken (POSIX locks are its own); a move takes none.
                take_locks and not parents_table,
                shared,
                own_parent,
                parents_table,
                memory.parents_memory,
                parents_handlers,
                exe_set=exe_set,
                later_writes=later_writes,
            )
            laps.lap("finish")
        finally:
            space.close()
    except BaseException:
        ipc.undo()
        raise
    assert image.signals is not None
    queued = [*image.signals.shared_pending, *(s for t in image.threads for s in t.pending)]
    pending = frozenset(struct.unpack_from("<i", siginfo)[0] for siginfo in queued)
    return Rebuilt(_result(stub.pid, image, plan), image.header, holdings, pending)


def lend(stub: Stub, ours: dict[int, int], *, batched: bool = False) -> dict[int, int]:
    """The stub's own copies (pidfd_getfd) of our descriptors `ours`, by the same keys.
    `batched`: in one batch of chained calls, one stop (its scratch area is executable:
    its memory is built)."""
    if not ours:
        return {}
    if batched:
        with stub.batched():
            opened = stub.queue("pidfd_open", os.getpid(), 0)
            copies = {key: stub.queue("pidfd_getfd", opened, fd, 0) for key, fd in ours.items()}
            stub.queue("close", opened)
        made = {key: call.result for key, call in copies.items()}
        return {key: fd for key, fd in made.items() if fd is not None}  # (all: none failed)
    stub.reset_scratch()
    handle = stub.call("pidfd_open", os.getpid(), 0)
    try:
        return {key: stub.call("pidfd_getfd", handle, fd, 0) for key, fd in ours.items()}
    finally:
        stub.call("close", handle)


def record_restored(
    registry: Registry, header: rec.ImageHeader, pid: int, holdings: ShadowHoldings | None
) -> None:
    """Write down a restored process (a tree's member too): rehomed to its shadow, if it
    has one, else restored here."""
    _record(registry, header, pid, holdings)


def _restore_prebuilt(
    records: Iterator[rec.Record],
    image: _Image,
    plan: FilePlan,
    prebuilt: Prebuilt,
    provided: dict[int, int],
    before_start: Callable[[int], None] | None,
    take_locks: bool,
    laps: Laps,
    lazy: Callable[[], LazyPages | None] | None = None,
) -> RestoreResult:
    """restore() of a move's final image into the stub its pre-copy rounds built."""
    stub, space = prebuilt.stub, prebuilt.space
    if stub is None or space is None:
        raise RestoreError("the move's final image came before any pre-copy round")
    prebuilt.taken = True
    injected_before = stub.tracee.injected  # the rounds' calls ran before the freeze
    try:
        inherited = prebuilt.hand_over(provided)
        laps.lap("descriptors in")
        space.adopt_final(image.segments.segments, later=frozenset(image.mapped()))
        laps.lap("layout")
        # The descriptors and the memory's objects need nothing the pages bring: made
        # while the mover still sends them, not after its last byte (issue #17).
        files = None
        if not _cwd_may_be_deleted(image.files):
            files = _finish_files(
                stub, space, image, plan, inherited, frozenset(provided or {}), exe_set=prebuilt.exe
            )
            laps.lap("finish: files ahead of the pages")
        _consume_rest(records, image, space)
        laps.lap("pages")
        missing = lazy() if lazy is not None else None
        if missing is not None:
            laps.lap("post-copy: lazy runs")
            # While the stub has root's powers; what the rest of the restore
            # touches (each thread's TCB and stack top) was never left out.
            missing.prepare(stub, image.segments.segments)
            laps.lap("post-copy: pages missing")
        _finish(
            stub,
            space,
            image,
            plan,
            inherited,
            frozenset(provided or {}),
            take_locks,
            laps=laps,
            cloned=prebuilt.cloned,
            files=files,
            exe_set=prebuilt.exe,
        )
        laps.lap("finish")
        laps.injected = stub.tracee.injected - injected_before
        if before_start is not None:
            before_start(stub.pid)
        start(stub)
        laps.lap("start")
    except BaseException:
        kill_stub(stub.pid)
        raise
    finally:
        space.close()
    return _result(stub.pid, image, plan)


def _result(pid: int, image: _Image, plan: FilePlan) -> RestoreResult:
    old_pid = image.header.pid
    return RestoreResult(
        pid=pid,
        old_pid=old_pid,
        program=image.header.comm,
        threads=len(image.threads),
        dropped=tuple(describe_fd(d) for d in plan.dropped),
        old_pid_holder="" if pid == old_pid else holder_of(old_pid),
    )


def holder_of(pid: int) -> str:
    """Who has `pid` now: "NAME (pid P)", "thread T of NAME (pid P)", a zombie, or "" if nobody."""
    try:
        status = procfs.read_status(pid)
    except HijackError:
        return ""
    if status.tgid == pid and status.state == "Z":
        return f"the zombie of {status.name}, not yet reaped by its parent (pid {status.ppid})"
    if status.tgid == pid:
        return f"{status.name} (pid {pid})"
    try:
        name = procfs.read_status(status.tgid).name
    except HijackError:
        name = status.name
    return f"thread {pid} of {name} (pid {status.tgid})"


def shadow_holdings(registry: Registry, old_pid: int) -> ShadowHoldings | None:
    """What the shadow of checkpointed process `old_pid` keeps, if it has one here:
    `old_pid` the root of an attached tree, or one of its members (keyed by member pid)."""
    record = registry.find(old_pid)
    member = registry.member(old_pid) if record is None else None
    if member is not None:
        record = registry.find(member.root)
    if record is None or not record.shadow_control or record.shadow_pid is None:
        return None
    if member is None and record.state != "checkpointed":
        return None
    if member is not None and record.state not in ("checkpointed", "attached"):
        return None  # a tree's root restored first is attached again; its members still held
    try:
        status = control.request(record.shadow_control, {"op": "status"})
    except ShadowError:
        return None  # the shadow is gone: what it held is gone with it
    if member is None:
        if status.get("mode") != "holding":
            return None
        fds = status["fds"]
    else:
        entry = next((m for m in status.get("members", []) if int(m["pid"]) == old_pid), None)
        if entry is None or entry.get("following", True):
            return None  # not checkpointed: the shadow follows it, it holds nothing for a restore
        fds = entry["fds"]
    return ShadowHoldings(
        shadow_pid=record.shadow_pid,
        control=record.shadow_control,
        own_fd={int(fd["fd"]): int(fd["own_fd"]) for fd in fds},
        identity={int(fd["fd"]): (int(fd["dev"]), int(fd["ino"])) for fd in fds},
        member=old_pid if member is not None else 0,
    )


def _shadow_namespace(holdings: ShadowHoldings) -> int | None:
    """The shadow's mount namespace if it is not ours (that of the process it was forked
    from), to build the process in: its paths name files there."""
    theirs = mount_namespace_of(holdings.shadow_pid)
    if theirs == mount_namespace_of(os.getpid()):
        return None
    return open_mount_namespace(holdings.shadow_pid, theirs)


def _take_from_shadow(holdings: ShadowHoldings, plan: FilePlan) -> dict[int, int]:
    """Copies, in this process and inheritable by the stub, of what the shadow keeps."""
    handle = pidfd.pidfd_open(holdings.shadow_pid)
    taken: dict[int, int] = {}
    try:
        for descriptor in plan.inherited:
            if descriptor.fd not in holdings.own_fd:
                continue  # handed over otherwise (a unix socket pair joining a tree's members)
            own = holdings.own_fd[descriptor.fd]
            taken[descriptor.fd] = pidfd.pidfd_getfd(handle, own, holdings.shadow_pid)
            os.set_inheritable(taken[descriptor.fd], True)
    except BaseException:
        for fd in taken.values():
            os.close(fd)
        raise
    finally:
        os.close(handle)
    return taken


def _record(
    registry: Registry,
    header: rec.ImageHeader,
    pid: int,
    holdings: ShadowHoldings | None,
) -> None:
    if holdings is None:
        registry.record_restored(pid, header.comm)
        return
    if holdings.member:
        control.request(holdings.control, {"op": "home", "pid": pid, "member": holdings.member})
        registry.rehome_member(header.pid, pid, procfs.read_stat(pid).starttime)
        return
    control.request(holdings.control, {"op": "home", "pid": pid})
    registry.rehome(header.pid, pid, procfs.read_stat(pid).starttime)


def _expect(records: Iterator[rec.Record], kind: type[R]) -> R:
    try:
        record = next(records)
    except StopIteration:
        raise ImageError(f"image ends before its {kind.__name__} record") from None
    if not isinstance(record, kind):
        raise ImageError(f"expected {kind.__name__}, found {type(record).__name__}")
    return record


def _expect_files(records: Iterator[rec.Record]) -> ImageFiles:
    """FILES and the object sections it counts (read_image checked their number)."""
    files = _expect(records, rec.Files)
    sections = [next(records) for _ in range(files.objects)]
    return ImageFiles(files, tuple(s for s in sections if isinstance(s, rec.ObjectRecord)))


def _consume_rest(
    records: Iterator[rec.Record],
    image: _Image,
    space: AddressSpace,
    stub_of: Callable[[int], int] | None = None,
    *,
    pages: bool = True,
) -> None:
    """The image's records after its objects. `stub_of(pid)`: the stub of a tree's member
    rebuilt before, whose pages a PAGE_REFERENCE copies (only a tree stream has those).
    Not `pages`: the member shares its parent's memory, whose image has them all."""
    for record in records:
        if not pages and isinstance(record, (rec.Pages, rec.ScatteredPages, rec.PageReference)):
            raise ImageError(
                f"process {image.header.pid} shares its parent's memory, yet its image has pages"
            )
        if isinstance(record, rec.Pages):
            space.write_pages(record)
        elif isinstance(record, rec.ScatteredPages):
            space.write_scattered_pages(record)
        elif isinstance(record, rec.PageReference):
            if stub_of is None:
                raise ImageError(
                    f"pages at {record.address:#x} refer to process {record.pid}: only the"
                    " restore of the whole tree stream restores them"
                )
            space.copy_pages(record, stub_of(record.pid))
        elif isinstance(record, rec.Thread):
            image.threads.append(record)
        elif isinstance(record, rec.SignalState):
            image.signals = record
        elif isinstance(record, rec.Cwd):
            image.cwd = record
        elif isinstance(record, rec.ProcessSettings):
            image.settings = record
        elif isinstance(record, rec.Timers):
            image.timers = record
        elif isinstance(record, rec.End):
            pass  # read_image checked the totals; the iterator ends after it
        else:
            raise ImageError(f"unexpected {type(record).__name__} record after the segments")
    if (
        not image.threads
        or image.signals is None
        or image.cwd is None
        or image.settings is None
        or image.timers is None
    ):
        raise ImageError("image has no threads, signal state, cwd, settings or timers")


# -- finishing the stub once the whole image is in --------------------------------


def _finish(
    stub: Stub,
    space: AddressSpace,
    image: _Image,
    plan: FilePlan,
    inherited: dict[int, int],
    provided: frozenset[int],
    take_locks: bool,
    shared: TreeShared | None = None,
    own_parent: bool = False,
    parents_table: bool = False,
    parents_memory: bool = False,
    parents_handlers: bool = False,
    laps: Laps | None = None,
    cloned: dict[int, int] | None = None,
    files: _FilesMade | None = None,
    exe_set: str = "",
    later_writes: list[Callable[[], None]] | None = None,
) -> None:
    """`cloned`: threads clone_ahead made already (the image's tid -> the stub's).
    `files`: _finish_files made its part already (before the image's pages came).
    `exe_set`: the stub's exe link set already (see _set_mm_map). `later_writes`: see
    finish_member."""
    laps = laps or Laps()
    assert image.signals is not None and image.cwd is not None
    assert image.settings is not None and image.timers is not None
    leader = _leader_record(image)
    if files is None:
        files = _finish_files(
            stub,
            space,
            image,
            plan,
            inherited,
            provided,
            shared,
            parents_table,
            parents_memory,
            exe_set,
        )
    controlling = files.controlling
    restored = {descriptor.fd for descriptor in (*plan.inherited, *plan.reopen)}
    with stub.batched():  # one stop for them all (hijack.mutator.parasite)
        if not parents_handlers:
            _set_signal_actions(stub, image.signals)
        _set_rlimits(stub, image.rlimits)
        # A tree's member has its session and group already (hijack.restore.tree).
        _set_process_state(stub, image, controlling, relations=shared is None)
    settings.apply_login_uid(stub, image.settings)
    if not parents_memory:
        settings.lock_memory(stub, image.segments)
        settings.lock_future_memory(stub, image.settings)
        aio.rebuild_rings(stub, image.settings)
        settings.install_guard_pages(stub, image.settings)
    if take_locks:
        # Last of the descriptors' business: a descriptor closed in the stub (the
        # exe's, above) would drop the POSIX locks the process holds on its file.
        restore_locks(stub, image.files, restored)
    laps.lap("finish: files and process")
    thread_ids = {leader.tid: stub.pid}
    ahead = dict(cloned or {})
    for thread in image.threads:
        if thread is not leader:
            made = ahead.pop(thread.tid, None)
            thread_ids[thread.tid] = made if made is not None else _clone_thread(stub, thread.tid)
    if ahead:  # the stub's threads must be the image's, none more
        raise RestoreError(f"threads {sorted(ahead)} were cloned ahead; the image has none such")
    laps.lap("finish: threads cloned")
    powers = credentials.Powers.of(stub.pid)  # the restorer's, every thread's until now
    with stub.side_by_side():  # every thread's batch at once (hijack.mutator.parasite)
        for thread in image.threads:
            tid = thread_ids[thread.tid]
            if cloned and thread.tid in cloned:
                _inherit(stub, image, tid)
            _set_thread_state(
                stub, thread, tid, image.credentials_of(thread.tid), powers, later_writes
            )
    laps.lap("finish: threads' state")
    _queue_pending_signals(stub, image, thread_ids)
    settings.apply_settings(stub, image.settings, thread_ids)
    if own_parent:
        settings.apply_parent_death_signal(stub, image.settings)
    timers.create_posix_timers(stub, image.timers, thread_ids)
    pending = {
        struct.unpack_from("<i", siginfo)[0]
        for siginfo in (
            *image.signals.shared_pending,
            *(s for t in image.threads for s in t.pending),
        )
    }
    # Last: the restore's own time does not count.
    timers.arm_timers(stub, image.timers, thread_ids, frozenset(pending))
    space.unmap_scratch()
    seccomp.install_seccomp(stub, image.settings, image.threads, image.segments, thread_ids)
    laps.lap("finish: settings and timers")
    for thread in image.threads:
        _set_registers(stub, thread, thread_ids[thread.tid], image.signals)


@dataclass(frozen=True)
class _FilesMade:
    """What _finish_files made that the rest of _finish needs."""

    controlling: int | None  # the descriptor standing for its controlling terminal


def _finish_files(
    stub: Stub,
    space: AddressSpace,
    image: _Image,
    plan: FilePlan,
    inherited: dict[int, int],
    provided: frozenset[int],
    shared: TreeShared | None = None,
    parents_table: bool = False,
    parents_memory: bool = False,
    exe_set: str = "",
) -> _FilesMade:
    """_finish's first part, which needs only the image's records before its pages (its cwd
    too if _cwd_may_be_deleted): the descriptors, the mappings of objects, the terminals
    and PR_SET_MM_MAP (`exe_set`: see _set_mm_map)."""
    restore_files(
        stub,
        plan,
        image.files,
        inherited,
        functools.partial(_objects, space, image, parents_memory),
        shared,
        made_already=parents_table,
    )
    restored = {descriptor.fd for descriptor in (*plan.inherited, *plan.reopen)}
    controlling = set_up_terminals(stub, image.files, provided)
    if controlling is None:
        controlling = controlling_slave(image.files, restored - provided)
    if not parents_memory:  # else the mm's, its parent set them
        _set_mm_map(stub, image.mm, exe_set)
    return _FilesMade(controlling)


def _cwd_may_be_deleted(files: ImageFiles) -> bool:
    """Whether the image holds a deleted directory (its cwd may be: then entered with the
    descriptors, which must wait for its CWD record, after the pages)."""
    return any(
        isinstance(found, rec.GhostFile) and stat.S_ISDIR(found.mode)
        for found in files.objects.values()
    )


def _objects(
    space: AddressSpace, image: _Image, parents_memory: bool, context: RestoreContext
) -> None:
    """What the process reaches other than by descriptors: the mappings of memfds, deleted
    files and shared anonymous memory (its parent's, mapped already, where it shares its
    parent's memory); a deleted cwd (its CWD not read yet only if it cannot be one:
    _cwd_may_be_deleted)."""
    if not parents_memory:
        map_objects(space, context, image.mapped())
    seal_memfds(context)
    if image.cwd is None:
        assert not _cwd_may_be_deleted(image.files)
        return
    directory = deleted_cwd(image.cwd, image.files)
    if directory is not None:
        enter_deleted_cwd(context, directory)


def start(stub: Stub) -> None:
    """Let every thread of the finished process run."""
    for thread in stub.tracee.threads.values():
        pt.detach(thread.tid)
        thread.state = ThreadState.RELEASED


def _leader_record(image: _Image) -> rec.Thread:
    for thread in image.threads:
        if thread.tid == image.header.pid:
            return thread
    raise ImageError(f"image has no thread {image.header.pid} (its main thread)")


def _set_mm_map(stub: Stub, mm: rec.MemoryStructure, exe_set: str = "") -> None:
    """PR_SET_MM_MAP: the memory structure's fields, its auxv and its exe link. `exe_set`:
    the file the stub's exe link names already (Prebuilt.set_exe, before the freeze): if
    it is the image's, left as it is (-1), and the calls go in one batch, one stop."""
    if exe_set and mm.exe_file == exe_set:
        with stub.batched():
            _set_mm_fields(stub, mm, -1)
        return
    stub.reset_scratch()
    exe_fd = stub.try_call("openat", AT_FDCWD, stub.put_string(mm.exe_file), O_RDONLY | O_CLOEXEC)
    try:
        _set_mm_fields(stub, mm, exe_fd if exe_fd >= 0 else -1)  # -1: the file is gone
    except RestoreError as exc:
        if not exe_set or exc.errno != errno.EBUSY:
            raise
        # The link set before the freeze names a file the process maps: the kernel
        # changes it no more. A process that changed its own link since (prctl) keeps
        # the one it had then.
        _set_mm_fields(stub, mm, -1)
    finally:
        if exe_fd >= 0:
            stub.call("close", exe_fd)


def _set_mm_fields(stub: Stub, mm: rec.MemoryStructure, exe_fd: int) -> None:
    """PR_SET_MM_MAP with `exe_fd` (-1 keeps the stub's exe link), then the personality."""
    auxv_words = [word for entry in mm.auxv for word in (entry.a_type, entry.a_val)] + [0, 0]
    auxv = stub.put_u64s(*auxv_words)
    prctl_mm_map = PRCTL_MM_MAP.pack(
        mm.start_code,
        mm.end_code,
        mm.start_data,
        mm.end_data,
        mm.start_brk,
        mm.brk,
        mm.start_stack,
        mm.arg_start,
        mm.arg_end,
        mm.env_start,
        mm.env_end,
        auxv,
        len(auxv_words) * 8,
        exe_fd,
    )
    stub.call("prctl", PR_SET_MM, PR_SET_MM_MAP, stub.put(prctl_mm_map), len(prctl_mm_map), 0)
    if mm.personality:
        stub.call("personality", mm.personality)


def _set_signal_actions(stub: Stub, signals: rec.SignalState) -> None:
    # Every one that differs from the stub's, defaults included: the stub
    # inherited what the restorer ignores. Its exec left every other action
    # SIG_DFL with no flags, mask or restorer.
    ignored = procfs.read_status(stub.pid).sig_ign
    for number, action in enumerate(signals.actions, start=1):
        if number in (SIGKILL, SIGSTOP):
            continue
        handler = SIG_IGN if ignored & (1 << (number - 1)) else SIG_DFL
        if (action.sa_handler, action.sa_flags, action.sa_restorer, action.sa_mask) == (
            handler,
            0,
            0,
            0,
        ):
            continue
        stub.reset_scratch()
        act = stub.put_u64s(action.sa_handler, action.sa_flags, action.sa_restorer, action.sa_mask)
        stub.call("rt_sigaction", number, act, 0, 8)


def _set_rlimits(stub: Stub, rlimits: rec.Rlimits) -> None:
    current = {limit.resource: (limit.soft, limit.hard) for limit in procfs.read_limits(stub.pid)}
    for limit in rlimits.limits:
        if current.get(limit.resource) == (limit.rlim_cur, limit.rlim_max):
            continue  # the stub inherited it as it is
        stub.reset_scratch()
        new = stub.put_u64s(limit.rlim_cur, limit.rlim_max)
        # Raising a hard limit needs CAP_SYS_RESOURCE, which root lacks here
        # (KERNEL-NOTES): such a limit stays at the restorer's value.
        stub.try_call("prlimit64", 0, limit.resource, new, 0)


def _set_process_state(
    stub: Stub, image: _Image, controlling: int | None, *, relations: bool = True
) -> None:
    """cwd, umask, session and group (no_new_privs is each thread's: its credentials).

    `controlling`: the descriptor of a terminal made for the process (a move's
    pty, the new slave of a pty pair it holds) standing for its controlling
    terminal. Only a session leader can take
    one, so the process then leads a session of its own (its old one, the
    shell's, stayed behind), and its group is the terminal's foreground group:
    it reads its terminal and gets its ^C and SIGWINCH as at home.
    """
    assert image.cwd is not None
    stub.reset_scratch()
    if image.cwd.root != "/":
        stub.call("chroot", stub.put_string(image.cwd.root))
    if deleted_cwd(image.cwd, image.files) is None:  # else entered with the descriptors
        stub.call("chdir", stub.put_string(image.cwd.cwd))
    stub.call("umask", image.credentials.umask)
    header = image.header
    if not relations:
        if controlling is not None:
            stub.try_call("ioctl", controlling, TIOCSCTTY, 0)  # a session leader's terminal
    elif header.sid == header.pid or controlling is not None:
        stub.call("setsid")
    elif header.pgid == header.pid:
        stub.call("setpgid", 0, 0)
    if controlling is not None and relations:
        stub.call("ioctl", controlling, TIOCSCTTY, 0)


def clone_ahead(prebuilt: Prebuilt, tids: list[int]) -> None:
    """A move's threads (but its leader), cloned in its pre-copied stub before the final
    image comes (the move message names them): each clone waits for the new thread's first
    stop, a wake-up of a loaded CPU (27-36 ms for 30 threads at load 2-7), which then
    overlaps the mover's reading of the frozen process. What a thread inherits at its
    clone from the leader's state, which _finish sets only later, _inherit gives each."""
    stub = prebuilt.stub
    if stub is None:
        raise RestoreError("the move's threads came before any pre-copy round")
    for tid in tids:
        if tid not in prebuilt.cloned and tid != stub.pid:
            prebuilt.cloned[tid] = _clone_thread(stub, tid)


def _inherit(stub: Stub, image: _Image, tid: int) -> None:
    """What thread `tid`, cloned ahead (clone_ahead), would have inherited from the leader
    had it been cloned after _finish's first steps: what the kernel keeps per thread and
    copies at a clone — the personality, the audit login uid."""
    assert image.settings is not None
    if image.mm.personality:
        with stub.batched(tid):  # (side by side with the other threads' batches)
            stub.call("personality", image.mm.personality, tid=tid)
    loginuid = image.settings.loginuid
    if loginuid in (settings.LOGINUID_UNSET, procfs.read_loginuid(tid)):
        return
    # As settings.apply_login_uid, in the thread itself (only a task writes its own).
    stub.reset_scratch()
    path = stub.put_string("/proc/thread-self/loginuid")
    fd = stub.call("openat", AT_FDCWD, path, settings.O_WRONLY, 0, tid=tid)
    try:
        text = str(loginuid).encode()
        stub.call("write", fd, stub.put(text), len(text), tid=tid)
    finally:
        stub.call("close", fd, tid=tid)


def _clone_thread(stub: Stub, old_tid: int) -> int:
    """A new thread in the stub, with `old_tid` as its tid when that is free."""
    stub.reset_scratch()
    set_tid = stub.put(struct.pack("<i", old_tid))
    args = CLONE_ARGS.pack(CLONE_THREAD_FLAGS, 0, 0, 0, 0, 0, 0, 0, set_tid, 1, 0)
    tid = stub.try_call("clone3", stub.put(args), CLONE_ARGS.size)
    if tid == -EEXIST:
        args = CLONE_ARGS.pack(CLONE_THREAD_FLAGS, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)
        tid = stub.call("clone3", stub.put(args), CLONE_ARGS.size)
    elif tid < 0:
        raise RestoreError(f"cannot create thread {old_tid}: errno {-tid}")
    result = pt.wait_for(tid)  # traced from birth (TRACECLONE): its first stop
    if result is None or result.exited:
        raise RestoreError(f"new thread {tid} died before it could be set up")
    stub.tracee.threads[tid] = TracedThread(
        tid,
        state=ThreadState.STOPPED,
        registers=pt.get_registers(tid),
        signal_mask=pt.get_signal_mask(tid),
    )
    return tid


def _set_thread_state(
    stub: Stub,
    thread: rec.Thread,
    tid: int,
    own: rec.Credentials,
    powers: credentials.Powers,
    later_writes: list[Callable[[], None]] | None = None,
) -> None:
    with stub.batched(tid):  # one stop for the thread's calls
        _set_thread_calls(stub, thread, tid, own, powers, later_writes)


def _set_thread_calls(
    stub: Stub,
    thread: rec.Thread,
    tid: int,
    own: rec.Credentials,
    powers: credentials.Powers,
    later_writes: list[Callable[[], None]] | None = None,
) -> None:
    stub.reset_scratch()
    if thread.robust_list.head:
        stub.call("set_robust_list", thread.robust_list.head, thread.robust_list.len, tid=tid)
    stub.call("set_tid_address", thread.clear_child_tid, tid=tid)
    altstack = thread.sigaltstack
    stack_t = stub.put(struct.pack("<QI4xQ", altstack.ss_sp, altstack.ss_flags, altstack.ss_size))
    if not altstack.ss_flags & 2:  # SS_DISABLE is what a new thread has already
        stub.call("sigaltstack", stack_t, 0, tid=tid)
    stub.call("prctl", PR_SET_NAME, stub.put_string(thread.comm[:15]), 0, 0, 0, tid=tid)
    if tid != thread.tid and later_writes is not None:
        later_writes.append(functools.partial(_fix_cached_tid, stub, thread, tid))
    elif tid != thread.tid:
        _fix_cached_tid(stub, thread, tid)
    credentials.set_credentials(stub, own, tid, powers)
    rseq = thread.rseq
    if rseq.rseq_abi_pointer:
        # Last of the injected calls in this thread (KERNEL-NOTES).
        stub.call("rseq", rseq.rseq_abi_pointer, rseq.rseq_abi_size, 0, rseq.signature, tid=tid)


def _fix_cached_tid(stub: Stub, thread: rec.Thread, tid: int) -> None:
    """glibc caches the tid in the TCB: a thread restored under a new tid needs it updated."""
    address = thread.regs.fs_base + GLIBC_TID_OFFSET
    try:
        (cached,) = struct.unpack("<i", memory.read(stub.pid, address, 4))
    except HijackError:
        return  # no TCB there: not a glibc thread
    if cached == thread.tid:
        memory.write(stub.pid, address, struct.pack("<i", tid))


def _queue_pending_signals(stub: Stub, image: _Image, thread_ids: dict[int, int]) -> None:
    assert image.signals is not None
    for siginfo in image.signals.shared_pending:
        stub.reset_scratch()
        (signal_number,) = struct.unpack_from("<i", siginfo)
        stub.call("rt_sigqueueinfo", stub.pid, signal_number, stub.put(siginfo))
    for thread in image.threads:
        for siginfo in thread.pending:
            stub.reset_scratch()
            (signal_number,) = struct.unpack_from("<i", siginfo)
            tid = thread_ids[thread.tid]
            stub.call("rt_tgsigqueueinfo", stub.pid, tid, signal_number, stub.put(siginfo), tid=tid)


def _set_registers(stub: Stub, thread: rec.Thread, tid: int, signals: rec.SignalState) -> None:
    pending = bool(thread.pending or signals.shared_pending)
    found = pt.Registers(**{name: getattr(thread.regs, name) for name in pt.REGISTER_NAMES})
    registers = resume_registers(found, restart_block_available=False, signal_pending=pending)
    pt.set_signal_mask(tid, thread.sigmask)
    pt.set_xstate(tid, thread.xstate)
    pt.set_registers(tid, registers)
