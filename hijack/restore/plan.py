"""What a restore would refuse, decided before anything is made for the process.

One check serves the restore's plan and `hijack dump --kill` (which must never
kill a process that could not come back): the files the image maps, and each
descriptor's kind (hijack.objects) asked why it could not be rebuilt. A move
asks the mapping part before it touches the process (its descriptors go
through its own proxy plan).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from hijack import objects
from hijack.errors import Unsupported
from hijack.image import records as rec
from hijack.image.files import ImageFiles
from hijack.image.identity import identity_change
from hijack.objects import sysv
from hijack.objects.memfd import mapped_objects
from hijack.restore.address_space import backing_file_mode, needs_backing_file, unmappable

SKIP_HINT = "use --skip-unsupported to drop them; "
ATTACH_HINT = "attach the process before dumping it and its shadow keeps them"


@dataclass(frozen=True)
class ShadowHoldings:
    """What the shadow of a checkpointed process keeps for its restore."""

    shadow_pid: int
    control: str
    own_fd: dict[int, int]  # the process's descriptor number -> the shadow's
    identity: dict[int, tuple[int, int]]  # the process's descriptor number -> (dev, ino)
    member: int = 0  # the process is this member of the shadow's tree (0: its root)


@dataclass(frozen=True)
class FilePlan:
    inherited: tuple[rec.FileDescriptor, ...]  # handed to the stub: from the shadow, or relays
    reopen: tuple[rec.FileDescriptor, ...]  # rebuilt by their kinds
    dropped: tuple[rec.FileDescriptor, ...]  # left out (--skip-unsupported)


@dataclass(frozen=True)
class Problems:
    """What a restore of an image would refuse."""

    mappings: tuple[str, ...]  # files it maps that cannot be opened or changed
    descriptors: tuple[tuple[rec.FileDescriptor, str], ...]  # and each one's reason


def restore_problems(
    segments: tuple[rec.Segment, ...],
    image: ImageFiles,
    held: Callable[[rec.FileDescriptor], bool] = lambda _: False,
) -> Problems:
    """Everything a restore from this image would refuse; `held` descriptors come from
    elsewhere (the shadow keeps them, a move relays them)."""
    held_by_objects = frozenset(mapped_objects(segments, image))
    mappings = (
        *mapping_problems(segments, held_by_objects, frozenset(d.ino for d in image.descriptors)),
        *sysv.segment_refusals(segments, image),
    )
    return Problems(mappings, tuple(objects.refusals(image, held)))


def mapping_problems(
    segments: Iterable[rec.Segment],
    held_by_objects: frozenset[int] = frozenset(),
    descriptor_inodes: frozenset[int] | None = None,
) -> tuple[str, ...]:
    """The files the segments map that a restore could not open, or that changed; those
    starting at `held_by_objects` are made from the image (a memfd, a deleted file, a
    packet socket's ring). Given the inodes of the image's descriptors, a socket's
    mapping whose socket has none is one too."""
    found: list[str] = []
    for segment in segments:
        if segment.start in held_by_objects:
            continue
        change = identity_change(segment.file) if segment.file is not None else None
        if (
            descriptor_inodes is not None
            and segment.path.startswith("socket:[")
            and segment.inode not in descriptor_inodes
        ):
            # A packet socket's ring with no descriptor of the socket left: memory
            # would come back, the socket that fills it would not.
            change = f"a socket's ring mapped with no descriptor of it left ({segment.path})"
        if change is None and needs_backing_file(segment) and not _can_open(segment):
            change = unmappable(segment)
        if change is not None and change not in found:
            found.append(change)
    return tuple(found)


def _can_open(segment: rec.Segment) -> bool:
    try:
        os.close(os.open(segment.path, backing_file_mode(segment)))
    except OSError:
        return False
    return True


def plan_files(
    segments: tuple[rec.Segment, ...],
    image: ImageFiles,
    *,
    skip_unsupported: bool,
    holdings: ShadowHoldings | None = None,
    provided: frozenset[int] = frozenset(),
) -> FilePlan:
    """Decide for each descriptor where it comes from, or refuse naming what cannot be.

    `provided` are numbers the caller hands over ready-made (a move's relays).
    """

    def held(descriptor: rec.FileDescriptor) -> bool:
        kept = holdings is not None and holdings.identity.get(descriptor.fd) == (
            descriptor.dev,
            descriptor.ino,
        )
        return descriptor.fd in provided or kept

    problems = restore_problems(segments, image, held)
    if problems.mappings:
        raise Unsupported("; ".join(problems.mappings))
    refused = [reason for _, reason in problems.descriptors]
    if refused and not skip_unsupported:
        raise Unsupported(f"cannot restore {', '.join(refused)} ({SKIP_HINT}{ATTACH_HINT})")
    dropped = {descriptor.fd for descriptor, _ in problems.descriptors}
    return FilePlan(
        inherited=tuple(d for d in image.descriptors if held(d)),
        reopen=tuple(d for d in image.descriptors if not held(d) and d.fd not in dropped),
        dropped=tuple(d for d, _ in problems.descriptors),
    )
