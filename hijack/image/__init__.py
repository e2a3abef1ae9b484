"""The CRF image format: records, writer, reader, summary (spec: docs/crf.md).

Pure code: nothing here talks to the kernel. The dumper fills records from a
live process and writes them with ImageWriter; a restorer reads them back one
at a time with read_image and acts on each as it arrives.

    with open(path, "wb") as out:
        writer = ImageWriter(out)
        writer.write(header); ...; writer.write(segments)
        writer.write_pages(segment.start, memory)      # zero pages left out
        writer.write(thread); ...; writer.write(cwd)
        writer.close(pages_untouched=n, pages_file=m)
    for record in read_image(stream): ...
"""

from hijack.image.codec import (
    END_SECTION_SIZE,
    FORMAT_VERSION,
    MAGIC,
    MAX_METADATA,
    BytesLike,
    ImageWriter,
    SectionKind,
    read_image,
    read_round,
    recode,
)
from hijack.image.fields import MAX_BLOB, MAX_STRING
from hijack.image.records import (
    MAX_PAGES_DATA,
    PAGE_SIZE,
    RLIM_INFINITY,
    SIGINFO_SIZE,
    SIGNAL_COUNT,
    AuxvEntry,
    ContentsKind,
    Credentials,
    Cwd,
    DumpOptions,
    End,
    FdKind,
    FileDescriptor,
    FileIdentity,
    Files,
    ImageHeader,
    MemoryStructure,
    Pages,
    Prot,
    Record,
    Rlimit,
    Rlimits,
    RobustList,
    Round,
    RseqConfiguration,
    Segment,
    Segments,
    SigAction,
    SigAltStack,
    SignalState,
    SocketInfo,
    TerminalState,
    Thread,
    UserRegsStruct,
)
from hijack.image.summary import ImageSummary, summarize, summary_to_json

__all__ = [
    "END_SECTION_SIZE",
    "FORMAT_VERSION",
    "MAGIC",
    "MAX_BLOB",
    "MAX_METADATA",
    "MAX_PAGES_DATA",
    "MAX_STRING",
    "PAGE_SIZE",
    "RLIM_INFINITY",
    "SIGINFO_SIZE",
    "SIGNAL_COUNT",
    "AuxvEntry",
    "BytesLike",
    "ContentsKind",
    "Credentials",
    "Cwd",
    "DumpOptions",
    "End",
    "FdKind",
    "FileDescriptor",
    "FileIdentity",
    "Files",
    "ImageHeader",
    "ImageSummary",
    "ImageWriter",
    "MemoryStructure",
    "Pages",
    "Prot",
    "Record",
    "Rlimit",
    "Rlimits",
    "RobustList",
    "Round",
    "RseqConfiguration",
    "SectionKind",
    "Segment",
    "Segments",
    "SigAction",
    "SigAltStack",
    "SignalState",
    "SocketInfo",
    "TerminalState",
    "Thread",
    "UserRegsStruct",
    "read_image",
    "read_round",
    "recode",
    "summarize",
    "summary_to_json",
]
