"""What the members of a tree being restored share: each object made once, for all of them.

An object two members hold is recorded in the image of both (docs/crf.md §7b;
the bytes of a memory object only in the first: the others' records name it,
`bytes_in`). The restore makes it for the first member that needs it and gives
the very same object to the others:

- an open file description members share (the TREE's `shared` list: a file
  inherited across a fork, with one offset): copied out of the first holder's
  stub (pidfd_getfd) and given to the others;
- an anonymous pipe or a FIFO joining members (the same inode in their
  descriptors): made (opened) and filled once, kept here until the whole tree
  is rebuilt;
- shared anonymous memory (the same dev and inode in their SHARED_ANONYMOUS
  records): made in the first member, then mapped by the others from it;
- a memfd or a deleted file (the same dev and inode in their MEMFD / GHOST_FILE
  records), whether members hold it by descriptors or only map it: made and
  filled once, each descriptor a new description of it and each mapping mapped
  from it; a memfd's seals are set once every member is rebuilt (seal), as
  F_SEAL_SEAL or F_SEAL_FUTURE_WRITE set after the first member would refuse
  the next one's seals or writable mappings;
- a pty pair members hold whole (the same `index` in their PTY_PAIR records):
  made once, each member's slave descriptors opened from its one master;
- an unnamed unix socket pair joining members (an end's peer is the other
  member's socket): made once, each end's queue filled from the other;
- private pages still shared copy-on-write at the dump (PAGE_REFERENCE): copied
  from the stub of the member whose image stored them (stub_of), rebuilt before.

What a restore would make once per member instead, though members share it, is
refused by `hijack dump --kill` by name before the kill (`copied_refusals`): a
pty whose master one member holds without its slave while another holds the
slave (forkpty: the master is reopened by path, a new pty), and an unlinked
POSIX message queue two members hold by descriptions of their own (each would
make its own queue).
"""

from __future__ import annotations

import os
from collections.abc import Hashable

from hijack.errors import RestoreError
from hijack.image import records as rec
from hijack.image.files import ImageFiles
from hijack.sys import filedata, mqueue, pidfd, procfs


class TreeShared:
    """Objects made for the members of one tree restore, kept until it ends (close)."""

    def __init__(self, links: tuple[rec.SharedDescription, ...]) -> None:
        self._holder = {(link.pid, link.fd): (link.holder_pid, link.holder_fd) for link in links}
        self._stub_of: dict[int, int] = {}  # a member's pid in the image -> its stub's pid
        self._given: set[tuple[int, int]] = set()  # (member, fd) given to its stub
        self._kept: dict[Hashable, int] = {}  # tree-wide key -> our descriptor
        self._keys: dict[int, Hashable] = {}  # the current member's object id -> tree key
        # The first ends of unix socket pairs joining members, by inode, with their member,
        # until the member holding the other end is rebuilt (hijack.objects.unix).
        self._half_pairs: dict[int, tuple[int, rec.UnixSocket]] = {}
        self._seals: dict[int, int] = {}  # our descriptor of a memfd -> the seals it takes
        self.member = 0  # the pid in the image of the member being rebuilt

    def begin(self, member: int, stub_pid: int, image: ImageFiles) -> None:
        """The member whose image is rebuilt next, into stub `stub_pid`."""
        self.member = member
        self._stub_of[member] = stub_pid
        self._keys = {
            d.object_id: ("pipe", d.dev, d.ino)
            for d in image.descriptors
            if isinstance(image.objects.get(d.object_id), rec.PipeObject | rec.FifoObject)
        }
        for found in image.objects.values():
            if isinstance(found, rec.MemfdObject | rec.GhostFile):
                self._keys[found.id] = ("file", found.dev, found.ino)
            elif isinstance(found, rec.PtyPair):
                self._keys[found.id] = ("pty", found.index)

    def stub_of(self, member: int) -> int:
        """The stub of `member`, rebuilt before the current one (its pages referred to)."""
        found = self._stub_of.get(member)
        if found is None or member == self.member:
            raise RestoreError(
                f"process {self.member} refers to pages of process {member},"
                " not a member rebuilt before it"
            )
        return found

    def given(self, fds: set[int]) -> None:
        """The current member's descriptors `fds` exist in its stub now."""
        self._given |= {(self.member, fd) for fd in fds}

    def description(self, fd: int) -> int | None:
        """Our copy of the open file description the current member's `fd` shares with a
        member rebuilt before it, or None (it is the first, or its holder's was dropped)."""
        holder = self._holder.get((self.member, fd))
        if holder is None or holder not in self._given:
            return None
        holder_pid, holder_fd = holder
        return pidfd.copy_fd(self._stub_of[holder_pid], holder_fd)

    def tree_key(self, key: Hashable) -> Hashable | None:
        """The tree-wide key of a restore context's key (an object id, or (id, part)) when
        its object is one members share, else None."""
        object_id, part = (key[0], key[1:]) if isinstance(key, tuple) else (key, ())
        found = self._keys.get(object_id) if isinstance(object_id, int) else None
        return None if found is None else (found, part)

    def built(self, key: Hashable) -> int | None:
        return self._kept.get(key)

    def keep(self, key: Hashable, our_fd: int) -> None:
        self._kept[key] = our_fd

    def seal_later(self, memfd: int, seals: int) -> None:
        """Seal our memfd `memfd` with `seals` once every member is rebuilt (seal)."""
        self._seals[memfd] = seals

    def seal(self) -> None:
        for memfd, seals in self._seals.items():
            filedata.add_seals(memfd, seals)
        self._seals.clear()

    def half_made(self, sock: rec.UnixSocket) -> None:
        """A socket pair was made for `sock`, an end the current member holds."""
        self._half_pairs[sock.inode] = (self.member, sock)

    def complete(self, inode: int) -> rec.UnixSocket | None:
        """The record of first end `inode` of a half-made pair, now complete; None if done."""
        found = self._half_pairs.pop(inode, None)
        return None if found is None else found[1]

    def unclaimed(self) -> list[str]:
        """The pairs whose other end no member held, one line each."""
        return [
            f"a unix socket of process {member} whose peer (socket {sock.peer}) no member holds"
            for member, sock in self._half_pairs.values()
        ]

    def close(self) -> None:
        for fd in self._kept.values():
            os.close(fd)
        self._kept.clear()


def copied_refusals(tree: rec.Tree) -> list[str]:
    """What the living members of stopped `tree` share that its restore would make once
    per member, not share: one line each."""
    linked = {(link.pid, link.fd) for link in tree.shared}  # a description held before
    entries = {m.pid: procfs.list_fds(m.pid) for m in tree.imaged}
    return _split_ptys(entries) + _unlinked_queues(entries, linked)


def _split_ptys(entries: dict[int, list[procfs.FdEntry]]) -> list[str]:
    """The ptys whose master a member holds without the slave, and whose slave another
    member holds: the master alone is reopened by path, which makes a new pty."""
    masters: dict[int, set[int]] = {}  # pty index -> the members holding its master
    slaves: dict[int, set[int]] = {}
    for pid, fds in entries.items():
        for entry in fds:
            if entry.kind is not procfs.FdKind.TTY:
                continue
            if os.path.basename(entry.target) == "ptmx":
                found = procfs.read_fdinfo(pid, entry.fd).extra.get("tty-index", ())
                if found:
                    masters.setdefault(int(found[0]), set()).add(pid)
            elif entry.target.startswith("/dev/pts/") and entry.target[9:].isdigit():
                slaves.setdefault(int(entry.target[9:]), set()).add(pid)
    refusals = []
    for index, holders in sorted(masters.items()):
        alone = sorted(holders - slaves.get(index, set()))
        others = sorted(slaves.get(index, set()) - set(alone))
        if alone and others:
            refusals.append(
                f"process {alone[0]} holds the master of pty /dev/pts/{index} and process"
                f" {others[0]} its slave: a restore would make a new pty for the master, not"
                " the slave's (ptys joining members are not rebuilt yet)"
            )
    return refusals


def _unlinked_queues(
    entries: dict[int, list[procfs.FdEntry]], linked: set[tuple[int, int]]
) -> list[str]:
    """The unlinked message queues two members hold by descriptions of their own."""
    first_holders: dict[tuple[int, int], dict[int, str]] = {}  # (dev, ino) -> pid -> name
    for pid, fds in entries.items():
        for entry in fds:
            name = entry.target.removesuffix(filedata.DELETED_SUFFIX)
            unlinked = entry.kind is procfs.FdKind.REGULAR and name != entry.target
            if not unlinked or (pid, entry.fd) in linked or name.count("/") != 1:
                continue
            copy = pidfd.copy_fd(pid, entry.fd)
            try:
                if mqueue.is_queue(copy):
                    first_holders.setdefault((entry.dev, entry.ino), {})[pid] = name
            finally:
                os.close(copy)
    return [
        f"processes {' and '.join(str(pid) for pid in sorted(holders))} each opened the"
        f" unlinked message queue {next(iter(holders.values()))}: a restore would make one"
        " for each, not one they share"
        for holders in first_holders.values()
        if len(holders) > 1
    ]
