"""Credentials survive `dump --kill` + `restore`, each thread's its own.

The thread_credentials fixture (tests/fixtures/thread_credentials.c) has three
threads whose ids, groups, capability sets and no_new_privs differ from its
leader's, and a leader whose bounding, permitted and inheritable sets are cut:
after the restore every thread checks its own. The test compares what /proc
says of every thread's credentials before and after, and what `hijack show`
says of them; a daemon's policy judges every thread's powers, not only the
leader's.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
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
from support.procview import difference

from hijack.image import records as rec
from hijack.node import policy

CREDENTIAL_LINES = (
    "Uid",
    "Gid",
    "Groups",
    "CapInh",
    "CapPrm",
    "CapEff",
    "CapBnd",
    "CapAmb",
    "NoNewPrivs",
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


def test_a_daemon_judges_every_threads_powers() -> None:
    """A process whose leader has no root powers but one of its threads has (uid 0 kept
    by a raw setresuid elsewhere, or capabilities) is refused as root's."""
    user = rec.Credentials(
        uid=1000,
        euid=1000,
        suid=1000,
        fsuid=1000,
        gid=1000,
        egid=1000,
        sgid=1000,
        fsgid=1000,
        cap_inheritable=0,
        cap_permitted=0,
        cap_effective=0,
        cap_bounding=(1 << 41) - 1,
        cap_ambient=0,
        umask=0o22,
        no_new_privs=False,
        groups=(1000,),
    )
    root_thread = dataclasses.replace(user, euid=0, cap_effective=1 << 21, cap_permitted=1 << 21)
    header = rec.ImageHeader(
        pid=4242,
        ppid=1,
        pgid=4242,
        sid=4242,
        created_ns=0,
        options=rec.DumpOptions(0),
        comm="server",
        argv=("server",),
        exe="/usr/bin/server",
        node="a",
    )
    segments = rec.Segments(segments=())
    policy.check_image(header, (user,), segments, allow_root=False)
    with pytest.raises(policy.Refused, match=r"uid 0, permitted capabilities 0x200000"):
        policy.check_image(header, (user, root_thread), segments, allow_root=False)
    policy.check_image(header, (user, root_thread), segments, allow_root=True)
