"""The identity of a file an image maps instead of storing: path, size, mtime, ELF build-id.

A restore maps such a file only if its identity is unchanged; otherwise the
pages it would give are not the pages the process had.
"""

from __future__ import annotations

import os
import re

from hijack.errors import ImageError
from hijack.image.records import FileIdentity

# libfoo.so, libfoo.so.6, libfoo-2.36.so, ld-linux-x86-64.so.2
SHARED_LIBRARY_NAME = re.compile(r"\.so(\.\d+)*$|\.so\.")


def is_shared_library(path: str) -> bool:
    return bool(SHARED_LIBRARY_NAME.search(os.path.basename(path)))


def read_build_id(path: str) -> bytes:
    """The NT_GNU_BUILD_ID note of an ELF file; empty for a file without one or not ELF."""
    # Imported here: pyelftools takes 20-40 ms, and most hijack commands read no ELF file.
    from elftools.common.exceptions import ELFError
    from elftools.elf.elffile import ELFFile
    from elftools.elf.sections import NoteSection

    try:
        with open(path, "rb") as file:
            elf = ELFFile(file)
            for section in elf.iter_sections():
                if not isinstance(section, NoteSection):
                    continue
                for note in section.iter_notes():
                    if note.n_type == "NT_GNU_BUILD_ID":
                        return bytes.fromhex(note.n_desc)
    except (OSError, ELFError, ValueError):
        return b""
    return b""


def file_identity(open_path: str, recorded_path: str) -> FileIdentity:
    """Identity of the file at `open_path` (e.g. a map_files link), as `recorded_path`."""
    try:
        info = os.stat(open_path)
    except OSError as exc:
        raise ImageError(f"cannot read {recorded_path}: {exc.strerror}") from None
    return FileIdentity(
        path=recorded_path,
        size=info.st_size,
        mtime_ns=info.st_mtime_ns,
        build_id=read_build_id(open_path),
    )


def identity_change(expected: FileIdentity) -> str | None:
    """Why the file at the identity's path is not the one the image was made with, or None."""
    try:
        info = os.stat(expected.path)
    except OSError as exc:
        return f"{expected.path}, mapped by the image, cannot be opened: {exc.strerror}"
    changes = []
    if info.st_size != expected.size:
        changes.append(f"size {expected.size} -> {info.st_size}")
    if info.st_mtime_ns != expected.mtime_ns:
        changes.append("modification time")
    if expected.build_id and read_build_id(expected.path) != expected.build_id:
        changes.append("ELF build-id")
    if changes:
        return f"{expected.path} changed since the dump ({', '.join(changes)}); refusing to map it"
    return None


def check_identity(expected: FileIdentity) -> None:
    """Refuse, with one clear line, a file that is not the one the image was made with."""
    change = identity_change(expected)
    if change is not None:
        raise ImageError(change)
