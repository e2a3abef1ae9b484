"""Per-process settings and timers survive `dump --kill` + `restore`, without attach.

The `settings` fixture (tests/fixtures/settings.c) sets oom_score_adj, timer
slack, dumpable, THP-disable, child subreaper, SCHED_BATCH with a nice value,
a CPU binding and mlock'd memory, and arms ITIMER_REAL, ITIMER_VIRTUAL and a
POSIX timer; after the restore it checks each of them and waits for the timers
to fire again. The test compares what /proc shows of them before and after.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from support import spawn_fixture
from support.cli import HijackCli
from support.objects import compare_views, dump_kill, proc_views, restore_adopted, shown_json
from support.procview import difference


def settings_view(pid: int) -> dict[str, str]:
    """What /proc says of the settings: compared before the dump and after the restore."""
    status = {
        line.split(":")[0]: line.split(":", 1)[1].strip()
        for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    }
    timers = Path(f"/proc/{pid}/timers").read_text()
    return {
        "oom_score_adj": Path(f"/proc/{pid}/oom_score_adj").read_text().strip(),
        "timerslack_ns": Path(f"/proc/{pid}/timerslack_ns").read_text().strip(),
        "VmLck": status["VmLck"],
        "THP_enabled": status["THP_enabled"],
        "Cpus_allowed_list": status["Cpus_allowed_list"],
        "policy": str(os.sched_getscheduler(pid)),
        "nice": str(os.getpriority(os.PRIO_PROCESS, pid)),
        # The pid a timer signals changes with a restore under another pid: left out.
        "timers": "\n".join(line for line in timers.splitlines() if "notify" not in line),
    }


def test_settings_and_timers_come_back_after_dump_kill_and_restore(
    hijack: HijackCli, tmp_path: Path
) -> None:
    image = tmp_path / "settings.crf"
    with spawn_fixture("settings", fifos=True) as fixture:
        before = settings_view(fixture.pid)
        identity_before = proc_views(fixture.pid, views=("identity",))
        dump_kill(hijack, fixture, image)

        shown = shown_json(hijack, image)
        assert shown["settings"]["oom_score_adj"] == 345
        assert shown["settings"]["thp_disable"] and shown["settings"]["child_subreaper"]
        assert shown["settings"]["dumpable"] == 0
        [guard] = shown["settings"]["guard_pages"]
        assert guard["end"] - guard["start"] == 2 * 4096
        [posix] = [t for t in shown["timers"]["posix"] if t["value_ns"]]
        assert posix["timer_id"] == int(fixture.ready["timer"])
        assert posix["interval_ns"] == 20_000_000 and posix["value"] == 0xFEED
        assert {t["which"] for t in shown["timers"]["itimers"]} == {0, 1}
        text = hijack.ok("show", image).stdout
        assert "oom_score_adj 345" in text and "THP disabled, child subreaper" in text
        assert f"POSIX timer {posix['timer_id']}: clock 1, signal 10" in text

        pid = restore_adopted(hijack, fixture, image)
        after = settings_view(pid)
        assert before == after, difference(before.items(), after.items())
        compare_views(identity_before, pid)
        fixture.assert_intact()


def test_a_seccomp_chain_shared_by_two_threads_still_judges_after_restore(
    hijack: HijackCli, tmp_path: Path
) -> None:
    image = tmp_path / "seccomp.crf"
    with spawn_fixture("seccomp", fifos=True) as fixture:
        dump_kill(hijack, fixture, image)
        shown = shown_json(hijack, image)
        chains = shown["settings"]["seccomp"]
        assert len(chains) == 2 and all(chain["mode"] == 2 for chain in chains), chains
        assert chains[0]["filters"] == chains[1]["filters"] and len(chains[0]["filters"]) == 2
        assert "seccomp filters of 7, 4 instructions" in hijack.ok("show", image).stdout

        restore_adopted(hijack, fixture, image)
        # Its own check: both threads under both filters, getppid refused, mincore killing.
        fixture.assert_intact()


def flags_view(pid: int) -> dict[str, str]:
    """What /proc says of the process_flags fixture's state, before and after."""
    status = {
        line.split(":")[0]: line.split(":", 1)[1].strip()
        for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    }
    names = sorted(
        task.joinpath("comm").read_text() for task in Path(f"/proc/{pid}/task").iterdir()
    )
    return {
        "personality": Path(f"/proc/{pid}/personality").read_text().strip(),
        "Umask": status["Umask"],
        "NoNewPrivs": status["NoNewPrivs"],
        "names": "".join(names),
    }


def test_mlockall_membarrier_personality_and_names_come_back(
    hijack: HijackCli, tmp_path: Path
) -> None:
    image = tmp_path / "flags.crf"
    with spawn_fixture("process_flags", fifos=True) as fixture:
        before = flags_view(fixture.pid)
        dump_kill(hijack, fixture, image)

        shown = shown_json(hijack, image)
        assert shown["settings"]["mlockall"] == 6  # MCL_FUTURE | MCL_ONFAULT
        assert shown["settings"]["membarrier"] == 0x14  # REGISTER_GLOBAL_ and _PRIVATE_EXPEDITED
        text = hijack.ok("show", image).stdout
        assert "mlockall MCL_FUTURE, MCL_ONFAULT, membarrier registrations 0x14" in text

        pid = restore_adopted(hijack, fixture, image)
        after = flags_view(pid)
        assert before == after, difference(before.items(), after.items())
        fixture.assert_intact()  # its own check: a new mapping locked, barriers, names


def test_an_aio_context_comes_back_at_its_address(hijack: HijackCli, tmp_path: Path) -> None:
    image = tmp_path / "aio.crf"
    with spawn_fixture("aio", fifos=True) as fixture:
        context = int(fixture.ready["context"], 16)
        dump_kill(hijack, fixture, image)
        shown = shown_json(hijack, image)
        assert shown["settings"]["aio_rings"] == [{"address": context, "size": 4096, "nr": 127}]
        assert f"AIO context at {context:#x}: 127 events" in hijack.ok("show", image).stdout

        restore_adopted(hijack, fixture, image)
        fixture.assert_intact()  # its own check: the ring at its address, a read through it


# Holds an AIO context with a completed event not reaped; prints its aio_context_t.
AIO_HOLDER = """\
import ctypes, os, struct, sys
libc = ctypes.CDLL(None, use_errno=True)
context = ctypes.c_ulong(0)
if libc.syscall(206, 1, ctypes.byref(context)) != 0:  # SYS_io_setup
    sys.exit(f"io_setup: errno {ctypes.get_errno()}")
buffer = ctypes.create_string_buffer(4)
fd = os.open("/proc/self/exe", os.O_RDONLY)
# struct iocb: data, key, rw_flags, opcode 0 (PREAD), reqprio, fildes, buf, nbytes, offset
iocb = ctypes.create_string_buffer(struct.pack("<QIiHhIQQqQIi", 7, 0, 0, 0, 0, fd,
                                               ctypes.addressof(buffer), 4, 0, 0, 0, 0))
requests = (ctypes.c_void_p * 1)(ctypes.addressof(iocb))
if libc.syscall(209, context, 1, requests) != 1:  # SYS_io_submit
    sys.exit(f"io_submit: errno {ctypes.get_errno()}")
ring = (ctypes.c_uint * 4).from_address(context.value)
while ring[2] == ring[3]:  # head == tail: not completed yet
    pass
print(hex(context.value), flush=True)
sys.stdin.read()
"""


def test_unreaped_aio_events_are_refused_by_name_and_the_process_runs_on(
    hijack: HijackCli, tmp_path: Path
) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", AIO_HOLDER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None
        ring = holder.stdout.readline().strip()
        refused = hijack("dump", holder.pid, "-o", tmp_path / "aio.crf", "--kill")
        assert refused.returncode == 1, refused.describe()
        assert refused.stderr == (
            f"hijack: process {holder.pid} has completed AIO events not yet reaped in its"
            f" context at {ring} (io_getevents them first)\n"
        ), refused.describe()
        assert not (tmp_path / "aio.crf").exists()
        assert holder.poll() is None
    finally:
        holder.kill()
        holder.wait()
