"""Pipes and named FIFOs rebuilt from the image alone (issue #12 item 2).

The `pipes` fixture holds self-pipes (both ends, bytes waiting, O_NONBLOCK,
a 1 MiB size, a dup'ed end, packet mode, a pipe whose writer or reader is
gone) and a named FIFO with bytes in it; it checks every byte arrives once,
in order, at its finish. Dumped with --kill without attach, restored, it
must pass; a plain dump must leave every byte where it was. A pipe whose
other end another process holds is refused by name.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from support import spawn_fixture
from support.cli import HijackCli
from support.objects import (
    assert_recodes,
    assert_refused,
    compare_views,
    dump_kill_and_restore,
    proc_views,
)
from support.procview import pipes_named_alike

from hijack.image import records as rec
from hijack.image.codec import read_image
from hijack.objects import pipe
from hijack.sys import procfs

STREAM_BYTES = 200_000  # as tests/fixtures/pipes.c writes them
FIFO_BYTES = 3000
PIPE_SIZE = 1024 * 1024
PACKETS = (10, 333, 4000)


def test_self_pipes_and_a_fifo_come_back_with_their_bytes_once_in_order(
    hijack: HijackCli, tmp_path: Path
) -> None:
    image = tmp_path / "pipes.crf"
    with spawn_fixture("pipes", tmp_path, fifos=True) as pipes:
        before = proc_views(pipes.pid, pipes_named_alike)
        pid = dump_kill_and_restore(hijack, pipes, image)
        compare_views(before, pid, pipes_named_alike)
        pipes.assert_intact()
    assert "PASS pipes" in pipes.stdout
    assert_recodes(image)


def test_a_plain_dump_takes_no_byte_and_the_image_holds_them_all(
    hijack: HijackCli, tmp_path: Path
) -> None:
    image = tmp_path / "pipes.crf"
    with spawn_fixture("pipes", tmp_path, fifos=True) as pipes:
        hijack.ok("dump", pipes.pid, "-o", image)
        # The process goes on: every byte must still be in its pipes.
        pipes.assert_intact()
    with open(image, "rb") as source:
        records = list(read_image(source))
    objects = {r.id: r for r in records if isinstance(r, rec.PipeObject | rec.FifoObject)}
    held: dict[int, int] = {}
    for chunk in (r for r in records if isinstance(r, rec.ObjectData)):
        held[chunk.id] = held.get(chunk.id, 0) + len(chunk.data)
    pipes_held = sorted(
        (held.get(i, 0), o.pipe_size, o.packets)
        for i, o in objects.items()
        if isinstance(o, rec.PipeObject)
    )
    assert (STREAM_BYTES, PIPE_SIZE, ()) in pipes_held, pipes_held
    assert (sum(PACKETS), 65536, PACKETS) in pipes_held, pipes_held
    fifos = [
        (held.get(i, 0), o.held_outside)
        for i, o in objects.items()
        if isinstance(o, rec.FifoObject)
    ]
    # The fixture's own FIFO, and the harness's CONTROL, which the harness holds too.
    assert sorted(fifos) == [(0, True), (FIFO_BYTES, False)], fifos
    assert_recodes(image)


def test_a_pipe_to_another_process_is_refused_by_name(hijack: HijackCli, tmp_path: Path) -> None:
    image = tmp_path / "pipes.crf"
    # Without fifos, CONTROL_FD is a pipe whose write end this test holds.
    with spawn_fixture("pipes", tmp_path) as pipes:
        refused = hijack("dump", pipes.pid, "-o", image, "--kill")
        assert_refused(refused, "pipe", "process", "attach")
        # Untouched: it runs on and every byte of its pipes is still there.
        pipes.assert_intact()


def test_a_plain_dump_records_the_pipe_another_process_holds(
    hijack: HijackCli, tmp_path: Path
) -> None:
    # A snapshot dump looks for the pipes' holders before its freeze: this test's end
    # of CONTROL_FD must still be found, and its bytes left to it.
    image = tmp_path / "pipes.crf"
    with spawn_fixture("pipes", tmp_path) as pipes:
        hijack.ok("dump", pipes.pid, "-o", image)
        pipes.assert_intact()
    with open(image, "rb") as source:
        records = list(read_image(source))
    outside = [r.outside_pid for r in records if isinstance(r, rec.PipeObject) and r.outside_pid]
    assert outside == [os.getpid()], outside


@contextmanager
def _holding(fd: int) -> Iterator[subprocess.Popen[bytes]]:
    """A process that holds our descriptor `fd` until it is killed."""
    held = subprocess.Popen(["sleep", "60"], pass_fds=(fd,))
    try:
        yield held
    finally:
        held.kill()
        held.wait()


def test_holders_scanned_before_a_freeze_miss_no_fork_and_no_hand_over() -> None:
    reader, writer = os.pipe()
    link = procfs.fd_entry(os.getpid(), reader).target
    try:
        with _holding(reader) as dumped:
            besides = frozenset({dumped.pid, os.getpid()})
            before = pipe.scan_holders_before(dumped.pid)
            assert before.found == {link: set()}
            # A process born since the scan (as a fork of a holder would be).
            with _holding(writer) as born:
                assert pipe.holders_since(frozenset({link}), besides, before)[link] == {born.pid}
            with _holding(writer) as gone, _holding(writer) as kept:
                # A holder that let the pipe go (here, to a process there at the scan).
                let_go = procfs.HolderScan(frozenset(procfs.list_pids()), {link: {gone.pid}})
                gone.kill()
                gone.wait()
                assert pipe.holders_since(frozenset({link}), besides, let_go)[link] == {kept.pid}
                # A pipe the process got since the scan.
                unknown = procfs.HolderScan(frozenset(procfs.list_pids()), {})
                assert pipe.holders_since(frozenset({link}), besides, unknown)[link] == {kept.pid}
    finally:
        os.close(reader)
        os.close(writer)
