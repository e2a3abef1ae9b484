"""hijack.sys.procfs against the real /proc of real processes.

Each reader is checked against a ground truth the test controls: a Python child
sets up files, pipes, sockets, mappings, masks and limits, reports what it made
on a pipe (never a sleep), then blocks until we close its stdin; /proc must say
exactly that.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import resource
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from hijack.errors import HijackError, ProcessGone
from hijack.node.move import sockets_of
from hijack.sys import kcmp, pidfd, procfs, tcp_repair
from hijack.sys.procfs import FdKind

PAGE = mmap.PAGESIZE
BIG_REGION = 1 << 30
TOUCHED_PAGES = range(0, 64, 2)  # every other page of the first 64 of BIG_REGION

# argv: READY_FD WORKDIR ...; prints one JSON line on READY_FD once all is set up,
# then blocks until its stdin closes.
CHILD = (
    f"BIG_REGION, TOUCHED_PAGES = {BIG_REGION}, {TOUCHED_PAGES!r}\n"
    + r"""
import ctypes, json, os, resource, select, signal, socket, sys, threading

ready_fd, workdir = int(sys.argv[1]), sys.argv[2]
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                      ctypes.c_int, ctypes.c_long]
PAGE = os.sysconf("SC_PAGE_SIZE")
PROT_RW, MAP_SHARED, MAP_PRIVATE, MAP_ANON, MAP_NORESERVE = 3, 1, 2, 0x20, 0x4000
MAP_FAILED = 2**64 - 1
fds, addrs, ports = {}, {}, {}

def checked(result):
    if result in (-1, None, MAP_FAILED):
        raise OSError(ctypes.get_errno(), "libc call failed")
    return result

def path(name):
    return os.path.join(workdir, name)

def map_file(name, pages, offset_pages, length_pages):
    with open(path(name), "wb") as file:
        file.write(b"x" * pages * PAGE)
    fd = os.open(path(name), os.O_RDWR)
    addr = checked(libc.mmap(None, length_pages * PAGE, PROT_RW, MAP_SHARED, fd,
                             offset_pages * PAGE))
    os.close(fd)
    ctypes.c_char.from_address(addr).value  # fault the first page in
    return addr

fds["file"] = os.open(path("data file"), os.O_RDWR | os.O_CREAT)
os.lseek(fds["file"], 1234, os.SEEK_SET)
fds["directory"] = os.open(workdir, os.O_RDONLY | os.O_DIRECTORY)
fds["pipe_read"], fds["pipe_write"] = os.pipe()
os.mkfifo(path("fifo"))
fds["fifo"] = os.open(path("fifo"), os.O_RDWR | os.O_NONBLOCK)
fds["pty_master"], fds["pty_slave"] = os.openpty()
fds["null"] = os.open("/dev/null", os.O_RDONLY)
if os.path.exists("/dev/loop0"):
    fds["blockdev"] = os.open("/dev/loop0", os.O_RDONLY)
fds["eventfd"] = os.eventfd(7)
epoll = select.epoll()
epoll.register(fds["eventfd"], select.EPOLLIN)
fds["epoll"] = epoll.fileno()
sigusr2_mask = ctypes.c_uint64(1 << (signal.SIGUSR2 - 1))
fds["signalfd"] = checked(libc.signalfd(-1, ctypes.byref(sigusr2_mask), 0))
fds["timerfd"] = checked(libc.timerfd_create(1, 0))  # CLOCK_MONOTONIC
fds["inotify"] = checked(libc.inotify_init1(0))
checked(libc.inotify_add_watch(fds["inotify"], workdir.encode(), 0x100))  # IN_CREATE
fds["fanotify"] = checked(libc.fanotify_init(0, 0))
fds["userfaultfd"] = checked(libc.syscall(323, 0))
fds["pidfd"] = os.pidfd_open(os.getpid())
fds["memfd"] = os.memfd_create("mem fd")

listener = socket.create_server(("127.0.0.1", 0))
client = socket.create_connection(listener.getsockname())
accepted, _ = listener.accept()
ports["listener"] = listener.getsockname()[1]
ports["client"] = client.getsockname()[1]
try:
    listener6 = socket.create_server(("::1", 0), family=socket.AF_INET6)
    ports["listener6"] = listener6.getsockname()[1]
    fds["listener6"] = listener6.fileno()
except OSError:
    pass
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.bind(("127.0.0.1", 0))
udp_connected = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp_connected.bind(("127.0.0.1", 0))
udp_connected.connect(udp.getsockname())
ports["udp"], ports["udp_connected"] = udp.getsockname()[1], udp_connected.getsockname()[1]
unix_listener = socket.socket(socket.AF_UNIX)
unix_listener.bind(path("unix sock"))
unix_listener.listen()
unix_abstract = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
unix_abstract.bind(b"\0hijack-test-%d" % os.getpid())
unix_pair = socket.socketpair()
for name, sock in [("listener", listener), ("client", client), ("accepted", accepted),
                   ("udp", udp), ("udp_connected", udp_connected),
                   ("unix_listener", unix_listener), ("unix_abstract", unix_abstract),
                   ("unix_pair", unix_pair[0])]:
    fds[name] = sock.fileno()

addrs["mapped"] = map_file("map file", 3, 1, 2)
addrs["gone"] = map_file("gone file", 1, 0, 1)
os.unlink(path("gone file"))
addrs["kept"] = map_file("  kept (deleted)", 1, 0, 1)
addrs["big"] = big = checked(libc.mmap(None, BIG_REGION, PROT_RW,
                                       MAP_PRIVATE | MAP_ANON | MAP_NORESERVE, -1, 0))
for page in TOUCHED_PAGES:
    ctypes.memset(big + page * PAGE, 1, 1)
ctypes.memset(big + BIG_REGION - PAGE, 1, 1)

os.umask(0o027)
# before the thread starts, which inherits the mask: a signal the test sends
# must stay pending, not kill the child through an unblocked thread
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1, signal.SIGUSR2})
block = threading.Event()
thread = threading.Thread(target=block.wait, daemon=True)
thread.start()
signal.signal(signal.SIGHUP, signal.SIG_IGN)
signal.signal(signal.SIGWINCH, lambda *_: None)
resource.setrlimit(resource.RLIMIT_NOFILE, (400, 500))
checked(libc.prctl(38, 1, 0, 0, 0))  # PR_SET_NO_NEW_PRIVS

report = {"fds": fds, "addrs": addrs, "ports": ports, "thread": thread.native_id}
os.write(ready_fd, json.dumps(report).encode() + b"\n")
os.read(0, 1)
"""
)


@pytest.fixture(scope="module", autouse=True)
def no_leaked_children() -> Iterator[None]:
    """Everything this module starts is killed and reaped by the time it ends."""
    before = procfs.children(os.getpid())
    yield
    assert procfs.children(os.getpid()) == before


@contextmanager
def running(argv: list[str], **popen: Any) -> Iterator[subprocess.Popen[bytes]]:
    """Run argv; whatever happens, kill and reap it afterwards."""
    process = subprocess.Popen(argv, stdin=subprocess.PIPE, **popen)
    try:
        yield process
    finally:
        process.kill()
        process.wait()
        if process.stdin:
            process.stdin.close()


def wait_ready(ready_read: int, process: subprocess.Popen[bytes]) -> dict[str, Any]:
    """The child's JSON report; fails (rather than hangs) if the child dies first."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = os.read(ready_read, 65536)
        if not chunk:
            pytest.fail(f"child exited with {process.wait()} before it was ready")
        data += chunk
    report: dict[str, Any] = json.loads(data)
    return report


class Child:
    """The running child, how it was started and what it reported."""

    def __init__(self, pid: int, argv: list[str], workdir: Path, report: dict[str, Any]):
        self.pid = pid
        self.argv = argv
        self.workdir = workdir
        self.fds: dict[str, int] = report["fds"]
        self.addrs: dict[str, int] = report["addrs"]
        self.ports: dict[str, int] = report["ports"]
        self.thread: int = report["thread"]


@pytest.fixture(scope="module")
def child(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Child]:
    workdir = tmp_path_factory.mktemp("procfs child")
    ready_read, ready_write = os.pipe()
    argv = [sys.executable, "-c", CHILD, str(ready_write), str(workdir), "arg with space"]
    try:
        with running(argv, cwd=workdir, pass_fds=[ready_write]) as process:
            os.close(ready_write)
            ready_write = -1  # so that EOF on ready_read means the child died
            yield Child(process.pid, argv, workdir, wait_ready(ready_read, process))
    finally:
        os.close(ready_read)
        if ready_write != -1:
            os.close(ready_write)


def mapping_at(pid: int, address: int) -> procfs.MapEntry:
    return next(entry for entry in procfs.read_maps(pid) if entry.start <= address < entry.end)


def signal_bits(*signals: int) -> int:
    return sum(1 << (number - 1) for number in signals)


# ---------------------------------------------------------------- maps and smaps


def test_maps_of_a_shared_file_mapping_at_an_offset(child: Child) -> None:
    entry = mapping_at(child.pid, child.addrs["mapped"])
    on_disk = os.stat(child.workdir / "map file")
    assert (entry.start, entry.size) == (child.addrs["mapped"], 2 * PAGE)
    assert entry.perms == "rw-s"
    assert entry.readable and entry.writable and entry.shared and not entry.executable
    assert entry.offset == PAGE
    device = on_disk.st_dev
    assert (entry.dev_major, entry.dev_minor) == (os.major(device), os.minor(device))
    assert entry.inode == on_disk.st_ino
    assert entry.path == str(child.workdir / "map file")
    assert not entry.deleted


def test_maps_tells_deleted_files_from_files_named_deleted(child: Child) -> None:
    gone = mapping_at(child.pid, child.addrs["gone"])
    assert gone.deleted and gone.path == str(child.workdir / "gone file")
    # a real file whose name ends in " (deleted)" and starts with spaces
    kept = mapping_at(child.pid, child.addrs["kept"])
    assert not kept.deleted and kept.path == str(child.workdir / "  kept (deleted)")


def test_maps_names_a_file_by_the_link_left_when_its_mapped_name_was_unlinked(
    tmp_path: Path,
) -> None:
    """As glibc's sem_open does: a file mapped under a temporary name, linked under its own,
    the first name unlinked. maps says "(deleted)"; the file lives on by the second name."""
    temporary, final = tmp_path / "sem.XXXXXX", tmp_path / "sem.name"
    temporary.write_bytes(b"\0" * PAGE)
    with open(temporary, "r+b") as file, mmap.mmap(file.fileno(), PAGE):
        inode = os.fstat(file.fileno()).st_ino

        def mapping() -> procfs.MapEntry:
            return next(e for e in procfs.read_maps(os.getpid()) if e.inode == inode)

        os.link(temporary, final)
        temporary.unlink()
        linked = mapping()
        assert not linked.deleted and linked.path == str(final)
        final.unlink()
        gone = mapping()
        assert gone.deleted and gone.path == str(temporary)


def test_maps_names_special_and_anonymous_mappings(child: Child) -> None:
    paths = {entry.path for entry in procfs.read_maps(os.getpid())}
    assert {"[heap]", "[stack]", "[vdso]", "[vvar]"} <= paths
    big = mapping_at(child.pid, child.addrs["big"])
    assert (big.path, big.inode, big.perms, big.size) == ("", 0, "rw-p", BIG_REGION)


def test_smaps_flags_and_sizes(child: Child) -> None:
    smaps = procfs.read_smaps(child.pid)
    assert {"rd", "wr", "sh", "mr", "mw", "me", "ms"} <= set(smaps[child.addrs["mapped"]].vm_flags)
    assert smaps[child.addrs["mapped"]].rss >= PAGE
    big = smaps[child.addrs["big"]]
    assert big.anonymous == big.rss == (len(TOUCHED_PAGES) + 1) * PAGE
    assert procfs.read_smaps_flags(child.pid)[child.addrs["big"]] == big.vm_flags
    assert set(smaps) == {entry.start for entry in procfs.read_maps(child.pid)}


def test_smaps_layout_names_each_mapping_as_maps_does(child: Child) -> None:
    """read_smaps_layout: each mapping's flags by the mapping as maps shows it."""
    layout = procfs.read_smaps_layout(child.pid)
    assert list(layout) == procfs.read_maps(child.pid)
    flags = procfs.read_smaps_flags(child.pid)
    assert {entry.start: found for entry, found in layout.items()} == flags


# ---------------------------------------------------------------- status and stat


def test_status_of_a_child_with_known_masks(child: Child) -> None:
    status = procfs.read_status(child.pid)
    inherited_mask = sum(
        signal_bits(number) for number in signal.pthread_sigmask(signal.SIG_BLOCK, [])
    )
    assert status.name == procfs.read_comm(child.pid)
    assert status.state == "S"
    assert (status.tgid, status.pid, status.ppid) == (child.pid, child.pid, os.getpid())
    assert status.tracer_pid == 0
    assert status.umask == 0o027
    assert status.uid == (*os.getresuid(), os.getuid())
    assert status.gid == (*os.getresgid(), os.getgid())
    assert status.groups == tuple(os.getgroups())
    assert status.nspid[0] == child.pid
    assert status.threads == 2
    assert status.sig_blk == inherited_mask | signal_bits(signal.SIGUSR1, signal.SIGUSR2)
    assert status.sig_ign & signal_bits(signal.SIGHUP)
    assert status.sig_cgt & signal_bits(signal.SIGWINCH)
    assert status.no_new_privs and not procfs.read_status(os.getpid()).no_new_privs
    assert status.seccomp == 0
    assert status.kthread is False
    assert status.cap_eff & (1 << 19)  # CAP_SYS_PTRACE: root here has it

    os.kill(child.pid, signal.SIGUSR1)  # blocked: stays pending for the process
    assert procfs.read_status(child.pid).shd_pnd & signal_bits(signal.SIGUSR1)


def test_stat_of_a_child(child: Child) -> None:
    proc_stat = procfs.read_stat(child.pid)
    maps = procfs.read_maps(child.pid)
    assert (proc_stat.pid, proc_stat.state, proc_stat.ppid) == (child.pid, "S", os.getpid())
    assert proc_stat.comm == procfs.read_comm(child.pid)
    assert (proc_stat.pgrp, proc_stat.session) == (os.getpgid(child.pid), os.getsid(child.pid))
    assert proc_stat.num_threads == 2
    assert proc_stat.starttime > 0 and proc_stat.exit_code == 0
    assert not proc_stat.flags & procfs.PF_KTHREAD
    heap = next(entry for entry in maps if entry.path == "[heap]")
    stack = next(entry for entry in maps if entry.path == "[stack]")
    assert heap.start == proc_stat.start_brk
    assert stack.start <= proc_stat.start_stack < stack.end
    assert mapping_at(child.pid, proc_stat.start_code).executable
    assert proc_stat.start_code < proc_stat.end_code <= proc_stat.start_data < proc_stat.end_data
    with open(f"/proc/{child.pid}/mem", "rb", buffering=0) as mem:
        mem.seek(proc_stat.arg_start)
        argv = mem.read(proc_stat.arg_end - proc_stat.arg_start)
    assert argv == b"\0".join(os.fsencode(arg) for arg in child.argv) + b"\0"
    assert proc_stat.arg_end <= proc_stat.env_start < proc_stat.env_end


def test_threads_and_task_stat(child: Child) -> None:
    assert procfs.list_threads(child.pid) == sorted([child.pid, child.thread])
    task = procfs.read_task_stat(child.pid, child.thread)
    assert (task.pid, task.state, task.ppid) == (child.thread, "S", os.getpid())


def test_children(child: Child) -> None:
    assert child.pid in procfs.children(os.getpid())
    assert procfs.children(child.pid) == []


def test_stat_and_comm_with_spaces_and_parentheses(tmp_path: Path) -> None:
    program = tmp_path / "we ird) (name"
    shutil.copy("/bin/dash", program)
    script = "echo ready; read line"
    # The shell says "ready" once it runs its script: exec is complete by then,
    # arguments included (a bare Popen returns before the new stack is set up).
    with running([str(program), "-c", script], stdout=subprocess.PIPE) as process:
        assert process.stdout is not None
        assert process.stdout.readline() == b"ready\n"
        assert procfs.read_stat(process.pid).comm == program.name
        assert procfs.read_stat(process.pid).ppid == os.getpid()
        assert procfs.read_comm(process.pid) == program.name
        assert procfs.read_status(process.pid).name == program.name
        assert procfs.read_exe(process.pid) == str(program)
        assert procfs.read_cmdline(process.pid) == [str(program), "-c", script]
        assert str(program) in {entry.path for entry in procfs.read_maps(process.pid)}

        program.unlink()
        assert procfs.read_exe(process.pid) == f"{program} (deleted)"
        text = [entry for entry in procfs.read_maps(process.pid) if entry.executable]
        assert any(entry.path == str(program) and entry.deleted for entry in text)


def test_kernel_thread() -> None:
    if procfs.read_comm(2) != "kthreadd":
        pytest.skip("pid 2 is not kthreadd in this pid namespace")
    assert procfs.is_kernel_thread(2)
    assert procfs.read_status(2).kthread is True
    assert procfs.read_maps(2) == []
    assert procfs.read_cmdline(2) == []
    with pytest.raises(HijackError) as raised:
        procfs.read_exe(2)  # a kernel thread has no exe: the entry, not the process, is missing
    assert not isinstance(raised.value, ProcessGone)
    assert not procfs.is_kernel_thread(os.getpid())


def test_zombie() -> None:
    with running(["/bin/sh", "-c", "exit 3"]) as process:
        os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOWAIT)  # exited, not yet reaped
        status = procfs.read_status(process.pid)
        assert (status.state, status.umask) == ("Z", None)
        assert procfs.read_stat(process.pid).exit_code == 3 << 8
        assert procfs.read_maps(process.pid) == []
        assert procfs.list_fds(process.pid) == []
        with pytest.raises(HijackError) as raised:
            procfs.read_exe(process.pid)
        assert not isinstance(raised.value, ProcessGone)


# ---------------------------------------------------------------- identity, auxv, limits


def test_cmdline_cwd_root_exe(child: Child) -> None:
    assert procfs.read_cmdline(child.pid) == child.argv
    assert procfs.read_cwd(child.pid) == str(child.workdir)
    assert procfs.read_root(child.pid) == "/"
    assert procfs.read_exe(child.pid) == os.path.realpath(sys.executable)


def test_auxv_matches_getauxval() -> None:
    getauxval = ctypes.CDLL(None).getauxval
    getauxval.restype = ctypes.c_ulong
    getauxval.argtypes = [ctypes.c_ulong]
    auxv = procfs.read_auxv(os.getpid())
    assert (6, PAGE) in auxv  # AT_PAGESZ
    # glibc's getauxval(AT_HWCAP) answers its own x86 feature word, not the kernel's
    assert all(getauxval(kind) == value for kind, value in auxv if kind != 16)


def test_limits_match_prlimit(child: Child) -> None:
    limits = procfs.read_limits(child.pid)
    assert len(limits) == 16  # RLIM_NLIMITS
    assert limits[resource.RLIMIT_STACK].name == "Max stack size"
    nofile = limits[resource.RLIMIT_NOFILE]
    assert (nofile.name, nofile.soft, nofile.hard) == ("Max open files", 400, 500)
    for limit in limits:
        soft, hard = resource.prlimit(child.pid, limit.resource)
        expected = tuple(
            procfs.RLIM_INFINITY if value == resource.RLIM_INFINITY else value
            for value in (soft, hard)
        )
        assert (limit.soft, limit.hard) == expected, limit.name


# ---------------------------------------------------------------- file descriptors


def test_fd_kinds(child: Child) -> None:
    expected = {
        "file": FdKind.REGULAR, "directory": FdKind.DIRECTORY,
        "pipe_read": FdKind.PIPE, "pipe_write": FdKind.PIPE, "fifo": FdKind.FIFO,
        "pty_master": FdKind.TTY, "pty_slave": FdKind.TTY, "null": FdKind.CHARDEV,
        "blockdev": FdKind.BLOCKDEV, "eventfd": FdKind.EVENTFD, "epoll": FdKind.EPOLL,
        "signalfd": FdKind.SIGNALFD, "timerfd": FdKind.TIMERFD, "inotify": FdKind.INOTIFY,
        "fanotify": FdKind.FANOTIFY, "userfaultfd": FdKind.USERFAULTFD,
        "pidfd": FdKind.PIDFD, "memfd": FdKind.MEMFD, "listener": FdKind.SOCKET,
        "unix_pair": FdKind.SOCKET,
    }  # fmt: skip
    by_fd = {entry.fd: entry for entry in procfs.list_fds(child.pid)}
    for name, fd in child.fds.items():
        if name in expected:
            assert by_fd[fd].kind == expected[name], name
    pipe_read, pipe_write = by_fd[child.fds["pipe_read"]], by_fd[child.fds["pipe_write"]]
    assert pipe_read.target == pipe_write.target == f"pipe:[{pipe_read.ino}]"
    assert by_fd[child.fds["file"]].target == str(child.workdir / "data file")
    assert stat.S_ISFIFO(by_fd[child.fds["fifo"]].mode)
    assert by_fd[child.fds["memfd"]].target == "/memfd:mem fd (deleted)"
    assert {0, 1, 2} <= set(by_fd)


def test_fdinfo_of_a_file_at_an_offset(child: Child) -> None:
    info = procfs.read_fdinfo(child.pid, child.fds["file"])
    assert info.pos == 1234
    assert info.flags & os.O_ACCMODE == os.O_RDWR
    assert info.flags & os.O_CLOEXEC  # Python's descriptors are non-inheritable
    assert info.ino == os.stat(child.workdir / "data file").st_ino
    assert info.mnt_id > 0 and info.extra == {}


def test_fdinfo_kind_specific_lines(child: Child) -> None:
    def extra(name: str) -> dict[str, tuple[str, ...]]:
        return dict(procfs.read_fdinfo(child.pid, child.fds[name]).extra)

    assert extra("eventfd")["eventfd-count"] == ("7",)
    (watch,) = extra("epoll")["tfd"]
    assert watch.split()[:3] == [str(child.fds["eventfd"]), "events:", "19"]
    assert int(extra("signalfd")["sigmask"][0], 16) == signal_bits(signal.SIGUSR2)
    assert extra("timerfd")["clockid"] == ("1",)
    assert extra("inotify")["inotify"][0].startswith("wd:1 ")
    assert extra("pidfd")["Pid"] == (str(child.pid),)
    pts = os.readlink(f"/proc/{child.pid}/fd/{child.fds['pty_slave']}")
    assert extra("pty_master")["tty-index"] == (pts.removeprefix("/dev/pts/"),)


def test_fdinfo_of_a_closed_fd_is_not_process_gone() -> None:
    with pytest.raises(HijackError) as raised:
        procfs.read_fdinfo(os.getpid(), 999_999)
    assert not isinstance(raised.value, ProcessGone)


# ---------------------------------------------------------------- sockets


def test_socket_table(child: Child) -> None:
    table = procfs.read_socket_table(child.pid)
    fds = {entry.fd: entry for entry in procfs.list_fds(child.pid)}

    def sock(name: str) -> procfs.SocketInfo:
        return table[fds[child.fds[name]].ino]

    listen, client = child.ports["listener"], child.ports["client"]
    assert sock("listener") == procfs.SocketInfo(
        fds[child.fds["listener"]].ino, socket.AF_INET, socket.SOCK_STREAM,
        socket.IPPROTO_TCP, "LISTEN", f"127.0.0.1:{listen}", "0.0.0.0:0",
    )  # fmt: skip
    assert (sock("client").state, sock("client").local, sock("client").remote) == (
        "ESTABLISHED", f"127.0.0.1:{client}", f"127.0.0.1:{listen}",
    )  # fmt: skip
    accepted = sock("accepted")
    assert (accepted.local, accepted.remote) == (f"127.0.0.1:{listen}", f"127.0.0.1:{client}")
    udp, udp_connected = sock("udp"), sock("udp_connected")
    assert (udp.type, udp.protocol, udp.state) == (socket.SOCK_DGRAM, socket.IPPROTO_UDP, "CLOSE")
    assert (udp.local, udp.remote) == (f"127.0.0.1:{child.ports['udp']}", "0.0.0.0:0")
    assert (udp_connected.state, udp_connected.remote) == (
        "ESTABLISHED", f"127.0.0.1:{child.ports['udp']}",
    )  # fmt: skip
    unix_listener = sock("unix_listener")
    assert (unix_listener.family, unix_listener.type, unix_listener.state) == (
        socket.AF_UNIX, socket.SOCK_STREAM, "LISTEN",
    )  # fmt: skip
    assert unix_listener.local == str(child.workdir / "unix sock")
    abstract = sock("unix_abstract")
    assert (abstract.type, abstract.local) == (socket.SOCK_DGRAM, f"@hijack-test-{child.pid}")
    assert (sock("unix_pair").state, sock("unix_pair").local) == ("CONNECTED", "")
    if "listener6" not in child.ports:
        pytest.skip("::1 is not available")
    listener6 = sock("listener6")
    assert (listener6.family, listener6.state) == (socket.AF_INET6, "LISTEN")
    assert listener6.local == f"[::1]:{child.ports['listener6']}"


def test_tcp_sockets_asked_one_by_one_as_the_tables_list_them(child: Child) -> None:
    """tcp_repair.listed_tcp (a move's freeze asks its sockets so, not the tables, which
    walk the kernel's whole hash) says what /proc/net/tcp and tcp6 say of each TCP
    socket (IPv4 and IPv6), and nothing of the others; sockets_of, all of them together,
    equals the tables for every socket the child holds."""
    table = procfs.read_socket_table(child.pid)
    namespace = os.stat(f"/proc/{child.pid}/ns/net").st_ino
    asked = 0
    for entry in procfs.list_fds(child.pid):
        if entry.kind is not procfs.FdKind.SOCKET:
            continue
        listed = table.get(entry.ino)
        copy = pidfd.copy_fd(child.pid, entry.fd)
        try:
            found = tcp_repair.listed_tcp(copy, entry.ino, namespace)
            elsewhere = tcp_repair.listed_tcp(copy, entry.ino, namespace + 1)
        finally:
            os.close(copy)
        assert elsewhere is None  # another namespace's table would not list it
        if listed is not None and (listed.family, listed.type) in (
            (socket.AF_INET, socket.SOCK_STREAM), (socket.AF_INET6, socket.SOCK_STREAM),
        ):  # fmt: skip
            assert found == listed
            asked += 1
        else:
            assert found is None, entry
    assert asked >= 3  # listener, client, accepted
    held = {e.ino for e in procfs.list_fds(child.pid) if e.kind is procfs.FdKind.SOCKET}
    by_socket = sockets_of(child.pid)
    assert {ino: by_socket.get(ino) for ino in held} == {ino: table.get(ino) for ino in held}
    # Its unix sockets told apart by asking them (a freeze then reads the unix table alone).
    unix: set[int] = set()
    fds = {e.fd: e.ino for e in procfs.list_fds(child.pid) if e.kind is procfs.FdKind.SOCKET}
    tcp_repair.listed_tcp_of(child.pid, fds, unix)
    assert unix == {ino for ino in held if ino in table and table[ino].family == socket.AF_UNIX}
    assert unix  # the child holds some
    alone = procfs.read_socket_table(child.pid, wanted=unix, inet=False)
    assert {ino: alone.get(ino) for ino in unix} == {ino: table[ino] for ino in unix}


# ---------------------------------------------------------------- pagemap


def test_present_runs_of_every_other_page(child: Child) -> None:
    big = child.addrs["big"]
    started = time.perf_counter()
    runs = procfs.present_runs(child.pid, big, big + BIG_REGION)
    elapsed = time.perf_counter() - started
    expected = [(big + page * PAGE, big + (page + 1) * PAGE) for page in TOUCHED_PAGES]
    assert runs == [*expected, (big + BIG_REGION - PAGE, big + BIG_REGION)]
    assert elapsed < 1.0, f"present_runs over 1 GiB took {elapsed:.2f} s"


def test_pagemap_entries(child: Child) -> None:
    big = child.addrs["big"]
    entries = procfs.read_pagemap(child.pid, big, big + BIG_REGION)
    assert len(entries) == BIG_REGION // PAGE
    assert procfs.page_present(entries[0]) and not procfs.page_present(entries[1])
    assert not procfs.page_swapped(entries[0])
    assert entries[0] & procfs.PM_MMAP_EXCLUSIVE and not entries[0] & procfs.PM_FILE
    (mapped,) = procfs.read_pagemap(child.pid, child.addrs["mapped"], child.addrs["mapped"] + PAGE)
    assert procfs.page_present(mapped) and mapped & procfs.PM_FILE
    with pytest.raises(ValueError):
        procfs.read_pagemap(child.pid, big + 1, big + PAGE)


def test_pagemap_merges_adjacent_pages() -> None:
    region = mmap.mmap(-1, 8 * PAGE)
    try:
        region[2 * PAGE : 5 * PAGE] = b"y" * 3 * PAGE
        start = ctypes.addressof(ctypes.c_char.from_buffer(region))
        assert procfs.present_runs(os.getpid(), start, start + 8 * PAGE) == [
            (start + 2 * PAGE, start + 5 * PAGE)
        ]
    finally:
        region.close()


# ---------------------------------------------------------------- a process that is gone

READERS: dict[str, Callable[[int], object]] = {
    reader.__name__: reader
    for reader in (
        procfs.read_maps, procfs.read_smaps, procfs.read_smaps_flags, procfs.read_status,
        procfs.read_stat, procfs.is_kernel_thread, procfs.list_threads, procfs.children,
        procfs.read_cmdline, procfs.read_comm, procfs.read_exe, procfs.read_cwd,
        procfs.read_root, procfs.read_auxv, procfs.read_limits, procfs.list_fds,
        procfs.read_socket_table,
    )
} | {
    "read_task_stat": lambda pid: procfs.read_task_stat(pid, pid),
    "read_fdinfo": lambda pid: procfs.read_fdinfo(pid, 0),
    "read_pagemap": lambda pid: procfs.read_pagemap(pid, 0, PAGE),
    "present_runs": lambda pid: procfs.present_runs(pid, 0, PAGE),
}  # fmt: skip


@pytest.fixture(scope="module")
def dead_pid() -> int:
    with running(["/bin/true"]) as process:
        process.wait()
    return process.pid


@pytest.mark.parametrize("reader", READERS)
def test_a_pid_that_does_not_exist_is_process_gone(reader: str, dead_pid: int) -> None:
    with pytest.raises(ProcessGone) as raised:
        READERS[reader](dead_pid)
    assert raised.value.pid == dead_pid


def test_descriptions_found_with_kcmp_group_dups_and_only_them() -> None:
    counters = [os.eventfd(0) for _ in range(40)]  # forty descriptions of one anonymous inode
    dups = {fd: os.dup(fd) for fd in counters[::7]}
    try:
        entries = procfs.list_fds(os.getpid())
        ids = kcmp.description_ids(os.getpid(), [(e.fd, e.dev, e.ino) for e in entries])
        assert all(ids[fd] == ids[dup] for fd, dup in dups.items())
        assert len({ids[fd] for fd in counters}) == len(counters)
        assert sorted(set(ids.values())) == list(range(1, len(set(ids.values())) + 1))
    finally:
        for fd in [*counters, *dups.values()]:
            os.close(fd)
