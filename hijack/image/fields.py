"""Field codecs: how each value inside a CRF section payload is laid out.

A record's layout is declared once, by the annotated types of its dataclass
fields (docs/crf.md, §3); `struct_codec(cls)` compiles those
annotations into a codec, so no layout is ever unpacked by hand:

    int annotated with UInt(n)/SInt(n)   n-byte little-endian integer
    IntEnum/IntFlag annotated UInt(n)    that integer, restricted to the declared values/bits
    bool                                 u8, 0 or 1
    str                                  u32 length, then UTF-8 (surrogateescape) bytes
    bytes                                u32 length, then the bytes
    bytes annotated with Fixed(n)        exactly n bytes, no length
    tuple[X, ...]                        u32 count, then count X
    X | None                             u8 0 (absent) or 1 followed by X
    a dataclass                          its fields in declaration order, no padding

Decoding is strict (a bool byte of 2, an unknown enum value, trailing bytes are
errors) so that decode then encode is the identity: the format is canonical.
Every failure raises ImageError; lengths and counts are checked against what
is left of the payload before anything is allocated.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import operator
import struct
import types
import typing
from typing import Any, Generic, TypeVar

from hijack.errors import ImageError

T = TypeVar("T")

# Linux's MAX_ARG_STRLEN (32 pages): one argv string may be this long, so a
# smaller limit would make some live processes impossible to dump.
MAX_STRING = 128 * 1024
# Blobs are xstate areas (about 11 KiB with AMX) and build ids; leave room to grow.
MAX_BLOB = 128 * 1024

_LENGTH = struct.Struct("<I")


class Cursor:
    """Reads one section's structured bytes front to back, never past their end."""

    __slots__ = ("_data", "position")

    def __init__(self, data: bytes) -> None:
        self._data = data
        self.position = 0

    @property
    def remaining(self) -> int:
        return len(self._data) - self.position

    def take(self, size: int) -> bytes:
        if size > self.remaining:
            raise ImageError(f"needs {size} bytes, only {self.remaining} left in the section")
        start = self.position
        self.position += size
        return self._data[start : self.position]

    def take_length(self, unit: int, limit: int | None = None) -> int:
        """A u32 length or count of `unit`-byte items, refused before anything is
        allocated if it exceeds `limit` or what the payload still holds."""
        count: int = _LENGTH.unpack(self.take(_LENGTH.size))[0]
        if limit is not None and count > limit:
            raise ImageError(f"length {count} exceeds the limit of {limit}")
        if count * unit > self.remaining:
            raise ImageError(f"length {count} overruns the section ({self.remaining} bytes left)")
        return count


class FieldCodec(Generic[T]):
    """Encodes one value into a payload and decodes it back."""

    min_size: int  # bytes the smallest encoding takes: bounds list counts before allocating
    fixed = True  # whether every encoding takes exactly min_size bytes
    spec_type: str  # the type as docs/crf.md writes it (the tests hold the two together)

    def encode(self, value: T, out: bytearray) -> None:
        raise NotImplementedError

    def decode(self, cursor: Cursor) -> T:
        raise NotImplementedError


class _Integer(FieldCodec[int]):
    def __init__(self, size: int, signed: bool) -> None:
        code = {1: "b", 2: "h", 4: "i", 8: "q"}[size]
        self._struct = struct.Struct("<" + (code if signed else code.upper()))
        self.min_size = size
        bits = 8 * size
        self._low = -(1 << (bits - 1)) if signed else 0
        self._high = (1 << (bits - 1)) if signed else (1 << bits)
        self.spec_type = f"{'i' if signed else 'u'}{bits}"

    def encode(self, value: int, out: bytearray) -> None:
        if not self._low <= value < self._high:
            raise ImageError(f"{value} does not fit in {self.spec_type}")
        out += self._struct.pack(value)

    def decode(self, cursor: Cursor) -> int:
        value: int = self._struct.unpack(cursor.take(self.min_size))[0]
        return value


class UInt(_Integer):
    """Unsigned little-endian integer of `size` bytes (1, 2, 4 or 8)."""

    def __init__(self, size: int) -> None:
        super().__init__(size, signed=False)


class SInt(_Integer):
    """Two's-complement little-endian integer of `size` bytes."""

    def __init__(self, size: int) -> None:
        super().__init__(size, signed=True)


class Fixed(FieldCodec[bytes]):
    """Exactly `size` raw bytes (e.g. a 128-byte siginfo), no length prefix."""

    def __init__(self, size: int) -> None:
        self.min_size = size
        self.spec_type = f"bytes[{size}]"

    def encode(self, value: bytes, out: bytearray) -> None:
        if len(value) != self.min_size:
            raise ImageError(f"{len(value)} bytes where exactly {self.min_size} are required")
        out += value

    def decode(self, cursor: Cursor) -> bytes:
        return cursor.take(self.min_size)


class _Bool(FieldCodec[bool]):
    min_size = 1
    spec_type = "bool"

    def encode(self, value: bool, out: bytearray) -> None:
        out.append(1 if value else 0)

    def decode(self, cursor: Cursor) -> bool:
        byte = cursor.take(1)[0]
        if byte > 1:
            raise ImageError(f"boolean byte is {byte}, not 0 or 1")
        return byte == 1


class _Blob(FieldCodec[bytes]):
    min_size = _LENGTH.size
    fixed = False
    spec_type = "bytes"

    def __init__(self, limit: int) -> None:
        self._limit = limit

    def encode(self, value: bytes, out: bytearray) -> None:
        if len(value) > self._limit:
            raise ImageError(f"{len(value)} bytes exceed the limit of {self._limit}")
        out += _LENGTH.pack(len(value))
        out += value

    def decode(self, cursor: Cursor) -> bytes:
        return cursor.take(cursor.take_length(1, self._limit))


class _String(FieldCodec[str]):
    """Paths and names: the kernel's bytes, decoded as os.fsdecode does on Linux."""

    min_size = _LENGTH.size
    fixed = False
    spec_type = "str"

    def __init__(self, limit: int) -> None:
        self._bytes = _Blob(limit)

    def encode(self, value: str, out: bytearray) -> None:
        try:
            raw = value.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError as error:
            raise ImageError(f"string {value!r} cannot be stored: {error.reason}") from None
        self._bytes.encode(raw, out)

    def decode(self, cursor: Cursor) -> str:
        # Never fails: undecodable bytes become lone surrogates, and encode() turns
        # them back into the same bytes, which keeps re-encoding byte-identical.
        return self._bytes.decode(cursor).decode("utf-8", "surrogateescape")


class _Enum(FieldCodec[enum.IntEnum | enum.IntFlag]):
    """An IntEnum (exactly one of its values) or an IntFlag (any union of its bits)."""

    def __init__(self, cls: type[enum.IntEnum | enum.IntFlag], width: FieldCodec[int]) -> None:
        self._cls = cls
        self._width = width
        self.min_size = width.min_size
        self.spec_type = f"{width.spec_type} {cls.__name__}"
        self._is_flags = issubclass(cls, enum.IntFlag)
        self._known_bits = functools.reduce(operator.or_, (member.value for member in cls), 0)

    def encode(self, value: enum.IntEnum | enum.IntFlag, out: bytearray) -> None:
        self._width.encode(int(value), out)

    def decode(self, cursor: Cursor) -> enum.IntEnum | enum.IntFlag:
        number = self._width.decode(cursor)
        if self._is_flags and number & ~self._known_bits:
            raise ImageError(f"unknown {self._cls.__name__} bits {number & ~self._known_bits:#x}")
        if not self._is_flags and number not in self._cls._value2member_map_:
            raise ImageError(f"{number} is not a {self._cls.__name__}")
        return self._cls(number)


class _Sequence(FieldCodec[tuple[Any, ...]]):
    min_size = _LENGTH.size
    fixed = False

    def __init__(self, item: FieldCodec[Any]) -> None:
        if item.min_size < 1:  # counts are bounded by the bytes their items take
            raise TypeError("a list item must take at least one byte")
        self._item = item
        self.spec_type = f"list of {item.spec_type}"

    def encode(self, value: tuple[Any, ...], out: bytearray) -> None:
        out += _LENGTH.pack(len(value))
        for element in value:
            self._item.encode(element, out)

    def decode(self, cursor: Cursor) -> tuple[Any, ...]:
        # Bounded by the bytes left: every item takes at least min_size of them.
        count = cursor.take_length(self._item.min_size)
        return tuple(self._item.decode(cursor) for _ in range(count))


class _Optional(FieldCodec[Any]):
    min_size = 1
    fixed = False

    def __init__(self, inner: FieldCodec[Any]) -> None:
        self._inner = inner
        self.spec_type = f"optional {inner.spec_type}"

    def encode(self, value: Any, out: bytearray) -> None:
        if value is None:
            out.append(0)
        else:
            out.append(1)
            self._inner.encode(value, out)

    def decode(self, cursor: Cursor) -> Any:
        present = _BOOL.decode(cursor)
        return self._inner.decode(cursor) if present else None


class StructCodec(FieldCodec[T]):
    """A dataclass: its fields in declaration order. Errors name the failing field."""

    def __init__(self, cls: type[T], fields: list[tuple[str, FieldCodec[Any]]]) -> None:
        self._cls = cls
        self.fields = fields
        self.min_size = sum(codec.min_size for _, codec in fields)
        self.fixed = all(codec.fixed for _, codec in fields)
        self.spec_type = cls.__name__

    def encode(self, value: T, out: bytearray) -> None:
        name = ""
        try:
            for name, codec in self.fields:
                codec.encode(getattr(value, name), out)
        except ImageError as error:
            raise ImageError(f"{self._cls.__name__}.{name}: {error.message}") from None

    def decode(self, cursor: Cursor) -> T:
        values: dict[str, Any] = {}
        name = ""
        try:
            for name, codec in self.fields:
                values[name] = codec.decode(cursor)
        except ImageError as error:
            raise ImageError(f"{self._cls.__name__}.{name}: {error.message}") from None
        return self._cls(**values)


_BOOL = _Bool()
_STRING = _String(MAX_STRING)
_BLOB = _Blob(MAX_BLOB)
_STRUCTS: dict[type[Any], StructCodec[Any]] = {}


def struct_codec(cls: type[T]) -> StructCodec[T]:
    """The codec of a record dataclass, compiled once from its field annotations."""
    compiled = _STRUCTS.get(cls)
    if compiled is None:
        hints = typing.get_type_hints(cls, include_extras=True)
        declared = dataclasses.fields(cls)  # type: ignore[arg-type]  # T: any record dataclass
        fields = [(field.name, _codec_for(hints[field.name])) for field in declared]
        compiled = _STRUCTS[cls] = StructCodec(cls, fields)
    return compiled


def _codec_for(hint: Any) -> FieldCodec[Any]:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Annotated:
        base, *metadata = args
        (width,) = [item for item in metadata if isinstance(item, FieldCodec)]
        if isinstance(base, type) and issubclass(base, enum.IntEnum | enum.IntFlag):
            return _Enum(base, width)
        return width
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return _Sequence(_codec_for(args[0]))
    if origin in (types.UnionType, typing.Union) and len(args) == 2 and type(None) in args:
        (inner,) = [arg for arg in args if arg is not type(None)]
        return _Optional(_codec_for(inner))
    simple: dict[Any, FieldCodec[Any]] = {bool: _BOOL, str: _STRING, bytes: _BLOB}
    if hint in simple:
        return simple[hint]
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        return struct_codec(hint)
    raise TypeError(f"no CRF layout declared for {hint!r}")
