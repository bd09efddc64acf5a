"""Durable file-system steps: fsync, atomic replace, and deletion that never looks half-done.

POSIX ``rename`` within one file system is atomic: a reader sees the old name or the new one,
never a mix. A rename is durable only once the *directory* holding it is fsynced, and the
renamed file's bytes only once the file itself was fsynced before the rename. These helpers do
both in that order.

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> d = Path(tempfile.mkdtemp())
    >>> atomic_write_text(d / "latest", "100\\n")
    >>> (d / "latest").read_text()
    '100\\n'
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

__all__ = [
    "TMP_PREFIX",
    "TRASH_PREFIX",
    "atomic_write_text",
    "fsync_dir",
    "fsync_file",
    "remove_tree",
    "replace_dir",
]

TMP_PREFIX = ".funczero-tmp-"
"""A checkpoint being written: ``<root>/.funczero-tmp-<tag>/`` (renamed to ``<tag>`` at commit)."""
TRASH_PREFIX = ".funczero-trash-"
"""A directory being deleted (renamed first, so it never looks like a checkpoint)."""


def fsync_file(path: Path) -> None:
    """Flush ``path``'s data to stable storage."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Flush ``path``'s directory entries (creations, renames, deletions) to stable storage."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError:
        # Some file systems (and platforms) refuse fsync on directories; nothing more to do.
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` atomically and durably (temp file, fsync, rename)."""
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:12]}")
    try:
        with open(tmp, "x", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def remove_tree(path: Path) -> None:
    """Delete a directory so that a crash midway never leaves it looking complete.

    It is first renamed to a hidden ``.funczero-trash-*`` name (atomic), then deleted; a crash
    between the two leaves only a hidden directory that the next save clears.
    """
    if not path.exists():
        return
    trash = path.with_name(f"{TRASH_PREFIX}{path.name}-{uuid.uuid4().hex[:12]}")
    os.rename(path, trash)
    fsync_dir(path.parent)
    shutil.rmtree(trash, ignore_errors=True)


def replace_dir(src: Path, dst: Path) -> None:
    """Move the complete directory ``src`` to ``dst``, replacing an existing ``dst``.

    With no ``dst`` this is one atomic rename. An existing ``dst`` is first moved aside to a
    hidden name, so a crash in between leaves ``dst`` absent (never partial); callers must not
    replace a directory that ``latest`` points to.
    """
    if dst.exists():
        aside = dst.with_name(f"{TRASH_PREFIX}{dst.name}-{uuid.uuid4().hex[:12]}")
        os.rename(dst, aside)
        os.rename(src, dst)
        fsync_dir(dst.parent)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.rename(src, dst)
        fsync_dir(dst.parent)
