"""Deleted files and memfds come back from the image alone (issue #12 items 4 and 5).

Each fixture is dumped with --kill, without attach, restored, and checks its
own state (contents, holes, sizes, offsets, modes, seals, sharing between a
descriptor and a mapping); the /proc views of the process must be the same
before and after. A deleted file holding more than --ghost-limit is refused
before the process is touched.
"""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import tempfile
from pathlib import Path

import lief
from support import spawn_fixture
from support.cli import HijackCli
from support.objects import assert_refused, compare_views, dump_kill_and_restore, proc_views
from support.procview import wait_in_syscall

from hijack.image import records as rec
from hijack.image.codec import read_image

SYS_READ = 0
EXIT_TIMEOUT = 30.0
SCRATCH_SIZE = 2 * 1024 * 1024  # ghost.c's deleted file, mostly holes
MEMFD_SHARED_SIZE = 64 * 1024  # memfd.c's shared memfd


def image_records(image: Path) -> list[rec.Record]:
    with open(image, "rb") as stream:
        return list(read_image(stream))


def stored_bytes(records: list[rec.Record], object_id: int) -> int:
    """The bytes of object `object_id` the image stores (its ObjectData)."""
    return sum(len(r.data) for r in records if isinstance(r, rec.ObjectData) and r.id == object_id)


def dump_kill_restore(hijack: HijackCli, fixture_name: str, image: Path, *args: object) -> None:
    """Dump the fixture with --kill, restore it, compare its /proc views, let it check itself."""
    with spawn_fixture(fixture_name, *args, fifos=True) as fixture:
        wait_in_syscall(fixture.pid, (SYS_READ,))  # idle: nothing changes while we look
        before = proc_views(fixture.pid)
        pid = dump_kill_and_restore(hijack, fixture, image)
        wait_in_syscall(pid, (SYS_READ,), describe=fixture.describe)
        compare_views(before, pid)
        fixture.assert_intact()


def test_deleted_file_directory_fifo_and_cwd_come_back_with_their_bytes_and_holes(
    hijack: HijackCli, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    image = tmp_path / "ghost.crf"
    dump_kill_restore(hijack, "ghost", image, data)
    # Made again under their old names and unlinked at once: nothing is left.
    assert list(data.iterdir()) == []
    records = image_records(image)
    [scratch] = [r for r in records if isinstance(r, rec.GhostFile) and r.size == SCRATCH_SIZE]
    assert 0 < stored_bytes(records, scratch.id) < SCRATCH_SIZE // 64, (
        "the holes of the deleted file were stored"
    )
    ghosts = {r.path for r in records if isinstance(r, rec.GhostFile)}
    # The file made by O_TMPFILE is named by /proc after its inode: "#INO".
    tmpfiles = {path for path in ghosts if re.fullmatch(r"#\d+", Path(path).name)}
    names = ("scratch.dat", "mapped.dat", "gone.d", "gone.fifo", "cwd.d")
    assert len(tmpfiles) == 1 and ghosts - tmpfiles == {str(data / name) for name in names}
    # The deleted FIFO's bytes are in the image, with its pipe size.
    [fifo] = [r for r in records if isinstance(r, rec.GhostFile) and r.path.endswith(".fifo")]
    assert (fifo.size, stored_bytes(records, fifo.id)) == (
        8192,
        len("queued before the dump, in order"),
    )
    shown = hijack.ok("show", image).stdout
    assert f"deleted {data / 'scratch.dat'}" in shown, shown


def test_memfds_and_shared_memory_come_back_named_sealed_and_shared_with_their_mappings(
    hijack: HijackCli, tmp_path: Path
) -> None:
    image = tmp_path / "memfd.crf"
    shm = Path(tempfile.mkdtemp(prefix="hijack-test-", dir="/dev/shm"))  # a file in shm too
    try:
        dump_kill_restore(hijack, "memfd", image, shm)
    finally:
        shutil.rmtree(shm)
    records = image_records(image)
    memfds = {r.name: r for r in records if isinstance(r, rec.MemfdObject)}
    assert sorted(memfds) == ["hijack-future", "hijack-mapped", "hijack-sealed", "hijack-shared"]
    # A memfd's bytes are in the image once: in its object, not in its mappings' pages.
    [segments] = [r for r in records if isinstance(r, rec.Segments)]
    in_memfds = [s for s in segments.segments if s.path.startswith("/memfd:")]
    assert len(in_memfds) == 3 and all(s.contents is rec.ContentsKind.NONE for s in in_memfds)
    pages = [r for r in records if isinstance(r, rec.Pages)]
    assert not any(s.start <= p.address < s.end for s in in_memfds for p in pages)
    shared = memfds["hijack-shared"]
    assert stored_bytes(records, shared.id) < MEMFD_SHARED_SIZE, (
        "the hole of the shared memfd was stored"
    )


def test_a_deleted_file_above_the_ghost_limit_is_refused_and_the_process_runs_on(
    hijack: HijackCli, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    image = tmp_path / "big.crf"
    with spawn_fixture("ghost", data, "3") as ghost:
        result = hijack("dump", ghost.pid, "-o", image, "--kill", "--ghost-limit", "2M")
        assert_refused(result, str(data / "big.dat"), "--ghost-limit")
        assert not image.exists() and not image.with_name(f".{image.name}.partial").exists()
        # Under the default limit, a plain dump takes it whole; the process runs on.
        hijack.ok("dump", ghost.pid, "-o", image)
        big = [
            r for r in image_records(image) if isinstance(r, rec.GhostFile) and r.size == 3 << 20
        ]
        assert len(big) == 1
        # Untouched by either: offsets, bytes and all, as it checks itself.
        ghost.assert_intact()
    limit = hijack("dump", "1", "-o", image, "--ghost-limit", "lots")
    assert limit.returncode == 2, limit.describe()


def test_an_attached_process_maps_the_very_memfd_its_shadow_kept(
    hijack: HijackCli, tmp_path: Path
) -> None:
    image = tmp_path / "memfd.crf"
    with spawn_fixture("memfd", fifos=True) as memfd:
        attached = json.loads(hijack.ok("attach", "--json", memfd.pid).stdout)
        shadow = os.pidfd_open(attached["shadow_pid"])
        try:
            pid = dump_kill_and_restore(hijack, memfd, image)
            # The descriptor is the shadow's, the memfd itself: its mapping maps it too.
            kept = os.stat(f"/proc/{pid}/fd/{memfd.ready['shared_fd']}").st_ino
            [original] = [
                r
                for r in image_records(image)
                if isinstance(r, rec.MemfdObject) and r.name == "hijack-shared"
            ]
            assert kept == original.ino
            maps = Path(f"/proc/{pid}/maps").read_text().splitlines()
            mapping = [line.split() for line in maps if "/memfd:hijack-shared" in line]
            assert [fields[4] for fields in mapping] == [str(kept)]
            hijack.ok("detach", pid)
            memfd.assert_intact()
        finally:
            select.select([shadow], [], [], EXIT_TIMEOUT)
            os.waitid(os.P_PIDFD, shadow, os.WEXITED | os.WNOHANG)
            os.close(shadow)


def test_a_core_of_the_image_shows_each_memory_object_in_its_mappings(
    hijack: HijackCli, tmp_path: Path
) -> None:
    image, core = tmp_path / "memfd.crf", tmp_path / "memfd.core"
    with spawn_fixture("memfd") as memfd:
        hijack.ok("dump", memfd.pid, "-o", image)
        memfd.assert_intact()
    hijack.ok("core", image, "-o", core)
    records = image_records(image)
    binary = lief.ELF.parse(str(core))
    assert binary is not None
    objects = {
        (r.dev, r.ino): r for r in records if isinstance(r, rec.MemfdObject | rec.SharedAnonymous)
    }
    [segments] = [r for r in records if isinstance(r, rec.Segments)]
    checked = 0
    for segment in segments.segments:
        found = objects.get((os.makedev(segment.dev_major, segment.dev_minor), segment.inode))
        if found is None or not segment.shared:
            continue
        contents = bytearray(max(found.size, segment.offset + segment.size))
        for chunk in records:
            if isinstance(chunk, rec.ObjectData) and chunk.id == found.id:
                contents[chunk.offset : chunk.offset + len(chunk.data)] = chunk.data
        expected = bytes(contents[segment.offset : segment.offset + segment.size])
        shown = bytes(binary.get_content_from_virtual_address(segment.start, segment.size))
        assert shown == expected, f"{segment.path} at {segment.start:#x}"
        checked += 1
    assert checked == 5  # three memfd mappings, the /dev/zero region and its second mapping
