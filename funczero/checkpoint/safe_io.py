"""Opening and parsing what a checkpoint names, treating it as untrusted.

A checkpoint directory may be damaged or hostile: a ``latest`` that is a FIFO (reading blocks
forever) or a link to ``/dev/zero`` (reading never ends), a file name that escapes the
directory, an ``index.json`` of gigabytes or nested a million levels deep. Every read goes
through here: only regular files are opened (without blocking, type checked before and after
opening), sizes are checked against a limit *before* reading, names must stay inside their
directory, and JSON is parsed strictly. Each failure is a
:class:`~funczero.checkpoint.errors.CorruptCheckpointError` naming the file and the fix.

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> d = Path(tempfile.mkdtemp())
    >>> _ = (d / "latest").write_text("100\\n")
    >>> read_limited(d / "latest", 4096, what="latest")
    b'100\\n'
    >>> loads_json('{"a": [1, 2]}')
    {'a': [1, 2]}
"""

from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path
from typing import Any

from funczero.checkpoint.errors import CorruptCheckpointError, UnsafePathError
from funczero.checkpoint.format import MAX_JSON_DEPTH, deeper_than

__all__ = ["file_kind", "loads_json", "open_regular", "read_limited", "safe_child"]

_KINDS = {
    stat.S_IFDIR: "a directory",
    stat.S_IFIFO: "a FIFO (named pipe)",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
}


def file_kind(mode: int) -> str:
    """``"a FIFO (named pipe)"``, ``"a directory"``... for an ``st_mode``."""
    return _KINDS.get(stat.S_IFMT(mode), "not a regular file")


def _not_regular(path: Path, mode: int, what: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f"{what} {path} is {file_kind(mode)}, not a regular file; funczero never reads from "
        "it (it could block or never end). Remove it, or restore the file a save wrote",
        where=str(path.parent),
    )


def open_regular(path: Path, what: str) -> int:
    """Open ``path`` for reading and return the descriptor; only regular files are opened.

    The type is checked before opening (opening a device can have effects) and again on the
    open descriptor (the path may have been swapped in between). ``O_NONBLOCK`` makes opening
    a FIFO return at once instead of waiting for a writer. Missing files raise
    ``FileNotFoundError``; callers decide what that means.
    """
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        raise _not_regular(path, mode, what)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise _not_regular(path, mode, what)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_limited(path: Path, limit: int, *, what: str) -> bytes:
    """All bytes of the regular file ``path``, refusing (before reading) more than ``limit``."""
    fd = open_regular(path, what)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise CorruptCheckpointError(
                f"{what} {path} is {size:,} bytes, more than the {limit:,} a valid one can "
                "be; it is damaged or not a funczero file",
                where=str(path.parent),
            )
        parts, total = [], 0
        while chunk := os.read(fd, limit + 1 - total):
            parts.append(chunk)
            total += len(chunk)
            if total > limit:  # the file grew while being read
                raise CorruptCheckpointError(
                    f"{what} {path} grew past {limit:,} bytes while being read",
                    where=str(path.parent),
                )
        return b"".join(parts)
    finally:
        os.close(fd)


def safe_child(directory: Path, name: str) -> Path:
    """Return ``directory / name`` after checking that it cannot escape ``directory``.

    ``name`` must be a plain file name (no separators, no ``..``, not absolute, not hidden), and
    its real path (symlinks resolved) must lie inside ``directory``'s real path.
    """
    bad = (
        not isinstance(name, str)
        or not name
        or name in (".", "..")
        or "/" in name
        or "\\" in name
        or "\0" in name
        or name.startswith(".")
        or os.path.isabs(name)
    )
    if bad:
        raise UnsafePathError(
            f"file name {name!r} in the index is not a plain file name inside the checkpoint "
            "directory; refusing to open it",
            where=str(directory),
        )
    path = directory / name
    root = os.path.realpath(directory)
    real = os.path.realpath(path)
    if os.path.commonpath([root, real]) != root:
        raise UnsafePathError(
            f"file {name!r} resolves to {real}, outside the checkpoint directory {root} "
            "(a symlink?); refusing to open it",
            where=str(directory),
        )
    return path


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):  # rare: only then find which key, in Python
        seen: set[str] = set()
        for k, _ in pairs:
            if k in seen:
                raise ValueError(f"duplicate key {k!r}")
            seen.add(k)
    return out


def _constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]} is out of range")
    return value


def loads_json(text: str | bytes, *, max_depth: int | None = MAX_JSON_DEPTH) -> Any:
    """Parse JSON strictly, or raise ``ValueError`` saying why.

    Refused: duplicate keys, ``NaN``/``Infinity``, numbers beyond the float range (``1e400``)
    or of more than 4,300 digits, bytes that are not UTF-8 (``UnicodeDecodeError`` is a
    ``ValueError``), JSON too deep for the parser, and nesting deeper than ``max_depth``
    levels. ``max_depth=None`` skips that last check (it walks every value), for callers that
    validate the whole structure anyway or check the depth of its free-form parts.

    Example:
        >>> loads_json('{"a": 1, "a": 2}')
        Traceback (most recent call last):
        ...
        ValueError: duplicate key 'a'
    """
    try:
        value = json.loads(
            text, object_pairs_hook=_no_duplicates, parse_constant=_constant, parse_float=_finite
        )
    except RecursionError:
        raise ValueError("JSON nested too deeply to parse") from None
    if max_depth is not None and deeper_than(value, max_depth):
        raise ValueError(f"JSON nested more than {max_depth} levels deep")
    return value
