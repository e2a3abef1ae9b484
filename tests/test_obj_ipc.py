"""System V IPC and POSIX message queues rebuilt from the image (issue #12 item 8).

The `sysv` fixture attaches two shared memory segments (one under a key, one
removed while attached), sets a semaphore set's values, queues typed
messages on a SysV queue and prioritised ones on a POSIX queue, and checks
all of it at its finish, each message once. Dumped with --kill without
attach, it is restored twice over: with its objects still there (SysV
objects and named queues outlive their process: the restore takes them as
they are) and with every one of them gone, as after a reboot (the restore
makes them again under the same ids, keys and names).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from support import RunningFixture, spawn_fixture
from support.cli import HijackCli
from support.objects import (
    assert_recodes,
    assert_refused,
    compare_views,
    dump_kill,
    proc_views,
    restore_adopted,
)

from hijack.errors import HijackError
from hijack.sys import mqueue, sysv


def remove_objects(ready: dict[str, str]) -> None:
    """Remove what the fixture made, where it is still there (its own finish removes it)."""
    for kind, key in (("shm", "shm"), ("shm", "removed"), ("sem", "sem"), ("msg", "msg")):
        with contextlib.suppress(HijackError):
            sysv.remove(kind, int(ready[key]))
    with contextlib.suppress(HijackError):
        mqueue.unlink(ready["mq"])


@contextlib.contextmanager
def sysv_fixture() -> Iterator[RunningFixture]:
    with spawn_fixture("sysv", fifos=True) as fixture:
        try:
            yield fixture
        finally:
            remove_objects(fixture.ready)


def dump_kill_restore(
    hijack: HijackCli, fixture: RunningFixture, image: Path, *, gone: bool
) -> None:
    before = proc_views(fixture.pid, views=("maps", "fd"))
    dump_kill(hijack, fixture, image)
    if gone:
        remove_objects(fixture.ready)
        assert int(fixture.ready["sem"]) not in sysv.semaphore_sets()
    pid = restore_adopted(hijack, fixture, image)
    compare_views(before, pid)
    ids = {
        "shm": sysv.shared_memory(),
        "removed": sysv.shared_memory(),
        "sem": sysv.semaphore_sets(),
        "msg": sysv.message_queues(),
    }
    for name, table in ids.items():
        assert int(fixture.ready[name]) in table, f"{name} {fixture.ready[name]} not there"
    fixture.assert_intact()
    assert "PASS sysv" in fixture.stdout
    shown = hijack.ok("show", image).stdout
    assert f"sem {fixture.ready['sem']}: private, values 1 4 42" in shown, shown
    assert f"msg {fixture.ready['msg']}: private, 3 messages" in shown, shown
    assert_recodes(image)


def test_ipc_objects_still_there_are_taken_as_they_are(hijack: HijackCli, tmp_path: Path) -> None:
    with sysv_fixture() as fixture:
        dump_kill_restore(hijack, fixture, tmp_path / "sysv.crf", gone=False)


def test_ipc_objects_gone_are_made_again_under_their_ids(hijack: HijackCli, tmp_path: Path) -> None:
    with sysv_fixture() as fixture:
        dump_kill_restore(hijack, fixture, tmp_path / "sysv.crf", gone=True)


def test_a_plain_dump_takes_no_message(hijack: HijackCli, tmp_path: Path) -> None:
    with sysv_fixture() as fixture:
        hijack.ok("dump", fixture.pid, "-o", tmp_path / "sysv.crf")
        fixture.assert_intact()
    assert "PASS sysv" in fixture.stdout


def test_an_id_another_object_took_is_refused_and_nothing_made_is_left(
    hijack: HijackCli, tmp_path: Path
) -> None:
    image = tmp_path / "sysv.crf"
    with sysv_fixture() as fixture:
        dump_kill(hijack, fixture, image)
        remove_objects(fixture.ready)
        semid = int(fixture.ready["sem"])
        # Another set (of one semaphore, not three) made under the process's id since.
        intruder = sysv.create_with_id("sem", semid, sysv.IPC_PRIVATE, 0o600, 1)
        try:
            refused = hijack("restore", image)
            assert_refused(refused, f"semaphore set id {semid} is taken")
            # The segments made before the refusal are gone again (other tests may make
            # objects meanwhile: only the image's ids are looked at); no process started
            # (the suite's leak check would name it).
            segments = sysv.shared_memory()
            for name in ("shm", "removed"):
                assert int(fixture.ready[name]) not in segments, f"{name} was left"
            assert int(fixture.ready["msg"]) not in sysv.message_queues()
        finally:
            sysv.remove("sem", intruder)
