"""Batched injected system calls (hijack.mutator.parasite), in a real stopped process: one
stop for the whole batch, results chained from call to call, a checked failure that stops
it, signals sent while it runs delivered once afterwards, the process put back as found
(its own checks in tests/fixtures/parasite.c). Batches of many threads run side by
side, each in its own part of the area (tests/fixtures/altstacks.c: each thread's own
altstack and clear-child-tid address)."""

from __future__ import annotations

import dataclasses
import errno
import os
import signal
import stat
import struct
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from support import spawn_fixture
from support.running import RunningFixture

from hijack.errors import InjectionFailed, RestoreError
from hijack.image.files import ImageFiles
from hijack.image.records import FdKind, FileDescriptor, Files
from hijack.mutator.parasite import BLOB, Batch, Call, parasite_area, run_in_threads
from hijack.mutator.tracee import ThreadState, TracedThread, Tracee, find_syscall_instruction
from hijack.restore.files import restore_files
from hijack.restore.plan import FilePlan
from hijack.restore.remote import BATCH_CALLS, SCRATCH_PROT, SCRATCH_SIZE, Stub
from hijack.sys import procfs
from hijack.sys.stub import kill_stub, spawn_stub

AT_FDCWD = -100
O_WRONLY, O_CREAT, O_TRUNC = 0o1, 0o100, 0o1000
READ_NR = 0
PR_GET_TID_ADDRESS = 40
SIGNAL_WAIT = 120.0  # seconds: generous, the machine is loaded


def _control_fd(pid: int) -> int:
    with open(f"/proc/{pid}/environ", "rb") as environ:
        variables = dict(
            entry.split(b"=", 1) for entry in environ.read().split(b"\0") if b"=" in entry
        )
    return int(variables[b"CONTROL_FD"])


def _signal_during_read(fixture: RunningFixture, buffer: int, errors: list[str]) -> None:
    """Once the batch's read (into `buffer`) blocks: SIGUSR1 and SIGTRAP, then the byte it
    waits for."""
    deadline = time.monotonic() + SIGNAL_WAIT
    while time.monotonic() < deadline:
        with open(f"/proc/{fixture.pid}/syscall") as found:
            fields = found.read().split()
        if len(fields) > 3 and int(fields[0]) == READ_NR and int(fields[2], 16) == buffer:
            os.kill(fixture.pid, signal.SIGUSR1)
            os.kill(fixture.pid, signal.SIGTRAP)
            fixture.send(b"x")
            return
        time.sleep(0.001)  # polling /proc: no descriptor tells a thread blocked
    errors.append(f"the batch's read did not block within {SIGNAL_WAIT} s")


@pytest.mark.parametrize("executable", [True, False], ids=["blob", "one by one"])
def test_a_batch_runs_chained_calls_stops_at_a_checked_failure_and_keeps_signals(
    tmp_path: Path, executable: bool
) -> None:
    target = tmp_path / "written"
    with spawn_fixture("parasite", target) as fixture:
        control = _control_fd(fixture.pid)
        maps_before = procfs.read_maps(fixture.pid)
        errors: list[str] = []
        with Tracee.seize(fixture.pid) as tracee, parasite_area(tracee) as area:
            assert area.executable  # this machine lets a process map writable code
            area.executable = executable
            batch = Batch(area)
            path = batch.put(os.fsencode(target) + b"\0")
            text = batch.put(b"batched\n")
            taken = batch.buffer(8)
            opened = batch.call("openat", AT_FDCWD, path, O_WRONLY | O_CREAT | O_TRUNC, 0o600)
            moved = batch.call("dup3", opened, 200, 0)  # chained: the open's result
            written = batch.call("write", moved, text, 8)
            batch.call("close", opened)
            bad = batch.call("close", -1, check=False)  # fails, the batch goes on
            read = batch.call("read", control, taken, 8)  # blocks until signalled
            umask = batch.call("umask", 0o027)
            failing = batch.call("close", -1)  # fails, checked: the batch stops
            never = batch.call("umask", 0o077)
            stops_before = tracee.stops
            sender = threading.Thread(target=_signal_during_read, args=(fixture, taken, errors))
            sender.start()
            try:
                with pytest.raises(InjectionFailed) as failed:
                    batch.run(tracee)
            finally:
                sender.join()
            stops = tracee.stops - stops_before
        assert not errors
        assert failed.value.errno == errno.EBADF
        assert opened.result is not None and opened.result >= 3
        assert (moved.result, written.result, read.result) == (200, 8, 1)
        assert batch.read(taken, 1) == b"x"
        assert bad.result == failing.result == -errno.EBADF
        assert umask.result == 0o022
        assert never.result is None
        # The blob: one stop, and one call (two stops) queueing the SIGTRAP it took again.
        assert stops == (1 + 2 if executable else 2 * 8)
        assert procfs.read_maps(fixture.pid) == maps_before
        fixture.assert_intact()


def test_a_stubs_batch_longer_than_its_area_holds_runs_in_cuts() -> None:
    """A restore's batch of calls that put no data (a big layout's unmaps, many descriptors)
    is cut where the area is full: every call runs, one stop a cut, and a checked failure
    in a later cut still stops it. The stub's SIGTRAP disposition is read once, not per
    batch (hijack.restore.remote)."""
    pid = spawn_stub(None)
    try:
        stub = Stub(pid, find_syscall_instruction(pid))
        anonymous = 0x02 | 0x20  # MAP_PRIVATE | MAP_ANONYMOUS
        stub.use_scratch(stub.call("mmap", 0, SCRATCH_SIZE, SCRATCH_PROT, anonymous, -1, 0))
        stops_before = stub.tracee.stops
        with stub.batched():
            for _ in range(3 * BATCH_CALLS - 1):
                stub.call("umask", 0o022)
            stub.call("umask", 0o027)  # the last, in the third cut
        assert stub.tracee.stops - stops_before == 3  # one stop a cut: the blob ran each
        assert stub.call("umask", 0o022) == 0o027
        with pytest.raises(RestoreError) as failed, stub.batched():
            for _ in range(BATCH_CALLS + 1):
                stub.call("umask", 0o022)
            stub.call("close", -1)  # in the second cut
            stub.call("umask", 0o077)  # never runs
        assert failed.value.errno == errno.EBADF
        assert stub.call("umask", 0o022) == 0o022
    finally:
        kill_stub(pid)


def _descriptor(fd: int, path: Path | str, *, pos: int = 0, description: int = 0) -> FileDescriptor:
    found = os.stat(path)
    regular = stat.S_ISREG(found.st_mode)
    return FileDescriptor(
        fd=fd,
        kind=FdKind.REGULAR if regular else FdKind.CHARDEV,
        flags=os.O_RDWR if regular else os.O_RDONLY,
        pos=pos,
        cloexec=fd % 2 == 1,
        mode=found.st_mode,
        dev=found.st_dev,
        ino=found.st_ino,
        description_id=description or fd + 1,
        path=str(path),
    )


def test_files_reopened_by_path_land_at_their_numbers_a_run_of_them_in_few_batches(
    tmp_path: Path,
) -> None:
    """restore_files queues the reopening of files by path (hijack.objects.regular.reopen):
    whether the open's lowest free number is the descriptor's own (no gap below it) or
    not (a gap), each lands at its number with its offset and close-on-exec, a dup'ed
    description is one again, and a run of them goes in a few stops, cut where the area
    is full (long paths); a file that cannot be opened fails the restore in its words."""
    deep = tmp_path
    for level in range(3):  # paths of ~700 bytes: a run of them does not fit one area
        deep = deep / (f"{level}" * 200)
    deep.mkdir(parents=True)
    files = [deep / f"file{index}" for index in range(40)]
    for index, path in enumerate(files):
        path.write_bytes(bytes([index]) * 100)
    descriptors = [_descriptor(0, "/dev/null")]  # 0: the open takes the descriptor's own
    numbers = [3, 4, 7, *range(9, 9 + len(files) - 3)]  # gaps below 7 and 9: another number
    descriptors += [
        _descriptor(fd, path, pos=index + 1)
        for index, (fd, path) in enumerate(zip(numbers, files, strict=True))
    ]
    shared = descriptors[2]  # fd 4, dup'ed at fd 60: one description, one offset
    descriptors.append(dataclasses.replace(shared, fd=60, cloexec=False))
    pid = spawn_stub(None)
    try:
        stub = Stub(pid, find_syscall_instruction(pid))
        anonymous = 0x02 | 0x20  # MAP_PRIVATE | MAP_ANONYMOUS
        stub.use_scratch(stub.call("mmap", 0, SCRATCH_SIZE, SCRATCH_PROT, anonymous, -1, 0))
        image = ImageFiles(Files(descriptors=tuple(descriptors)), ())
        plan = FilePlan(inherited=(), reopen=tuple(descriptors), dropped=())
        stops_before = stub.tracee.stops
        restore_files(stub, plan, image, {})
        stops = stub.tracee.stops - stops_before
        assert stops <= 12, stops  # ~250 calls: a few batches, one stop each
        assert {entry.fd for entry in procfs.list_fds(pid)} == {d.fd for d in descriptors}
        for descriptor in descriptors:
            assert os.readlink(f"/proc/{pid}/fd/{descriptor.fd}") == descriptor.path
            info = procfs.read_fdinfo(pid, descriptor.fd)
            assert bool(info.flags & 0o2000000) == descriptor.cloexec, descriptor
            assert info.pos == (shared.pos if descriptor.fd == 60 else descriptor.pos), descriptor
        # One description: a seek through fd 4 moves fd 60's offset.
        stub.call("lseek", 4, 77, 0)
        assert procfs.read_fdinfo(pid, 60).pos == 77

        gone = _descriptor(70, files[0])
        gone = dataclasses.replace(gone, path=str(tmp_path / "gone"))
        with pytest.raises(RestoreError, match=r"cannot reopen fd 70 \(regular .*gone\): No such"):
            restore_files(stub, dataclasses.replace(plan, reopen=(gone,)), image, {})
    finally:
        kill_stub(pid)


def test_the_blob_is_its_assembly_source(tmp_path: Path) -> None:
    source = Path(__file__).parent.parent / "hijack" / "native" / "parasite.S"
    obj, raw = tmp_path / "parasite.o", tmp_path / "parasite.bin"
    subprocess.run(["gcc", "-c", str(source), "-o", str(obj)], check=True)
    subprocess.run(["objcopy", "-O", "binary", "-j", ".text", str(obj), str(raw)], check=True)
    assert raw.read_bytes() == BLOB


@pytest.mark.parametrize(
    ("executable", "size"),
    [(True, 16 * 1024), (True, 4096), (False, 4096)],
    ids=["side by side", "two groups", "one by one"],
)
def test_batches_of_many_threads_run_side_by_side_each_in_its_own_thread(
    executable: bool, size: int
) -> None:
    # 31 tasks, each with its own clear-child-tid slot and altstack size: a thread's
    # results read from another's part of the area would pair a slot with another's size.
    with spawn_fixture("altstacks", "30") as fixture:
        slots, stack_size = int(fixture.ready["slots"], 16), int(fixture.ready["stack_size"])
        with Tracee.seize(fixture.pid) as tracee, parasite_area(tracee, size) as area:
            area.executable = executable
            threads = [tracee.threads[tid] for tid in tracee.thread_ids]
            assert len(threads) == int(fixture.ready["threads"]) == 31

            def queue(thread: TracedThread, batch: Batch) -> tuple[Call, Callable[[], bytes]]:
                address, altstack = batch.buffer(8), batch.buffer(24)
                batch.call("prctl", PR_GET_TID_ADDRESS, address, 0, 0, 0)
                batch.call("sigaltstack", 0, altstack)
                gettid = batch.call("gettid")
                return gettid, lambda: batch.read(address, 8) + batch.read(altstack, 24)

            stops_before = tracee.stops
            queued = run_in_threads(tracee, area, threads, queue)
            stops = tracee.stops - stops_before
            indexes = set()
            for thread, (gettid, written) in zip(threads, queued, strict=True):
                assert gettid.result == thread.tid, "a batch ran in another thread"
                tid_address, _, flags, ss_size = struct.unpack("<QQi4xQ", written())
                index = (tid_address - slots) // 8
                assert (flags, ss_size) == (0, stack_size + 4096 * index), f"task {thread.tid}"
                indexes.add(index)
            assert indexes == set(range(31))
            # Side by side: one stop each; one by one: two for each of its three calls.
            assert stops == (31 if executable else 31 * 3 * 2)
        fixture.assert_intact()


def test_a_batch_failing_in_one_thread_leaves_every_other_run_and_all_stopped() -> None:
    with spawn_fixture("altstacks", "12") as fixture:
        with Tracee.seize(fixture.pid) as tracee, parasite_area(tracee) as area:
            threads = [tracee.threads[tid] for tid in tracee.thread_ids]
            failing = threads[5]
            gettids: dict[int, Call] = {}

            def queue(thread: TracedThread, batch: Batch) -> None:
                if thread is failing:
                    batch.call("close", -1)  # checked: fails with EBADF, its batch stops
                gettids[thread.tid] = batch.call("gettid")

            with pytest.raises(InjectionFailed) as failed:
                run_in_threads(tracee, area, threads, queue)
            assert failed.value.errno == errno.EBADF
            assert gettids.pop(failing.tid).result is None
            assert {tid: call.result for tid, call in gettids.items()} == {
                tid: tid for tid in gettids
            }
            # Every thread stopped again at its trap: put back and released as any.
            assert all(thread.state is ThreadState.INJECTING for thread in threads)
        fixture.assert_intact()
