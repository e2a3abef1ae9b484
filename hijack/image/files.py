"""An image's descriptors together with the object records they refer to.

FILES lists the descriptors; the object sections after it (docs/crf.md,
"Objects") hold one record per kernel object and its bulk bytes. ImageFiles
gathers them, as the dumper made them or as a restorer read them, so a kind
finds a descriptor's object and data by id.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TypeVar

from hijack.errors import ImageError
from hijack.image.records import FileDescriptor, Files, ObjectData, ObjectRecord

R = TypeVar("R")


@dataclass(frozen=True)
class ImageFiles:
    files: Files
    sections: tuple[ObjectRecord, ...]  # the object sections, in image order
    objects: dict[int, ObjectRecord] = field(init=False)  # by id, ObjectData left out
    chunks: dict[int, tuple[ObjectData, ...]] = field(init=False)  # data by object id

    def __post_init__(self) -> None:
        objects: dict[int, ObjectRecord] = {}
        chunks: dict[int, list[ObjectData]] = {}
        for section in self.sections:
            if isinstance(section, ObjectData):
                chunks.setdefault(section.id, []).append(section)
            else:
                objects[section.id] = section
        object.__setattr__(self, "objects", objects)
        object.__setattr__(self, "chunks", {i: tuple(c) for i, c in chunks.items()})

    @classmethod
    def of(
        cls, descriptors: Iterable[FileDescriptor], sections: Iterable[ObjectRecord]
    ) -> ImageFiles:
        """FILES for `descriptors`, counting `sections`."""
        kept = tuple(sections)
        return cls(Files(objects=len(kept), descriptors=tuple(descriptors)), kept)

    @property
    def descriptors(self) -> tuple[FileDescriptor, ...]:
        return self.files.descriptors

    def object_of(self, descriptor: FileDescriptor, record_type: type[R]) -> R:
        """The descriptor's object, which must be a `record_type`."""
        found = self.objects.get(descriptor.object_id)
        if not isinstance(found, record_type):
            raise ImageError(
                f"fd {descriptor.fd} refers to object {descriptor.object_id}, which is not"
                f" a {record_type.__name__}"
            )
        return found

    def data(self, object_id: int) -> bytes:
        """The bytes of an object's ObjectData sections, holes between them left as zeros."""
        out = bytearray()
        for chunk in self.chunks.get(object_id, ()):
            out.extend(bytes(chunk.offset - len(out)))
            out.extend(chunk.data)
        return bytes(out)
