"""`hijack check` on this machine, and with a requirement made unmet in a way the test undoes.

Nothing machine-wide is changed: the unmet requirements are a state directory
that cannot be one (a regular file stands where it should be) and a node
certificate that is not there, both under the test's own temporary directory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from support.cli import CLI_TIMEOUT, CliResult, HijackCli

REQUIRED = (
    "machine",
    "privileges",
    "proc",
    "ptrace scope",
    "ptrace seize",
    "clone3 set_tid",
    "PR_SET_MM_MAP",
    "pidfd_getfd",
    "state directory",
    "cluster certificates",
)


def findings(result: CliResult) -> dict[str, dict[str, Any]]:
    return {finding["name"]: finding for finding in json.loads(result.stdout)}


@pytest.fixture
def cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> HijackCli:
    monkeypatch.setenv("HIJACK_NODE", "checked")
    cli = HijackCli(tmp_path / "state")
    cli.ok("cluster", "init")
    cli.ok("cluster", "add-node", "checked")
    return cli


def test_every_line_ok_on_this_machine(cli: HijackCli) -> None:
    result = cli.ok("check")
    lines = result.stdout.splitlines()
    assert len(lines) >= len(REQUIRED), result.describe()
    assert not [line for line in lines if line.startswith("MISSING")], result.describe()
    found = findings(cli.ok("check", "--json"))
    for name in REQUIRED:
        assert found[name]["ok"] and found[name]["required"], found[name]
    # What this machine's root lacks (KERNEL-NOTES) is said, not hidden.
    assert found["raising hard limits"]["ok"] is ("CAP_SYS_RESOURCE" in capabilities())
    assert found["dirty-page tracking"]["ok"], found["dirty-page tracking"]
    assert found["network namespaces"]["ok"], found["network namespaces"]


def test_an_unusable_state_directory_is_missing_and_exit_is_1(tmp_path: Path) -> None:
    in_the_way = tmp_path / "a-file"
    in_the_way.write_text("not a directory\n")
    cli = HijackCli(in_the_way)
    result = cli("check")
    assert result.returncode == 1, result.describe()
    line = next(line for line in result.stdout.splitlines() if "state directory" in line)
    assert line.startswith("MISSING") and "is not a directory" in line, result.describe()
    assert "the registry" in line, result.describe()
    assert result.stderr.strip().splitlines() == [
        "hijack: missing what hijack needs: state directory, cluster certificates"
    ], result.describe()


def test_a_missing_node_certificate_is_missing_and_exit_is_1(cli: HijackCli) -> None:
    os.unlink(cli.state_dir / "pki" / "nodes" / "checked.crt")
    result = cli("check", "--json")
    assert result.returncode == 1, result.describe()
    found = findings(result)
    certificates = found["cluster certificates"]
    assert not certificates["ok"], certificates
    assert "hijack cluster add-node checked" in certificates["detail"]
    assert certificates["without"] == "move and node serve"
    assert all(found[name]["ok"] for name in REQUIRED if name != "cluster certificates"), found
    assert result.stderr.strip() == "hijack: missing what hijack needs: cluster certificates"


def capabilities() -> set[str]:
    with open("/proc/self/status") as status:
        mask = next(int(line.split()[1], 16) for line in status if line.startswith("CapEff:"))
    return {"CAP_SYS_RESOURCE"} if mask >> 24 & 1 else set()


def test_a_proc_of_another_pid_namespace_is_missing_and_exit_is_1(cli: HijackCli) -> None:
    """Run in a pid namespace of its own whose /proc is still this one's (no --mount-proc),
    hijack would read other processes under its pids: check says so."""
    completed = subprocess.run(
        ["unshare", "--pid", "--fork", sys.executable, "-m", "hijack", "check", "--json"],
        env={**os.environ, "HIJACK_STATE_DIR": str(cli.state_dir)},
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
        check=False,
    )
    assert completed.returncode == 1, completed.stderr
    proc = {finding["name"]: finding for finding in json.loads(completed.stdout)}["proc"]
    assert not proc["ok"] and "another pid namespace's" in proc["detail"], proc
    assert "--mount-proc" in proc["detail"], proc
    with_proc = subprocess.run(
        ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-m", "hijack", "check"],
        env={**os.environ, "HIJACK_STATE_DIR": str(cli.state_dir)},
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
        check=False,
    )
    line = next(line for line in with_proc.stdout.splitlines() if " proc " in line)
    assert line.startswith("ok"), with_proc.stdout
