"""The tree stream of docs/crf.md §7b: TREE, END, then one IMAGE per living member."""

from __future__ import annotations

import dataclasses
import io

import pytest
from test_image_codec import BUILT

from hijack.errors import ImageError
from hijack.image import (
    End,
    Files,
    ImageHeader,
    ImageWriter,
    MemberState,
    MemfdObject,
    ObjectData,
    PageReference,
    SharedAnonymous,
    SharedDescription,
    Tree,
    TreeMember,
    read_image,
    read_stream,
)


def member(pid: int, ppid: int, state: MemberState = MemberState.RUNNING) -> TreeMember:
    return TreeMember(
        pid=pid,
        ppid=ppid,
        pgid=pid,
        sid=1,
        exit_signal=17,
        exit_code=0x300 if state is MemberState.ZOMBIE else 0,
        state=state,
        comm=f"p{pid}",
    )


def tree_head(tree: Tree) -> bytes:
    out = io.BytesIO()
    writer = ImageWriter(out)
    writer.write(tree)
    writer.close()
    return out.getvalue()


def image_of(pid: int, bytes_in: int = 0, keep_data: bool = False) -> bytes:
    """BUILT's image, its HEADER saying `pid`, without BUILT's PAGE_REFERENCE (it names
    a process no tree here holds: tests/test_tree_share.py tests references in streams).
    `bytes_in`: its memfd's and shared anonymous memory's bytes said to be in that member's
    image (their OBJECT_DATA left out, unless `keep_data`)."""
    out = io.BytesIO()
    writer = ImageWriter(out)
    records = list(read_image(io.BytesIO(BUILT.image)))
    elsewhere = {r.id for r in records if bytes_in and isinstance(r, MemfdObject | SharedAnonymous)}
    left_out = [
        r for r in records if isinstance(r, ObjectData) and r.id in elsewhere and not keep_data
    ]
    for record in records:
        if isinstance(record, PageReference) or record in left_out:
            continue
        if isinstance(record, Files):
            record = dataclasses.replace(record, objects=record.objects - len(left_out))
        if isinstance(record, MemfdObject | SharedAnonymous) and record.id in elsewhere:
            record = dataclasses.replace(record, bytes_in=bytes_in)
        if isinstance(record, ImageHeader):
            record = ImageHeader(**{**_fields(record), "pid": pid})
        if isinstance(record, End):
            writer.close(pages_untouched=record.pages_untouched, pages_file=record.pages_file)
        elif type(record).__name__ == "Pages":
            writer.write_pages(record.address, record.data, keep_zero_pages=True)  # type: ignore[union-attr]
        else:
            writer.write(record)
    return out.getvalue()


def _fields(record: ImageHeader) -> dict[str, object]:
    return {name: getattr(record, name) for name in record.__slots__}


TREE = Tree(
    members=(member(10, 1), member(11, 10), member(12, 10, MemberState.ZOMBIE), member(13, 11)),
    shared=(
        SharedDescription(pid=11, fd=3, holder_pid=10, holder_fd=4),
        SharedDescription(pid=13, fd=3, holder_pid=10, holder_fd=4),
    ),
)


def test_a_tree_stream_round_trips_member_by_member() -> None:
    stream = tree_head(TREE) + image_of(10) + image_of(11) + image_of(13)
    records = list(read_stream(io.BytesIO(stream)))
    assert records[0] == TREE and isinstance(records[1], End)
    assert [r.pid for r in records if isinstance(r, ImageHeader)] == [10, 11, 13]
    assert sum(isinstance(r, End) for r in records) == 4
    assert [m.pid for m in TREE.imaged] == [10, 11, 13]


def test_a_plain_image_reads_as_before() -> None:
    plain = image_of(10)
    assert list(read_stream(io.BytesIO(plain))) == list(read_image(io.BytesIO(plain)))
    with pytest.raises(ImageError, match="unexpected data after END"):
        list(read_stream(io.BytesIO(plain + b"x")))


def test_a_plain_image_may_not_refer_to_another() -> None:
    with pytest.raises(ImageError, match="refer to process 4000"):
        list(read_stream(io.BytesIO(BUILT.image)))


def test_a_memory_object_s_bytes_may_be_in_a_member_s_image_before() -> None:
    """Version 10: a memfd or shared anonymous memory members share has its bytes in the
    first image recording it; a later member's record names that member, and holds none."""
    head = tree_head(TREE)
    stream = head + image_of(10) + image_of(11, bytes_in=10) + image_of(13, bytes_in=10)
    records = list(read_stream(io.BytesIO(stream)))
    said = [r.bytes_in for r in records if isinstance(r, MemfdObject | SharedAnonymous)]
    assert said == [0, 0, 10, 10, 10, 10]
    with pytest.raises(ImageError, match="not a member whose image came before this one"):
        list(read_stream(io.BytesIO(head + image_of(10) + image_of(11, bytes_in=13))))
    with pytest.raises(ImageError, match="whose record says another member holds it"):
        list(read_stream(io.BytesIO(head + image_of(10) + image_of(11, 10, keep_data=True))))
    with pytest.raises(ImageError, match="not a member whose image came before this one"):
        list(read_stream(io.BytesIO(image_of(10, bytes_in=9))))  # a plain image: none


def test_a_tree_stream_must_hold_the_images_it_announces_in_order() -> None:
    head = tree_head(TREE)
    with pytest.raises(ImageError, match="image 2 is of process 13, the TREE says 11"):
        list(read_stream(io.BytesIO(head + image_of(10) + image_of(13) + image_of(11))))
    with pytest.raises(ImageError, match="the tree stream ends after 2 of its 3 images"):
        list(read_stream(io.BytesIO(head + image_of(10) + image_of(11))))
    with pytest.raises(ImageError, match="unexpected data after END"):
        whole = head + image_of(10) + image_of(11) + image_of(13)
        list(read_stream(io.BytesIO(whole + b"x")))
    with pytest.raises(ImageError, match="out of place, expected HEADER"):
        list(read_image(io.BytesIO(head)))


def test_a_tree_record_refuses_what_is_not_a_tree() -> None:
    with pytest.raises(ImageError, match="no members"):
        Tree(members=())
    with pytest.raises(ImageError, match="appears twice"):
        Tree(members=(member(10, 1), member(10, 10)))
    with pytest.raises(ImageError, match="comes before its parent 11"):
        Tree(members=(member(10, 1), member(12, 11), member(11, 10)))
    with pytest.raises(ImageError, match="the root is a zombie"):
        Tree(members=(member(10, 1, MemberState.ZOMBIE),))


def test_shared_descriptions_name_living_members_listed_before() -> None:
    members = (member(10, 1), member(11, 10), member(12, 10, MemberState.ZOMBIE))

    def link(pid: int, holder: int, fd: int = 3) -> SharedDescription:
        return SharedDescription(pid=pid, fd=fd, holder_pid=holder, holder_fd=4)

    with pytest.raises(ImageError, match="not a member"):
        Tree(members=members, shared=(link(11, 99),))
    with pytest.raises(ImageError, match="not a member listed before it"):
        Tree(members=members, shared=(link(10, 11),))
    with pytest.raises(ImageError, match="not a member listed before it"):
        Tree(members=members, shared=(link(10, 10),))
    with pytest.raises(ImageError, match="a zombie holds no descriptor"):
        Tree(members=members, shared=(link(12, 10),))
    with pytest.raises(ImageError, match="listed twice"):
        Tree(members=members, shared=(link(11, 10), link(11, 10)))
