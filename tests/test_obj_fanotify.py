"""A fanotify group comes back from the image alone (`dump --kill`, no attach).

The `fanotify` fixture (tests/fixtures/fanotify.c) holds a group with inode marks
(one an ignore mark), a directory mark for its children and a mount mark; after
`dump --kill` and `restore` it checks its flags and marks and that a change made
after the restore is reported. The /proc views of its descriptors agree.
"""

from __future__ import annotations

from pathlib import Path

from support import spawn_fixture
from support.cli import HijackCli
from support.objects import (
    compare_views,
    dump_kill,
    objects_of,
    proc_views,
    restore_adopted,
    shown_json,
)


def test_a_fanotify_group_comes_back_with_its_marks(hijack: HijackCli, tmp_path: Path) -> None:
    image = tmp_path / "fanotify.crf"
    watched = tmp_path / "dir"
    watched.mkdir()
    with spawn_fixture("fanotify", watched, fifos=True) as fixture:
        before = proc_views(fixture.pid, views=("fd",))
        dump_kill(hijack, fixture, image)

        [group] = objects_of(shown_json(hijack, image), "FanotifyObject")
        assert [m["kind"] for m in group["marks"]].count(0) == 3, group
        text = hijack.ok("show", image).stdout
        # (The table may wrap "inode" away from its path: that depends on the path's length.)
        assert f"{watched}/watched.dat 0xa" in text and "inode" in text, text
        assert f"inode {watched}/ignored.dat 0x0 ignoring 0x20" in text, text

        compare_views(before, restore_adopted(hijack, fixture, image))
        fixture.assert_intact()


def test_a_mark_on_a_file_gone_since_is_refused_by_name(hijack: HijackCli, tmp_path: Path) -> None:
    image = tmp_path / "fanotify.crf"
    watched = tmp_path / "dir"
    watched.mkdir()
    with spawn_fixture("fanotify", watched, fifos=True) as fixture:
        hijack.ok("dump", fixture.pid, "-o", image)
        (watched / "watched.dat").unlink()
        refused = hijack("restore", image)
        assert refused.returncode == 1, refused.describe()
        assert f"its mark on {watched}/watched.dat, now gone" in refused.stderr, refused.describe()
        fixture.kill()
