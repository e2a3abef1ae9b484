"""Pages spliced from a stopped process into a file, never through hijack's memory
(hijack.mutator.spliced_pages): the bytes are the process's, what vmsplice cannot reach is
told, not guessed, and the process runs on unharmed with no descriptor or mapping left."""

from __future__ import annotations

import os
from pathlib import Path

from support import spawn_fixture

from hijack.mutator.spliced_pages import page_splicer, spliceable
from hijack.mutator.tracee import Tracee
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
