"""Reading an export: plain file or zip archive, any of the encodings exports come in, streamed.

A JSON export is read item by item (ijson), so a 200 MB ``conversations.json`` is imported in
bounded memory; a JSONL file line by line; a text export (Markdown) whole. ``Source.read`` counts
the bytes it has handed out, for the progress bar.
"""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Iterator
from pathlib import Path

import ijson

from training.data.schema import DatasetError, input_file, json_depth, max_json_depth, parse_json, _limit, MAX_LINE_BYTES


class ImportFormatError(ValueError):
    """Input that cannot be imported; the message names the file (and line or record)."""


# Members of the ChatGPT and Claude export archives that hold the chats.
ZIP_MEMBERS = ("conversations.json",)
MAX_TEXT_BYTES = 512 << 20  # a text (Markdown) export is read whole; DUET_MAX_TEXT_EXPORT_BYTES overrides


class _Bounded(io.RawIOBase):
    """A zip member's stream that never hands out more than the member declared (a lying header
    cannot make it grow), and whose damage is an ImportFormatError."""

    def __init__(self, raw, size: int, where: str):
        super().__init__()
        self.raw, self.left, self.where = raw, size, where

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        if not self.closed:
            self.raw.close()
        super().close()

    def read(self, n: int = -1) -> bytes:
        want = self.left if n is None or n < 0 else min(n, self.left)
        if want <= 0:
            return b""
        try:
            data = self.raw.read(want)
        except Exception as exc:  # zlib.error, LZMAError, BadZipFile (CRC), EOFError: a damaged member
            raise ImportFormatError(f"{self.where}: a damaged zip member ({type(exc).__name__}: {exc})") from None
        self.left -= len(data)
        return data


class _Counting(io.RawIOBase):
    """A binary stream that counts what it hands out (progress) and can put bytes back in front."""

    def __init__(self, raw, total: int, on_progress=None, owner=None):
        super().__init__()
        self.raw, self.total, self.done, self.on_progress = raw, total, 0, on_progress
        self._front = b""
        self._reported = 0
        self._owner = owner  # the ZipFile a member stream belongs to

    def close(self) -> None:
        if not self.closed:
            self.raw.close()
            if self._owner is not None:
                self._owner.close()
        super().close()

    def readable(self) -> bool:
        return True

    def unread(self, data: bytes) -> None:
        self._front = data + self._front
        self.done -= len(data)

    def read(self, n: int = -1) -> bytes:
        if self._front:
            if n is None or n < 0:
                data, self._front = self._front + self.raw.read(), b""
            else:
                data, self._front = self._front[:n], self._front[n:]
        else:
            data = self.raw.read(n if n is not None and n >= 0 else -1)
        self.done += len(data)
        if self.on_progress is not None and self.done > self._reported:
            self._reported = self.done
            self.on_progress(self.done, self.total)
        return data

    def readinto(self, b) -> int:
        data = self.read(len(b))
        b[:len(data)] = data
        return len(data)

    def readline(self, limit: int = -1) -> bytes:
        out = bytearray()
        while limit < 0 or len(out) < limit:
            want = 1 << 16 if limit < 0 else min(1 << 16, limit - len(out))
            chunk = self.read(want)
            if not chunk:
                break
            nl = chunk.find(b"\n")
            if nl >= 0:
                self.unread(chunk[nl + 1:])
                out += chunk[:nl + 1]
                break
            out += chunk
        return bytes(out)


MAX_ZIP_MEMBERS = 100_000
MAX_MEMBER_BYTES = 16 << 30     # a conversations.json inside a zip; DUET_MAX_ZIP_MEMBER_BYTES overrides
MAX_RATIO = 500                 # uncompressed / compressed; chat JSON compresses ~5-20x
ZIP_METHODS = {zipfile.ZIP_STORED: "stored", zipfile.ZIP_DEFLATED: "Deflate", zipfile.ZIP_BZIP2: "bzip2",
               zipfile.ZIP_LZMA: "LZMA"}
ZIP_METHOD_NAMES = {9: "Deflate64 (what Windows Explorer writes for large files)", 93: "Zstandard", 95: "xz",
                    98: "PPMd", 99: "AES encryption"}


def check_member(path: Path, info: zipfile.ZipInfo) -> None:
    """A zip member duet will read: a plain name, not encrypted, a compression Python reads, and a
    size (declared and per compressed byte) within bounds. ImportFormatError for each, saying what
    to do instead."""
    name = info.filename
    if name.startswith(("/", "\\")) or ".." in Path(name.replace("\\", "/")).parts or ":" in name.split("/")[0]:
        raise ImportFormatError(f"{path}: member {name[:120]!r} has a path that leaves the archive; refusing the zip")
    if info.flag_bits & 0x1 or info.compress_type == 99:
        raise ImportFormatError(f"{path}: {name} is encrypted (password-protected); unpack it yourself and import "
                                "the conversations.json")
    if info.compress_type not in ZIP_METHODS:
        how = ZIP_METHOD_NAMES.get(info.compress_type, f"compression method {info.compress_type}")
        raise ImportFormatError(f"{path}: {name} is compressed with {how}, which duet cannot read; unpack the archive "
                                "(e.g. with 7-Zip or `unzip`) and import the conversations.json inside")
    limit = _limit("DUET_MAX_ZIP_MEMBER_BYTES", MAX_MEMBER_BYTES)
    if info.file_size > limit:
        raise ImportFormatError(f"{path}: {name} unpacks to {info.file_size:,} bytes, over the {limit:,}-byte limit "
                                "(DUET_MAX_ZIP_MEMBER_BYTES raises it)")
    if info.file_size > (1 << 20) and info.file_size > MAX_RATIO * max(1, info.compress_size):
        raise ImportFormatError(f"{path}: {name} unpacks {info.file_size // max(1, info.compress_size):,} times its "
                                f"packed size (over {MAX_RATIO}x: a zip bomb?); refusing it")


class Source:
    """One export file opened for reading; ``name`` is what records name as their source."""

    def __init__(self, path: str | Path, on_progress=None):
        try:
            self.path = input_file(path)
        except DatasetError as exc:
            raise ImportFormatError(str(exc)) from exc
        self.name = self.path.name
        self.member = None
        self.on_progress = on_progress
        with open(self.path, "rb") as fh:
            magic = fh.read(4)
        self.is_zip = magic == b"PK\x03\x04"
        if self.is_zip:
            self._zip_member()

    def _zip_member(self) -> None:
        try:
            with zipfile.ZipFile(self.path) as zf:
                infos = zf.infolist()
        except Exception as exc:  # BadZipFile, struct.error, OverflowError, ... : not a zip duet can read
            raise ImportFormatError(f"{self.path}: a damaged zip archive ({exc})") from exc
        max_members = _limit("DUET_MAX_ZIP_MEMBERS", MAX_ZIP_MEMBERS)
        if len(infos) > max_members:
            raise ImportFormatError(f"{self.path}: a zip archive of {len(infos):,} members (more than {max_members:,}; "
                                    "DUET_MAX_ZIP_MEMBERS raises the limit)")
        names = [i for i in infos if not i.is_dir()]
        chats = [i for i in names if Path(i.filename).name in ZIP_MEMBERS]
        for i in chats:
            check_member(self.path, i)
        if not chats:
            listed = ", ".join(i.filename for i in names[:8]) + (" ..." if len(names) > 8 else "")
            raise ImportFormatError(f"{self.path}: a zip archive without conversations.json (it holds {listed}); "
                                    "unpack it and import the chat file itself")
        chats.sort(key=lambda i: (i.filename.count("/"), i.filename))
        self.member = chats[0]
        self.name = f"{self.path.name}:{self.member.filename}"

    def open(self) -> _Counting:
        """A fresh binary stream of the export (the zip member's bytes for an archive)."""
        if self.member is not None:
            zf = zipfile.ZipFile(self.path)
            try:
                member = zf.open(self.member)
            except Exception as exc:  # a header that disagrees with the directory, encryption, a method
                zf.close()
                raise ImportFormatError(f"{self.where()}: cannot be read ({type(exc).__name__}: {exc})") from None
            return _Counting(_Bounded(member, self.member.file_size, self.where()), self.member.file_size,
                             self.on_progress, owner=zf)
        return _Counting(open(self.path, "rb"), self.path.stat().st_size, self.on_progress)

    def head(self, n: int = 1 << 16) -> bytes:
        with self.open() as s:
            s.on_progress = None
            return s.read(n)

    def where(self) -> str:
        return str(self.path) if self.member is None else f"{self.path}:{self.member.filename}"

    def text(self) -> tuple[str, str]:
        """The whole export as text, and the encoding it was read with (UTF-8, with or without a
        byte-order mark, UTF-16 with one; a file that is not UTF-8 is read as cp1252 and said so)."""
        limit = _limit("DUET_MAX_TEXT_EXPORT_BYTES", MAX_TEXT_BYTES)
        with self.open() as s:
            data = s.read(limit + 1)
        if len(data) > limit:
            raise ImportFormatError(f"{self.where()}: a text export larger than {limit:,} bytes "
                                    "(DUET_MAX_TEXT_EXPORT_BYTES raises the limit)")
        if data.startswith((b"\xff\xfe", b"\xfe\xff")):
            try:
                return data.decode("utf-16"), "utf-16"
            except UnicodeDecodeError as exc:
                raise ImportFormatError(f"{self.where()}: not valid UTF-16 (byte {exc.start})") from exc
        if b"\x00" in data[:1 << 20]:
            raise ImportFormatError(f"{self.where()}: binary data (NUL bytes), not a text export")
        try:
            return data.decode("utf-8-sig"), "utf-8"
        except UnicodeDecodeError:
            return data.decode("cp1252", errors="replace"), "cp1252"

    def first_char(self) -> str:
        """The first non-blank character of the export ('' for an empty one)."""
        head = self.head(1 << 12)
        if head.startswith((b"\xff\xfe", b"\xfe\xff")):
            head = head.decode("utf-16", errors="ignore").encode()
        head = head.removeprefix(b"\xef\xbb\xbf").lstrip()
        return chr(head[0]) if head else ""

    def items(self) -> Iterator[tuple[str, object]]:
        """(where, item) for a JSON export: each element of a top-level list, the one object of a
        JSON document, or each line of a JSONL file. ImportFormatError for a file that is not JSON
        (the whole file is refused: the caller writes nothing)."""
        first = self.first_char()
        if first == "[":
            yield from self._array()
        elif first == "{":
            yield from self._objects()
        elif not first:
            raise ImportFormatError(f"{self.where()}: empty")
        else:
            raise ImportFormatError(f"{self.where()}: not JSON (it starts with {first!r})")

    def _stream(self) -> _Counting:
        s = self.open()
        head = s.read(4)
        if head.startswith((b"\xff\xfe", b"\xfe\xff")):  # UTF-16: re-encode (rare; held in memory)
            data = (head + s.read()).decode("utf-16", errors="strict").encode("utf-8")
            s.close()
            return _Counting(io.BytesIO(data), len(data), self.on_progress)
        s.unread(head.removeprefix(b"\xef\xbb\xbf"))
        return s

    def _checked(self, where: str, obj: object) -> tuple[str, object]:
        limit = max_json_depth()
        if json_depth(obj) > limit:
            raise _Skip(where, f"nested deeper than {limit} levels (DUET_MAX_JSON_DEPTH raises the limit)")
        return where, obj

    def _array(self) -> Iterator[tuple[str, object]]:
        with self._stream() as s:
            i = -1
            try:
                for i, obj in enumerate(bounded_items(s, self.where())):
                    if isinstance(obj, _Skip):
                        yield obj.where, obj
                        continue
                    try:
                        yield self._checked(f"{self.where()}[{i}]", obj)
                    except _Skip as sk:
                        yield sk.where, sk
            except ijson.JSONError as exc:
                raise ImportFormatError(f"{self.where()}: invalid JSON after item {i + 1} (near byte {s.done:,}): "
                                        f"{str(exc).splitlines()[0]}; the file is refused whole") from exc
            except UnicodeDecodeError as exc:
                raise ImportFormatError(f"{self.where()}: not UTF-8 near byte {s.done:,}") from exc

    def _objects(self) -> Iterator[tuple[str, object]]:
        """One JSON object (pretty-printed over many lines) or JSONL (one object a line)."""
        max_line = _limit("DUET_MAX_LINE_BYTES", MAX_LINE_BYTES)
        with self._stream() as s:
            first = s.readline(max_line + 1)
            rest = s.read(1)
            s.unread(rest)
            try:
                single = json.loads(first.decode("utf-8")) if first.strip() else None
            except (ValueError, UnicodeDecodeError):
                single = None
            if not isinstance(single, dict):  # not one object a line: one JSON document
                s.unread(first)
                data = s.read(max_line + 1)
                if len(data) > max_line:
                    raise ImportFormatError(f"{self.where()}: one JSON document larger than {max_line:,} bytes; "
                                            "a large export is a JSON list or JSONL (DUET_MAX_LINE_BYTES raises it)")
                yield self._one(self.where(), data)
                return
            lineno, line = 1, first
            while line:
                if line.strip():
                    if len(line) > max_line and not line.endswith(b"\n"):
                        raise ImportFormatError(f"{self.where()}:{lineno}: a line longer than {max_line:,} bytes "
                                                "(DUET_MAX_LINE_BYTES raises the limit)")
                    yield self._one(f"{self.where()}:{lineno}", line)
                line = s.readline(max_line + 1)
                lineno += 1

    def _one(self, where: str, data: bytes) -> tuple[str, object]:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ImportFormatError(f"{where}: not UTF-8 (byte {exc.start}); the file is refused whole") from exc
        try:
            obj = parse_json(text, where)
        except ValueError as exc:
            raise ImportFormatError(f"{exc}; the file is refused whole") from exc
        return where, obj


MAX_ITEM_NODES = 1_000_000      # values in one item (a conversation); DUET_MAX_ITEM_NODES overrides
MAX_ITEM_BYTES = 512 << 20      # bytes of one item; DUET_MAX_ITEM_BYTES overrides
MAX_ITEMS = 5_000_000           # items in one export; DUET_MAX_ITEMS overrides
MAX_SECONDS = 1800              # reading one export; DUET_MAX_IMPORT_SECONDS overrides


def bounded_items(stream, where: str) -> Iterator[object]:
    """The elements of a top-level JSON array, each built from the parser's events with its limits
    checked while it is built (nesting depth, values, bytes), so an item too deep or too large is
    skipped (a ``_Skip`` in its place) before it exists in memory; the export's item count and the
    time spent are bounded too (ImportFormatError). ijson's own ``items`` keeps a path prefix per
    level, which grows with the square of the depth: a 541-byte zip of nested lists needed tens of GB."""
    import time

    depth_limit = max_json_depth()
    nodes_limit = _limit("DUET_MAX_ITEM_NODES", MAX_ITEM_NODES)
    bytes_limit = _limit("DUET_MAX_ITEM_BYTES", MAX_ITEM_BYTES)
    items_limit = _limit("DUET_MAX_ITEMS", MAX_ITEMS)
    deadline = time.monotonic() + _limit("DUET_MAX_IMPORT_SECONDS", MAX_SECONDS)
    events = ijson.basic_parse(stream, use_float=True)
    first = next(events, (None, None))[0]
    if first != "start_array":
        raise ImportFormatError(f"{where}: not a JSON list")
    index, stack, keys, nodes, skipping, why, start = 0, [], [], 0, 0, None, stream.done
    for n, (ev, value) in enumerate(events):
        if n & 0x3FF == 0 and time.monotonic() > deadline:
            raise ImportFormatError(f"{where}: reading took longer than {_limit('DUET_MAX_IMPORT_SECONDS', MAX_SECONDS)} s "
                                    f"(at item {index:,}); nothing was imported (DUET_MAX_IMPORT_SECONDS raises it)")
        if skipping:
            if ev in ("start_map", "start_array"):
                skipping += 1
            elif ev in ("end_map", "end_array"):
                skipping -= 1
            if skipping == 0:
                yield _Skip(f"{where}[{index}]", why)
                index += 1
            continue
        if not stack:
            if ev == "end_array":  # the end of the top-level list
                return
            if index >= items_limit:
                raise ImportFormatError(f"{where}: more than {items_limit:,} items (DUET_MAX_ITEMS raises the limit)")
            start, nodes = stream.done, 0
        nodes += 1
        too = None
        if len(stack) >= depth_limit and ev in ("start_map", "start_array"):
            too = f"nested deeper than {depth_limit} levels (DUET_MAX_JSON_DEPTH raises the limit)"
        elif nodes > nodes_limit:
            too = f"more than {nodes_limit:,} values in one item (DUET_MAX_ITEM_NODES raises the limit)"
        elif n & 0xFF == 0 and stream.done - start > bytes_limit:
            too = f"larger than {bytes_limit:,} bytes (DUET_MAX_ITEM_BYTES raises the limit)"
        if too:
            skipping = len(stack) + (1 if ev in ("start_map", "start_array") else 0) \
                - (1 if ev in ("end_map", "end_array") else 0)
            stack, keys, why = [], [], too
            if skipping == 0:
                yield _Skip(f"{where}[{index}]", why)
                index += 1
            continue
        if ev == "map_key":
            keys[-1] = value
            continue
        if ev in ("start_map", "start_array"):
            stack.append({} if ev == "start_map" else [])
            keys.append(None)
            continue
        if ev in ("end_map", "end_array"):
            value = stack.pop()
            keys.pop()
        if not stack:
            yield value
            index += 1
            continue
        top = stack[-1]
        if isinstance(top, list):
            top.append(value)
        else:
            top[keys[-1]] = value
    raise ImportFormatError(f"{where}: the JSON list is cut short (no closing bracket)")


class _Skip(Exception):
    """An item that was read but cannot be used (too deep); reported as skipped."""

    def __init__(self, where: str, reason: str):
        super().__init__(reason)
        self.where, self.reason = where, reason
