"""A fanotify group comes back from the image alone (`dump --kill`, no attach).

The `fanotify` fixture (tests/fixtures/fanotify.c) holds a group with inode marks
(one an ignore mark), a directory mark for its children and a mount mark; after
`dump --kill` and `restore` it checks its flags and marks and that a change made
after the restore is reported. The /proc views of its descriptors agree.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

from support import spawn_fixture
from support.cli import HijackCli, restored_pid
from support.procview import difference, fds_view


def test_a_fanotify_group_comes_back_with_its_marks(hijack: HijackCli, tmp_path: Path) -> None:
    image = tmp_path / "fanotify.crf"
    watched = tmp_path / "dir"
    watched.mkdir()
    with spawn_fixture("fanotify", watched, fifos=True) as fixture:
        before = fds_view(fixture.pid)
        hijack.ok("dump", fixture.pid, "-o", image, "--kill")
        assert fixture.wait_exit() == -signal.SIGKILL

        shown: dict[str, Any] = json.loads(hijack.ok("show", "--json", image).stdout)
        [group] = [o for o in shown["objects"] if o["record"] == "FanotifyObject"]
        assert [m["kind"] for m in group["marks"]].count(0) == 3, group
        text = hijack.ok("show", image).stdout
        assert f"inode {watched}/watched.dat 0xa" in text, text
        assert f"inode {watched}/ignored.dat 0x0 ignoring 0x20" in text, text

        pid = restored_pid(hijack.ok("restore", image))
        fixture.adopt(pid)
        after = fds_view(pid)
        assert before == after, difference(before, after)
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
