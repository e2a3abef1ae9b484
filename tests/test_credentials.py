"""Credentials survive `dump --kill` + `restore`, each thread's its own.

The thread_credentials fixture (tests/fixtures/thread_credentials.c) has three
threads whose ids, groups, capability sets and no_new_privs differ from its
leader's, and a leader whose bounding, permitted and inheritable sets are cut:
after the restore every thread checks its own. The test compares what /proc
says of every thread's credentials before and after, and what `hijack show`
says of them; a daemon's policy judges every thread's powers, not only the
leader's (tests/test_node_trust.py).
"""

from __future__ import annotations

from pathlib import Path

from support import spawn_fixture
from support.cli import HijackCli
from support.objects import (
    assert_recodes,
    compare_views,
    dump_kill,
    proc_views,
    restore_adopted,
    shown_json,
    without_pipe_inodes,
)
from support.procview import STATUS_FIELDS, difference

# The status lines of credentials, of those a restore gives back (support.procview).
CREDENTIAL_LINES = tuple(
    line for line in STATUS_FIELDS if line.startswith(("Uid", "Gid", "Groups", "Cap", "NoNew"))
)


def credentials_view(pid: int) -> set[tuple[str, str, str]]:
    """(thread name, status line, value) of every thread's credentials, from /proc."""
    view = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        name = task.joinpath("comm").read_text().strip()
        for line in task.joinpath("status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in CREDENTIAL_LINES:
                view.add((name, key, " ".join(value.split())))
    return view


def test_each_threads_own_credentials_come_back(hijack: HijackCli, tmp_path: Path) -> None:
    image = tmp_path / "credentials.crf"
    with spawn_fixture("thread_credentials", fifos=True) as fixture:
        before = credentials_view(fixture.pid)
        views = proc_views(fixture.pid, without_pipe_inodes)
        # The fixture set them up as it says (the leader's bounding set lacks
        # CAP_SYS_MODULE, 16; the threads made before keep it).
        assert ("dropper", "Uid", "65534 65534 65534 65534") in before
        assert ("dropper", "NoNewPrivs", "1") in before
        assert ("leader", "NoNewPrivs", "0") in before
        dump_kill(hijack, fixture, image)

        shown = {thread["comm"]: thread for thread in shown_json(hijack, image)["threads"]}
        assert shown["leader"]["own_credentials"] is None
        assert "uid 65534/65534/65534/65534" in shown["dropper"]["own_credentials"]
        assert "no_new_privs" in shown["dropper"]["own_credentials"]
        assert "ambient 0x400" in shown["keeper"]["own_credentials"]
        assert "uid 0/0/0/1002" in shown["fsuser"]["own_credentials"]
        assert "credentials (where its own)" in hijack.ok("show", image).stdout
        assert_recodes(image)

        pid = restore_adopted(hijack, fixture, image)
        after = credentials_view(pid)
        assert before == after, difference(before, after)
        compare_views(views, pid, without_pipe_inodes)
        fixture.assert_intact()  # each thread's own check of its credentials
