"""A relaying process (the shadow, the node's forwarder) keeps the memory malloc freed for
its next buffers (hijack.sys.libc.keep_freed_memory): a relay's 256 KiB buffers were
mapped, faulted in zeroed and handed back for every one of them (glibc's defaults), which
was most of the system time of a bulk stream through an encrypted relay."""

from __future__ import annotations

import subprocess
import sys

# Run in a process of its own (pytest's malloc is left alone): a 1 MiB block after
# keep_freed_memory(4 MiB) comes from the heap, not a mapping of its own, and once
# freed it stays in the heap for the next one.
CHECK = """
import ctypes, sys
from hijack.sys import libc
FIELDS = ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
          "uordblks", "fordblks", "keepcost")
class Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in FIELDS]
mallinfo2 = libc.libc.mallinfo2
mallinfo2.restype = Mallinfo2
libc.keep_freed_memory(4 << 20)
mapped = mallinfo2().hblks
block = ctypes.create_string_buffer(1 << 20)
print(mallinfo2().hblks - mapped)
del block
print(int(mallinfo2().fordblks >= 1 << 20))
"""


def test_freed_relay_buffers_stay_in_the_heap() -> None:
    result = subprocess.run(
        [sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    mapped, kept = result.stdout.split()
    assert mapped == "0", "a 1 MiB block was mapped on its own, not taken from the heap"
    assert kept == "1", "the freed block went back to the kernel"
