"""Giving the stub the image's descriptors, each rebuilt by its kind (hijack.objects).

Descriptors are made in ascending order; one whose open file description was
made already (dup'ed, inherited) is dup3'ed from the first, so the two share
it again (offset, status flags). Those the process's shadow keeps, or a move
relays, are handed in ready-made. Epoll interest lists and the like are filled
last, once every descriptor exists (Kind.finish).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from types import TracebackType

from hijack import objects
from hijack.image import records as rec
from hijack.image.files import ImageFiles
from hijack.objects.base import (
    F_SETFL,
    O_CLOEXEC,
    SETTABLE_STATUS_FLAGS,
    Kind,
    RestoreContext,
)
from hijack.restore.plan import FilePlan
from hijack.restore.remote import Stub
from hijack.restore.shared import TreeShared
from hijack.sys import procfs


def restore_files(
    stub: Stub,
    plan: FilePlan,
    image: ImageFiles,
    inherited: dict[int, int],
    then: Callable[[RestoreContext], None] | None = None,
    shared: TreeShared | None = None,
    *,
    made_already: bool = False,
) -> None:
    """Give the stub the image's descriptors.

    `inherited` maps the image's numbers of the shadow's descriptions to the
    numbers the stub inherited them under from the restorer. They are parked
    above every number in play first, so nothing restored lands on them.
    `then(context)` runs last, while the objects the descriptors' kinds made
    are still kept (the process's mappings of them, its deleted cwd). `shared`: the
    process is a member of a tree, whose other members' objects it may share.
    `made_already`: the stub shares its parent's descriptor table (CLONE_FILES), rebuilt
    before it: only `then` is left to do.
    """
    if made_already:
        restored = frozenset(d.fd for d in (*plan.inherited, *plan.reopen))
        parking = max((e.fd for e in procfs.list_fds(stub.pid)), default=2) + 1
        with RestoreContext(stub, image, parking, restored, shared) as context:
            if shared is not None:
                shared.given(set(restored))
            if then is not None:
                then(context)
        return
    numbers = [d.fd for d in (*plan.inherited, *plan.reopen)] + list(inherited.values())
    parking = max(numbers, default=2) + 1
    given = sorted((*plan.inherited, *plan.reopen), key=lambda d: d.fd)
    restored = frozenset(d.fd for d in given)
    placed: frozenset[int] = frozenset()
    if shared is None:
        placed = _place_inherited(stub, given, inherited, parking)
        parked: dict[int, int] = {}
    else:
        present = [entry.fd for entry in procfs.list_fds(stub.pid)]
        parked = {image_fd: parking + index for index, image_fd in enumerate(inherited)}
    first_of: dict[int, int] = {}  # description id -> the descriptor that made it
    made: list[tuple[Kind, rec.FileDescriptor]] = []
    with RestoreContext(stub, image, parking, restored, shared) as context, _Runs(stub) as run:
        if shared is not None:
            # A tree's member: its copies parked above every number in play, every other
            # descriptor of the stub closed, in the run's batch, and so are the
            # descriptions other members made (give_made): the descriptors of a member
            # whose every description is shared take one stop, not two a call (frozen).
            run.begin()
            for image_fd, fd in inherited.items():
                stub.call("dup3", fd, parked[image_fd], 0)
            for fd in present:
                if fd not in parked.values():
                    stub.call("close", fd)
        for descriptor in given:
            copy = None
            if shared is not None and descriptor.description_id not in first_of:
                copy = shared.description(descriptor.fd)
            if descriptor.fd in placed:
                pass  # where it belongs already, as the first of its description
            elif copy is not None:
                run.begin()
                context.give_made(copy, descriptor)  # another member's description, shared
            elif descriptor.fd in parked:
                run.begin()
                context.place(parked.pop(descriptor.fd), descriptor)
                # A relay stands for the original: it takes the original's status
                # flags (a server's non-blocking listener must not block in accept).
                stub.call("fcntl", descriptor.fd, F_SETFL, descriptor.flags & SETTABLE_STATUS_FLAGS)
            elif descriptor.description_id in first_of:
                run.begin()
                first = first_of[descriptor.description_id]
                stub.call("dup3", first, descriptor.fd, O_CLOEXEC if descriptor.cloexec else 0)
            else:
                kind = objects.kind_of(descriptor, image)
                if kind.queues_only(descriptor):
                    run.begin()
                else:
                    run.end()  # it may read what its calls return: the batch runs first
                kind.restore(descriptor, context)
                made.append((kind, descriptor))
            first_of.setdefault(descriptor.description_id, descriptor.fd)
        if parked:
            run.begin()
            for unused in parked.values():
                stub.call("close", unused)  # a description another member's copy stood for
        run.end()
        for kind, descriptor in made:
            kind.finish(descriptor, context)
        if shared is not None:
            shared.given(set(restored))
        if then is not None:
            then(context)


# Room a descriptor's queued calls may take in a batch's area: a path (PATH_MAX) and a few
# calls' entries. A run is cut where less is left (its calls and data must fit one batch).
RUN_ROOM = 4096 + 16 * 64


class _Runs:
    """Runs of descriptors whose restore only queues calls (a reopened file, a dup3 of a
    description made before, ...), each run in one batch of calls: one stop for the run,
    not one for each call (issue #17: a move's files, frozen)."""

    def __init__(self, stub: Stub) -> None:
        self._stub = stub
        self._open: contextlib.ExitStack | None = None

    def begin(self) -> None:
        """The calls from here on go in the run's batch (a new one if none is open, or if
        the open one may not have room for one more descriptor's)."""
        room = self._stub.batch_room()
        if room is not None and room < RUN_ROOM:
            self.end()
        if self._open is None:
            stack = contextlib.ExitStack()
            stack.enter_context(self._stub.batched())
            self._open = stack

    def end(self) -> None:
        """The run's batch runs now (its failure raised here); calls run at once again."""
        stack, self._open = self._open, None
        if stack is not None:
            stack.close()

    def __enter__(self) -> _Runs:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        stack, self._open = self._open, None
        if stack is not None:
            stack.__exit__(kind, error, trace)  # with an error: the batch is dropped


def _place_inherited(
    stub: Stub, given: list[rec.FileDescriptor], inherited: dict[int, int], parking: int
) -> frozenset[int]:
    """The stub's `inherited` copies (image number -> the stub's) put at their image numbers
    with their close-on-exec and status flags, every other descriptor of the stub closed:
    in one batch of calls, one stop (hijack.mutator.parasite), not five stops each (a
    move's relays, in its freeze: issue #17). Each is parked first, above every number in
    play (`parking`), so that none lands on another's copy. Return the numbers placed."""
    present = [entry.fd for entry in procfs.list_fds(stub.pid)]
    # dup3 onto a number the stub uses (one of its own, above `parking`) replaces it.
    parked = {image_fd: parking + index for index, image_fd in enumerate(inherited)}
    wanted = [descriptor for descriptor in given if descriptor.fd in parked]
    with stub.batched():
        for image_fd, fd in inherited.items():
            stub.call("dup3", fd, parked[image_fd], 0)
        for fd in present:
            if fd not in parked.values():
                stub.call("close", fd)
        for descriptor in wanted:
            number = parked.pop(descriptor.fd)
            stub.call("dup3", number, descriptor.fd, O_CLOEXEC if descriptor.cloexec else 0)
            stub.call("close", number)
            # A relay stands for the original: it takes the original's status
            # flags (a server's non-blocking listener must not block in accept).
            stub.call("fcntl", descriptor.fd, F_SETFL, descriptor.flags & SETTABLE_STATUS_FLAGS)
        for unused in parked.values():
            stub.call("close", unused)  # a description another member's copy stood for
    return frozenset(descriptor.fd for descriptor in wanted)
