"""Test nodes: network namespaces on one machine, each with its own link, address and daemon.

A cluster is one *hub* namespace holding a bridge, plus one namespace per
node with `lo` up and a veth whose peer is a port of the hub's bridge:

    node a (10.77.0.1, eth0) ──veth── v-a ┐
    node b (10.77.0.2, eth0) ──veth── v-b ├─ br0   (hub namespace)
    node c (10.77.0.3, eth0) ──veth── v-c ┘

Every link is created inside the cluster's own namespaces (`ip -n HUB link
add ... peer ... netns NODE`), so nothing ever appears in the root namespace
and clusters of parallel runs never touch each other: each is its own L2
segment, so every cluster can use the same 10.77.0.0/24 without collisions.
Namespace names start with `hj<pid of this process>x` (namespace_prefix()),
so two pytest runs on one machine never share a name, and the per-test leak
check (conftest) counts only this process's namespaces.

All nodes share this machine's filesystem, and by default its pid space:
paths and pids carry over, only the network differs. A node named in
Cluster(pid_namespaces=...) has a pid namespace of its own instead, as a
machine has: a moved process can take its old pid there, which its original
still holds here while the move runs. Its first process is a small init
(pid 1 there: it reaps the orphans, as a machine's init does), started in a
mount namespace of its own where /proc is mounted again for that pid
namespace, so that every program of the node (its daemon, `hijack` run
there) reads the pids it lives among in /proc, and in an IPC namespace of
its own: its System V objects are its own, as a machine's are (a segment a
process moved there attaches is made again there, not found as it was). Everything the node starts
joins both namespaces; the test sees those processes under other pids
(Node.host_pid, Node.pid_inside map them through /proc/PID/status NSpid).
Killing the init at the cluster's end kills all that runs in it.

Programs run inside a node are moved into its namespace by the child itself,
between fork and exec (setns in a preexec_fn), not by `ip netns exec`. That
one also execs its program (iproute2's cmd_exec is an execvp, no fork), so
the pid would be the program's too, but Popen returns once `ip` is exec'd:
for a moment the pid is still `ip`, not yet in the namespace, and a test that
attaches to it or lists the namespace's processes at once sees the wrong
program or misses it. With setns in the child, Popen returns with the
program itself running inside the namespace, a missing program raises
FileNotFoundError as a plain Popen does, and the program keeps this
machine's mount namespace (`ip netns exec` makes a private one to remount
/sys, which nothing here needs).

Cleanup always runs, also when a test fails or a daemon hangs: daemons get
SIGTERM and then SIGKILL after a bound, every process still inside a cluster
namespace is killed and reaped, and the namespaces are deleted.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import secrets
import select
import signal
import string
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from pyroute2 import NetNS
from pyroute2.netlink.exceptions import NetlinkError

from hijack.node import pki
from hijack.sys import procfs
from hijack.sys.process import WALL
from support.cli import CLI_COLUMNS, CLI_TIMEOUT, CliResult, _text

# `ip netns add` keeps a bind mount per namespace here; `ip netns list` reads it.
NETNS_RUN_DIR = Path("/run/netns")
SUBNET = "10.77.0"  # /24; the same in every cluster: each cluster is an isolated L2 segment
PREFIX_LENGTH = 24
NODE_LINK = "eth0"  # the node's end of its veth, inside the node's namespace
BRIDGE = "br0"  # in the hub namespace
DEFAULT_DAEMON_PORT = 7450
# The command that runs `hijack`: the same interpreter and package as the tests.
HIJACK_PROGRAM: tuple[str, ...] = (sys.executable, "-m", "hijack")

IP_TIMEOUT = 10.0  # one `ip` command; they take milliseconds
SNIPPET_TIMEOUT = 20.0  # a helper python snippet run inside a node
DAEMON_READY_TIMEOUT = 20.0
DAEMON_STOP_TIMEOUT = 5.0  # SIGTERM to exit; then SIGKILL
KILL_TIMEOUT = 10.0  # SIGKILL to exit
EXIT_GRACE = 1.0  # a daemon that failed before ready, to exit on its own
CONNECT_RETRY_INTERVAL = 0.02  # between connects to a port nobody listens on yet
_OUTPUT_TAIL = 4000  # characters of a daemon's stderr shown in a failure


class NodeError(AssertionError):
    """A node, its network or its daemon did not behave (an assertion: it fails the test)."""


# -- entering a namespace ------------------------------------------------------------

CLONE_NEWNET = 0x40000000
CLONE_NEWNS = 0x00020000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REC, MS_SLAVE = 0x2, 0x4, 0x8, 0x4000, 0x80000
# Python 3.11 has no os.setns nor os.unshare (3.12 does).
_libc = ctypes.CDLL(None, use_errno=True)
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.setns.restype = ctypes.c_int
_libc.unshare.argtypes = [ctypes.c_int]
_libc.unshare.restype = ctypes.c_int
_libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_void_p]
_libc.mount.restype = ctypes.c_int


def _checked(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


@contextlib.contextmanager
def entering_namespace(netns: str) -> Iterator[Callable[[], None]]:
    """A preexec_fn for subprocess that moves the child into network namespace `netns`.

    Runs in the child between fork and exec, so the program starts inside
    and the calling process stays in its own namespace. The namespace is
    opened here, in the parent: a missing one fails before any fork.
    """
    netns_fd = os.open(NETNS_RUN_DIR / netns, os.O_RDONLY | os.O_CLOEXEC)

    def enter() -> None:
        if _libc.setns(netns_fd, CLONE_NEWNET) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"setns({netns}): {os.strerror(errno)}")

    try:
        yield enter
    finally:
        os.close(netns_fd)


def spawn_in_namespace(
    netns: str, argv: Sequence[str | os.PathLike[str]], **popen: Any
) -> subprocess.Popen[Any]:
    """subprocess.Popen(argv, **popen) inside network namespace `netns`; returns once argv
    itself runs there."""
    with entering_namespace(netns) as enter:
        return subprocess.Popen([os.fspath(arg) for arg in argv], preexec_fn=enter, **popen)


@contextlib.contextmanager
def children_in_pid_namespace(pid_namespace_fd: int | None) -> Iterator[None]:
    """While inside, the children this process forks start in the pid namespace
    `pid_namespace_fd` (None: a new one, whose init the first child is).

    setns/unshare of a pid namespace move only the children to come, never the
    caller, and a child's preexec_fn runs too late for its own pid: so this
    process switches for the fork and switches back (to its own namespace,
    which setns allows). Keep the inside to one Popen: no thread can start
    while the two differ (clone fails with EINVAL).
    """
    own = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if pid_namespace_fd is None:
            _checked(_libc.unshare(CLONE_NEWPID), "unshare(CLONE_NEWPID)")
        else:
            _checked(_libc.setns(pid_namespace_fd, CLONE_NEWPID), "setns(pid namespace)")
        try:
            yield
        finally:
            _checked(_libc.setns(own, CLONE_NEWPID), "setns(own pid namespace)")
    finally:
        os.close(own)


# The init of a node's pid namespace: reaps every child (orphans of the node come
# to it), with SIGCHLD blocked between the reaping and the wait so none is missed
# (a child whose exit signal is not SIGCHLD is reaped within a second). Signals from
# outside do not reach a namespace's init unless it handles them: only SIGKILL.
_PID_INIT_SNIPPET = """\
import os, signal
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
while True:
    try:
        while os.waitpid(-1, os.WNOHANG | 0x40000000)[0]:
            pass
    except ChildProcessError:
        pass
    signal.sigtimedwait({signal.SIGCHLD}, 1.0)
"""


# -- namespaces ------------------------------------------------------------------


def namespace_prefix() -> str:
    """The start of every namespace name this process creates (computed now: fork-safe)."""
    # The 'x' ends the pid: hj12x... is never mistaken for a name of pid 123.
    return f"hj{os.getpid()}x"


def snapshot_namespaces() -> frozenset[str]:
    """This process's cluster namespaces that exist now.

    Lists /run/netns directly (what `ip netns list` prints) rather than
    running `ip`: the conftest does this twice for every test.
    """
    try:
        names = os.listdir(NETNS_RUN_DIR)
    except FileNotFoundError:
        return frozenset()
    prefix = namespace_prefix()
    return frozenset(name for name in names if name.startswith(prefix))


def find_leftover_namespaces(baseline: frozenset[str]) -> list[str]:
    """This process's namespaces created since `baseline` and still present."""
    return sorted(snapshot_namespaces() - baseline)


def run_ip(*args: str, stdin: str | None = None) -> str:
    """Run `ip ARGS...` (bounded); return its stdout, or raise NodeError with its stderr."""
    argv = ["ip", *args]
    try:
        completed = subprocess.run(
            argv,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=IP_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise NodeError(f"$ {' '.join(argv)} did not finish within {IP_TIMEOUT} s") from None
    if completed.returncode != 0:
        raise NodeError(
            f"$ {' '.join(argv)} -> exit {completed.returncode}\n"
            + (f"--- stdin ---\n{stdin}" if stdin else "")
            + f"--- stderr ---\n{completed.stderr}"
        )
    return completed.stdout


def _namespace_ids(names: Iterable[str]) -> set[tuple[int, int]]:
    """(st_dev, st_ino) of each namespace: the identity /proc/PID/ns/net shows too."""
    ids: set[tuple[int, int]] = set()
    for name in names:
        with contextlib.suppress(FileNotFoundError):
            status = os.stat(NETNS_RUN_DIR / name)
            ids.add((status.st_dev, status.st_ino))
    return ids


def _pids_inside(namespace_ids: set[tuple[int, int]]) -> list[int]:
    """Every process whose network namespace is one of `namespace_ids` (`ip netns pids`, at once
    for all of them). Zombies have left their namespaces and are not listed."""
    pids: list[int] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            status = os.stat(f"/proc/{entry}/ns/net")
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue  # exited meanwhile, or a zombie
        if (status.st_dev, status.st_ino) in namespace_ids:
            pids.append(int(entry))
    return pids


def kill_processes_inside(names: Iterable[str], timeout: float = KILL_TIMEOUT) -> list[int]:
    """SIGKILL every process inside the namespaces `names` and wait until all have exited.

    Returns the pids killed (exited, not reaped: the caller reaps, through
    its Popen where it has one so the Popen learns the status). Scans again
    after each round, since a process may fork while the previous round is
    killed. Raises NodeError if some process outlives `timeout`.
    """
    namespace_ids = _namespace_ids(names)
    killed: list[int] = []
    deadline = time.monotonic() + timeout
    while namespace_ids and (pids := _pids_inside(namespace_ids)):
        pidfds: list[int] = []
        for pid in pids:
            try:
                pidfd = os.pidfd_open(pid)
            except ProcessLookupError:
                continue
            # ProcessLookupError: exited since the scan; the pidfd is readable already.
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            pidfds.append(pidfd)
            killed.append(pid)
        try:
            # A pidfd turns readable when its process has exited (and its
            # children have been reparented to us: pytest is a subreaper).
            while pidfds:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise NodeError(
                        f"SIGKILL did not end these processes within {timeout} s: "
                        + ", ".join(_describe_pid(pid) for pid in pids)
                    )
                exited, _, _ = select.select(pidfds, [], [], remaining)
                for pidfd in exited:
                    pidfds.remove(pidfd)
                    os.close(pidfd)
        finally:
            for pidfd in pidfds:
                os.close(pidfd)
    return killed


def reap(pids: Iterable[int]) -> None:
    """Reap those of `pids` that are our exited children; leave the others to their parents."""
    for pid in pids:
        # ChildProcessError: not our child, or reaped already (e.g. by its Popen).
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG | WALL)


def remove_namespaces(names: Sequence[str]) -> None:
    """Kill and reap everything inside the namespaces `names`, then delete them.

    Deleting alone is not enough: `ip netns del` only removes the name, and a
    namespace lives on while a process is inside it.
    """
    if not names:
        return
    try:
        reap(kill_processes_inside(names))
    finally:
        delete_namespaces(names)


def delete_namespaces(names: Iterable[str]) -> None:
    """`ip netns del` each name (one `ip` for all); a name that is gone already is no error."""
    present = [name for name in names if (NETNS_RUN_DIR / name).exists()]
    if present:
        # -force: go on with the next line when one fails (and still exit non-zero).
        run_ip("-force", "-batch", "-", stdin="".join(f"netns del {name}\n" for name in present))


def _describe_pid(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline_file:
            cmdline = cmdline_file.read().replace(b"\0", b" ").decode(errors="replace")
    except (FileNotFoundError, ProcessLookupError):
        return f"{pid} (gone)"
    return f"{pid} ({cmdline.strip()})"


# -- waiting on a process's output ----------------------------------------------------


def read_line(process: subprocess.Popen[Any], timeout: float) -> str:
    """The next line `process` writes to its stdout (a pipe: stdout=PIPE), without the newline.

    Waits with select on the pipe and a pidfd, never a sleep. Reads a byte at
    a time so nothing after the line is taken from the pipe. Raises NodeError
    if the process closes stdout or exits first, or `timeout` passes.
    """
    if process.stdout is None:
        raise ValueError("read_line needs a process started with stdout=subprocess.PIPE")
    stdout_fd = process.stdout.fileno()
    line = bytearray()
    deadline = time.monotonic() + timeout
    pidfd = os.pidfd_open(process.pid)
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise NodeError(f"no line from pid {process.pid} within {timeout} s: {line!r}")
            readable, _, _ = select.select([stdout_fd, pidfd], [], [], remaining)
            if stdout_fd in readable:
                byte = os.read(stdout_fd, 1)
                if byte == b"\n":
                    return line.decode(errors="replace")
                if not byte:
                    raise NodeError(f"pid {process.pid} closed stdout before a line: {line!r}")
                line += byte
            elif pidfd in readable:
                # Exited, and its stdout is held open by someone else (a child).
                raise NodeError(f"pid {process.pid} exited before a line: {line!r}")
    finally:
        os.close(pidfd)


def _wait_exit(process: subprocess.Popen[Any], timeout: float) -> int | None:
    """Reap `process` if it exits within `timeout` (a pidfd, no polling); its code, else None."""
    if process.returncode is not None:
        return process.returncode
    pidfd = os.pidfd_open(process.pid)
    try:
        readable, _, _ = select.select([pidfd], [], [], timeout)
    finally:
        os.close(pidfd)
    return process.wait() if readable else None


def _tail(path: Path) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return ""
    return text if len(text) <= _OUTPUT_TAIL else "..." + text[-_OUTPUT_TAIL:]


# Connects to ADDRESS:PORT until it succeeds or the deadline passes; exit 0 when
# connected, else 1 with the last error on stderr. A port nobody listens on yet
# gives nothing to wait on, so it retries after a short pause.
_CONNECT_SNIPPET = """\
import socket, sys, time
address, port, timeout, retry, interval = (
    sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4] == "retry", float(sys.argv[5]))
deadline = time.monotonic() + timeout
while True:
    remaining = deadline - time.monotonic()
    try:
        socket.create_connection((address, port), timeout=max(remaining, 0.001)).close()
        sys.exit(0)
    except OSError as error:
        if not retry or deadline - time.monotonic() <= interval:
            sys.exit(f"{type(error).__name__}: {error}")
    time.sleep(interval)
"""

# Binds port 0 on every address of the namespace and prints the port it got.
_FREE_PORT_SNIPPET = """\
import socket
with socket.socket() as sock:
    sock.bind(("0.0.0.0", 0))
    print(sock.getsockname()[1])
"""


# -- nodes and clusters ---------------------------------------------------------------


class Node:
    """One node of a Cluster: a network namespace with an address, a state dir and a daemon."""

    def __init__(
        self,
        name: str,
        address: str,
        netns: str,
        hub_netns: str,
        directory: Path,
        pki_dir: Path,
        cluster: Cluster,
    ) -> None:
        self.name = name
        self.address = address
        self.netns = netns
        self.hub_netns = hub_netns
        # The hub's end of this node's veth: link_down/link_up switch it.
        self.hub_link = f"v-{name}"
        self.directory = directory
        self.state_dir = directory / "state"
        self.env: dict[str, str] = {
            "HIJACK_STATE_DIR": str(self.state_dir),
            "HIJACK_NODE": name,
            "HIJACK_PKI": str(pki_dir),
        }
        self.daemon: subprocess.Popen[bytes] | None = None
        self.daemon_endpoint: str | None = None  # "ADDRESS:PORT", what `hijack move --to` takes
        self._cluster = cluster
        # A node with a pid namespace of its own (Cluster(pid_namespaces=...)): its init,
        # and descriptors of the pid and mount namespaces its programs join.
        self.pid_init: subprocess.Popen[bytes] | None = None
        self._pid_namespace_fd: int | None = None
        self._mount_namespace_fd: int | None = None
        self._ipc_namespace_fd: int | None = None
        self._spawned_inside: list[subprocess.Popen[Any]] = []  # our children in it

    def __repr__(self) -> str:
        return f"Node({self.name!r}, {self.address}, netns {self.netns})"

    # -- running programs inside ------------------------------------------------------

    def environment(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """This process's environment, then the node's (env), then `extra`."""
        return {**os.environ, **self.env, **(extra or {})}

    @property
    def own_pid_namespace(self) -> bool:
        return self.pid_init is not None

    def _start_pid_namespace(self) -> None:
        """Start the init of a new pid namespace inside this node, in a new mount namespace
        whose /proc shows that pid namespace.

        The mounts below / turn slaves of this machine's: what is mounted or
        unmounted outside still reaches the node (`ip netns del` unmounting
        a namespace's name in /run/netns, which a private copy would keep
        alive), and its /proc stays its own.
        """
        netns_fd = os.open(NETNS_RUN_DIR / self.netns, os.O_RDONLY | os.O_CLOEXEC)

        def enter() -> None:  # in the child: pid 1 of the new namespace
            _checked(_libc.setns(netns_fd, CLONE_NEWNET), f"setns({self.netns})")
            _checked(_libc.unshare(CLONE_NEWNS | CLONE_NEWIPC), "unshare(CLONE_NEWNS|NEWIPC)")
            slave, proc = MS_REC | MS_SLAVE, MS_NOSUID | MS_NODEV | MS_NOEXEC
            _checked(_libc.mount(None, b"/", None, slave, None), "mount --make-rslave /")
            _checked(_libc.mount(b"proc", b"/proc", b"proc", proc, None), "mount proc /proc")

        try:
            with (
                open(self.directory / "pid-init.stderr", "ab") as stderr,
                children_in_pid_namespace(None),
            ):
                init: subprocess.Popen[bytes] = subprocess.Popen(
                    [sys.executable, "-c", _PID_INIT_SNIPPET],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=stderr,
                    preexec_fn=enter,
                )
        finally:
            os.close(netns_fd)
        self._cluster._spawned.append(init)
        self.pid_init = init
        # Popen returns once the init runs its program: the namespaces are made.
        self._pid_namespace_fd = os.open(f"/proc/{init.pid}/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
        self._mount_namespace_fd = os.open(f"/proc/{init.pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
        self._ipc_namespace_fd = os.open(f"/proc/{init.pid}/ns/ipc", os.O_RDONLY | os.O_CLOEXEC)

    def _end_pid_namespace(self) -> None:
        """Kill the init of this node's pid namespace, and so everything in it.

        The init's exit waits until every process of its namespace is reaped,
        those whose parent is outside too: ours (what spawn started there),
        reaped here through their Popens, else neither would ever end.
        """
        init, spawned, self._spawned_inside = self.pid_init, self._spawned_inside, []
        if init is None or init.poll() is not None:
            return
        init.kill()
        for process in spawned:
            process.wait(timeout=KILL_TIMEOUT)  # the kernel SIGKILLs them as the init exits
        init.wait(timeout=KILL_TIMEOUT)

    def _close_namespaces(self) -> None:
        for fd in (self._pid_namespace_fd, self._mount_namespace_fd, self._ipc_namespace_fd):
            if fd is not None:
                os.close(fd)
        self._pid_namespace_fd = self._mount_namespace_fd = self._ipc_namespace_fd = None

    def _popen(self, argv: Sequence[str | os.PathLike[str]], **popen: Any) -> subprocess.Popen[Any]:
        """subprocess.Popen(argv, **popen) inside this node's namespaces; returns once argv
        itself runs there."""
        command = [os.fspath(arg) for arg in argv]
        if (
            self._pid_namespace_fd is None
            or self._mount_namespace_fd is None
            or self._ipc_namespace_fd is None
        ):
            return spawn_in_namespace(self.netns, command, **popen)
        mount_fd, ipc_fd = self._mount_namespace_fd, self._ipc_namespace_fd
        # Entering a mount namespace moves the working directory to its root: back to
        # the one asked for (the same files: only /proc differs).
        cwd = os.fspath(popen.get("cwd") or os.getcwd())
        with entering_namespace(self.netns) as enter_network:

            def enter() -> None:
                enter_network()
                _checked(_libc.setns(mount_fd, CLONE_NEWNS), "setns(mount namespace)")
                _checked(_libc.setns(ipc_fd, CLONE_NEWIPC), "setns(IPC namespace)")
                os.chdir(cwd)

            with children_in_pid_namespace(self._pid_namespace_fd):
                return subprocess.Popen(command, preexec_fn=enter, **popen)

    def host_pid(self, pid: int) -> int:
        """The pid this test sees for the process that is `pid` inside this node."""
        if self._pid_namespace_fd is None:
            return pid
        for entry in self._processes_inside():
            if procfs.read_status(entry).nspid[-1] == pid:
                return entry
        raise NodeError(f"no process {pid} inside node {self.name}")

    def pid_inside(self, host_pid: int) -> int:
        """The pid inside this node of the process this test sees as `host_pid`."""
        if self._pid_namespace_fd is None:
            return host_pid
        if host_pid not in self._processes_inside():
            raise NodeError(f"process {host_pid} is not inside node {self.name}")
        return procfs.read_status(host_pid).nspid[-1]

    def _processes_inside(self) -> list[int]:
        """Every process of this node's own pid namespace, by the pids this test sees."""
        assert self._pid_namespace_fd is not None
        own = os.fstat(self._pid_namespace_fd)
        found = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    status = os.stat(f"/proc/{entry}/ns/pid")
                except (FileNotFoundError, ProcessLookupError, PermissionError):
                    continue  # exited meanwhile, or not ours to look at (pid 1 in a sandbox)
                if (status.st_dev, status.st_ino) == (own.st_dev, own.st_ino):
                    found.append(int(entry))
        return found

    def spawn(self, argv: Sequence[str | os.PathLike[str]], **popen: Any) -> subprocess.Popen[Any]:
        """Start argv inside this node with its environment; returns once argv itself runs.

        `popen` goes to subprocess.Popen; an `env` there adds to (and overrides)
        the node's environment. The cluster owns the process: whatever still
        runs at the cluster's end is killed and reaped, its pipes closed. In a
        node with its own pid namespace, the Popen's pid is the one this test
        sees (`pid_inside` gives the node's).
        """
        env = self.environment(popen.pop("env", None))
        process = self._popen(argv, env=env, **popen)
        self._cluster._spawned.append(process)
        if self.own_pid_namespace:
            self._spawned_inside.append(process)
        return process

    def run(
        self,
        argv: Sequence[str | os.PathLike[str]],
        *,
        timeout: float,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run argv inside this node to its end (bounded), stdin empty, output captured as text.

        `env` adds to the node's environment. Past `timeout` it is killed and
        NodeError shows what it printed.
        """
        command = [os.fspath(arg) for arg in argv]
        # _popen switches pid namespaces for the fork alone: the wait runs in ours.
        with self._popen(
            command,
            env=self.environment(env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        ) as process:
            try:
                stdout, stderr = process.communicate(timeout=timeout)
            except subprocess.TimeoutExpired as expired:
                process.kill()  # as subprocess.run: what it printed so far is in `expired`
                process.wait()
                raise NodeError(
                    f"[node {self.name}] $ {' '.join(command)}\n"
                    f"did not finish within {timeout} s\n"
                    f"--- stdout ---\n{_text(expired.stdout)}"
                    f"--- stderr ---\n{_text(expired.stderr)}"
                ) from None
        return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)

    def run_python(
        self, code: str, *args: str | int | float, timeout: float = SNIPPET_TIMEOUT
    ) -> subprocess.CompletedProcess[str]:
        """Run a python snippet with `args` inside this node (bounded)."""
        return self.run([sys.executable, "-c", code, *map(str, args)], timeout=timeout)

    def hijack(self, *args: str | int | Path, timeout: float = CLI_TIMEOUT) -> CliResult:
        """`hijack ARGS...` run inside this node with its environment, as a user would there."""
        argv = tuple(str(arg) for arg in args)
        completed = self.run(
            [*HIJACK_PROGRAM, *argv], timeout=timeout, env={"COLUMNS": CLI_COLUMNS}
        )
        return CliResult(argv, completed.returncode, completed.stdout, completed.stderr)

    def hijack_ok(self, *args: str | int | Path, timeout: float = CLI_TIMEOUT) -> CliResult:
        """`hijack ARGS...` inside this node; demand exit 0 and a quiet stderr."""
        result = self.hijack(*args, timeout=timeout)
        assert result.returncode == 0, f"[node {self.name}] {result.describe()}"
        assert result.stderr == "", f"[node {self.name}] {result.describe()}"
        return result

    # -- network helpers ----------------------------------------------------------------

    def free_port(self) -> int:
        """A TCP port nothing listens on in this node (its namespace has its own ports)."""
        completed = self.run_python(_FREE_PORT_SNIPPET)
        if completed.returncode != 0:
            raise NodeError(f"free_port in node {self.name} failed:\n{completed.stderr}")
        return int(completed.stdout)

    def connect_error(self, address: str, port: int, timeout: float = 1.0) -> str | None:
        """Connect once from this node to address:port: None if it connects, else the error."""
        completed = self.run_python(
            _CONNECT_SNIPPET, address, port, timeout, "once", CONNECT_RETRY_INTERVAL
        )
        return None if completed.returncode == 0 else completed.stderr.strip()

    def wait_tcp(self, address: str, port: int, timeout: float = 10.0) -> None:
        """Retry connecting from this node to address:port until it accepts (bounded)."""
        completed = self.run_python(
            _CONNECT_SNIPPET,
            address,
            port,
            timeout,
            "retry",
            CONNECT_RETRY_INTERVAL,
            timeout=timeout + SNIPPET_TIMEOUT,
        )
        if completed.returncode != 0:
            raise NodeError(
                f"node {self.name} could not connect to {address}:{port} within {timeout} s: "
                f"{completed.stderr.strip()}"
            )

    # -- the node daemon ----------------------------------------------------------------

    def start_daemon(
        self,
        port: int = DEFAULT_DAEMON_PORT,
        *,
        program: Sequence[str] = HIJACK_PROGRAM,
        allow_root: bool = True,
        options: Sequence[str] = (),
    ) -> str:
        """Start `hijack node serve --listen ADDRESS:PORT` inside this node; return "ADDRESS:PORT".

        Returns once the daemon prints `hijack node NAME listening on
        ADDRESS:PORT` (it then accepts connections). Its stderr goes to
        daemon.stderr in the node's directory; its stdout stays a pipe that
        nothing reads after that line, so the daemon must write no more than a
        pipe's buffer there. `program` replaces `python -m hijack` (tests of
        this harness run a stand-in). `allow_root` (the default: the suite's
        fixtures run as root) starts it with --allow-root. `options` are more
        options of `node serve` (--name).
        """
        if self.daemon is not None and self.daemon.returncode is None:
            raise NodeError(f"node {self.name} already runs a daemon (pid {self.daemon.pid})")
        endpoint = f"{self.address}:{port}"
        stderr_path = self.directory / "daemon.stderr"
        with open(stderr_path, "ab") as stderr:
            daemon: subprocess.Popen[bytes] = self.spawn(
                [*program, "node", "serve", "--listen", endpoint]
                + (["--allow-root"] if allow_root else [])
                + list(options),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=stderr,
                bufsize=0,
            )
        expected = f"hijack node {self.name} listening on {endpoint}"
        try:
            line: str | None = read_line(daemon, DAEMON_READY_TIMEOUT)
            problem = f"printed {line!r}, not {expected!r}"
        except NodeError as error:
            line, problem = None, str(error)
        if line != expected:
            # One that is dying (closed stdout) gets a moment to finish: its
            # own exit code says more than our SIGKILL.
            code = _wait_exit(daemon, 0 if line is not None else EXIT_GRACE)
            if code is None:
                daemon.kill()
                code = daemon.wait()
            assert daemon.stdout is not None
            daemon.stdout.close()
            raise NodeError(
                f"the daemon of node {self.name} did not report ready: {problem}; "
                f"exit code {code}\n--- stderr ---\n{_tail(stderr_path)}"
            )
        self.daemon = daemon
        self.daemon_endpoint = endpoint
        return endpoint

    def _send_sigterm_to_daemon(self) -> None:
        if self.daemon is not None and self.daemon.returncode is None:
            # ProcessLookupError: exited already; its status tells.
            with contextlib.suppress(ProcessLookupError):
                self.daemon.send_signal(signal.SIGTERM)

    def _finish_daemon(self, timeout: float) -> str | None:
        """After SIGTERM: wait for the daemon, SIGKILL it past `timeout`; say what went wrong."""
        daemon, self.daemon, self.daemon_endpoint = self.daemon, None, None
        if daemon is None:
            return None
        code = _wait_exit(daemon, timeout)
        problem = None
        if code is None:
            daemon.kill()
            daemon.wait()
            problem = f"did not end within {timeout} s of SIGTERM (killed)"
        elif code != 0:
            problem = f"ended with exit code {code}, not 0, on SIGTERM"
        if daemon.stdout is not None:
            daemon.stdout.close()
        if problem is None:
            return None
        return (
            f"the daemon of node {self.name} {problem}\n"
            f"--- stderr ---\n{_tail(self.directory / 'daemon.stderr')}"
        )

    def stop_daemon(self, timeout: float = DAEMON_STOP_TIMEOUT) -> None:
        """SIGTERM the daemon and wait for it; it must exit 0 within `timeout` (else SIGKILL,
        NodeError). Nothing to do if no daemon was started."""
        self._send_sigterm_to_daemon()
        problem = self._finish_daemon(timeout)
        if problem is not None:
            raise NodeError(problem)


@functools.cache
def node_serve_missing() -> str | None:
    """Why `hijack node serve` cannot run here (its --help fails), or None if it can.

    For a skip reason in tests that need real daemons while the command is
    being written.
    """
    completed = subprocess.run(
        [*HIJACK_PROGRAM, "node", "serve", "--help"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
        check=False,
    )
    if completed.returncode == 0:
        return None
    last_line = (completed.stderr.strip().splitlines() or ["(no stderr)"])[-1]
    return f"`hijack node serve --help` exits {completed.returncode}: {last_line}"


def link_down(node: Node) -> None:
    """Cut `node` off the cluster: switch off the hub's end of its veth.

    The node's own eth0 stays up with its address and routes (it only loses
    carrier), so its programs see no error, just silence: a partition, as a
    pulled cable is. Established connections resume after link_up.
    """
    run_ip("-n", node.hub_netns, "link", "set", node.hub_link, "down")


def link_up(node: Node) -> None:
    """Undo link_down: the node reaches the cluster again."""
    run_ip("-n", node.hub_netns, "link", "set", node.hub_link, "up")


def _shape(node: Node, rate_bits: int, delay_us: int) -> bool:
    """tbf at `rate_bits` on the node's link (what it sends), netem's `delay_us` under it
    if asked and the kernel has netem; whether the delay is there."""
    rate = rate_bits // 8  # bytes a second
    with NetNS(node.netns) as netns:
        index = netns.link_lookup(ifname=NODE_LINK)[0]
        # Bucket: a millisecond of the rate, and never less than a GSO packet (64 KiB).
        burst = max(rate // 1000, 256 * 1024)
        netns.tc("add", "tbf", index, handle="1:", rate=rate, burst=burst, latency=5000)
        if not delay_us:
            return False
        try:
            netns.tc("add", "netem", index, handle="10:", parent="1:1", delay=delay_us)
        except NetlinkError:
            return False  # no netem in this kernel (ENOENT: unknown qdisc kind)
    return True


def _unshape(node: Node) -> None:
    with NetNS(node.netns) as netns:
        index = netns.link_lookup(ifname=NODE_LINK)[0]
        with contextlib.suppress(NetlinkError):
            netns.tc("del", index=index, handle="1:", root=True)  # netem under it goes too


@contextlib.contextmanager
def shaped(nodes: Sequence[Node], rate_bits: int, delay_us: int = 0) -> Iterator[bool]:
    """Every node's link shaped (tbf; pyroute2, no tc shell-out) while inside; yields
    whether the delay is there."""
    try:
        delayed = [_shape(node, rate_bits, delay_us) for node in nodes]
        yield all(delayed)
    finally:
        for node in nodes:
            _unshape(node)


class Cluster:
    """`with Cluster(tmp_path, nodes=3) as cluster:` nodes a, b, c on one bridge, removed after.

    tmp_path holds pki/ (HIJACK_PKI: the cluster's CA, revocation list and
    each node's key and certificate, naming the node and its address, as
    `hijack cluster init` and `hijack cluster add-node NAME --address ADDR`
    write them: every node channel runs over TLS) and node-NAME/ per node
    (state/ is its HIJACK_STATE_DIR, daemon.stderr). Node i (0-based) has
    address 10.77.0.(i+1). All nodes read the one pki/ (they share the
    filesystem); each uses its own key and certificate in it.
    """

    def __init__(
        self,
        tmp_path: Path,
        nodes: int = 3,
        *,
        stop_timeout: float = DAEMON_STOP_TIMEOUT,
        pid_namespaces: Iterable[str] = (),
    ) -> None:
        if not 1 <= nodes <= len(string.ascii_lowercase):
            raise ValueError(f"a cluster has 1 to 26 nodes, not {nodes}")
        # The nodes with a pid namespace of their own (module docstring).
        self._pid_namespaces = frozenset(pid_namespaces)
        unknown = self._pid_namespaces - set(string.ascii_lowercase[:nodes])
        if unknown:
            raise ValueError(f"no such nodes for a pid namespace: {sorted(unknown)}")
        self.id = f"{namespace_prefix()}{secrets.token_hex(3)}"
        self.hub_netns = f"{self.id}-hub"
        self.pki_dir = tmp_path / "pki"
        self.stop_timeout = stop_timeout  # how long each daemon gets to end on SIGTERM
        self.nodes: tuple[Node, ...] = tuple(
            Node(
                name=name,
                address=f"{SUBNET}.{index + 1}",
                netns=f"{self.id}-{name}",
                hub_netns=self.hub_netns,
                directory=tmp_path / f"node-{name}",
                pki_dir=self.pki_dir,
                cluster=self,
            )
            for index, name in enumerate(string.ascii_lowercase[:nodes])
        )
        self._tmp_path = tmp_path
        self._spawned: list[subprocess.Popen[Any]] = []
        self._created_namespaces: list[str] = []

    def __getitem__(self, name: str) -> Node:
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(name)

    def __iter__(self) -> Iterator[Node]:
        return iter(self.nodes)

    def namespaces(self) -> list[str]:
        return [self.hub_netns, *(node.netns for node in self.nodes)]

    # -- setting up ------------------------------------------------------------------

    def __enter__(self) -> Cluster:
        try:
            self._issue_certificates()
            for node in self.nodes:
                node.state_dir.mkdir(parents=True)
            self._create_network()
            for node in self.nodes:
                if node.name in self._pid_namespaces:
                    node._start_pid_namespace()
        except BaseException:
            self._tear_down()
            raise
        return self

    def _issue_certificates(self) -> None:
        # What `hijack cluster init` and `add-node` do, without a process each.
        pki.init_ca(self.pki_dir)
        for node in self.nodes:
            pki.add_node(self.pki_dir, node.name, node.address)

    def _create_network(self) -> None:
        for name in self.namespaces():
            # `ip netns add` refuses a name that exists: no two clusters share one.
            run_ip("netns", "add", name)
            self._created_namespaces.append(name)
        hub_commands = [f"link add {BRIDGE} type bridge", f"link set {BRIDGE} up"]
        for node in self.nodes:
            # Created inside the hub, the node's end moved straight into its own
            # namespace: the pair never exists in the root namespace.
            hub_commands += [
                f"link add {node.hub_link} type veth peer name {NODE_LINK} netns {node.netns}",
                f"link set {node.hub_link} master {BRIDGE}",
                f"link set {node.hub_link} up",
            ]
        run_ip("-n", self.hub_netns, "-batch", "-", stdin="\n".join(hub_commands) + "\n")
        for node in self.nodes:
            node_commands = [
                "link set lo up",
                f"address add {node.address}/{PREFIX_LENGTH} dev {NODE_LINK}",
                f"link set {NODE_LINK} up",
            ]
            run_ip("-n", node.netns, "-batch", "-", stdin="\n".join(node_commands) + "\n")

    # -- tearing down ----------------------------------------------------------------

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        problems = self._tear_down()
        # A daemon that hung or failed on SIGTERM fails a test that otherwise
        # passed; an exception already on its way is not masked.
        if problems and exc_type is None:
            raise NodeError("\n".join(problems))

    def _tear_down(self) -> list[str]:
        """Stop daemons, kill and reap every process inside, delete the namespaces.

        Each step runs even if one before it failed; returns the daemons' problems.
        """
        problems: list[str] = []
        try:
            # SIGTERM all first, then wait: hung daemons cost one bound, not one each.
            for node in self.nodes:
                node._send_sigterm_to_daemon()
            for node in self.nodes:
                problem = node._finish_daemon(self.stop_timeout)
                if problem is not None:
                    problems.append(problem)
        finally:
            killed: list[int] = []
            try:
                for node in self.nodes:
                    node._end_pid_namespace()
                killed = kill_processes_inside(self._created_namespaces)
            finally:
                # Reap through each Popen first so it keeps its real exit status.
                for process in self._spawned:
                    if process.poll() is None:
                        process.kill()
                        process.wait()
                    for stream in (process.stdin, process.stdout, process.stderr):
                        if stream is not None:
                            stream.close()
                self._spawned.clear()
                reap(killed)
                for node in self.nodes:
                    node._close_namespaces()
                namespaces, self._created_namespaces = self._created_namespaces, []
                delete_namespaces(namespaces)
        return problems


@contextlib.contextmanager
def two_nodes(tmp_path: Path, *, pid_namespaces: Iterable[str] = ()) -> Iterator[tuple[Node, Node]]:
    """Nodes a and b of a new Cluster, each with its daemon; those named in
    `pid_namespaces` with a pid namespace of their own."""
    with Cluster(tmp_path, nodes=2, pid_namespaces=pid_namespaces) as cluster:
        a, b = cluster.nodes
        a.start_daemon()
        b.start_daemon()
        yield a, b
