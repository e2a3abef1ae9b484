"""The per-kind framework (hijack.objects) on its own: ids, data chunks, which kind a
descriptor goes to. The kinds themselves are tested end to end by dump and restore."""

from __future__ import annotations

import os
from pathlib import Path

from hijack import objects
from hijack.image import records as rec
from hijack.image.files import ImageFiles
from hijack.objects.base import DumpContext
from hijack.objects.epoll import Epoll
from hijack.objects.other import Other
from hijack.objects.regular import Regular, is_deleted

MIB = 1024 * 1024


def descriptor(fd: int, kind: rec.FdKind, object_id: int = 0) -> rec.FileDescriptor:
    return rec.FileDescriptor(
        fd=fd,
        kind=kind,
        flags=2,
        pos=0,
        cloexec=False,
        mode=0,
        dev=1,
        ino=fd,
        description_id=fd + 1,
        object_id=object_id,
        path=f"thing:[{fd}]",
    )


def test_one_id_per_object_and_its_data_in_chunks_of_8_mib() -> None:
    with DumpContext(os.getpid(), [], {}) as dump:
        made: list[int] = []

        def make(id: int) -> rec.EventfdObject:
            made.append(id)
            return rec.EventfdObject(id=id, count=0, semaphore=False)

        first = dump.add_object(("eventfd", 1), make)
        assert dump.add_object(("eventfd", 1), make) == first and made == [first]
        second = dump.add_object(("eventfd", 2), make)
        assert second != first
        dump.add_data(first, b"a" * (9 * MIB))
        dump.add_data(first, b"b" * 10)  # goes on after the first 9 MiB
        dump.add_data(first, b"c", offset=20 * MIB)  # after a hole
        dump.add_data(second, b"")
        sections = dump.sections
    chunks = [(s.id, s.offset, len(s.data)) for s in sections if isinstance(s, rec.ObjectData)]
    assert chunks == [
        (first, 0, 8 * MIB),
        (first, 8 * MIB, MIB),
        (first, 9 * MIB, 10),
        (first, 20 * MIB, 1),
    ]
    files = ImageFiles.of([descriptor(3, rec.FdKind.EVENTFD, first)], sections)
    data = files.data(first)
    assert len(data) == 20 * MIB + 1 and data[9 * MIB : 9 * MIB + 11] == b"b" * 10 + b"\0"
    assert files.data(second) == b""
    assert files.files.objects == len(sections) == 6


def test_a_descriptor_goes_to_its_objects_kind_or_by_its_fd_kind() -> None:
    epoll = rec.EpollObject(id=1, targets=())
    files = ImageFiles.of(
        [
            descriptor(3, rec.FdKind.EPOLL, 1),
            descriptor(4, rec.FdKind.REGULAR),
            descriptor(5, rec.FdKind.PIPE),
        ],
        [epoll],
    )
    kinds = [type(objects.kind_of(d, files)) for d in files.descriptors]
    assert kinds == [Epoll, Regular, Other]
    assert objects.kind_named("epoll").name == "epoll"
    assert objects.describe(files.descriptors[0], files) == "epoll: watching none"
    assert isinstance(objects.KINDS[-1], Other)  # whatever no kind claims is refused


def test_a_deleted_file_is_told_from_one_named_deleted(tmp_path: Path) -> None:
    named = tmp_path / "kept (deleted)"
    named.write_text("still here")
    gone = tmp_path / "gone"
    gone.write_text("unlinked")
    with open(named) as kept_file, open(gone) as gone_file:
        gone.unlink()
        for file, deleted in ((kept_file, False), (gone_file, True)):
            link = os.readlink(f"/proc/self/fd/{file.fileno()}")
            found = os.fstat(file.fileno())
            assert link.endswith(" (deleted)")
            assert is_deleted(link, found.st_dev, found.st_ino) == deleted, link
