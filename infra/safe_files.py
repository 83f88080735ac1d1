"""One rule for reading a file out of a workspace, a run folder or a data folder: the path resolves
inside its root (a symlink that leads out of it is refused, wherever it sits on the way), it is a
regular file (not a folder, FIFO or device), and it is no larger than a limit checked before a byte
is read. The dashboard, the CLI, the executor and the architect read records through it, so a
symlink that a ``git pull`` carried in cannot hand the cluster token or an SSH key to a browser or
a terminal.

``FileRefused`` (a ValueError) names the file and the reason; a file that is simply absent is
``FileNotFoundError`` (or None from the ``*_or_none`` readers).
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

RECORD_BYTES = 64 << 20      # a run record, report, events log, manifest, session file
DATA_BYTES = 8 << 30         # a dataset version's split


class FileRefused(ValueError):
    """A file duet will not read: outside its root, not a regular file, or too large."""


def resolve_inside(root: str | os.PathLike, path: str | os.PathLike) -> Path:
    """``path`` (absolute, or relative to ``root``) resolved; FileRefused when it, or a symlink on its
    way, leads outside ``root``."""
    base = Path(root).resolve()
    p = Path(path)
    p = p if p.is_absolute() else Path(root) / p
    real = p.resolve()
    if real != base and base not in real.parents:
        raise FileRefused(f"{p}: leads to {real}, outside {base} (a symlink?); refusing to read it")
    return real


def check_file(root: str | os.PathLike, path: str | os.PathLike, limit: int = RECORD_BYTES) -> Path:
    """The resolved path of a regular file inside ``root`` of at most ``limit`` bytes (FileRefused,
    FileNotFoundError)."""
    real = resolve_inside(root, path)
    try:
        st = os.stat(real)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    if not stat.S_ISREG(st.st_mode):
        raise FileRefused(f"{path}: not a regular file (a folder, FIFO or device); refusing to read it")
    if st.st_size > limit:
        raise FileRefused(f"{path}: {st.st_size:,} bytes, over the {limit:,}-byte limit for this kind of file")
    return real


def read_bytes(root: str | os.PathLike, path: str | os.PathLike, limit: int = RECORD_BYTES) -> bytes:
    real = check_file(root, path, limit)
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(real, flags)
    except OSError as exc:  # swapped for a symlink or a FIFO since the check
        raise FileRefused(f"{path}: cannot be opened safely ({exc.strerror})") from None
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise FileRefused(f"{path}: not a regular file; refusing to read it")
        # read what the file holds, not ``limit`` bytes: CPython allocates a read's whole size up front, so
        # read(8 GiB + 1) maps 8 GiB for a 1 MB split (refused under a memory limit or strict overcommit)
        data = fh.read(min(limit, os.fstat(fd).st_size) + 1)
        while len(data) <= limit:  # the file grew since: on, a bounded piece at a time
            more = fh.read(min(64 << 20, limit + 1 - len(data)))
            if not more:
                break
            data += more
    if len(data) > limit:
        raise FileRefused(f"{path}: over the {limit:,}-byte limit for this kind of file")
    return data


def read_text(root: str | os.PathLike, path: str | os.PathLike, limit: int = RECORD_BYTES) -> str:
    data = read_bytes(root, path, limit)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise FileRefused(f"{path}: not UTF-8 text (byte {exc.start})") from None


def loads(text: str, where: str):
    """JSON text parsed; FileRefused (not RecursionError) for a nesting too deep to parse."""
    try:
        return json.loads(text)
    except RecursionError:
        raise FileRefused(f"{where}: JSON nested too deep to read") from None
    except ValueError as exc:
        raise FileRefused(f"{where}: not valid JSON ({exc})") from None


def read_json(root: str | os.PathLike, path: str | os.PathLike, limit: int = RECORD_BYTES):
    return loads(read_text(root, path, limit), str(path))


def read_jsonl(root: str | os.PathLike, path: str | os.PathLike, limit: int = RECORD_BYTES) -> list:
    """Each non-blank line's JSON value; FileRefused naming the first bad line."""
    out = []
    for i, line in enumerate(read_text(root, path, limit).splitlines(), 1):
        if line.strip():
            out.append(loads(line, f"{path}:{i}"))
    return out


def exists(root: str | os.PathLike, path: str | os.PathLike) -> bool:
    """A regular file is there (refusing one that leads out of ``root``, FileRefused)."""
    return resolve_inside(root, path).is_file()
