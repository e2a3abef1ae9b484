"""What the members of a tree being restored share: each object made once, for all of them.

A tree's images are each whole (docs/crf.md §7b): an object two members hold is
recorded in both. The restore makes it for the first member that needs it and
gives the very same object to the others:

- an open file description members share (the TREE's `shared` list: a file
  inherited across a fork, with one offset): copied out of the first holder's
  stub (pidfd_getfd) and given to the others;
- an anonymous pipe or a FIFO joining members (the same inode in their
  descriptors): made (opened) and filled once, kept here until the whole tree
  is rebuilt;
- shared anonymous memory (the same dev and inode in their SHARED_ANONYMOUS
  records): made in the first member, then mapped by the others from it;
- an unnamed unix socket pair joining members (an end's peer is the other
  member's socket): made once, each end's queue filled from the other.
"""

from __future__ import annotations

import os
from collections.abc import Hashable

from hijack.image import records as rec
from hijack.image.files import ImageFiles
from hijack.sys import pidfd


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
