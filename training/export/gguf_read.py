"""A GGUF file's header, read fast: its metadata's scalars and strings, each array's element type and
length, and the tensors' names, shapes and types. ``gguf.GGUFReader`` builds a numpy view of every array
element, which takes ~14 s for a 262k-token vocabulary (Gemma 3); this reads the same header in well
under a second by stepping over the arrays' elements. The exporter's read-back checks use it."""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path

# GGUF value types (gguf/constants.py: GGUFValueType): struct format of the fixed-size ones
_FIXED = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
STRING, ARRAY = 8, 9
SMALL_ARRAY = 64  # arrays this short are read in full (token ids of a few specials, a layer pattern)


class GGUFHeaderError(ValueError):
    pass


@dataclass
class ArrayField:
    element_type: int
    length: int
    values: list | None = None  # for arrays of at most SMALL_ARRAY elements

    def __len__(self) -> int:
        return self.length


@dataclass
class Header:
    version: int
    fields: dict = field(default_factory=dict)   # key -> int | float | bool | str | ArrayField
    tensors: list = field(default_factory=list)  # (name, shape, ggml type)


def read_header(path: str | Path) -> Header:
    with open(path, "rb") as fh:
        if fh.seek(0, 2) < 24:
            raise GGUFHeaderError(f"{Path(path).name}: {fh.tell()} bytes, too short for a GGUF header")
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _parse(buf, Path(path).name)


def _parse(buf, name: str) -> Header:
    pos = 0

    def take(fmt: str):
        nonlocal pos
        try:
            (val,) = struct.unpack_from("<" + fmt, buf, pos)
        except struct.error:
            raise GGUFHeaderError(f"{name}: the header ends early (at byte {pos})") from None
        pos += struct.calcsize("<" + fmt)
        return val

    def string() -> str:
        nonlocal pos
        n = take("Q")
        if pos + n > len(buf):
            raise GGUFHeaderError(f"{name}: a string at byte {pos} runs past the end of the file")
        s = bytes(buf[pos:pos + n]).decode("utf-8", "replace")
        pos += n
        return s

    def skip_strings(count: int) -> None:
        nonlocal pos
        unpack = struct.Struct("<Q").unpack_from
        try:
            for _ in range(count):
                pos += 8 + unpack(buf, pos)[0]
        except struct.error:
            pos = len(buf) + 1
        if pos > len(buf):
            raise GGUFHeaderError(f"{name}: a string array runs past the end of the file")

    def value(vtype: int):
        nonlocal pos
        if vtype in _FIXED:
            return take(_FIXED[vtype])
        if vtype == STRING:
            return string()
        if vtype == ARRAY:
            etype, count = take("I"), take("Q")
            if count <= SMALL_ARRAY:
                return ArrayField(etype, count, [value(etype) for _ in range(count)])
            if etype in _FIXED:
                pos += count * struct.calcsize("<" + _FIXED[etype])
            elif etype == STRING:
                skip_strings(count)
            else:  # arrays of arrays: GGUF allows them, no vocabulary uses them
                for _ in range(count):
                    value(etype)
            return ArrayField(etype, count)
        raise GGUFHeaderError(f"{name}: unknown GGUF value type {vtype} at byte {pos}")

    if bytes(buf[:4]) != b"GGUF":
        raise GGUFHeaderError(f"{name}: not a GGUF file (magic {bytes(buf[:4])!r})")
    pos = 4
    version, n_tensors, n_kv = take("I"), take("Q"), take("Q")
    head = Header(version)
    for _ in range(n_kv):
        key = string()
        head.fields[key] = value(take("I"))
    for _ in range(n_tensors):
        tname = string()
        dims = [take("Q") for _ in range(take("I"))]
        ttype, _offset = take("I"), take("Q")
        head.tensors.append((tname, dims, ttype))
    return head
