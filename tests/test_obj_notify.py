"""timerfd, signalfd and inotify descriptors come back from the image alone (no attach).

The `notify` fixture (tests/fixtures/notify.c) holds a periodic and an expired
one-shot timerfd, a signalfd with its signal pending, and an inotify instance
whose second watch was removed; after `dump --kill` and `restore`, the test
makes a file in two watched directories and the fixture checks every one of
them. The /proc views of its descriptors agree before and after.
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


def test_timerfd_signalfd_and_inotify_come_back_after_dump_kill_and_restore(
    hijack: HijackCli, tmp_path: Path
) -> None:
    dirs = [tmp_path / name for name in ("one", "two", "three")]
    for directory in dirs:
        directory.mkdir()
    image = tmp_path / "notify.crf"
    with spawn_fixture("notify", *dirs, fifos=True) as fixture:
        before = proc_views(fixture.pid, views=("fd",))
        dump_kill(hijack, fixture, image)

        shown = shown_json(hijack, image)
        records = {o["record"] for o in shown["objects"]}
        assert {"TimerfdObject", "SignalfdObject", "InotifyObject"} <= records, records
        [inotify] = objects_of(shown, "InotifyObject")
        watched = [(w["wd"], w["path"]) for w in inotify["watches"]]
        assert watched == [(1, str(dirs[0])), (3, str(dirs[2]))]
        text = hijack.ok("show", image).stdout
        assert "1 unread ticks" in text and "signals 10" in text, text

        pid = restore_adopted(hijack, fixture, image)
        compare_views(before, pid)
        (dirs[0] / "created").touch()
        (dirs[2] / "created").touch()
        fixture.assert_intact()


def test_pidfds_of_itself_and_of_its_parent_come_back(hijack: HijackCli, tmp_path: Path) -> None:
    image = tmp_path / "pidfds.crf"
    with spawn_fixture("pidfds", fifos=True) as fixture:
        before = proc_views(fixture.pid, views=("fd",))
        dump_kill(hijack, fixture, image)
        text = hijack.ok("show", image).stdout
        assert "pidfd: of the process itself" in text, text
        assert f"pidfd: of process {fixture.ready['parent']}" in text, text
        compare_views(before, restore_adopted(hijack, fixture, image))
        fixture.assert_intact()
