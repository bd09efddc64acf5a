"""Chunks: which flat element ranges of each tensor a rank stores, and each file's record of them.

On disk, ``shard`` and ``replicated`` leaves are stored the same way: rank ``r`` writes the
unpadded 1-D chunk ``ShardSpec(...).bounds(r)`` of the flattened global tensor (a replicated
tensor is thus written once in total, split across ranks, with no funnel through rank 0).
``per_rank`` leaves (the RNG) are written whole by every rank. Reading any layout at any world
size is then slicing flat element ranges out of the chunks that overlap it.

Each shard file also records, in its header's ``__metadata__["tensors"]`` (format version 2),
the global shape and element range of every chunk it holds, so an ``index.json`` edited on its
own (a tensor reshaped, a chunk reused by another path) no longer matches its files.

Example:
    >>> list(overlaps([(0, 3), (3, 6), (6, 9), (9, 10)], 2, 7))
    [(0, 2, 3), (1, 3, 6), (2, 6, 7)]
    >>> records_json({"w": ((2, 2), 0, 4)})
    '{"w":{"shape":[2,2],"start":0,"stop":4}}'
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch

from funczero.checkpoint.entry import Chunk, TensorEntry
from funczero.checkpoint.format import MAX_DIM, MAX_NDIM
from funczero.checkpoint.safe_io import loads_json

__all__ = [
    "RECORDS_KEY",
    "Record",
    "find_aliases",
    "header_limit",
    "local_chunk",
    "overlaps",
    "parse_records",
    "record_mismatch",
    "records_json",
]

RECORDS_KEY = "tensors"
"""The ``__metadata__`` key of a shard file's chunk records (format version 2)."""

Record = tuple[tuple[int, ...], int, int]
"""``(global shape, start, stop)`` of one chunk, as its file records it."""


def overlaps(ranges: Sequence[tuple[int, int]], a: int, b: int) -> Iterator[tuple[int, int, int]]:
    """Yield ``(i, lo, hi)`` for each sorted range ``i`` overlapping ``[a, b)`` in ``[lo, hi)``."""
    for i, (s, e) in enumerate(ranges):
        lo, hi = max(a, s), min(b, e)
        if lo < hi:
            yield i, lo, hi


def local_chunk(entry: TensorEntry, leaf: torch.Tensor, world_size: int, rank: int) -> torch.Tensor:
    """The 1-D piece of ``leaf`` this rank stores: its unpadded chunk, or all of it (per_rank)."""
    flat = leaf.detach().reshape(-1)
    if entry.placement == "per_rank":
        return flat
    start, stop = entry.spec(world_size).bounds(rank)
    if entry.placement == "shard":
        return flat[: stop - start]
    return flat[start:stop]


def _storage_key(t: torch.Tensor) -> tuple[Any, ...] | None:
    if t.numel() == 0:
        return None
    return (
        t.device,
        t.untyped_storage().data_ptr(),
        t.storage_offset(),
        tuple(t.shape),
        tuple(t.stride()),
        t.dtype,
    )


def find_aliases(entries: Iterable[tuple[TensorEntry, torch.Tensor]]) -> dict[str, str]:
    """Leaves that are the same tensor as another leaf: path -> stored path (master preferred)."""
    groups: dict[Any, list[str]] = {}
    for entry, leaf in entries:
        key = _storage_key(leaf)
        if key is not None:
            groups.setdefault(key, []).append(entry.path)
    out: dict[str, str] = {}
    for paths in groups.values():
        if len(paths) > 1:
            owner = next((p for p in paths if p.startswith("master/")), paths[0])
            out.update({p: owner for p in paths if p != owner})
    return out


def records_json(records: Mapping[str, Record]) -> str:
    """A file's chunk records as stored in its ``__metadata__`` (compact JSON)."""
    return json.dumps(
        {k: {"shape": list(shape), "start": a, "stop": b} for k, (shape, a, b) in records.items()},
        separators=(",", ":"),
    )


def _size(x: Any) -> bool:
    return type(x) is int and 0 <= x <= MAX_DIM


def parse_records(metadata: Mapping[str, str]) -> dict[str, Record]:
    """The chunk records of a shard file's ``__metadata__``; ``ValueError`` if malformed."""
    text = metadata.get(RECORDS_KEY)
    if text is None:
        raise ValueError(f"its header has no __metadata__[{RECORDS_KEY!r}] (format version 2)")
    raw = loads_json(text, max_depth=None)  # validated record by record
    if not isinstance(raw, dict):
        raise ValueError(f"__metadata__[{RECORDS_KEY!r}] is not a JSON object")  # noqa: TRY004
    out: dict[str, Record] = {}
    for key, r in raw.items():
        ok = (
            isinstance(r, dict)
            and set(r) == {"shape", "start", "stop"}
            and isinstance(r["shape"], list)
            and len(r["shape"]) <= MAX_NDIM
            and all(_size(d) for d in r["shape"])
            and _size(r["start"])
            and _size(r["stop"])
        )
        if not ok:
            raise ValueError(f"__metadata__[{RECORDS_KEY!r}] has a malformed record for {key!r}")
        out[key] = (tuple(r["shape"]), r["start"], r["stop"])
    return out


def record_mismatch(records: Mapping[str, Record], entry: TensorEntry, chunk: Chunk) -> str | None:
    """What differs between a chunk as the index describes it and as its file records it."""
    got = records.get(chunk.key)
    want = (entry.shape, chunk.start, chunk.stop)
    if got == want:
        return None
    if got is None:
        return f"{chunk.file} records no chunk {chunk.key!r}"
    return (
        f"the index says shape {list(want[0])} elements [{want[1]}, {want[2]}), but "
        f"{chunk.file} records shape {list(got[0])} elements [{got[1]}, {got[2]}) for "
        f"{chunk.key!r}: index.json was edited or belongs to other files"
    )


def header_limit(chunks: Iterable[tuple[TensorEntry, Chunk]]) -> int:
    """The largest safetensors header a shard file holding ``chunks`` can have, in bytes.

    Each chunk costs its safetensors entry and its record, both with the key JSON-escaped
    (up to 6 bytes a character, escaped once more inside the metadata string); 64 KiB cover
    the rest of the metadata. A larger header is refused before it is read.
    """
    return 65_536 + sum(512 + 18 * len(c.key) + 48 * len(e.shape) for e, c in chunks)
