"""Write tests/corpus/crf/*.crf: malformed CRF images, each broken in one known way.

    .venv/bin/python tests/corpus/make_crf_corpus.py   (as root; rewrites the directory)

They all start from one real, small image: the `counter` fixture dumped with
`--no-binary --no-shared-libs` (its code is mapped from files, so only its
stack, heap and changed pages are stored). That image itself is not kept: it
is valid, and the corpus holds only images every reader must refuse. Each
mutation below names what it breaks; those that change a section's payload
recompute its CRC, so the reader meets the flaw itself, not a bad checksum.
tests/test_corpus.py runs `hijack show` and `hijack restore` on every file;
tests/fuzz/run.py uses them as the seed corpus of crf_reader.
"""

from __future__ import annotations

import dataclasses
import io
import struct
import subprocess
import sys
import tempfile
import zlib
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from support import spawn_fixture  # noqa: E402

from hijack.image import Segment  # noqa: E402
from hijack.image.fields import struct_codec  # noqa: E402

CORPUS = HERE / "crf"
SIGNATURE_SIZE = 8
HEAD = struct.Struct("<4sI")

Section = tuple[bytes, bytes]  # tag, payload
Mutation = Callable[[bytes, list[Section]], bytes]


def dump_base_image() -> bytes:
    with (
        tempfile.TemporaryDirectory() as directory,
        spawn_fixture("counter", Path(directory) / "counter.log") as counter,
    ):
        image = Path(directory) / "base.crf"
        subprocess.run(
            [
                sys.executable,
                "-m",
                "hijack",
                "dump",
                str(counter.pid),
                "-o",
                str(image),
                "--no-binary",
                "--no-shared-libs",
            ],
            check=True,
            env={"HIJACK_STATE_DIR": directory, "PATH": "/usr/bin:/bin"},
        )
        counter.assert_intact()
        return image.read_bytes()


def minimized(signature: bytes, sections: list[Section]) -> list[Section]:
    """The image without its large PAGES sections (all but single pages), END fixed.

    Still a valid image (an anonymous page not stored is zero; the reader checks
    that), and the corpus stays small.
    """
    kept = [s for s in sections if s[0] != b"PAGE" or len(s[1]) <= 8 + 4096]
    body = kept[:-1]
    pages = sum((len(p) - 8) // 4096 for tag, p in body if tag == b"PAGE")
    end = bytearray(kept[-1][1])
    struct.pack_into("<QQQ", end, 0, len(body), len(join(signature, body)), pages)
    return [*body, (b"END_", bytes(end))]


def check_valid(image: bytes) -> None:
    from hijack.image import read_image
    from hijack.image.summary import summarize

    summarize(read_image(io.BytesIO(image)))


def split(image: bytes) -> tuple[bytes, list[Section]]:
    signature, rest, sections = image[:SIGNATURE_SIZE], image[SIGNATURE_SIZE:], []
    while rest:
        tag, length = HEAD.unpack(rest[: HEAD.size])
        # A dump to a file splices its pages (SPLICED_PAGES): the mutations below work on
        # PAGES, which join() checksums whole, as they did before dumps spliced.
        sections.append((b"PAGE" if tag == b"SPLC" else tag, rest[HEAD.size : HEAD.size + length]))
        rest = rest[HEAD.size + length + 4 :]
    return signature, sections


def section(tag: bytes, payload: bytes) -> bytes:
    head = HEAD.pack(tag, len(payload))
    return head + payload + struct.pack("<I", zlib.crc32(head + payload))


def join(signature: bytes, sections: list[Section]) -> bytes:
    return signature + b"".join(section(tag, payload) for tag, payload in sections)


def first(sections: list[Section], tag: bytes) -> int:
    return next(i for i, (t, _) in enumerate(sections) if t == tag)


def patched(sections: list[Section], tag: bytes, offset: int, data: bytes) -> list[Section]:
    """`data` written over the payload of the first `tag` section at `offset`."""
    index = first(sections, tag)
    payload = sections[index][1]
    copy = list(sections)
    copy[index] = (tag, payload[:offset] + data + payload[offset + len(data) :])
    return copy


def segments_payload(segments: list[Segment]) -> bytes:
    out = bytearray(struct.pack("<I", len(segments)))
    codec = struct_codec(Segment)
    for segment in segments:
        codec.encode(segment, out)
    return bytes(out)


def read_segments(payload: bytes) -> list[Segment]:
    from hijack.image.fields import Cursor

    cursor = Cursor(payload[4:])
    codec = struct_codec(Segment)
    return [codec.decode(cursor) for _ in range(struct.unpack_from("<I", payload)[0])]


def with_segments(sections: list[Section], segments: list[Segment]) -> list[Section]:
    copy = list(sections)
    copy[first(sections, b"SEGS")] = (b"SEGS", segments_payload(segments))
    return copy


def overlapping(sig: bytes, sections: list[Section]) -> bytes:
    segments = read_segments(sections[first(sections, b"SEGS")][1])
    segments[0] = dataclasses.replace(segments[0], end=segments[1].start + 4096)
    return join(sig, with_segments(sections, segments))


def out_of_order(sig: bytes, sections: list[Section]) -> bytes:
    segments = read_segments(sections[first(sections, b"SEGS")][1])
    segments[0], segments[1] = segments[1], segments[0]
    return join(sig, with_segments(sections, segments))


def swapped(sig: bytes, sections: list[Section], a: bytes, b: bytes) -> bytes:
    copy = list(sections)
    i, j = first(copy, a), first(copy, b)
    copy[i], copy[j] = copy[j], copy[i]
    return join(sig, copy)


def without(sig: bytes, sections: list[Section], tag: bytes) -> bytes:
    return join(sig, [s for s in sections if s[0] != tag])


def raw_length(sig: bytes, sections: list[Section], tag: bytes, length: int) -> bytes:
    """The `tag` section's LENGTH field replaced (its CRC left as it was)."""
    index = first(sections, tag)
    before = join(sig, sections[:index])
    encoded = section(*sections[index])
    return before + HEAD.pack(tag, length) + encoded[HEAD.size :] + join(b"", sections[index + 1 :])


def with_objects(sections: list[Section], count: int, objects: list[Section]) -> list[Section]:
    """FILES announcing `count` object sections, followed by `objects` instead of the
    image's own (those up to its first PAGES or THREAD)."""
    at = first(sections, b"FDS_")
    files = (b"FDS_", struct.pack("<I", count) + sections[at][1][4:])
    rest = at + 1
    while sections[rest][0] not in (b"PAGE", b"THRD"):
        rest += 1
    return [*sections[:at], files, *objects, *sections[rest:]]


def eventfd(object_id: int) -> Section:
    return (b"EVFD", struct.pack("<QQ?", object_id, 3, False))


def pages_field(sections: list[Section], offset: int, data: bytes) -> list[Section]:
    return patched(sections, b"PAGE", offset, data)


# ImageHeader: pid, ppid, pgid, sid (u32 each), created_ns (u64), options (u32), comm (str).
COMM_LENGTH = 28
# Credentials: 8 u32 ids, 5 u64 capability sets, then umask (u32) and no_new_privs (bool).
UMASK = 8 * 4 + 5 * 8
END_RECORDS = 0  # End: records (u64) first
# Files: objects (u32), the descriptor count (u32), then the first FileDescriptor: fd u32,
# kind u8, flags u32, pos i64, cloexec bool, mode u32, dev ino description_id u64, object_id.
FIRST_OBJECT_ID = 4 + 4 + 4 + 1 + 4 + 8 + 1 + 4 + 3 * 8

MUTATIONS: dict[str, Mutation] = {
    "empty": lambda sig, s: b"",
    "wrong-magic": lambda sig, s: b"CRX\0" + join(sig, s)[4:],
    "elf-not-crf": lambda sig, s: b"\x7fELF\x02\x01\x01" + bytes(57),
    "unknown-version": lambda sig, s: join(sig[:4] + struct.pack("<I", 99), s),
    "truncated-signature": lambda sig, s: sig[:5],
    "signature-only": lambda sig, s: sig,
    "truncated-section-head": lambda sig, s: join(sig, s)[: SIGNATURE_SIZE + 5],
    "truncated-in-header": lambda sig, s: join(sig, s)[: SIGNATURE_SIZE + 20],
    "truncated-in-pages": lambda sig, s: join(sig, s[: first(s, b"PAGE") + 1])[:-2000],
    "truncated-before-end": lambda sig, s: join(sig, s[:-1]),
    "bad-checksum-header": lambda sig, s: (
        lambda image: image[:20] + bytes([image[20] ^ 0x40]) + image[21:]
    )(join(sig, s)),
    "bad-checksum-end": lambda sig, s: join(sig, s)[:-1] + bytes([join(sig, s)[-1] ^ 1]),
    # SPLICED_PAGES' CRC covers its head and address only: one over its data too is wrong.
    "spliced-pages-crc-over-data": lambda sig, s: join(
        sig, [(b"SPLC" if i == first(s, b"PAGE") else t, p) for i, (t, p) in enumerate(s)]
    ),
    "bad-checksum-pages": lambda sig, s: (
        join(sig, s[: first(s, b"PAGE")])
        + (lambda encoded: encoded[:100] + bytes([encoded[100] ^ 1]) + encoded[101:])(
            section(*s[first(s, b"PAGE")])
        )
        + join(b"", s[first(s, b"PAGE") + 1 :])
    ),
    "unknown-tag": lambda sig, s: join(
        sig, [(b"XXXX" if tag == b"RLIM" else tag, payload) for tag, payload in s]
    ),
    "sections-out-of-order": lambda sig, s: swapped(sig, s, b"CRED", b"RLIM"),
    "threads-before-pages": lambda sig, s: swapped(sig, s, b"PAGE", b"THRD"),
    "missing-segments": lambda sig, s: without(sig, s, b"SEGS"),
    "missing-threads": lambda sig, s: without(sig, s, b"THRD"),
    "missing-end": lambda sig, s: without(sig, s, b"END_"),
    "header-twice": lambda sig, s: join(sig, [s[0], *s]),
    "data-after-end": lambda sig, s: join(sig, s) + b"\0",
    "image-after-end": lambda sig, s: join(sig, s) * 2,
    "huge-section-length": lambda sig, s: raw_length(sig, s, b"HEAD", 0xFFFFFFFF),
    "huge-pages-length": lambda sig, s: raw_length(sig, s, b"PAGE", 0x7FFFFFFF),
    "section-length-past-eof": lambda sig, s: raw_length(sig, s, b"CWD_", 1 << 20),
    "zero-length-header": lambda sig, s: join(sig, [(b"HEAD", b""), *s[1:]]),
    "huge-string-length": lambda sig, s: join(
        sig, patched(s, b"HEAD", COMM_LENGTH, struct.pack("<I", 0xFFFFFFF0))
    ),
    "huge-list-count": lambda sig, s: join(
        sig, patched(s, b"SEGS", 0, struct.pack("<I", 0xFFFFFFFF))
    ),
    "huge-page-count": lambda sig, s: raw_length(sig, s, b"PAGE", 8 + 2049 * 4096),
    "pages-not-whole": lambda sig, s: join(
        sig,
        [
            *s[: first(s, b"PAGE")],
            (b"PAGE", s[first(s, b"PAGE")][1][:-1]),
            *s[first(s, b"PAGE") + 1 :],
        ],
    ),
    "pages-unaligned-address": lambda sig, s: join(
        sig,
        pages_field(
            s, 0, struct.pack("<Q", struct.unpack_from("<Q", s[first(s, b"PAGE")][1])[0] + 1)
        ),
    ),
    "pages-outside-segments": lambda sig, s: join(
        sig, pages_field(s, 0, struct.pack("<Q", 0x1000))
    ),
    "pages-at-top-of-address-space": lambda sig, s: join(
        sig, pages_field(s, 0, struct.pack("<Q", 2**64 - 4096))
    ),
    "segments-overlap": overlapping,
    "segments-out-of-order": out_of_order,
    "umask-not-a-mode": lambda sig, s: join(
        sig, patched(s, b"CRED", UMASK, struct.pack("<I", 0o7777))
    ),
    "bool-not-0-or-1": lambda sig, s: join(sig, patched(s, b"CRED", UMASK + 4, b"\x02")),
    "end-counts-wrong": lambda sig, s: join(
        sig, patched(s, b"END_", END_RECORDS, struct.pack("<Q", 2**64 - 1))
    ),
    "end-bytes-wrong": lambda sig, s: join(sig, patched(s, b"END_", 8, struct.pack("<Q", 0))),
    "random-garbage": lambda sig, s: bytes((i * 7919 + 13) % 251 for i in range(5000)),
    "object-not-counted": lambda sig, s: join(sig, with_objects(s, 0, [eventfd(1)])),
    "objects-missing": lambda sig, s: join(sig, with_objects(s, 1, [])),
    "object-twice": lambda sig, s: join(sig, with_objects(s, 2, [eventfd(1), eventfd(1)])),
    "object-id-zero": lambda sig, s: join(sig, with_objects(s, 1, [eventfd(0)])),
    "object-data-before-its-object": lambda sig, s: join(
        sig, with_objects(s, 2, [(b"ODAT", struct.pack("<QQ", 1, 0) + b"x"), eventfd(1)])
    ),
    "object-data-empty": lambda sig, s: join(
        sig, with_objects(s, 2, [eventfd(1), (b"ODAT", struct.pack("<QQ", 1, 0))])
    ),
    "descriptor-object-missing": lambda sig, s: join(
        sig,
        patched(with_objects(s, 1, [eventfd(1)]), b"FDS_", FIRST_OBJECT_ID, struct.pack("<Q", 7)),
    ),
}


def main() -> None:
    signature, sections = split(dump_base_image())
    sections = minimized(signature, sections)
    check_valid(join(signature, sections))
    CORPUS.mkdir(exist_ok=True)
    for old in CORPUS.glob("*.crf"):
        old.unlink()
    for name, mutate in MUTATIONS.items():
        data = mutate(signature, sections)
        (CORPUS / f"{name}.crf").write_bytes(data)
        print(f"{name}.crf: {len(data)} bytes")


if __name__ == "__main__":
    main()
