"""`hijack dump` of a process tree, `hijack show` of its image (docs/crf.md §7b).

The family fixture is a tree three levels deep with a zombie: dumped while it
runs on, its image holds the tree and one image per living member; a restore
of it beside the running tree is refused (its pids are taken) with the tree
untouched; a member traced by another tracer is refused by name (dump --kill
and restore of trees: test_tree_restore.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from support import spawn_fixture
from support.cli import HijackCli
from test_process_tree import SEIZE  # another tracer, holding a pid

from hijack.image import Tree, read_stream
from hijack.process.tree import read_tree


@pytest.fixture
def hijack(tmp_path: Path) -> HijackCli:
    return HijackCli(tmp_path / "state")


def test_a_tree_is_dumped_as_a_tree_and_shown_as_one(hijack: HijackCli, tmp_path: Path) -> None:
    image = tmp_path / "family.crf"
    with spawn_fixture("family") as family:
        pids = {name: int(value) for name, value in family.ready.items()}
        before = read_tree(family.pid)
        dumped = hijack.ok("dump", "-o", image, family.pid)
        assert "the tree of process" in dumped.stdout and "4 processes" in dumped.stdout
        assert read_tree(family.pid).pids == before.pids, "the tree runs on as it was"

        with open(image, "rb") as stream:
            records = list(read_stream(stream))
        tree = records[0]
        assert isinstance(tree, Tree)
        relations = {m.pid: (m.ppid, m.state.name) for m in tree.members}
        assert relations == {
            family.pid: (before.root.ppid, "RUNNING"),
            pids["child"]: (family.pid, "RUNNING"),
            pids["zombie"]: (family.pid, "ZOMBIE"),
            pids["grandchild"]: (pids["child"], "RUNNING"),
        }
        zombie = next(m for m in tree.members if m.pid == pids["zombie"])
        assert zombie.exit_code == 3 << 8, "its wait status: exited with 3"
        headers = [r.pid for r in records if type(r).__name__ == "ImageHeader"]
        assert headers == [family.pid, pids["child"], pids["grandchild"]]

        shown = hijack.ok("show", image)
        assert f"pid {pids['grandchild']}" in shown.stdout
        assert "zombie, wait status 0x300" in shown.stdout
        assert "tree of 4 processes" in shown.stdout
        as_json = json.loads(hijack.ok("show", "--json", image).stdout)
        assert [m["pid"] for m in as_json["tree"]] == [m.pid for m in tree.members]
        assert sorted(as_json["images"]) == sorted(str(pid) for pid in headers)

        # Its pids are the running tree's: a restore beside it is refused, nothing made.
        restore = hijack("restore", image)
        assert restore.returncode == 1
        assert restore.stderr.count("\n") == 1 and "--new-pids" in restore.stderr
        assert f"pid {pids['grandchild']} (family) is held by family" in restore.stderr
        assert read_tree(family.pid).pids == before.pids
        family.assert_intact()


def test_a_process_waiting_for_its_vfork_child_is_refused_by_name(
    hijack: HijackCli, tmp_path: Path
) -> None:
    """A process inside vfork sleeps until its child execs or exits, and no ptrace stop
    reaches it meanwhile: attach and dump (plain or --kill) of its tree, or of it, refuse
    it by name at once, touching nothing, rather than wait for the child (they waited:
    an attach paused the tree for as long as the child ran)."""
    image = tmp_path / "vfork.crf"
    with spawn_fixture("vfork_wait") as fixture:
        child = int(fixture.ready["child"])
        why = f"process {child} (vfork_wait) waits for its vfork child to exec or exit"
        for target in (fixture.pid, child):
            for command in (("attach",), ("dump", "-o", image), ("dump", "--kill", "-o", image)):
                refused = hijack(*command, target)
                assert refused.returncode == 1, refused.describe()
                assert why in refused.stderr, refused.stderr
                assert len(refused.stderr.splitlines()) == 1, refused.stderr
                assert not image.exists()
        assert not any((hijack.state_dir / "shadows").glob("*"))
        fixture.assert_intact()  # the vfork child exits: its parent saw its status


def test_a_tree_with_a_member_traced_by_another_tracer_is_refused_by_name(
    hijack: HijackCli, tmp_path: Path
) -> None:
    with spawn_fixture("family") as family:
        child = int(family.ready["child"])
        tracer = subprocess.Popen(
            [sys.executable, "-c", SEIZE, str(child)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        try:
            assert tracer.stdout is not None
            assert tracer.stdout.readline() == b"seized\n"
            refused = hijack("dump", "-o", tmp_path / "traced.crf", family.pid)
            assert refused.returncode == 1, refused.describe()
            assert refused.stderr == (
                f"hijack: cannot take the tree of process {family.pid}: process {child}"
                f" (family) is traced by pid {tracer.pid} (python)\n"
            )
            assert not (tmp_path / "traced.crf").exists()
        finally:
            tracer.kill()
            tracer.wait()
        family.assert_intact()
