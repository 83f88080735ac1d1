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

from training.schema import DatasetError, input_file, json_depth, max_json_depth, parse_json, _limit, MAX_LINE_BYTES


class ImportFormatError(ValueError):
    """Input that cannot be imported; the message names the file (and line or record)."""


# Members of the ChatGPT and Claude export archives that hold the chats.
ZIP_MEMBERS = ("conversations.json",)
MAX_TEXT_BYTES = 512 << 20  # a text (Markdown) export is read whole; DUET_MAX_TEXT_EXPORT_BYTES overrides


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
                names = [i for i in zf.infolist() if not i.is_dir()]
        except (zipfile.BadZipFile, OSError) as exc:
            raise ImportFormatError(f"{self.path}: a damaged zip archive ({exc})") from exc
        chats = [i for i in names if Path(i.filename).name in ZIP_MEMBERS]
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
            return _Counting(zf.open(self.member), self.member.file_size, self.on_progress, owner=zf)
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
                for i, obj in enumerate(ijson.items(s, "item", use_float=True)):
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


class _Skip(Exception):
    """An item that was read but cannot be used (too deep); reported as skipped."""

    def __init__(self, where: str, reason: str):
        super().__init__(reason)
        self.where, self.reason = where, reason
