"""Tags under a checkpoint root: the ``latest`` pointer, listing, resolving and retention.

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> list_tags(Path(tempfile.mkdtemp()))
    []
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from funczero.checkpoint.atomic import atomic_write_text, remove_tree
from funczero.checkpoint.errors import (
    CheckpointError,
    CheckpointExistsError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    InvalidTagError,
)
from funczero.checkpoint.format import (
    FORMAT_NAME,
    INDEX_NAME,
    LATEST_NAME,
    MAX_INDEX_BYTES,
    MAX_LATEST_BYTES,
    validate_tag,
)
from funczero.checkpoint.safe_io import file_kind, loads_json, read_limited

__all__ = [
    "apply_retention",
    "check_latest_replaceable",
    "latest_tag",
    "list_tags",
    "resolve",
    "write_latest",
]


def latest_tag(root: str | os.PathLike[str]) -> str | None:
    """The tag ``<root>/latest`` names, or ``None`` when there is no ``latest`` file.

    Raises:
        CorruptCheckpointError: ``latest`` is not a regular file (a FIFO, a device, a
            directory), is larger than a tag can be, or holds something that is not a tag.
    """
    path = Path(root) / LATEST_NAME
    try:
        text = read_limited(path, MAX_LATEST_BYTES, what=LATEST_NAME).decode("utf-8")
    except FileNotFoundError:
        return None
    except UnicodeDecodeError as e:
        raise CorruptCheckpointError(f"{path} is not UTF-8 text", where=str(root)) from e
    try:
        return validate_tag(text.strip())
    except InvalidTagError as e:
        raise CorruptCheckpointError(
            f"{path} does not hold a valid tag: {e}", where=str(root)
        ) from e


def check_latest_replaceable(root: Path) -> None:
    """Raise unless ``<root>/latest`` is absent or a regular file (which a commit replaces).

    Writers call it before writing anything: a directory named ``latest`` cannot be replaced,
    so finding out at commit would leave a committed checkpoint that ``latest`` does not name.
    """
    latest = root / LATEST_NAME
    if latest.exists() and not latest.is_file():
        raise CheckpointExistsError(
            f"{latest} is {file_kind(latest.stat().st_mode)}, not the pointer file funczero "
            "writes there; move it away (nothing was written)"
        )


def write_latest(root: Path, tag: str) -> None:
    """Point ``<root>/latest`` at ``tag`` atomically."""
    atomic_write_text(root / LATEST_NAME, validate_tag(tag) + "\n")


def _created(tag_dir: Path) -> tuple[int, int] | None:
    """``(created_ns, step)`` of a committed checkpoint of ours, else ``None``.

    Whatever is wrong with the directory (no index, an unreadable or hostile one) it is just
    not listed: listing must never fail, or hang, because of one bad sibling.
    """
    try:
        data = read_limited(tag_dir / INDEX_NAME, MAX_INDEX_BYTES, what=INDEX_NAME)
        raw = loads_json(data, max_depth=None)  # only two numbers are read
    except (OSError, ValueError, CheckpointError):
        return None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT_NAME:
        return None
    created, step = raw.get("created_ns", 0), raw.get("step", 0)
    return (
        created if type(created) is int else 0,
        step if type(step) is int else 0,
    )


def list_tags(root: str | os.PathLike[str]) -> list[str]:
    """Committed checkpoints under ``root``, oldest first (by commit time, then step).

    Only directories holding a funczero ``index.json`` count: interrupted saves (hidden
    temporary directories) never appear.

    Example:
        >>> import tempfile
        >>> list_tags(tempfile.mkdtemp())
        []
    """
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        if child.name.startswith(".") or not child.is_dir():
            continue
        try:
            validate_tag(child.name)
        except InvalidTagError:
            continue
        key = _created(child)
        if key is not None:
            found.append((key, child.name))
    return [name for _, name in sorted(found)]


def resolve(path: str | os.PathLike[str], tag: str | None = None) -> Path:
    """The tag directory meant by ``path`` (a root, or a tag directory itself) and ``tag``.

    Without ``tag``, a directory holding ``index.json`` is taken as is; otherwise ``latest``
    must exist. Never returns a directory that does not exist.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointNotFoundError(f"checkpoint directory {path} does not exist")
    if tag is None:
        if (path / INDEX_NAME).exists():  # read_index says what is wrong with it, if anything
            return path
        tag = latest_tag(path)
        if tag is None:
            tags = list_tags(path)
            hint = (
                f"; tags present: {', '.join(tags[-5:])}" if tags else " and holds no checkpoints"
            )
            raise CheckpointNotFoundError(
                f"{path} has no '{LATEST_NAME}' file{hint}; pass tag= to choose one"
            )
        where = f"{path}/{LATEST_NAME} points to tag {tag!r}, but"
    else:
        tag = validate_tag(tag)
        where = f"tag {tag!r} not found:"
    tag_dir = path / tag
    if not (tag_dir / INDEX_NAME).exists():
        tags = list_tags(path)
        raise CheckpointNotFoundError(
            f"{where} {tag_dir} is not a committed checkpoint; tags present: "
            f"{', '.join(tags[-5:]) or 'none'}"
        )
    return tag_dir


def apply_retention(root: Path, keep_last: int, protect: Iterable[str]) -> list[str]:
    """Delete all but the ``keep_last`` newest checkpoints; never those in ``protect``.

    Returns the deleted tags. Deletion renames a directory to a hidden name before removing
    it, so a crash never leaves a half-deleted checkpoint that looks complete.
    """
    if keep_last < 1:
        raise ValueError(f"keep_last={keep_last} must be >= 1 (or None to keep everything)")
    keep = set(protect)
    current = latest_tag(root)
    if current is not None:
        keep.add(current)
    tags = list_tags(root)
    deleted = []
    for tag in tags[: max(len(tags) - keep_last, 0)]:
        if tag not in keep:
            remove_tree(root / tag)
            deleted.append(tag)
    return deleted
