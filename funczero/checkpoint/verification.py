"""``verify``: check a checkpoint's structure and every checksum, naming each bad file or tensor.

Beyond the checksums, every chunk must be in its file as the index describes it: the dtype and
size of the file's entry, and (format version 2) the global shape and element range the file
recorded when it was written. So an ``index.json`` edited on its own is damage, even when the
edit is consistent with itself (a tensor reshaped, a chunk listed under another tensor).

Example:
    >>> import tempfile
    >>> from funczero.checkpoint import save
    >>> from funczero.testing.states import toy_state
    >>> root = tempfile.mkdtemp()
    >>> _ = save(root, toy_state())
    >>> verify(root).ok
    True
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from funczero.checkpoint.chunks import header_limit, parse_records, record_mismatch
from funczero.checkpoint.entry import Chunk, TensorEntry
from funczero.checkpoint.errors import CorruptCheckpointError
from funczero.checkpoint.format import INDEX_NAME, LATEST_NAME
from funczero.checkpoint.index import Index, read_index
from funczero.checkpoint.safe_io import safe_child
from funczero.checkpoint.tags import resolve
from funczero.checkpoint.tensorfile import TensorFile, file_digest

__all__ = ["Problem", "VerifyReport", "verify"]


@dataclasses.dataclass(frozen=True)
class Problem:
    """One thing wrong: ``where`` is ``index.json``, a file name or a tensor path."""

    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


@dataclasses.dataclass
class VerifyReport:
    """The outcome of :func:`verify`.

    Attributes:
        tag_dir: the checkpoint checked.
        ok: no problems.
        problems: what is wrong, per index, file or tensor.
        notes: harmless findings (extra files in the directory).
        files_checked, bytes_checked: how much was read.
    """

    tag_dir: Path
    problems: list[Problem] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    files_checked: int = 0
    bytes_checked: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        return {
            "checkpoint": str(self.tag_dir),
            "ok": self.ok,
            "problems": [{"where": p.where, "message": p.message} for p in self.problems],
            "notes": self.notes,
            "files_checked": self.files_checked,
            "bytes_checked": self.bytes_checked,
        }


def _check_file(tag_dir: Path, index: Index, name: str, report: VerifyReport) -> None:
    entry = index.files[name]
    chunks = index.chunks_in(name)
    expected: dict[str, tuple[TensorEntry, Chunk]] = {c.key: (e, c) for e, c in chunks}

    def lost(why: str) -> None:
        report.problems.append(Problem(name, why))
        for e, c in expected.values():
            report.problems.append(
                Problem(e.path, f"elements [{c.start}, {c.stop}) in {name} are unreadable")
            )

    try:
        path = safe_child(tag_dir, name)
    except CorruptCheckpointError as e:
        report.problems.append(Problem(name, str(e)))
        return
    if not path.exists():
        lost(f"missing (the {entry.group} shard of rank {entry.rank})")
        return
    try:
        f = TensorFile(path, max_header=header_limit(chunks))
    except CorruptCheckpointError as e:
        lost(e.problems[0])
        return
    with f:
        report.files_checked += 1
        if f.size != entry.bytes:
            report.problems.append(Problem(name, f"{f.size} bytes, the index says {entry.bytes}"))
        meta_id = f.metadata.get("checkpoint_id")
        if meta_id != index.checkpoint_id:
            lost(
                f"belongs to another checkpoint (checkpoint_id {meta_id!r}, "
                f"expected {index.checkpoint_id!r})"
            )
            return
        if f.metadata.get("rank") != str(entry.rank):
            report.problems.append(
                Problem(name, f"written by rank {f.metadata.get('rank')!r}, expected {entry.rank}")
            )
        records = None
        if index.has_file_records:
            try:
                records = parse_records(f.metadata)
            except ValueError as e:
                report.problems.append(Problem(name, str(e)))
        digests = _check_entries(f, name, expected, records, report)
        if file_digest(f.header, digests) != entry.sha256:
            report.problems.append(Problem(name, "file checksum mismatch"))


def _check_entries(
    f: TensorFile,
    name: str,
    expected: dict[str, tuple[TensorEntry, Chunk]],
    records: dict[str, Any] | None,
    report: VerifyReport,
) -> list[str]:
    """Check that each chunk the index places in ``f`` is there, as described, with its
    checksum; return the digest of every entry in file order (each byte is read once)."""
    digests = []
    for key, info in sorted(f.entries.items(), key=lambda kv: kv[1].begin):
        digest = f.entry_digest(key)
        digests.append(digest)
        report.bytes_checked += info.end - info.begin
        if key not in expected:
            report.problems.append(
                Problem(name, f"holds tensor {key!r}, which the index does not list")
            )
            continue
        e, c = expected[key]
        if info.dtype != e.dtype or info.shape != (c.numel,):
            report.problems.append(
                Problem(
                    e.path,
                    f"{name}[{key!r}] is {info.dtype} {list(info.shape)}, "
                    f"expected {e.dtype} [{c.numel}]",
                )
            )
            continue
        mismatch = None if records is None else record_mismatch(records, e, c)
        if mismatch:
            report.problems.append(Problem(e.path, mismatch))
        elif digest != c.sha256:
            report.problems.append(
                Problem(e.path, f"elements [{c.start}, {c.stop}) in {name} fail their checksum")
            )
    for key, (e, c) in expected.items():
        if key not in f.entries:
            report.problems.append(
                Problem(e.path, f"elements [{c.start}, {c.stop}) are missing from {name}")
            )
    return digests


def verify(directory: str | os.PathLike[str], tag: str | None = None) -> VerifyReport:
    """Check ``index.json``, every shard file and every chunk's SHA-256.

    Reads every byte once, streaming (bounded memory). Missing directories and tags raise
    :class:`~funczero.checkpoint.CheckpointNotFoundError`; everything else wrong with the
    checkpoint (``latest`` included) is reported in the returned :class:`VerifyReport`.
    """
    try:
        tag_dir = resolve(directory, tag)
    except CorruptCheckpointError as e:  # a damaged 'latest': nothing further to check
        report = VerifyReport(Path(directory))
        report.problems.extend(Problem(LATEST_NAME, p) for p in e.problems)
        return report
    report = VerifyReport(tag_dir)
    try:
        index = read_index(tag_dir)
    except CorruptCheckpointError as e:
        report.problems.extend(Problem(INDEX_NAME, p) for p in e.problems)
        return report
    for name in index.files:
        _check_file(tag_dir, index, name, report)
    known = set(index.files) | {INDEX_NAME}
    for child in sorted(tag_dir.iterdir()):
        if child.name not in known:
            report.notes.append(f"{child.name} is not part of the checkpoint (ignored)")
    return report
