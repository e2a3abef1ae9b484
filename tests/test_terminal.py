"""A process on a terminal moved to another node: it finds a terminal there, the same one to it.

The terminal fixture runs in node a on a pty the test opened (the test holds
its master: what a terminal emulator or tmux holds), as the leader of a
session whose controlling terminal it is. The test types lines at the master
and reads the answers there, before and after the move; on node b the
process has a pty of its own, with the home terminal's settings and window
size, as its controlling terminal; the home shadow passes the bytes (and a
resize of the home terminal, SIGWINCH there) through; when the process ends,
the home terminal gets its settings back.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import signal
import sys
import termios
import time
from collections.abc import Iterator
from pathlib import Path

from support import spawn_fixture
from support.nodes import Cluster, read_line, two_nodes
from test_move import (
    EXIT_TIMEOUT,
    LINE_TIMEOUT,
    ask,
    ask_moved,
    assert_ended_well,
    exit_code_on,
    finish_moved,
    logs,
    move,
    poll_until,
    spawn_python,
    wait_gone,
    wait_released,
)
from test_tree_move import MEMBER_LINE, move_tree, wait_members

from hijack.process.tree import read_tree
from hijack.sys import kcmp, procfs, terminal

ANSWER_TIMEOUT = 10.0
HOME_SIZE = terminal.WindowSize(33, 97)
RESIZED = terminal.WindowSize(40, 120)


class Typist:
    """The test at the master of the home pty: types lines, reads what the terminal shows."""

    def __init__(self, master: int) -> None:
        self.master = master
        self.shown = b""  # every byte the terminal showed
        self.seen = 0  # where the last expected line ended

    def type(self, text: str) -> None:
        os.write(self.master, text.encode())

    def expect(self, pattern: str, what: str) -> re.Match[bytes]:
        """Read until a line matching `pattern` shows (bounded); return the match."""
        wanted = re.compile(pattern.encode())
        deadline = time.monotonic() + ANSWER_TIMEOUT
        while not (found := wanted.search(self.shown, self.seen)):
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"no {what} within {ANSWER_TIMEOUT} s; shown: {self.shown!r}"
            readable, _, _ = select.select([self.master], [], [], remaining)
            if readable:
                self.shown += os.read(self.master, 4096)
        self.seen = found.end()
        return found


@contextlib.contextmanager
def home_terminal() -> Iterator[tuple[int, int, Typist]]:
    """A pty the test made, HOME_SIZE (the test holds its master, as a terminal emulator
    or tmux does): its master, its slave, and a Typist at the master."""
    master, slave = os.openpty()
    try:
        terminal.set_window_size(master, HOME_SIZE)
        yield master, slave, Typist(master)
    finally:
        os.close(master)
        os.close(slave)


def test_a_process_on_a_terminal_keeps_it_across_a_move(tmp_path: Path) -> None:
    with home_terminal() as (master, slave, typist):
        home_settings = termios.tcgetattr(slave)
        home_settings[6][termios.VERASE] = b"\x08"  # ^H: settings only the copy can carry over
        termios.tcsetattr(slave, termios.TCSANOW, home_settings)
        home_settings = termios.tcgetattr(slave)
        with Cluster(tmp_path, nodes=3) as cluster:
            a, b, c = cluster.nodes
            b.start_daemon()
            c.start_daemon()
            assert b.daemon is not None
            daemon_fds = len(os.listdir(f"/proc/{b.daemon.pid}/fd"))
            with spawn_fixture("terminal", os.ttyname(slave), netns=a.netns) as fixture:
                assert fixture.ready == {"rows": "33", "cols": "97"}
                typist.type("at home\n")
                typist.expect(r"echo at home rows=33 cols=97 winch=0\r\n", "answer at home")

                moved = move(a, fixture.pid, b)
                assert fixture.wait_exit(EXIT_TIMEOUT) == -signal.SIGKILL  # the original
                typist.type("on b\n")
                typist.expect(r"on b\r\n", "the echo of the line by the pty at b")
                typist.expect(r"echo on b rows=33 cols=97 winch=0\r\n", "answer from b")
                assert termios.tcgetattr(master)[3] & termios.ICANON == 0  # raw while away

                terminal.set_window_size(master, RESIZED)
                typist.expect(r"winch rows=40 cols=120 winch=1\r\n", "SIGWINCH at b")
                typist.type("resized\n")
                typist.expect(r"echo resized rows=40 cols=120 winch=1\r\n", "answer after it")

                # On from b: c's pty stands for the same home terminal, b's is gone.
                home_pid = fixture.pid
                moved = move(b, moved.pid, c, home=(a, home_pid))
                typist.type("on c\n")
                typist.expect(r"echo on c rows=40 cols=120 winch=1\r\n", "answer from c")
                # b's daemon let go of the pty and the relay once its process was gone.
                poll_until(
                    lambda: len(os.listdir(f"/proc/{b.daemon.pid}/fd")) == daemon_fds,
                    "the daemon of b back to its descriptors",
                )

                finish_moved(fixture, moved, tmp_path)
            # Released, the shadow gave the home terminal its settings back.
            assert termios.tcgetattr(master) == home_settings, logs(tmp_path)
            print(typist.shown.decode(errors="replace"))


def test_input_typed_before_a_later_move_and_not_read_yet_reaches_the_process(
    tmp_path: Path,
) -> None:
    with home_terminal() as (_master, slave, typist), Cluster(tmp_path, nodes=3) as cluster:
        a, b, c = cluster.nodes
        b.start_daemon()
        c.start_daemon()
        with spawn_fixture("terminal", os.ttyname(slave), netns=a.netns) as fixture:
            moved = move(a, fixture.pid, b)
            assert fixture.wait_exit(EXIT_TIMEOUT) == -signal.SIGKILL  # the original
            # Half a line: it waits in the line discipline of b's pty (which
            # echoed it), read by no one until the line is complete.
            typist.type("half a")
            typist.expect(r"half a", "the echo of half a line by the pty at b")
            moved = move(b, moved.pid, c, home=(a, fixture.pid))
            typist.type(" line\n")
            typist.expect(r"echo half a line rows=33 cols=97 winch=0\r\n", "the whole line")
            finish_moved(fixture, moved, tmp_path)


def test_the_terminal_fixture_passes_alone_and_its_checks_bite() -> None:
    with home_terminal() as (master, slave, typist):
        with spawn_fixture("terminal", os.ttyname(slave)) as fixture:
            typist.type("one\n")
            typist.expect(r"echo one rows=33 cols=97 winch=0\r\n", "an answer")
            terminal.set_window_size(master, RESIZED)
            typist.expect(r"winch rows=40 cols=120 winch=1\r\n", "SIGWINCH")
            fixture.assert_intact()
        with spawn_fixture("terminal", os.ttyname(slave)) as fixture:
            settings = termios.tcgetattr(master)
            settings[6][termios.VERASE] = (
                b"\x7f" if settings[6][termios.VERASE] != b"\x7f" else b"\x08"
            )
            termios.tcsetattr(master, termios.TCSANOW, settings)
            typist.type("two\n")
            assert fixture.finish() == 1
            assert "terminal settings changed" in fixture.stderr, fixture.describe()


# Holds the master of a pty whose slave is `cat`'s terminal (as tmux, screen or
# expect hold theirs); prints cat's pid and the slave's path. Each stdin line:
# "send TEXT" writes TEXT and a newline to the master and prints what the
# master gives until cat's answer ("TEXT|TEXT": the pty's echo, then cat's);
# "size" prints whether the master is a terminal and its window size;
# "resize ROWS COLS" sets it.
PTY_HOLDER = """\
import fcntl, os, struct, subprocess, sys, termios
master, slave = os.openpty()
fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("4H", 30, 100, 0, 0))
# cat is not our child (a double fork): a move takes a process with its descendants,
# and this test moves the holder alone, leaving the slave's side at home.
told, tell = os.pipe()
middle = os.fork()
if middle == 0:
    os.setsid()
    cat = subprocess.Popen(["cat"], stdin=slave, stdout=slave, stderr=subprocess.DEVNULL)
    os.write(tell, str(cat.pid).encode())
    os._exit(0)
os.waitpid(middle, 0)
os.close(tell)
cat_pid = int(os.read(told, 32))
slave_path = os.ttyname(slave)
os.close(slave)
print(cat_pid, slave_path, flush=True)
for line in sys.stdin:
    words = line.split()
    if words[0] == "send":
        os.write(master, words[1].encode() + b"\\n")
        shown = b""
        while shown.count(b"\\r\\n") < 2:
            shown += os.read(master, 100)
        print(shown.decode().replace("\\r\\n", "|").rstrip("|"), flush=True)
    elif words[0] == "size":
        rows, cols, _, _ = struct.unpack("4H", fcntl.ioctl(master, termios.TIOCGWINSZ, bytes(8)))
        print(os.isatty(master), rows, cols, flush=True)
    else:
        size = struct.pack("4H", int(words[1]), int(words[2]), 0, 0)
        fcntl.ioctl(master, termios.TIOCSWINSZ, size)
        print("resized", flush=True)
"""


def home_window(slave_path: str) -> terminal.WindowSize:
    slave = os.open(slave_path, os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK)
    try:
        return terminal.get_window_size(slave)
    finally:
        os.close(slave)


def test_a_process_holding_a_pty_master_gets_a_pty_master_on_each_node(tmp_path: Path) -> None:
    with Cluster(tmp_path, nodes=2) as cluster:
        a, b = cluster.nodes
        a.start_daemon()
        b.start_daemon()
        holder = spawn_python(a, PTY_HOLDER)
        cat_pid, slave_path = read_line(holder, LINE_TIMEOUT).split()
        try:
            assert ask(holder, "send one") == "one|one"
            assert ask(holder, "size") == "True 30 100"
            moved = move(a, holder.pid, b)
            assert holder.wait(EXIT_TIMEOUT) == -signal.SIGKILL  # the original
            # A terminal there: the home pty's size; its bytes go to cat and back.
            assert ask_moved(holder, "size") == "True 30 100"
            assert ask_moved(holder, "send two") == "two|two"
            # A size it sets reaches the home pty (cat's terminal).
            assert ask_moved(holder, "resize 40 120") == "resized"
            poll_until(
                lambda: home_window(slave_path) == terminal.WindowSize(40, 120),
                "the home pty resized",
            )
            back = move(b, moved.pid, a, home=(a, holder.pid))
            assert ask_moved(holder, "size") == "True 40 120"
            assert ask_moved(holder, "send three") == "three|three"
            assert holder.stdin is not None
            holder.stdin.close()
            assert_ended_well(back, "the pty holder", tmp_path)
            wait_released(back)
        finally:
            # cat (its child, ours now) ends when the master goes: hung up.
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(cat_pid), signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(int(cat_pid), 0)


# A login shell's stand-in, at home: leads a session on the pty (argv[1]) and starts the
# job (argv[2], a `sh -c` line) in a process group of its own, in the foreground there, on
# that terminal (its stdin, stdout, stderr); prints the job's pid, waits for it, then for
# its stdin to close, never reading the terminal (an interactive shell waits for its
# foreground job, and the test moves the job away; or moves it all, its job with it).
LOGIN_SHELL = """\
import contextlib, os, signal, sys, termios, fcntl
os.setsid()
tty = os.open(sys.argv[1], os.O_RDWR)
fcntl.ioctl(tty, termios.TIOCSCTTY, 0)
signal.signal(signal.SIGTTOU, signal.SIG_IGN)
job = os.fork()
if job == 0:
    os.setpgid(0, 0)
    os.tcsetpgrp(tty, os.getpid())
    for number in (0, 1, 2):
        os.dup2(tty, number)
    os.close(tty)
    signal.signal(signal.SIGTTOU, signal.SIG_DFL)
    os.execvp(sys.argv[2], sys.argv[2:])
with contextlib.suppress(PermissionError):  # EACCES: it has exec'd, its own setpgid done
    os.setpgid(job, job)
os.tcsetpgrp(tty, job)
print(job, flush=True)
with contextlib.suppress(ChildProcessError):  # moved away, or moved: under a new pid
    os.waitpid(-1, 0)
sys.stdin.read()
"""
# A job whose every member holds the terminal: a pipeline reader | filter | consumer of
# bash loops under a parent that collects their exit statuses. The reader reads the
# terminal (its stdin), each member writes it (stderr, and the consumer's stdout); each
# ends with a status of its own, which the parent prints there, sorted. (Not bash's own
# PIPESTATUS: its job table names its children by their pids, fresh ones after a move
# between the test's nodes, which share one kernel: README, limits.)
READER = (
    'while read -r line; do echo "read $line" >&2; [ "$line" = end ] && break; echo "$line";'
    " done; : </dev/tty && echo 'the reader has its terminal' >&2; exit 3"
)
FILTER = 'while read -r line; do echo "filter $line" >&2; echo "x$line"; done; exit 5'
CONSUMER = 'while read -r line; do echo "got $line"; done; echo "consumer done"; exit 7'
PIPELINE_JOB = f"""\
import os, subprocess, sys
reader = subprocess.Popen(["bash", "-c", {READER!r}], stdout=subprocess.PIPE)
filter = subprocess.Popen(["bash", "-c", {FILTER!r}], stdin=reader.stdout, stdout=subprocess.PIPE)
consumer = subprocess.Popen(["bash", "-c", {CONSUMER!r}], stdin=filter.stdout)
reader.stdout.close()
filter.stdout.close()
statuses = sorted(os.waitstatus_to_exitcode(os.wait()[1]) for _ in range(3))
print("statuses", *statuses, flush=True)
sys.exit(4)
"""


def lines_of(shown: bytes) -> list[str]:
    return shown.decode(errors="replace").split("\r\n")


def assert_in_order(lines: list[str], wanted: list[str]) -> None:
    """`wanted` appear among `lines` in that order."""
    at = [lines.index(line) if line in lines else -1 for line in wanted]
    assert -1 not in at and at == sorted(at), (wanted, lines)


def test_a_shell_job_on_a_terminal_moves_as_one_tree_and_keeps_it(tmp_path: Path) -> None:
    with home_terminal() as (master, slave, typist):
        home_settings = termios.tcgetattr(slave)
        with two_nodes(tmp_path) as (a, b):
            job_line = (sys.executable, "-c", PIPELINE_JOB)
            shell = spawn_python(a, LOGIN_SHELL, os.ttyname(slave), *job_line)
            job = int(read_line(shell, LINE_TIMEOUT))
            wait_members(job, 4)
            typist.type("one\n")
            typist.expect(r"got xone\r\n", "the line through the job at home")

            there, printed = move_tree(a, job, b)
            assert len(MEMBER_LINE.findall(printed)) == 4, printed
            wait_gone(job, EXIT_TIMEOUT, "the original job, killed by the move")
            # On b, one pty for the tree: every member's controlling terminal, the job's
            # group (the root's) in the foreground there.
            stats = [procfs.read_stat(member.pid) for member in read_tree(there).members]
            assert len(stats) == 4
            assert stats[0].tty_nr != 0 and {s.tty_nr for s in stats} == {stats[0].tty_nr}
            assert stats[0].session == stats[0].pgrp == stats[0].tpgid == there
            assert {s.pgrp for s in stats} == {there}
            # Their stderr, one open file at home (inherited), is one there too.
            for member in read_tree(there).members[1:]:
                assert kcmp.same_description_in(there, 2, member.pid, 2), member
            moved_from = len(typist.shown)

            typist.type("two\nthree\n")  # both at once: the reader takes them in turn
            typist.expect(r"got xthree\r\n", "the lines through the moved job")
            # Half a line typed at b's pty, unread: it goes along to the next one.
            typist.type("fo")
            typist.expect("fo", "the echo of half a line by the pty at b")
            there, _ = move_tree(b, there, a)  # home again: a pty of a's stands for it
            stats = [procfs.read_stat(member.pid) for member in read_tree(there).members]
            assert stats[0].tty_nr != 0 and {s.tty_nr for s in stats} == {stats[0].tty_nr}
            assert stats[0].session == stats[0].pgrp == stats[0].tpgid == there
            typist.type("ur\n")
            typist.expect(r"got xfour\r\n", "the whole line through the job moved home")
            typist.type("end\n")
            typist.expect(r"statuses 3 5 7\r\n", "each member's exit status, in its parent")
            assert exit_code_on(a, there) == 4, logs(tmp_path)
            shown = lines_of(typist.shown[moved_from:])
            assert_in_order(shown, ["read two", "read three", "read four", "read end"])
            assert_in_order(shown, ["filter two", "filter three", "filter four"])
            assert_in_order(
                shown, ["got xtwo", "got xthree", "got xfour", "consumer done", "statuses 3 5 7"]
            )
            for word in ("two", "three", "four"):
                assert_in_order(shown, [f"read {word}", f"filter {word}", f"got x{word}"])
            assert_in_order(shown, ["read end", "the reader has its terminal", "consumer done"])
            # Released, the shadow gave the home terminal its settings back.
            poll_until(
                lambda: termios.tcgetattr(master) == home_settings, "the home terminal's settings"
            )
            assert shell.stdin is not None
            shell.stdin.close()
            assert shell.wait(EXIT_TIMEOUT) == 0
            print(typist.shown.decode(errors="replace"))


def test_a_session_on_a_terminal_moves_whole_with_its_job_in_the_foreground_for_ctrl_c(
    tmp_path: Path,
) -> None:
    with home_terminal() as (_master, slave, typist), two_nodes(tmp_path) as (a, b):
        job_line = (sys.executable, "-c", PIPELINE_JOB)
        shell = spawn_python(a, LOGIN_SHELL, os.ttyname(slave), *job_line)
        read_line(shell, LINE_TIMEOUT)  # the job's pid: it runs
        wait_members(shell.pid, 5)
        there, _ = move_tree(a, shell.pid, b, "--no-precopy")
        assert shell.wait(EXIT_TIMEOUT) == -signal.SIGKILL  # the original
        # The session's leader leads it there too; the job's group (not the leader's)
        # is the pty's foreground group, as it was the home terminal's.
        members = read_tree(there).members
        stats = {member.pid: procfs.read_stat(member.pid) for member in members}
        job_there = next(m.pid for m in members if m.ppid == there)
        assert stats[there].session == stats[there].pgrp == there
        assert stats[there].tty_nr != 0
        assert {s.tty_nr for s in stats.values()} == {stats[there].tty_nr}
        assert {s.session for s in stats.values()} == {there}
        assert stats[there].tpgid == stats[job_there].pgrp == job_there
        typist.type("one\n")
        typist.expect(r"got xone\r\n", "the line through the moved job")
        assert_in_order(lines_of(typist.shown), ["read one", "filter one", "got xone"])
        # ^C typed at home: SIGINT for the foreground group there, the job's, not the
        # login shell's (whose Python would end on it).
        typist.type("\x03")
        wait_gone(job_there, EXIT_TIMEOUT, "the job, interrupted")
        assert procfs.read_stat(there).state in "RS"
        assert shell.stdin is not None
        shell.stdin.close()  # through the shadow: the login shell there ends
        wait_gone(there, EXIT_TIMEOUT, "the login shell, moved")
        assert exit_code_on(b, there) == 0, logs(tmp_path)
