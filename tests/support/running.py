"""Start a fixture, wait for its `ready` line, drive it through CONTROL_FD, collect its verdict.

The protocol is in tests/fixtures/README.md. Every wait here is bounded and
blocks on a file descriptor (the ready pipe, a pidfd), never on a sleep: a
fixture that dies, hangs or lies fails the test with a message naming it and
showing its stderr.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType

from support.build import fixture_path
from support.nodes import entering_namespace
from support.tempdirs import make_temp_dir, remove_temp_dir

READY_TIMEOUT = 10.0
FINISH_TIMEOUT = 30.0
SEND_TIMEOUT = 10.0
KILL_TIMEOUT = 10.0
_OUTPUT_TAIL = 4000  # characters of stdout/stderr shown in a failure
# Names of the FIFOs in a fixture's temp directory in FIFO mode (spawn_fixture).
READY_FIFO = "ready.fifo"
CONTROL_FIFO = "control.fifo"


class FixtureError(AssertionError):
    """A fixture did not behave: died before ready, hung, or reported a broken state."""


def _tail(text: str) -> str:
    return text if len(text) <= _OUTPUT_TAIL else "..." + text[-_OUTPUT_TAIL:]


def _exit_description(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


class RunningFixture:
    """A fixture process started by spawn_fixture; a context manager that always kills and reaps it.

    The exit status is collected through a pidfd and waitpid, not Popen, so
    waiting is bounded without polling and works while a tracer holds it.
    """

    def __init__(
        self,
        name: str,
        argv: list[str],
        process: subprocess.Popen[bytes],
        control_fd: int,
        output_dir: Path,
    ) -> None:
        self.name = name
        self.argv = argv
        self.pid = process.pid
        self.ready: dict[str, str] = {}
        self.returncode: int | None = None
        self._popen: subprocess.Popen[bytes] | None = process
        self._pidfd = os.pidfd_open(process.pid)
        self._control_fd: int | None = control_fd
        self._output_dir: Path | None = output_dir
        self._captured: dict[str, str] = {}
        # The path of CONTROL in FIFO mode (spawn_fixture(fifos=True)), else None.
        self.control_fifo: Path | None = None

    # -- output ---------------------------------------------------------------

    def _output(self, stream: str) -> str:
        if stream in self._captured:
            return self._captured[stream]
        assert self._output_dir is not None
        return (self._output_dir / stream).read_bytes().decode(errors="replace")

    @property
    def stdout(self) -> str:
        return self._output("stdout")

    @property
    def stderr(self) -> str:
        return self._output("stderr")

    def describe(self) -> str:
        """Who it is, how it ended, and what it printed: the body of every failure message."""
        return (
            f"fixture {self.name} (pid {self.pid}, argv {self.argv}): "
            f"{_exit_description(self.returncode)}\n"
            f"--- stderr ---\n{_tail(self.stderr)}--- stdout ---\n{_tail(self.stdout)}"
        )

    # -- protocol ---------------------------------------------------------------

    def _wait_ready(self, ready_fd: int, timeout: float) -> None:
        """Read the ready line and wait for the fixture to close READY_FD.

        Waiting for the close, not just the line, means the fixture's
        descriptor table no longer changes once spawn_fixture returns: a test
        that compares it before and after hijack works on it sees no READY_FD
        that was about to go.
        """
        received = b""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            readable, _, _ = select.select([ready_fd], [], [], max(remaining, 0))
            if not readable:
                self.kill()
                what = "READY_FD not closed after" if b"\n" in received else "no"
                raise FixtureError(f"{what} ready line within {timeout} s\n{self.describe()}")
            chunk = os.read(ready_fd, 4096)
            if not chunk:
                break
            received += chunk
        if b"\n" not in received:
            # EOF: it exited (or closed READY_FD) without a ready line. Give it
            # the time to exit so the message shows its exit code.
            self._wait(KILL_TIMEOUT)
            self.kill()
            raise FixtureError(
                f"READY_FD closed before a ready line (got {received!r})\n{self.describe()}"
            )
        line, _, rest = received.decode(errors="replace").partition("\n")
        words = line.split()
        if rest or not words or words[0] != "ready" or not all("=" in w for w in words[1:]):
            self.kill()
            raise FixtureError(f"malformed ready line {received!r}\n{self.describe()}")
        self.ready = dict(word.split("=", 1) for word in words[1:])

    def send(self, data: bytes, timeout: float = SEND_TIMEOUT) -> None:
        """Write `data` to the fixture's CONTROL_FD (bounded: a fixture not reading fails)."""
        if self._control_fd is None:
            raise FixtureError(f"CONTROL_FD already closed\n{self.describe()}")
        deadline = time.monotonic() + timeout
        view = memoryview(data)
        while view:
            remaining = deadline - time.monotonic()
            _, writable, _ = select.select([], [self._control_fd], [], max(remaining, 0))
            if not writable:
                raise FixtureError(
                    f"CONTROL_FD not read: {len(view)} of {len(data)} bytes unsent after "
                    f"{timeout} s\n{self.describe()}"
                )
            try:
                written = os.write(self._control_fd, view)
            except BrokenPipeError:
                raise FixtureError(f"fixture closed CONTROL_FD\n{self.describe()}") from None
            view = view[written:]

    def close_control(self) -> None:
        """Close CONTROL_FD: the fixture sees EOF and finishes."""
        if self._control_fd is not None:
            os.close(self._control_fd)
            self._control_fd = None

    # -- ending -----------------------------------------------------------------

    def _wait(self, timeout: float) -> int | None:
        """Reap the fixture if it exits within `timeout`; return its code (as Popen's)."""
        if self.returncode is not None:
            return self.returncode
        readable, _, _ = select.select([self._pidfd], [], [], timeout)
        if not readable:
            return None
        try:
            _, status = os.waitpid(self.pid, 0)
        except ChildProcessError:
            raise FixtureError(
                f"fixture {self.name} (pid {self.pid}) is not our child or was reaped by "
                "someone else; its exit status is lost"
            ) from None
        self.returncode = os.waitstatus_to_exitcode(status)
        if self._popen is not None:
            # Tell Popen, or its finaliser would wait on a pid that may be recycled.
            self._popen.returncode = self.returncode
            self._popen = None
        return self.returncode

    def wait_exit(self, timeout: float = FINISH_TIMEOUT) -> int:
        """Wait for the process to end without being asked (e.g. `hijack dump --kill`) and reap it.

        CONTROL_FD stays open and the output stays on disk: the fixture may
        live on in a restored process (adopt). Reaping frees the pid, which a
        zombie would keep from a same-pid restore.
        """
        code = self._wait(timeout)
        if code is None:
            raise FixtureError(f"did not exit within {timeout} s\n{self.describe()}")
        return code

    def adopt(self, pid: int) -> None:
        """Follow the fixture into process `pid`, restored from an image of the one that ended.

        Its exit status can be read if it is our child, which a restored
        process orphaned by its restorer becomes (pytest is a subreaper).
        """
        if self.returncode is None or self._pidfd < 0:
            raise FixtureError(f"cannot adopt pid {pid}: pid {self.pid} still runs or was finished")
        os.close(self._pidfd)
        self._pidfd = os.pidfd_open(pid)
        self.pid = pid
        self.returncode = None

    def _release(self) -> None:
        """Close our fds and delete the captured output (kept in memory for messages)."""
        self.close_control()
        if self._output_dir is not None:
            for stream in ("stdout", "stderr"):
                self._captured[stream] = self._output(stream)
            remove_temp_dir(self._output_dir)
            self._output_dir = None
        if self._pidfd >= 0:
            os.close(self._pidfd)
            self._pidfd = -1

    def send_signal(self, number: signal.Signals) -> None:
        """Send signal `number` if the fixture still runs (through its pidfd: never to a
        process that took its pid since)."""
        if self.returncode is None and self._pidfd >= 0:
            with contextlib.suppress(ProcessLookupError):  # exited already, not yet reaped
                signal.pidfd_send_signal(self._pidfd, number)

    def kill(self) -> None:
        """SIGKILL and reap the fixture if it still runs; release everything it held."""
        if self.returncode is None:
            # ProcessLookupError: exited already, not yet reaped.
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
            if self._wait(KILL_TIMEOUT) is None:
                raise FixtureError(f"SIGKILL did not end it in {KILL_TIMEOUT} s\n{self.describe()}")
        self._release()

    def finish(self, timeout: float = FINISH_TIMEOUT) -> int:
        """Close CONTROL_FD and wait for the fixture's verdict; return its exit code."""
        self.close_control()
        code = self._wait(timeout)
        if code is None:
            self.kill()
            raise FixtureError(
                f"did not exit within {timeout} s of CONTROL_FD EOF; killed\n{self.describe()}"
            )
        self._release()
        return code

    def assert_intact(self, timeout: float = FINISH_TIMEOUT) -> None:
        """Finish and demand exit code 0: the fixture found all its state intact."""
        code = self.finish(timeout)
        if code != 0:
            raise FixtureError(f"reported a broken state\n{self.describe()}")

    def __enter__(self) -> RunningFixture:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.kill()


def _open_fifos(directory: Path) -> tuple[int, int, int, int]:
    """Make the READY and CONTROL FIFOs in `directory`; open (ready_read, ready_write,
    control_read, control_write) without ever blocking in open().

    Opening one end of a FIFO blocks until the other end is open, so the
    harness's end is opened first in a mode that does not wait: READY's read
    end O_NONBLOCK (it is only read after select() says so), CONTROL's write
    end O_RDWR (Linux never blocks that open). That O_RDWR end also matters
    later: as a writer it lets a restored process reopen CONTROL by path
    (O_RDONLY) without blocking, and as a reader it keeps the FIFO, and the
    bytes sent into it, alive and writable while no fixture process holds it
    (between a dump --kill and the restore).
    """
    ready_path, control_path = directory / READY_FIFO, directory / CONTROL_FIFO
    os.mkfifo(ready_path, 0o600)
    os.mkfifo(control_path, 0o600)
    opened: list[int] = []
    try:
        for path, flags in (
            (ready_path, os.O_RDONLY | os.O_NONBLOCK),
            (ready_path, os.O_WRONLY),
            (control_path, os.O_RDONLY | os.O_NONBLOCK),
            (control_path, os.O_RDWR),
        ):
            opened.append(os.open(path, flags | os.O_CLOEXEC))
    except BaseException:
        for fd in opened:
            os.close(fd)
        raise
    ready_read, ready_write, control_read, control_write = opened
    # The fixture's read end blocks, as an anonymous pipe's does; opening it
    # O_NONBLOCK only avoided waiting for a writer.
    os.set_blocking(control_read, True)
    return ready_read, ready_write, control_read, control_write


def spawn_fixture(
    name: str,
    *args: str | os.PathLike[str],
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    ready_timeout: float = READY_TIMEOUT,
    fifos: bool = False,
    netns: str | None = None,
    user: int | None = None,
) -> RunningFixture:
    """Start fixture `name` with `args`, wait for its ready line, return it running.

    `env` adds to (and overrides) this process's environment. The fixture's
    stdout and stderr go to files (O_APPEND) in a harness temp directory that
    lives until the fixture is finished or killed.

    With `fifos`, READY_FD and CONTROL_FD are named FIFOs in that directory
    (`RunningFixture.control_fifo`) instead of anonymous pipes: a process
    restored from an image of the fixture reopens its descriptors by path, and
    only a FIFO can be reopened onto the same channel.

    With `netns` (a test node's `node.netns`), the fixture runs inside that
    network namespace, entered between fork and exec.

    With `user` (a uid, e.g. 65534), the fixture runs as that uid, with the
    gid of the same number and no supplementary groups (set after entering
    `netns`, which needs root).
    """
    binary = fixture_path(name)
    argv = [str(binary), *(os.fspath(arg) for arg in args)]
    output_dir = make_temp_dir(f"hijack-{name}-")
    try:
        if fifos:
            ready_read, ready_write, control_read, control_write = _open_fifos(output_dir)
        else:
            ready_read, ready_write = os.pipe()
            control_read, control_write = os.pipe()
    except BaseException:
        remove_temp_dir(output_dir)
        raise
    child_env = {**os.environ, **(env or {})}
    child_env["READY_FD"] = str(ready_write)
    child_env["CONTROL_FD"] = str(control_read)
    try:
        with (
            open(output_dir / "stdout", "ab") as stdout,
            open(output_dir / "stderr", "ab") as stderr,
            entering_namespace(netns) if netns else contextlib.nullcontext() as enter,
        ):
            process = subprocess.Popen(
                argv,
                env=child_env,
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=stderr,
                pass_fds=(ready_write, control_read),
                preexec_fn=_as_user(enter, user),
            )
    except BaseException:
        for fd in (ready_read, ready_write, control_read, control_write):
            os.close(fd)
        remove_temp_dir(output_dir)
        raise
    # Only the fixture may hold these ends: EOF on READY_FD must mean it is gone.
    os.close(ready_write)
    os.close(control_read)
    # A fixture that stops reading must not block send() forever.
    os.set_blocking(control_write, False)
    fixture = RunningFixture(name, argv, process, control_write, output_dir)
    if fifos:
        fixture.control_fifo = output_dir / CONTROL_FIFO
    try:
        fixture._wait_ready(ready_read, ready_timeout)
    except BaseException:
        fixture.kill()
        raise
    finally:
        os.close(ready_read)
    return fixture


def _as_user(enter: Callable[[], None] | None, user: int | None) -> Callable[[], None] | None:
    """`enter` (the namespace), then become `user`: what a fixture's child does before exec."""
    if user is None:
        return enter

    def become() -> None:
        if enter is not None:
            enter()
        os.setgroups([])
        os.setresgid(user, user, user)
        os.setresuid(user, user, user)

    return become
