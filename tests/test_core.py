"""`hijack core IMAGE -o FILE`: an ELF core file of an image, opened by gdb.

The threads fixture is dumped twice while it runs (once storing every page,
once with its executable and libraries left to their files), ends intact,
and each image becomes a core: gdb from Debian's packages shows every
thread's backtrace with the fixture's functions, lief reads back the notes
as the image has them, and the memory of the core is the image's. Bad input
is one line and exit 1, with no core file left behind.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import lief
import pytest
from support import spawn_fixture
from support.cli import HijackCli

from hijack.cli.main import main
from hijack.image import (
    ContentsKind,
    MemoryStructure,
    Pages,
    Segment,
    Segments,
    Thread,
    read_image,
)
from hijack.image.codec import skip_rounds

GDB = shutil.which("gdb")
GDB_TIMEOUT = 60.0
# What each task of the threads fixture runs (tests/fixtures/threads.c).
FIXTURE_FUNCTIONS = Counter({"main": 1, "work": 4, "wait_for_release": 1})
THREAD_HEADING = re.compile(r"^Thread \d+ \(.*\(LWP (\d+)\)\):$", re.MULTILINE)
FRAME_FUNCTION = re.compile(r"^#\d+\s+(?:0x[0-9a-f]+ in )?(\w+) ", re.MULTILINE)


@dataclass(frozen=True)
class Dumped:
    program: Path
    image: Path
    core: Path
    cli: HijackCli


@pytest.fixture(scope="module")
def dumped(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Dumped]:
    """The threads fixture's images and cores: "stored" (every page), "files", "rounds" (a
    snapshot made of pre-copy rounds: its stacks' pages in its rounds)."""
    directory = tmp_path_factory.mktemp("core")
    cli = HijackCli(directory / "state")
    options = {
        "stored": ("--snapshot", "fork"),
        "files": ("--no-binary", "--no-shared-libs", "--snapshot", "fork"),
        "rounds": ("--snapshot", "rounds"),
    }
    with spawn_fixture("threads") as threads:
        program = Path(os.readlink(f"/proc/{threads.pid}/exe"))
        for name, flags in options.items():
            cli.ok("dump", threads.pid, "-o", directory / f"{name}.crf", *flags)
        threads.assert_intact()
    result: dict[str, Dumped] = {}
    for name in options:
        dumped = Dumped(program, directory / f"{name}.crf", directory / f"{name}.core", cli)
        cli.ok("core", dumped.image, "-o", dumped.core)
        result[name] = dumped
    return result


def image_records(image: Path) -> tuple[list[Thread], MemoryStructure, tuple[Segment, ...]]:
    threads: list[Thread] = []
    mm: MemoryStructure | None = None
    segments: tuple[Segment, ...] = ()
    with open(image, "rb") as stream:
        for record in read_image(skip_rounds(stream)[0]):
            if isinstance(record, Thread):
                threads.append(record)
            elif isinstance(record, MemoryStructure):
                mm = record
            elif isinstance(record, Segments):
                segments = record.segments
    assert mm is not None
    return threads, mm, segments


def gdb_backtraces(program: Path, core: Path) -> tuple[str, dict[int, list[str]]]:
    """gdb's whole output, and the functions of each thread's backtrace by LWP."""
    assert GDB is not None
    env = {key: value for key, value in os.environ.items() if key != "DEBUGINFOD_URLS"}
    completed = subprocess.run(
        [GDB, "-batch", "-nx", "-iex", "set debuginfod enabled off",
         "-ex", "thread apply all bt", str(program), str(core)],
        env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
        timeout=GDB_TIMEOUT, check=False,
    )  # fmt: skip
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, output
    headings = list(THREAD_HEADING.finditer(completed.stdout))
    backtraces: dict[int, list[str]] = {}
    for heading, following in zip(headings, [*headings[1:], None], strict=True):
        block = completed.stdout[heading.end() : following.start() if following else None]
        backtraces[int(heading.group(1))] = FRAME_FUNCTION.findall(block)
    return output, backtraces


@pytest.mark.skipif(GDB is None, reason="gdb is not installed (make system-deps)")
@pytest.mark.parametrize("variant", ["stored", "files", "rounds"])
def test_gdb_shows_every_threads_backtrace_with_the_fixtures_functions(
    dumped: dict[str, Dumped], variant: str
) -> None:
    core = dumped[variant]
    threads, _, _ = image_records(core.image)
    output, backtraces = gdb_backtraces(core.program, core.core)
    assert sorted(backtraces) == sorted(thread.tid for thread in threads), output
    # Each thread once: gdb 13 loads the threads again and again when it cannot
    # read the executable's headers, which the core must hold.
    assert output.count("[New LWP ") == len(threads), output
    found: Counter[str] = Counter()
    for tid, functions in backtraces.items():
        mine = [function for function in functions if function in FIXTURE_FUNCTIONS]
        assert len(mine) == 1, f"thread {tid}: {functions}\n{output}"
        found[mine[0]] += 1
    assert found == FIXTURE_FUNCTIONS, output
    main_thread = min(thread.tid for thread in threads)
    assert backtraces[main_thread][-1] == "main", output


@pytest.mark.parametrize("variant", ["stored", "files", "rounds"])
def test_the_notes_and_memory_are_the_images(dumped: dict[str, Dumped], variant: str) -> None:
    core = dumped[variant]
    threads, mm, segments = image_records(core.image)
    binary = lief.ELF.parse(str(core.core))
    assert binary is not None and binary.header.file_type == lief.ELF.Header.FILE_TYPE.CORE

    loads = [s for s in binary.segments if s.type == lief.ELF.Segment.TYPE.LOAD]
    assert [(load.virtual_address, load.virtual_size) for load in loads] == [
        (segment.start, segment.size) for segment in segments
    ]
    statuses = {
        note.status.pid: note for note in binary.notes if isinstance(note, lief.ELF.CorePrStatus)
    }
    assert sorted(statuses) == sorted(thread.tid for thread in threads)
    for thread in threads:
        status = statuses[thread.tid]
        assert (status.pc, status.sp) == (thread.regs.rip, thread.regs.rsp)
        assert status.status.sighold == thread.sigmask
    (info,) = [note for note in binary.notes if isinstance(note, lief.ELF.CorePrPsInfo)]
    assert info.info is not None and info.info.filename_stripped == "threads"
    (files,) = [note for note in binary.notes if isinstance(note, lief.ELF.CoreFile)]
    assert [(entry.start, entry.end, entry.path) for entry in files.files] == [
        (segment.start, segment.end, segment.path) for segment in segments if segment.inode
    ]
    # lief's auxv drops the types it does not know: compare the raw note.
    (auxv,) = [note for note in binary.notes if isinstance(note, lief.ELF.CoreAuxv)]
    pairs = struct.iter_unpack("<QQ", bytes(auxv.description))
    assert list(pairs) == [(entry.a_type, entry.a_val) for entry in mm.auxv]
    xstates = [note for note in binary.notes if note.original_type == 0x202]  # NT_X86_XSTATE
    assert bytes(xstates[0].description) == threads[0].xstate

    with open(core.image, "rb") as stream:
        # A snapshot of rounds: its image's pages, which override its rounds'.
        pages = [r for r in read_image(skip_rounds(stream)[0]) if isinstance(r, Pages)]
    for page in pages[:: max(1, len(pages) // 50)]:
        assert bytes(binary.get_content_from_virtual_address(page.address, len(page.data))) == (
            page.data
        ), f"{page.address:#x}"
    for segment in segments:
        if segment.contents is ContentsKind.FILE and segment.offset == 0:
            with open(segment.path, "rb") as file:  # the ELF header page gdb needs
                expected = file.read(segment.size)
            content = binary.get_content_from_virtual_address(segment.start, len(expected))
            assert bytes(content)[:64] == expected[:64], segment.path
    size = core.core.stat()
    assert size.st_blocks * 512 < size.st_size  # the zeros are holes
    assert size.st_mode & 0o777 == 0o600


def test_bad_input_is_one_line_and_leaves_no_core(
    dumped: dict[str, Dumped], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """In this process (main(argv)), as the command runs it, to keep the suite fast."""

    def refused(image: Path, core: Path, phrase: str) -> None:
        assert main(["core", str(image), "-o", str(core)]) == 1
        lines = capsys.readouterr().err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("hijack: "), lines
        assert phrase in lines[0], lines

    core = tmp_path / "out.core"
    not_an_image = tmp_path / "notes.txt"
    not_an_image.write_text("not an image\n")
    refused(not_an_image, core, "not a CRF image")
    refused(tmp_path / "absent.crf", core, "cannot open image")
    truncated = tmp_path / "truncated.crf"
    truncated.write_bytes(dumped["stored"].image.read_bytes()[:100_000])
    refused(truncated, core, "truncated")
    refused(dumped["stored"].image, tmp_path / "absent" / "x.core", "cannot write")
    refused(dumped["stored"].image, Path("-"), "not stdout")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["notes.txt", "truncated.crf"]
