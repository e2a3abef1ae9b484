"""Pages spliced from a stopped process into a file, never through hijack's memory
(hijack.mutator.spliced_pages): the bytes are the process's, what vmsplice cannot reach is
told, not guessed, and the process runs on unharmed with no descriptor or mapping left."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from support import spawn_fixture

from hijack.mutator.spliced_pages import page_splicer, spliceable
from hijack.mutator.tracee import MAP_PRIVATE_ANONYMOUS, PROT_READ_WRITE, Tracee
from hijack.sys import memory, procfs

PAGE_SIZE = 4096


def test_pages_spliced_into_a_file_are_the_process_s_and_it_runs_on(tmp_path: Path) -> None:
    with spawn_fixture("counter", tmp_path / "counter.log") as counter:
        heap = next(m for m in procfs.read_maps(counter.pid) if m.path == "[heap]")
        fds_before = {entry.fd for entry in procfs.list_fds(counter.pid)}
        maps_before = procfs.read_maps(counter.pid)
        image = tmp_path / "pages"
        with open(image, "wb") as out, Tracee.seize(counter.pid) as tracee:
            with page_splicer(tracee, out, pipes=False) as splicer:
                assert splicer is not None
                length = min(heap.end - heap.start, 3 * splicer.capacity)
                put = 0
                while put < length:  # in pipefuls: each fill takes at most one
                    taken = splicer.fill(heap.start + put, length - put)
                    assert 0 < taken <= splicer.capacity
                    assert splicer.put(taken) == taken
                    put += taken
                # Nothing mapped there: told, so the dump reads those pages another way.
                assert splicer.fill(0x1000, PAGE_SIZE) == 0
            expected = memory.read(counter.pid, heap.start, length)  # still stopped
        assert image.read_bytes() == expected
        assert {entry.fd for entry in procfs.list_fds(counter.pid)} == fds_before
        assert procfs.read_maps(counter.pid) == maps_before
        counter.assert_intact()  # its own check of its count and its heap


def test_only_files_and_dev_null_take_pages_of_a_process_that_runs_again(
    tmp_path: Path,
) -> None:
    read_end, write_end = os.pipe()
    try:
        with open(write_end, "wb", closefd=False) as pipe:
            assert spliceable(pipe, pipes=False) is None  # it would keep references
            assert spliceable(pipe, pipes=True) == write_end
        with open(tmp_path / "image", "ab") as appended:
            assert spliceable(appended, pipes=True) is None  # splice refuses O_APPEND
        with open(tmp_path / "image", "wb") as file, open(os.devnull, "wb") as null:
            assert spliceable(file, pipes=False) == file.fileno()
            assert spliceable(null, pipes=False) == null.fileno()
    finally:
        os.close(read_end)
        os.close(write_end)


def test_pages_after_a_gap_in_one_group_are_not_taken_for_the_ones_before(
    tmp_path: Path,
) -> None:
    """One fill puts a group's worth in several pipes by one batch; a pipe that takes less
    than asked (a hole in the range) ends what the fill took: the next pipes' pages, after
    the hole, are dropped, not spliced as if they followed."""
    with spawn_fixture("counter", tmp_path / "counter.log") as counter:
        maps_before = procfs.read_maps(counter.pid)
        image = tmp_path / "pages"
        with (
            open(image, "wb") as out,
            Tracee.seize(counter.pid) as tracee,
            page_splicer(tracee, out, pipes=False) as splicer,
        ):
            assert splicer is not None
            pipe = splicer.pipe_capacity
            if splicer.capacity < 2 * pipe:
                pytest.skip("this user's pipes hold a whole group each: no gap within one")
            size = 4 * pipe
            area = tracee.checked_syscall(
                "mmap", 0, size, PROT_READ_WRITE, MAP_PRIVATE_ANONYMOUS, -1, 0
            )
            try:
                pattern = bytes(range(256)) * (size // 256)
                memory.write(counter.pid, area, pattern)
                # A hole in the first pipe's part: it takes half; the next take theirs.
                tracee.checked_syscall("munmap", area + pipe // 2, pipe // 2)
                taken = splicer.fill(area, size)
                assert taken == pipe // 2
                assert splicer.put(taken) == taken
                taken = splicer.fill(area + pipe, size - pipe)
                assert taken == min(splicer.capacity, size - pipe)
                assert splicer.put(taken) == taken
                expected = pattern[: pipe // 2] + pattern[pipe : pipe + taken]
            finally:
                tracee.checked_syscall("munmap", area, size)
        assert image.read_bytes() == expected
        assert procfs.read_maps(counter.pid) == maps_before
        counter.assert_intact()
