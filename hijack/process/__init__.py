"""Per-process kernel state that is not a descriptor: one module per kind.

Each module holds, side by side, how its state is read at dump time (from
/proc and by calls injected into the stopped process), and how a restore
gives it back to the stub. Its image record lives in hijack.image.records.
"""
